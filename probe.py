"""Linear probe of every block of a pre-trained model: accuracy vs depth (Fig. 4 right).

    python probe.py runs/demo/checkpoint.pth --dataset fashion-mnist --data data --fast
    torchrun --nproc_per_node=8 probe.py runs/in1k/checkpoint.pth --data /imagenet      # released protocol
    python probe.py CKPT --data /imagenet --corruptions /imagenet-c                     # App. C
    python probe.py CKPT --data /imagenet --diagnostics                                 # Fig. 8

The network stays frozen in eval mode. Block k's feature is the output of its pooling head (as the
authors' evaluation) or, with --features trunk, the global average pool of the block's output.
One linear classifier per block is trained on top, all in the same pass. Results go to OUT/probe.json.
"""
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import losses
from blockwise import ARCHS, POOLINGS, BlockResNet
from cli import Abort, Parser, Ticker, one_line, quiet_worker, run, setup_distributed
from data import DATASETS, ImageFolder, Seeded, TwoViews, dataset, normalize, plain_transform, probe_transforms


def get_args(argv=None):
    p = Parser(__doc__)
    a = p.add_argument
    a("checkpoint", help="checkpoint.pth written by train.py")
    a("--data", default="./data", help="dataset root, as train.py")
    a("--dataset", default="folder", choices=DATASETS)
    a("--limit", type=int, default=0, help="probe with N training images, balanced over the classes (0 = all)")
    a("--image-size", type=int, default=224)
    a("--blocks-to-probe", default="", help="1-based blocks to probe, e.g. 4 (default: all)")
    a("--features", default="head", choices=("head", "trunk"), help="pooling-head output or global average pool")
    a("--fast", action="store_true", help="features extracted once without augmentation and cached; adds kNN")
    a("--untrained", action="store_true", help="also probe the untrained network of the checkpoint's configuration "
      "(its initial weights, same seed) and print both, with the difference per block")
    a("--epochs", type=int, default=100, help="released protocol: 100")
    a("--batch-size", type=int, default=256, help="global batch size")
    a("--lr", type=float, default=0.1, help="SGD lr, cosine per epoch (their eval script: 0.1)")
    a("--weight-decay", type=float, default=1e-6)
    a("--knn", type=int, default=20, help="neighbours of the kNN classifier (--fast)")
    a("--corruptions", default="", help="ImageNet-C style root/<corruption>/<severity>/<class>/<image> (App. C)")
    a("--diagnostics", action="store_true", help="cross-correlation of two views' pooled features per block (Fig. 8)")
    a("--arch", choices=ARCHS, help="expected architecture (checked against the checkpoint)")
    a("--blocks", help="expected block split (checked against the checkpoint)")
    a("--pooling", choices=POOLINGS, help="expected pooling head (checked against the checkpoint)")
    a("--workers", type=int, default=min(8, os.cpu_count()), help="data loading processes per process")
    a("--seed", type=int, default=0)
    a("--timeout", type=float, default=10.0, help="minutes a process waits for the others before stopping")
    a("--out", default="", help="directory for probe.json (default: the checkpoint's)")
    return p.parse_args(argv)


def load_frozen(path, args, device, untrained=False):
    """Rebuild the network a checkpoint was trained with (without projectors) and freeze it. `untrained`:
    the same network as train.py started it, before any step (same seed): the baseline of every accuracy."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, empty, truncated, or not a torch file
        raise Abort(f"cannot read checkpoint {path}: {one_line(e)[:200]}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise Abort(f"{path} is not a train.py checkpoint (no model config in it)")
    cfg = dict(ckpt["config"], projector_widths=None)
    for old in ("checkpoint_heads", "checkpoint"):  # earlier releases kept the recompute mode here; eval ignores it
        cfg.pop(old, None)
    for key in ("arch", "blocks", "pooling"):
        if getattr(args, key) is not None and getattr(args, key) != cfg[key]:
            raise Abort(f"{path} holds {key} {cfg[key]!r}, not the {getattr(args, key)!r} asked for")
    torch.manual_seed(ckpt.get("args", {}).get("seed", 0))  # as train.py's build(): projectors are built last
    model = BlockResNet(**cfg)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("projectors.")}
    try:
        if not untrained:
            model.load_state_dict(state)  # strict: a partial load would probe a half-random network
    except RuntimeError as e:
        raise Abort(f"{path} does not match its own config: {str(e).splitlines()[1].strip()}") from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def block_features(model, x, kind, probed):
    """The features of the probed blocks for a batch of images, in fp32: each block's head output, or
    (kind "trunk") its global average pool. The network is frozen and in eval mode, so there is no noise;
    Algorithm 1 stops after the last probed block."""
    feats = {}
    for k, h in enumerate(model.blockwise(x)):
        if k in probed:
            feats[k] = model.heads[k](h) if kind == "head" else h.mean((2, 3))
        if k == max(probed):
            break
    return [feats[k].float() for k in probed]


@torch.no_grad()
def stage_features(model, x):
    """The global average pool of the output of every ResNet stage 1-4, whatever the block split (Fig. 8);
    in evaluation, Algorithm 1 is the plain forward of the trunk."""
    feats = []
    for s in (1, 2, 3, 4):
        for unit in model.units(s):
            x = unit(x)
        feats.append(x.mean((2, 3)).float())
    return feats


def loader(ds, batch, args, shuffle):
    """This rank's share of a dataset; shuffled, the global batches are the same for any number of ranks."""
    rank, world = (dist.get_rank() if dist.is_initialized() else 0), losses.world_size()
    sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=shuffle, seed=args.seed)
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
    over ranks (each rank holds a share of the batch)."""
    opt = torch.optim.SGD(probes.parameters(), args.lr, momentum=0.9, weight_decay=args.weight_decay)
    tick = Ticker("linear probes", args.epochs * steps, "steps")
    for epoch in range(args.epochs):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        for i, (feats, y) in enumerate(batches(epoch)):
            loss = sum(F.cross_entropy(logits, y) for logits in probes(feats))
            opt.zero_grad()
            loss.backward()
            if average and losses.world_size() > 1:
                for p in probes.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= losses.world_size()
            opt.step()
            tick(epoch * steps + i + 1, f"epoch {epoch + 1}/{args.epochs}, loss {loss.item():.3f}")


@torch.no_grad()
def accuracy(probes, batches, reduce=True):
    """Top-1 and top-5 (%) per block; `reduce`: counts summed over ranks (each rank holds a share)."""
    total = 0
    for feats, y in batches:
        hits = [[(l.topk(min(k, l.shape[1]), 1).indices == y[:, None]).any(1).sum() for k in (1, 5)]
                for l in probes(feats)]
        total = total + torch.tensor([*sum(hits, []), len(y)], dtype=torch.float64)
    if reduce and dist.is_initialized():
        dist.all_reduce(total)
    top = (100 * total[:-1] / total[-1]).view(-1, 2)
    return [dict(top1=a.item(), top5=b.item()) for a, b in top]


def gather_strided(t, n):
    """Rank r holds rows r, r + world, r + 2 world, ... of an n-row tensor; every rank gets all n rows, in order."""
    world = losses.world_size()
    if world == 1:
        return t
    padded = t.new_zeros(-(-n // world), *t.shape[1:])
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:n]


def cache(model, ds, probed, kind="head", batch_size=256, workers=0):
    """The probed blocks' features of a whole dataset (--fast, and train.py's monitors), extracted once. Each
    rank extracts every world-th image and all ranks get all features, so what follows is the same on every
    rank and for any number of ranks."""
    rank, world, device = (dist.get_rank() if dist.is_initialized() else 0), losses.world_size(), device_of(model)
    dl = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(rank, len(ds), world)), batch_size,
                                     num_workers=workers, worker_init_fn=quiet_worker)
    feats, ys, tick = [[] for _ in probed], [], Ticker(f"features of {len(ds)} images", len(dl))
    for n, (x, y) in enumerate(dl):
        for i, f in enumerate(block_features(model, x.to(device), kind, probed)):
            feats[i].append(f)
        ys.append(y.to(device))
        tick(n + 1)
    return [gather_strided(torch.cat(f), len(ds)).cpu() for f in feats], gather_strided(torch.cat(ys), len(ds)).cpu()


def device_of(model):
    return next(model.parameters()).device


def rankme(f, eps=1e-7):
    """RankMe (Garrido et al., 2023): the effective rank exp(entropy) of the normalised singular values of
    a feature matrix; low means dimensional collapse, the known failure of deep blocks in blockwise SSL."""
    s = torch.linalg.svdvals(f.double())
    p = s / s.sum() + eps
    return torch.exp(-(p * p.log()).sum()).item()


def knn(train_f, train_y, test_f, test_y, k, classes):
    """Cosine kNN with similarity-weighted votes; top-1 (%)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim, idx = (test_f[i:i + 1024] @ train_f.T).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(idx), classes).scatter_add_(1, train_y[idx], sim.exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100 * correct / len(test_f)


def fast_probe(model, train_ds, val_ds, probed, args, device):
    """--fast: cached features, standardised with the training set's statistics (so one lr fits every
    block), one linear probe per block, plus kNN. Returns the per-block results and the probes with their
    preprocessing, for the corruption pass."""
    val_t = probe_transforms(args.image_size)[1]
    (tr_f, tr_y), (va_f, va_y) = (cache(model, Seeded(ds, val_t), probed, args.features, args.batch_size, args.workers)
                                  for ds in (train_ds, val_ds))
    mean, std = [f.mean(0) for f in tr_f], [f.std(0) + 1e-6 for f in tr_f]

    def standardised(fs):
        return [((f.cpu() - m) / s).to(device) for f, m, s in zip(fs, mean, std)]
    tr_n, va_n, tr_yd, va_yd = standardised(tr_f), standardised(va_f), tr_y.to(device), va_y.to(device)

    def batches(epoch):  # the global batch on every rank: all ranks compute the same
        order = torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in range(0, len(order), args.batch_size):
            yield [f[order[i:i + args.batch_size]] for f in tr_n], tr_yd[order[i:i + args.batch_size]]
    probes = new_probes([f.shape[1] for f in tr_f], train_ds.num_classes, args, device)
    sgd_epochs(probes, batches, args, -(-len(tr_y) // args.batch_size), average=False)
    acc = accuracy(probes, (([f[i:i + 1024] for f in va_n], va_yd[i:i + 1024]) for i in range(0, len(va_y), 1024)),
                   reduce=False)
    blocks = [dict(block=k + 1, **a, knn=knn(f, tr_y, v, va_y, args.knn, train_ds.num_classes))
              for k, a, f, v in zip(probed, acc, tr_f, va_f)]
    return blocks, probes, standardised


def full_probe(model, train_ds, val_ds, probed, args, device):
    """The released protocol: probes trained on augmented images through the frozen network, every epoch."""
    train_t, val_t = probe_transforms(args.image_size)
    local_bs = max(1, args.batch_size // losses.world_size())

    def batches(ds, transform, shuffle, epoch=0):  # (features of the probed blocks, labels)
        dl, sampler = loader(Seeded(ds, transform, args.seed), local_bs, args, shuffle)
        sampler.set_epoch(epoch)
        dl.dataset.epoch = epoch
        for x, y in dl:
            yield block_features(model, x.to(device), args.features, probed), y.to(device)
    dims = [f.shape[1] for f in next(batches(val_ds, val_t, False))[0]]
    probes = new_probes(dims, train_ds.num_classes, args, device)
    steps = -(-len(train_ds) // (local_bs * losses.world_size()))
    sgd_epochs(probes, lambda epoch: batches(train_ds, train_t, True, epoch), args, steps)
    blocks = [dict(block=k + 1, **a) for k, a in zip(probed, accuracy(probes, batches(val_ds, val_t, False)))]
    return blocks, probes, lambda fs: fs


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
            if os.path.isdir(path):
                yield corruption, severity, ImageFolder(path, plain_transform())


def corruption_errors(model, probes, preprocess, probed, args, device):
    """App. C, Fig. 15: error = 100 - top-1 of the trained probes on each corrupted copy of the validation
    set; per corruption, the mean and std over its severities (last probed block), and their mean."""
    errors = {}
    for corruption, severity, ds in corruption_sets(args.corruptions):
        dl, _ = loader(ds, max(1, args.batch_size // losses.world_size()), args, shuffle=False)
        acc = accuracy(probes, ((preprocess(block_features(model, x.to(device), args.features, probed)), y.to(device))
                                for x, y in dl))
        errors.setdefault(corruption, {})[severity] = [100 - a["top1"] for a in acc]
    summary = {c: dict(mean=float(np.mean([e[-1] for e in s.values()])), std=float(np.std([e[-1] for e in s.values()])))
               for c, s in errors.items()}
    return dict(corruptions=errors, corruption_summary=summary,
                corruption_mean_error=float(np.mean([v["mean"] for v in summary.values()])))


@torch.no_grad()
def diagnostics(model, ds, args, device, batches=4):
    """Fig. 8-9: for each ResNet stage 1-4 (any block split, so that an end-to-end model gives the reference
    curve), the cross-correlation matrix C of Eq. (1) between two views' globally pooled stage outputs (no head,
    no projector) over the global batch, averaged over a few batches; summarised by the mean and quantiles
    of its diagonal and off-diagonal entries."""
    dl, _ = loader(ds, max(1, args.batch_size // losses.world_size()), args, shuffle=True)
    n, per_stage = min(batches, len(dl)), [0] * 4
    for i, ((y1, y2), _) in zip(range(n), dl):
        f1, f2 = (stage_features(model, normalize(y.to(device))) for y in (y1, y2))
        for s, (a, b) in enumerate(zip(f1, f2)):
            c = losses.all_reduce(losses.standardize(a).T @ losses.standardize(b)) / (len(a) * losses.world_size())
            per_stage[s] = per_stage[s] + c / n
    out = []
    for s, c in enumerate(per_stage):
        on, off = c.diagonal(), c[~torch.eye(len(c), dtype=torch.bool, device=c.device)]
        q = torch.tensor([0.1, 0.5, 0.9], device=c.device)
        out.append(dict(stage=s + 1, on_mean=on.mean().item(), on_q10_50_90=on.quantile(q).tolist(),
                        off_mean=off.mean().item(), off_abs_mean=off.abs().mean().item(),
                        off_q10_50_90=off.quantile(q).tolist()))
    return out


def report(results, path):
    """A table on stdout (with the untrained network beside, if probed) and, when matplotlib is installed,
    accuracy vs depth next to probe.json."""
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
    """Flags that cannot make a probe, refused before anything runs, naming the flag."""
    for name, ok in (("epochs", args.epochs >= 1), ("batch_size", args.batch_size >= 1), ("knn", args.knn >= 1),
                     ("workers", args.workers >= 0), ("limit", args.limit >= 0), ("lr", args.lr > 0),
                     ("image_size", args.image_size >= 1), ("timeout", args.timeout > 0)):
        if not ok:
            raise Abort(f"--{name.replace('_', '-')} {getattr(args, name)}: out of range")
    if args.corruptions and not any(ds for _, _, ds in corruption_sets(args.corruptions)):
        raise Abort(f"--corruptions {args.corruptions}: no <corruption>/<severity>/<class>/<image> inside")


def main(args):
    check_args(args)
    device, rank, world = setup_distributed(args.timeout)
    model = load_frozen(args.checkpoint, args, device)
    probed = [int(k) - 1 for k in args.blocks_to_probe.split(",") if k] or list(range(len(model.blocks)))
    if not set(probed) <= set(range(len(model.blocks))):
        raise Abort(f"--blocks-to-probe {args.blocks_to_probe}: the model has blocks 1-{len(model.blocks)}")
    train_ds = dataset(args.dataset, args.data, train=True, limit=args.limit, seed=args.seed)
    val_ds = dataset(args.dataset, args.data, train=False)
    protocol = fast_probe if args.fast else full_probe
    blocks, probes, preprocess = protocol(model, train_ds, val_ds, probed, args, device)
    results = dict(checkpoint=args.checkpoint, features=args.features, fast=args.fast, blocks=blocks)
    if args.untrained:
        untrained = load_frozen(args.checkpoint, args, device, untrained=True)
        results["untrained"] = protocol(untrained, train_ds, val_ds, probed, args, device)[0]
    out = os.path.join(args.out or os.path.dirname(os.path.abspath(args.checkpoint)), "probe.json")
    if rank == 0 and (args.corruptions or args.diagnostics):  # the probe's result is safe before the extra passes
        save_json(results, out)
    if args.corruptions:
        results.update(corruption_errors(model, probes, preprocess, probed, args, device))
    if args.diagnostics:
        two_views = Seeded(train_ds, TwoViews(args.image_size), args.seed)
        results["diagnostics"] = diagnostics(model, two_views, args, device)
    if rank == 0:
        save_json(results, out)
        report(results, out)
    return results


def save_json(results, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    run(main, get_args(), "probe.py")
