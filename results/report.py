"""Rebuild the small-scale reproduction's table (in results/README.md) and plot from the runs under results/.

    python results/report.py

Each run is a folder results/GROUP/seedK/ holding run.json (the flags, the seed, the wall times, the row it is
compared with), train.py's log.jsonl and probe.py's probe.json. A run probed with --untrained also gives its
"untrained" row (one per architecture) its seed. Add runs with results/run.py, then rerun this.

The "against" column compares the last block's top-1 with the reference row's: the difference of the means, and
"within noise" when it is under twice its standard error, sqrt(s1^2 / n1 + s2^2 / n2), where a row with one seed
takes the largest seed-to-seed std of the rows that have several.
"""
import glob
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from blockwise import parse_blocks  # noqa: E402  (the --blocks grammar, written once)
from train import get_args  # noqa: E402  (train.py's own flag parser reads each run's flags)

README = os.path.join(HERE, "README.md")
BEGIN, END = "<!-- results table: begin -->", "<!-- results table: end -->"


def load_runs():
    groups = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*", "seed*", "run.json"))):
        run = json.load(open(path))
        probe = json.load(open(os.path.join(os.path.dirname(path), "probe.json")))
        g = groups.setdefault(run["group"], dict(flags=run["flags"], order=run.get("order", 99), runs=[],
                                                 versus=run.get("versus")))
        g["runs"].append(dict(seed=run["seed"], blocks=probe["blocks"], minutes=run["minutes"], flags=run["flags"]))
        if "untrained" in probe:
            name = run.get("untrained_group", "untrained")
            u = groups.setdefault(name, dict(flags="(initial weights of the runs above)", order=run.get(
                "untrained_order", 0), runs=[], versus=None))
            u["runs"].append(dict(seed=run["seed"], blocks=probe["untrained"], minutes=None, flags=run["flags"]))
    return dict(sorted(groups.items(), key=lambda g: g[1]["order"]))


def by_stage(run, key):
    """A metric by the stage each block ends at, read from the run's --blocks: `1,234` ends at 1 and 4; merged
    and LoCo runs have 3 blocks, ending at 2, 3, 4."""
    blocks = parse_blocks(get_args(run["flags"].split()).blocks)
    return {block[-1]: b[key] for block, b in zip(blocks, run["blocks"])}


def cell(values):
    if not values:
        return ""
    return f"{np.mean(values):.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def last(group):
    return [by_stage(r, "top1")[4] for r in group["runs"]]


def against(group, groups, spread):
    """The last block's difference with the reference row, or that it is within noise (see the docstring)."""
    ref = groups.get(group["versus"])
    if ref is None:
        return ""
    a, b = last(group), last(ref)
    se = np.sqrt(sum((np.std(v) if len(v) > 1 else spread) ** 2 / len(v) for v in (a, b)))
    diff = np.mean(a) - np.mean(b)
    verdict = f"{diff:+.1f}" if abs(diff) >= 2 * se else f"within noise ({diff:+.1f})"
    return f"{verdict} vs {group['versus']}"


def table(groups):
    spread = max([np.std(last(g)) for g in groups.values() if len(g["runs"]) > 1] or [0.0])
    rows = ["| run | flags | seeds | block 1 | block 2 | block 3 | block 4 | 20-NN, block 4 | against (block 4) "
            "| minutes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, g in groups.items():
        stages = [by_stage(r, "top1") for r in g["runs"]]
        knn = [by_stage(r, "knn").get(4) for r in g["runs"]]
        minutes = [r["minutes"] for r in g["runs"] if r["minutes"]]
        rows.append(f"| {name} | `{g['flags']}` | {len(g['runs'])} | " +
                    " | ".join(cell([s[k] for s in stages if k in s]) for k in (1, 2, 3, 4)) +
                    f" | {cell([v for v in knn if v is not None])} | {against(g, groups, spread)} | {cell(minutes)} |")
    return "\n".join(rows), spread


def plot(groups, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    plt.figure(figsize=(9, 6.5))
    for i, (name, g) in enumerate(groups.items()):
        stages = [by_stage(r, "top1") for r in g["runs"]]
        xs = sorted(stages[0])
        ys = [np.mean([s[x] for s in stages]) for x in xs]
        plt.errorbar(xs, ys, yerr=[np.std([s[x] for s in stages]) for x in xs], marker="os^Dv"[i % 5], capsize=3,
                     label=name, color=plt.cm.tab20(i % 20), linestyle=("-", "--", ":")[i // 20 % 3])
    plt.xticks([1, 2, 3, 4])
    plt.xlabel("block (the stage it ends at)")
    plt.ylabel("linear probe top-1 (%), Fashion-MNIST test")
    plt.legend(fontsize=6, ncol=2)
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(path, dpi=110)


def main():
    groups = load_runs()
    text, spread = table(groups)
    print(text)
    print(f"largest seed-to-seed std of the last block: {spread:.2f}")
    readme = open(README).read()
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN)
        readme = head + BEGIN + "\n" + text + "\n" + END + rest.split(END)[1]
        open(README, "w").write(readme)
    plot(groups, os.path.join(HERE, "accuracy_vs_depth.png"))


if __name__ == "__main__":
    main()
