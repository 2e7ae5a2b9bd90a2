"""Train and probe one run of the small-scale reproduction (results/README.md) into results/GROUP/seedK/.

    python results/run.py "blockwise: LSP" 0 --order 5 --versus "blockwise: 1x1 CbE, no noise" -- \
        --pooling lsp --noise 0
    python results/report.py          # then rebuild the table and the plot

The run trains with the protocol flags below plus the flags after `--`, then probes every block (--fast: the
frozen features of all 60,000 training images, 30 epochs of SGD, top-1 on the 10,000 test images), and writes
run.json (group, flags, seed, minutes) beside train.py's log.jsonl and probe.py's probe.json.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROTOCOL = ("--dataset fashion-mnist --data data --limit 10000 --arch resnet18 --image-size 32 --projector 512-512-512 "
            "--head-dim 512 --batch-size 256 --lr 0.2 --warmup-epochs 0 --workers 2 --lars-eta 0.02 --crop-scale 0.3 "
            "--epochs 6 --monitor-images 2000").split()
PROBE = "--dataset fashion-mnist --data data --image-size 32 --fast --epochs 30 --seed 0".split()


def folder(group):
    """The run's folder: the one that already holds this group's runs, else one named after the group."""
    for name in sorted(os.listdir(HERE)):
        for seed in glob.glob(os.path.join(HERE, name, "seed*", "run.json")):
            if json.load(open(seed))["group"] == group:
                return name
    return re.sub(r"[^A-Za-z0-9]+", "_", group)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("group", help="the table's row, e.g. 'blockwise: LSP'")
    p.add_argument("seed", type=int)
    p.add_argument("--order", type=float, default=99, help="the row's place in the table")
    p.add_argument("--versus", help="the row this one is compared with (report.py's 'against' column)")
    p.add_argument("--untrained", default="", help="also probe the untrained network, for this row (e.g. 'untrained')")
    p.add_argument("--untrained-order", type=float, default=0, help="that row's place in the table")
    p.add_argument("--protocol", default=" ".join(PROTOCOL), help="the protocol's training flags")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, flags = p.parse_args(argv[:cut]), argv[cut + 1:]  # after --: the run's own train.py flags
    out = os.path.join(HERE, folder(args.group), f"seed{args.seed}")
    t0 = time.time()
    subprocess.run([sys.executable, "train.py", *args.protocol.split(), *flags, "--seed", str(args.seed),
                    "--out", out], cwd=ROOT, check=True)
    t1 = time.time()
    subprocess.run([sys.executable, "probe.py", os.path.join(out, "checkpoint.pth"), *PROBE,
                    *(["--untrained"] if args.untrained else [])], cwd=ROOT, check=True)
    run = dict(group=args.group, order=args.order, seed=args.seed, flags=" ".join(flags), versus=args.versus,
               **(dict(untrained_group=args.untrained, untrained_order=args.untrained_order) if args.untrained else {}),
               minutes=round((time.time() - t0) / 60, 1), train_s=round(t1 - t0), probe_s=round(time.time() - t1))
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(run, f)


if __name__ == "__main__":
    main()
