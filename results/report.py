"""Rebuild the README's small-scale reproduction table and plot from the runs under results/.

    python results/report.py            # rewrites the table in README.md and results/accuracy_vs_depth.png

Each run is a folder results/GROUP/seedK/ holding run.json (the flags, the seed and the wall times), and
train.py's log.jsonl and probe.py's probe.json. A run probed with --untrained also gives the "untrained"
group its seed. Add runs by training and probing into such folders (see the README), then rerun this.
"""
import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")
BEGIN, END = "<!-- results table: begin -->", "<!-- results table: end -->"


def load_runs():
    groups = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*", "seed*", "run.json"))):
        run = json.load(open(path))
        probe = json.load(open(os.path.join(os.path.dirname(path), "probe.json")))
        groups.setdefault(run["group"], dict(flags=run["flags"], order=run.get("order", 99), runs=[]))
        groups[run["group"]]["runs"].append(dict(seed=run["seed"], blocks=probe["blocks"], minutes=run["minutes"]))
        if "untrained" in probe:
            groups.setdefault("untrained", dict(flags="(initial weights of the blockwise runs)", order=0, runs=[]))
            groups["untrained"]["runs"].append(dict(seed=run["seed"], blocks=probe["untrained"], minutes=None))
    return dict(sorted(groups.items(), key=lambda g: g[1]["order"]))


def by_stage(blocks, key):
    """top-1 by the ResNet stage a block ends at (merged and LoCo runs have 3 blocks, ending at 2, 3, 4)."""
    n = len(blocks)
    return {stage: b[key] for stage, b in zip(range(5 - n, 5), blocks)}


def cell(values):
    if not values:
        return ""
    return f"{np.mean(values):.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def table(groups):
    rows = ["| run | flags | seeds | block 1 | block 2 | block 3 | block 4 | 20-NN, block 4 | minutes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, g in groups.items():
        stages = [by_stage(r["blocks"], "top1") for r in g["runs"]]
        knn = [by_stage(r["blocks"], "knn").get(4) for r in g["runs"]]
        minutes = [r["minutes"] for r in g["runs"] if r["minutes"]]
        rows.append(f"| {name} | `{g['flags']}` | {len(g['runs'])} | " +
                    " | ".join(cell([s[k] for s in stages if k in s]) for k in (1, 2, 3, 4)) +
                    f" | {cell([v for v in knn if v is not None])} | {cell(minutes)} |")
    return "\n".join(rows)


def plot(groups, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    plt.figure(figsize=(8, 5.5))
    for i, (name, g) in enumerate(groups.items()):
        stages = [by_stage(r["blocks"], "top1") for r in g["runs"]]
        xs = sorted(stages[0])
        ys = [np.mean([s[x] for s in stages]) for x in xs]
        plt.errorbar(xs, ys, yerr=[np.std([s[x] for s in stages]) for x in xs], marker="os^Dv"[i % 5], capsize=3,
                     label=name, color=plt.cm.tab20(i % 20), linestyle="-" if i < 10 else "--")
    plt.xticks([1, 2, 3, 4])
    plt.xlabel("block (ResNet stage it ends at)")
    plt.ylabel("linear probe top-1 (%), Fashion-MNIST test")
    plt.legend(fontsize=7, ncol=2)
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(path, dpi=110)


def main():
    groups = load_runs()
    text = table(groups)
    print(text)
    readme = open(README).read()
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN)
        readme = head + BEGIN + "\n" + text + "\n" + END + rest.split(END)[1]
        open(README, "w").write(readme)
    plot(groups, os.path.join(HERE, "accuracy_vs_depth.png"))


if __name__ == "__main__":
    main()
