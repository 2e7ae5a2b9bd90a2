"""Linear probe of every block of a pre-trained model: accuracy vs depth (Fig. 4 right).

    python probe.py runs/demo/checkpoint.pth --dataset fashion-mnist --data data --fast
    torchrun --nproc_per_node=8 probe.py runs/in1k/checkpoint.pth --data /imagenet      # released protocol
    python probe.py CKPT --data /imagenet --corruptions /imagenet-c                     # App. C
    python probe.py CKPT --data /imagenet --diagnostics                                 # Fig. 8

The network stays frozen in eval mode. Block k's feature is the output of its pooling head (as the
authors' evaluation) or, with --features trunk, the global average pool of the block's output.
One linear classifier per block is trained on top, all in the same pass. Results go to OUT/probe.json, written
as each part finishes (the trained network, the untrained one, corruptions, diagnostics).
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import bookkeeping
import distributed
import losses
from augment import TwoViews, normalize
import vit
from blockwise import ARCHS, POOLINGS
from cli import (COUNT, POSITIVE, POSITIVE_INT, SEED, Abort, Parser, Stopped, Ticker, quiet_worker, raise_on_signals,
                 run)
from data import DATASETS, ImageFolder, Seeded, dataset, plain_transform, probe_transforms
from evaluation import block_features, features, knn


def get_args(argv=None):
    p = Parser(__doc__)
    a = p.add_argument
    a("checkpoint", help="checkpoint.pth written by train.py")
    a("--data", default="./data", help="dataset root, as train.py")
    a("--dataset", default="folder", choices=DATASETS)
    a("--limit", type=COUNT, default=0, help="probe with N training images, balanced over the classes (0 = all)")
    a("--image-size", type=POSITIVE_INT, help="default: the size the checkpoint was trained at")
    a("--blocks-to-probe", default="", help="1-based blocks to probe, e.g. 4 (default: all)")
    a("--features", default="head", choices=("head", "trunk"), help="pooling-head output or global average pool")
    a("--fast", action="store_true", help="features extracted once without augmentation and cached; adds kNN")
    a("--untrained", action="store_true", help="also probe the network train.py started this run from (its seed, "
      "its --init weights) and print both, with the difference per block")
    a("--epochs", type=POSITIVE_INT, default=100, help="released protocol: 100")
    a("--batch-size", type=POSITIVE_INT, default=256, help="global batch size")
    a("--lr", type=POSITIVE, default=0.1, help="SGD lr, cosine per epoch (their eval script: 0.1)")
    a("--weight-decay", type=float, default=1e-6)
    a("--knn", type=POSITIVE_INT, default=20, help="neighbours of the kNN classifier (--fast)")
    a("--knn-temperature", type=POSITIVE, default=1.0, help="votes weighted by exp(cos / T): 1 here, 0.07 in DINO")
    a("--corruptions", default="", help="ImageNet-C style root/<corruption>/<severity>/<class>/<image> (App. C)")
    a("--diagnostics", action="store_true", help="cross-correlation of two views' pooled features per block (Fig. 8)")
    a("--arch", choices=ARCHS + tuple(vit.VITS), help="expected architecture (checked against the checkpoint)")
    a("--blocks", help="expected block split (checked against the checkpoint)")
    a("--pooling", choices=tuple(dict.fromkeys(POOLINGS + vit.POOLINGS)), help="expected pooling head (checked "
      "against the checkpoint)")
    a("--workers", type=COUNT, default=min(8, os.cpu_count()), help="data loading processes per process")
    a("--seed", type=SEED, default=0, help="seed of the probes' initialisation and of the data order")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: a GPU if one is usable")
    a("--timeout", type=POSITIVE, default=10.0, help="minutes a process waits for the others before stopping")
    a("--out", default="", help="directory for probe.json (default: the checkpoint's)")
    return p.parse_args(argv)


def load_frozen(path, args, device, untrained=False):
    """Rebuild the network a checkpoint was trained with (without projectors) and freeze it. `untrained`: the
    network as train.py started it, before any step (the run's seed, its --init weights): the baseline of every
    accuracy. Returns the model and the checkpoint's training flags."""
    ckpt = bookkeeping.load(path, needs=("config", "model"))
    cfg, run_args = dict(ckpt["config"], projector_widths=None), ckpt.get("args", {})
    for key in ("arch", "blocks", "pooling"):
        if getattr(args, key, None) is not None and getattr(args, key) != cfg[key]:
            raise Abort(f"{path} holds {key} {cfg[key]!r}, not the {getattr(args, key)!r} asked for")
    frozen = [int(k) - 1 for k in run_args.get("frozen", "").split(",") if k]
    model = bookkeeping.network(cfg, run_args.get("seed", 0), frozen, run_args.get("init", "") if untrained else "")
    if not untrained:
        state = {k: v for k, v in ckpt["model"].items() if not k.startswith("projectors.")}
        try:
            model.load_state_dict(state)  # strict: a partial load would probe a half-random network
        except RuntimeError as e:
            raise Abort(f"{path} does not match its own config: {str(e).splitlines()[1].strip()}") from None
    return model.to(device).eval().requires_grad_(False), run_args


def loader(ds, batch, args, shuffle):
    """This process's share of a dataset. Shuffled (probe training): the global batches are the same for any
    number of processes. In order (evaluation): every world-th image, each image once, so counts are exact."""
    if not shuffle:
        part = torch.utils.data.Subset(ds, range(distributed.rank(), len(ds), distributed.world()))
        return torch.utils.data.DataLoader(part, batch, num_workers=args.workers, worker_init_fn=quiet_worker), None
    sampler = torch.utils.data.DistributedSampler(ds, distributed.world(), distributed.rank(), seed=args.seed)
    return torch.utils.data.DataLoader(ds, batch, sampler=sampler, num_workers=args.workers,
                                       worker_init_fn=quiet_worker), sampler


class Probes(nn.Module):
    """One Linear(dim, classes) per probed block, initialised N(0, 0.01) with zero bias (released eval)."""

    def __init__(self, dims, classes):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(d, classes) for d in dims)
        for fc in self.fcs:
            fc.weight.data.normal_(0, 0.01)
            fc.bias.data.zero_()

    def forward(self, feats):
        return [fc(f) for fc, f in zip(self.fcs, feats)]


def sgd_epochs(probes, batches, args, steps, average=True):
    """SGD with momentum 0.9, cosine decay per epoch, `steps` batches an epoch; `average`: gradients averaged
    over the processes (each holds a share of the batch)."""
    opt = torch.optim.SGD(probes.parameters(), args.lr, momentum=0.9, weight_decay=args.weight_decay)
    tick = Ticker("linear probes", args.epochs * steps, "steps")
    for epoch in range(args.epochs):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        for i, (feats, y) in enumerate(batches(epoch)):
            loss = sum(F.cross_entropy(logits, y) for logits in probes(feats))
            opt.zero_grad()
            loss.backward()
            if average:
                for p in probes.parameters():
                    distributed.all_reduce(p.grad)
                    p.grad /= distributed.world()
            opt.step()
            tick(epoch * steps + i + 1, lambda: f"epoch {epoch + 1}/{args.epochs}, loss {loss.item():.3f}")


@torch.no_grad()
def accuracy(probes, batches, reduce=True):
    """Top-1 and top-5 (%) per block; `reduce`: counts summed over the processes (each holds a share)."""
    total = 0
    for feats, y in batches:
        hits = [[(l.topk(min(k, l.shape[1]), 1).indices == y[:, None]).any(1).sum() for k in (1, 5)]
                for l in probes(feats)]
        total = total + torch.stack([*sum(hits, []), torch.tensor(len(y), device=y.device)]).double()
    if reduce:
        distributed.all_reduce(total)
    top = (100 * total[:-1] / total[-1]).view(-1, 2).tolist()
    return [dict(top1=a, top5=b) for a, b in top]


def fast_probe(model, train_ds, val_ds, probed, args, device):
    """--fast: cached features, standardised with the training set's statistics (so one lr fits every
    block), one linear probe per block, plus kNN. Returns the per-block results and the probes with their
    preprocessing, for the corruption pass."""
    val_t = probe_transforms(args.image_size)[1]
    (tr_f, tr_y), (va_f, va_y) = (features(model, Seeded(ds, val_t), probed, args.features, args.batch_size,
                                           args.workers) for ds in (train_ds, val_ds))
    mean, std = [f.mean(0) for f in tr_f], [f.std(0) + 1e-6 for f in tr_f]  # training features only

    def standardised(fs):
        return [((f.to(device) - m) / s) for f, m, s in zip(fs, mean, std)]
    tr_n, va_n = standardised(tr_f), standardised(va_f)

    def batches(epoch):  # the global batch on every process: all compute the same
        order = torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in range(0, len(order), args.batch_size):
            yield [f[order[i:i + args.batch_size]] for f in tr_n], tr_y[order[i:i + args.batch_size]]
    probes = new_probes([f.shape[1] for f in tr_f], train_ds.num_classes, args, device)
    sgd_epochs(probes, batches, args, -(-len(tr_y) // args.batch_size), average=False)
    acc = accuracy(probes, (([f[i:i + 1024] for f in va_n], va_y[i:i + 1024]) for i in range(0, len(va_y), 1024)),
                   reduce=False)
    blocks = [dict(block=k + 1, **a, knn=knn(f, tr_y, v, va_y, args.knn, train_ds.num_classes, args.knn_temperature))
              for k, a, f, v in zip(probed, acc, tr_f, va_f)]
    return blocks, probes, standardised


def full_probe(model, train_ds, val_ds, probed, args, device):
    """The released protocol: probes trained on augmented images through the frozen network, new augmentations
    every epoch."""
    train_t, val_t = probe_transforms(args.image_size)
    dims = [f.shape[1] for f in next(augmented(model, val_ds, val_t, False, 0, probed, args, device))[0]]
    probes = new_probes(dims, train_ds.num_classes, args, device)
    local_bs = max(1, args.batch_size // distributed.world())
    steps = -(-len(train_ds) // (local_bs * distributed.world()))
    sgd_epochs(probes, lambda epoch: augmented(model, train_ds, train_t, True, epoch, probed, args, device), args,
               steps)
    val = augmented(model, val_ds, val_t, False, 0, probed, args, device)
    return [dict(block=k + 1, **a) for k, a in zip(probed, accuracy(probes, val))], probes, lambda fs: fs


def augmented(model, ds, transform, shuffle, epoch, probed, args, device):
    """This process's batches of (features of the probed blocks, labels), the images drawn through `transform` with
    the augmentations of `epoch` (Seeded: new ones every epoch, the same for any number of processes)."""
    seeded = Seeded(ds, transform, args.seed)
    seeded.epoch = epoch
    dl, sampler = loader(seeded, max(1, args.batch_size // distributed.world()), args, shuffle)
    if sampler is not None:
        sampler.set_epoch(epoch)
    for x, y in dl:
        yield block_features(model, x.to(device), args.features, probed), y.to(device)


def new_probes(dims, classes, args, device):
    torch.manual_seed(args.seed)
    return Probes(dims, classes).to(device)


def corruption_sets(root):
    """Walk an ImageNet-C style tree: root/<corruption>/<severity>/<class>/<image>. App. C: the images are
    the benchmark's 224 px already, so they are fed as they are, only normalised (no resize, no crop)."""
    if not os.path.isdir(root):
        raise Abort(f"--corruptions {root} is not a directory")
    for corruption in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        for severity in sorted(os.listdir(os.path.join(root, corruption))):
            path = os.path.join(root, corruption, severity)
            if os.path.isdir(path) and not severity.startswith("."):
                yield corruption, severity, ImageFolder(path, plain_transform())


def corruption_errors(model, probes, preprocess, probed, args, device):
    """App. C, Fig. 15: error = 100 - top-1 of the trained probes on each corrupted copy of the validation
    set; per corruption, the mean and std over its severities (last probed block), and their mean."""
    errors = {}
    for corruption, severity, ds in corruption_sets(args.corruptions):
        dl, _ = loader(ds, max(1, args.batch_size // distributed.world()), args, shuffle=False)
        acc = accuracy(probes, ((preprocess(block_features(model, x.to(device), args.features, probed)), y.to(device))
                                for x, y in dl))
        errors.setdefault(corruption, {})[severity] = [100 - a["top1"] for a in acc]
    summary = {c: dict(mean=float(np.mean([e[-1] for e in s.values()])), std=float(np.std([e[-1] for e in s.values()])))
               for c, s in errors.items()}
    return dict(corruptions=errors, corruption_summary=summary,
                corruption_mean_error=float(np.mean([v["mean"] for v in summary.values()])))


@torch.no_grad()
def stage_features(model, x):
    """The global average pool of the output of every stage 1-4, whatever the block split (Fig. 8); in evaluation,
    Algorithm 1 is the plain forward of the trunk."""
    feats = []
    for s in (1, 2, 3, 4):
        x = model.enter(x, s, 0.0)  # a ViT's first stage embeds the image
        for unit in model.units(s):
            x = unit(x)
        feats.append(model.pool_trunk(x).float())
    return feats


@torch.no_grad()
def diagnostics(model, ds, args, device, batches=4):
    """Fig. 8-9: for each ResNet stage 1-4 (any block split, so that an end-to-end model gives the reference
    curve), the cross-correlation matrix C of Eq. (1) between two views' globally pooled stage outputs (no head,
    no projector) over the global batch, averaged over a few batches; summarised by the mean and quantiles
    of its diagonal and off-diagonal entries."""
    dl, _ = loader(ds, max(1, args.batch_size // distributed.world()), args, shuffle=True)
    n, per_stage = min(batches, len(dl)), [0] * 4
    for i, ((y1, y2), _) in zip(range(n), dl):
        f1, f2 = (stage_features(model, normalize(y.to(device))) for y in (y1, y2))
        for s, (a, b) in enumerate(zip(f1, f2)):
            c = losses.all_reduce(losses.standardize(a).T @ losses.standardize(b)) / (len(a) * distributed.world())
            per_stage[s] = per_stage[s] + c / n
    out = []
    for s, c in enumerate(per_stage):
        on, off = c.diagonal(), c[~torch.eye(len(c), dtype=torch.bool, device=c.device)]
        q = torch.tensor([0.1, 0.5, 0.9], device=c.device)
        out.append(dict(stage=s + 1, on_mean=on.mean().item(), on_q10_50_90=on.quantile(q).tolist(),
                        off_mean=off.mean().item(), off_abs_mean=off.abs().mean().item(),
                        off_q10_50_90=off.quantile(q).tolist()))
    return out


def table(results):
    """The results so far as a table on stdout, with the untrained network beside, if probed."""
    metrics = [m for m in ("top1", "top5", "knn") if m in results["blocks"][0]]
    base = {b["block"]: b for b in results.get("untrained", [])}
    cols = [f"{m} {w}" for m in metrics for w in (("trained", "untrained", "diff") if base else ("",))]
    print("block " + " ".join(f"{c.strip():>15}" for c in cols))
    for b in results["blocks"]:
        row = [v for m in metrics for v in ((b[m], base[b["block"]][m], b[m] - base[b["block"]][m]) if base
                                             else (b[m],))]
        print(f"{b['block']:>5} " + " ".join(f"{v:15.2f}" for v in row))
    if "corruptions" in results:
        print(f"corruptions: mean error {results['corruption_mean_error']:.2f} "
              f"(block {results['blocks'][-1]['block']})")


def plot(results, path):
    """Accuracy vs depth next to probe.json, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for name, blocks in (("trained", results["blocks"]), ("untrained", results.get("untrained", []))):
        if blocks:
            plt.plot([b["block"] for b in blocks], [b["top1"] for b in blocks], "o-", label=name)
    plt.xlabel("block")
    plt.ylabel("linear probe top-1 (%)")
    plt.legend()
    plt.savefig(path.replace(".json", ".png"), dpi=120)
    plt.close()


def check_args(args):
    """What argparse cannot check alone, refused before anything runs, naming the flag."""
    if args.corruptions and not any(ds for _, _, ds in corruption_sets(args.corruptions)):
        raise Abort(f"--corruptions {args.corruptions}: no <corruption>/<severity>/<class>/<image> inside")
    try:
        return [int(k) - 1 for k in args.blocks_to_probe.split(",") if k]
    except ValueError:
        raise Abort(f"--blocks-to-probe {args.blocks_to_probe}: expected block numbers like 1,4") from None


def main(args):
    probed = check_args(args)
    device = distributed.setup(args.device, args.timeout)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    model, run_args = load_frozen(args.checkpoint, args, device)
    trained_at = run_args.get("image_size", 224)
    if args.image_size and args.image_size != trained_at and run_args.get("arch") in vit.VITS:
        raise Abort(f"--image-size {args.image_size}: this ViT was trained at {trained_at} px, and its "
                    f"position embeddings fit that size only; leave --image-size out (or pass {trained_at})")
    args.image_size = args.image_size or trained_at
    probed = probed or list(range(len(model.blocks)))
    if not set(probed) <= set(range(len(model.blocks))):
        raise Abort(f"--blocks-to-probe {args.blocks_to_probe}: the model has blocks 1-{len(model.blocks)}")
    out = os.path.join(out_dir, "probe.json")
    with bookkeeping.prepare_out(out_dir, "probe", lock=".probe.lock"):
        raise_on_signals()
        try:
            return probe_all(model, probed, args, device, out)
        except Stopped as e:
            done = json.load(open(out)) if os.path.exists(out) else {}
            parts = [p for p in ("blocks", "untrained", "corruptions", "diagnostics") if p in done]
            raise Stopped(e.args[0], f"{out} holds the parts that were finished ({', '.join(parts)})" if parts
                          else "nothing was finished, nothing written") from None


def probe_all(model, probed, args, device, out):
    """Every part that was asked for, each written to probe.json as soon as it is done."""
    train_ds = dataset(args.dataset, args.data, train=True, limit=args.limit, seed=args.seed)
    val_ds = dataset(args.dataset, args.data, train=False)
    protocol = fast_probe if args.fast else full_probe
    results = dict(checkpoint=args.checkpoint, features=args.features, fast=args.fast, image_size=args.image_size,
                   env=bookkeeping.environment())
    results["blocks"], probes, preprocess = protocol(model, train_ds, val_ds, probed, args, device)
    save_json(results, out)
    if args.untrained:
        untrained = load_frozen(args.checkpoint, args, device, untrained=True)[0]
        results["untrained"] = protocol(untrained, train_ds, val_ds, probed, args, device)[0]
        save_json(results, out)
    if args.corruptions:
        results.update(corruption_errors(model, probes, preprocess, probed, args, device))
        save_json(results, out)
    if args.diagnostics:
        two_views = Seeded(train_ds, TwoViews(args.image_size), args.seed)
        results["diagnostics"] = diagnostics(model, two_views, args, device)
        save_json(results, out)
    if distributed.rank() == 0:
        plot(results, out)
    return results


def save_json(results, path):
    """The results table on stdout, then probe.json, atomically (rank 0): a failed write loses nothing printed."""
    if distributed.rank() == 0:
        table(results)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise Abort(f"cannot write {path} ({e.strerror})") from None


if __name__ == "__main__":
    run(main, get_args(), "probe.py", interrupted="probe.json holds the parts that were finished")
