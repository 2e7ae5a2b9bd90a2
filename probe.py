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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import losses
from blockwise import ARCHS, POOLINGS, BlockResNet
from data import DATASETS, Seeded, TwoViews, dataset, probe_transforms
from train import Abort, Parser, run, setup_distributed


def get_args(argv=None):
    p = Parser(__doc__)
    a = p.add_argument
    a("checkpoint", help="checkpoint.pth written by train.py")
    a("--data", default="./data", help="dataset root, as train.py")
    a("--dataset", default="folder", choices=DATASETS)
    a("--limit", type=int, default=0, help="use only the first N training images (0 = all)")
    a("--image-size", type=int, default=224)
    a("--blocks-to-probe", default="", help="1-based blocks to probe, e.g. 4 (default: all)")
    a("--features", default="head", choices=("head", "trunk"), help="pooling-head output or global average pool")
    a("--fast", action="store_true", help="features extracted once without augmentation and cached; adds kNN")
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
    a("--out", default="", help="directory for probe.json (default: the checkpoint's)")
    return p.parse_args(argv)


def load_frozen(path, args, device):
    """Rebuild the network a checkpoint was trained with (without projectors) and freeze it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise Abort(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise Abort(f"{path} is not a train.py checkpoint (no model config in it)")
    cfg = dict(ckpt["config"], projector_widths=None)
    cfg.pop("checkpoint_heads", None)  # the first release's name of `checkpoint`, which does not matter in eval
    for key in ("arch", "blocks", "pooling"):
        if getattr(args, key) is not None and getattr(args, key) != cfg[key]:
            raise Abort(f"{path} holds {key} {cfg[key]!r}, not the {getattr(args, key)!r} asked for")
    model = BlockResNet(**cfg)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("projectors.")}
    try:
        model.load_state_dict(state)  # strict: a partial load would probe a half-random network
    except RuntimeError as e:
        raise Abort(f"{path} does not match its own config: {str(e).splitlines()[1].strip()}") from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def block_features(model, x, kind, probed):
    """The features of the probed blocks for a batch of images, in fp32 (the network is frozen and in
    eval mode, so there is no noise; blocks above the last probed one are not run)."""
    outs, feats = {0: x}, {}
    for k in range(max(probed) + 1):
        h = model.forward_block(k, model.block_input(k, outs), outs)
        feats[k] = model.heads[k](h) if kind == "head" else h.mean((2, 3))
    return [feats[k].float() for k in probed]


def loader(ds, batch, args, shuffle):
    sampler = torch.utils.data.DistributedSampler(ds, shuffle=shuffle, seed=args.seed) if dist.is_initialized() else None
    return torch.utils.data.DataLoader(ds, batch, shuffle=shuffle and sampler is None, sampler=sampler,
                                       num_workers=args.workers, drop_last=False), sampler


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


def sgd_epochs(probes, batches, args):
    """SGD with momentum 0.9, cosine decay per epoch; gradients averaged over ranks."""
    opt = torch.optim.SGD(probes.parameters(), args.lr, momentum=0.9, weight_decay=args.weight_decay)
    for epoch in range(args.epochs):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        for feats, y in batches(epoch):
            loss = sum(F.cross_entropy(logits, y) for logits in probes(feats))
            opt.zero_grad()
            loss.backward()
            if losses.world_size() > 1:
                for p in probes.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= losses.world_size()
            opt.step()


@torch.no_grad()
def accuracy(probes, batches):
    """Top-1 and top-5 (%) per block, summed over ranks."""
    total = 0
    for feats, y in batches:
        hits = [[(l.topk(min(k, l.shape[1]), 1).indices == y[:, None]).any(1).sum() for k in (1, 5)]
                for l in probes(feats)]
        total = total + torch.tensor([*sum(hits, []), len(y)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    top = (100 * total[:-1] / total[-1]).view(-1, 2)
    return [dict(top1=a.item(), top5=b.item()) for a, b in top]


def cache(model, ds, args, device, probed):
    """--fast: every block's features of a dataset, extracted once without augmentation."""
    dl, _ = loader(ds, args.batch_size, args, shuffle=False)
    feats, ys = [[] for _ in probed], []
    for x, y in dl:
        for i, f in enumerate(block_features(model, x.to(device), args.features, probed)):
            feats[i].append(f.cpu())
        ys.append(y)
    return [torch.cat(f) for f in feats], torch.cat(ys)


def knn(train_f, train_y, test_f, test_y, k, classes):
    """Cosine kNN with similarity-weighted votes; top-1 (%)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim, idx = (test_f[i:i + 1024] @ train_f.T).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(idx), classes).scatter_add_(1, train_y[idx], sim.exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100 * correct / len(test_f)


def corruption_sets(root, transform):
    """Walk an ImageNet-C style tree: root/<corruption>/<severity>/<class>/<image>."""
    import torchvision
    if not os.path.isdir(root):
        raise Abort(f"--corruptions {root} is not a directory")
    for corruption in sorted(os.listdir(root)):
        for severity in sorted(os.listdir(os.path.join(root, corruption))):
            path = os.path.join(root, corruption, severity)
            if os.path.isdir(path):
                yield corruption, severity, torchvision.datasets.ImageFolder(path, transform)


@torch.no_grad()
def diagnostics(model, ds, args, device, batches=4):
    """Fig. 8: per block, the on- and off-diagonal entries of the cross-correlation matrix between two
    views' globally pooled block outputs (no head, no projector), summarised by their mean and quantiles."""
    dl, _ = loader(ds, args.batch_size, args, shuffle=True)
    per_block = None
    for i, ((y1, y2), _) in enumerate(dl):
        if i == batches:
            break
        f1, f2 = (block_features(model, y.to(device), "trunk", range(len(model.blocks))) for y in (y1, y2))
        cs = [losses.standardize(a.float()).T @ losses.standardize(b.float()) / len(a) for a, b in zip(f1, f2)]
        per_block = cs if per_block is None else [p + c for p, c in zip(per_block, cs)]
    out = []
    for c in per_block:
        c = c / min(batches, len(dl))
        on, off = c.diagonal(), c[~torch.eye(len(c), dtype=torch.bool, device=c.device)]
        q = torch.tensor([0.1, 0.5, 0.9], device=c.device)
        out.append(dict(on_mean=on.mean().item(), on_q10_50_90=on.quantile(q).tolist(),
                        off_mean=off.mean().item(), off_abs_mean=off.abs().mean().item(),
                        off_q10_50_90=off.quantile(q).tolist()))
    return out


def report(results, path):
    """probe.json, a table on stdout and, when matplotlib is installed, accuracy vs depth."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"{'block':>5} {'top-1':>7} {'top-5':>7}" + (f" {'kNN':>7}" if "knn" in results["blocks"][0] else ""))
    for b in results["blocks"]:
        print(f"{b['block']:>5} {b['top1']:7.2f} {b['top5']:7.2f}" + (f" {b['knn']:7.2f}" if "knn" in b else ""))
    if "corruptions" in results:
        print(f"corruptions: mean error {results['corruption_mean_error']:.2f} (block {results['blocks'][-1]['block']})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.plot([b["block"] for b in results["blocks"]], [b["top1"] for b in results["blocks"]], "o-")
    plt.xlabel("block")
    plt.ylabel("linear probe top-1 (%)")
    plt.savefig(path.replace(".json", ".png"), dpi=120)


def main(args):
    device, rank, world = setup_distributed()
    model = load_frozen(args.checkpoint, args, device)
    n = len(model.blocks)
    probed = [int(k) - 1 for k in args.blocks_to_probe.split(",") if k] or list(range(n))
    if not set(probed) <= set(range(n)):
        raise Abort(f"--blocks-to-probe {args.blocks_to_probe}: the model has blocks 1-{n}")
    train_t, val_t = probe_transforms(args.image_size)
    train_ds, val_ds = (dataset(args.dataset, args.data, train=t, limit=args.limit if t else 0) for t in (True, False))
    classes, local_bs = train_ds.num_classes, max(1, args.batch_size // world)

    def batches(ds, transform, shuffle, epoch=0):  # (features of the probed blocks, labels), through the frozen net
        dl, sampler = loader(Seeded(ds, transform, args.seed), local_bs, args, shuffle)
        if sampler is not None:
            sampler.set_epoch(epoch)
        dl.dataset.epoch = epoch
        for x, y in dl:
            yield block_features(model, x.to(device), args.features, probed), y.to(device)

    dims = [f.shape[1] for f in next(batches(val_ds, val_t, False))[0]]
    torch.manual_seed(args.seed)
    probes = Probes(dims, classes).to(device)
    results = dict(checkpoint=args.checkpoint, features=args.features, fast=args.fast, blocks=[])
    if args.fast:
        (tr_f, tr_y), (va_f, va_y) = (cache(model, Seeded(ds, val_t), args, device, probed) for ds in (train_ds, val_ds))
        mean, std = [f.mean(0) for f in tr_f], [f.std(0) + 1e-6 for f in tr_f]  # standardised: one lr fits all blocks
        norm = lambda fs: [((f - m) / s).to(device) for f, m, s in zip(fs, mean, std)]  # noqa: E731
        tr_n, va_n, tr_y, va_y = norm(tr_f), norm(va_f), tr_y.to(device), va_y.to(device)

        def cached(epoch):
            order = torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(epoch)).to(device)
            for i in range(0, len(order), local_bs):
                yield [f[order[i:i + local_bs]] for f in tr_n], tr_y[order[i:i + local_bs]]
        sgd_epochs(probes, cached, args)
        acc = accuracy(probes, ((([f[i:i + 1024] for f in va_n]), va_y[i:i + 1024]) for i in range(0, len(va_y), 1024)))
        for k, a, f, v in zip(probed, acc, tr_f, va_f):
            results["blocks"].append(dict(block=k + 1, **a, knn=knn(f, tr_y.cpu(), v, va_y.cpu(), args.knn, classes)))
        preprocess = lambda fs: [((f.cpu() - m) / s).to(device) for f, m, s in zip(fs, mean, std)]  # noqa: E731
    else:
        sgd_epochs(probes, lambda epoch: batches(train_ds, train_t, True, epoch), args)
        results["blocks"] = [dict(block=k + 1, **a) for k, a in zip(probed, accuracy(probes, batches(val_ds, val_t, False)))]
        preprocess = lambda fs: fs  # noqa: E731
    if args.corruptions:  # App. C: error = 100 - top-1 of the trained probes on each corrupted copy
        errors = {}
        for corruption, severity, ds in corruption_sets(args.corruptions, val_t):
            dl, _ = loader(ds, local_bs, args, shuffle=False)
            acc = accuracy(probes, ((preprocess(block_features(model, x.to(device), args.features, probed)), y.to(device))
                                     for x, y in dl))
            errors.setdefault(corruption, {})[severity] = [100 - a["top1"] for a in acc]
        results["corruptions"] = errors
        results["corruption_mean_error"] = sum(sum(e[-1] for e in s.values()) / len(s) for s in errors.values()) / len(errors)
    if args.diagnostics:
        results["diagnostics"] = diagnostics(model, Seeded(train_ds, TwoViews(args.image_size), args.seed), args, device)
    if rank == 0:
        out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
        os.makedirs(out, exist_ok=True)
        report(results, os.path.join(out, "probe.json"))
    return results


if __name__ == "__main__":
    run(main, get_args(), "probe.py")
