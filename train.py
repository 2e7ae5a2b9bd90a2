"""Blockwise self-supervised pre-training (Siddiqui et al., TMLR 2024). Defaults are the paper's ImageNet run.

    python train.py --data /imagenet                                   # one process (CPU or 1 GPU)
    torchrun --nproc_per_node=8 train.py --data /imagenet              # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...

The run writes DIR/checkpoint.pth every epoch (and on SIGTERM) and resumes from it by itself,
DIR/log.jsonl (one JSON object per line), and at the end DIR/trunk.pth, a torchvision state_dict.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist

import losses
import probe
import recompute
from blockwise import ARCHS, POOLINGS, BlockResNet
from cli import (STOP, Abort, FolderLock, Parser, clock, one_line, quiet_worker, run, setup_distributed,
                 start_workers, stop_on_signals)
from data import DATASETS, Seeded, TwoViews, dataset, probe_transforms, to_device


def get_args(argv=None):
    p = Parser(__doc__)
    a = p.add_argument
    a("--data", default="./data", help="dataset root (for folder: root/train, root/val)")
    a("--dataset", default="folder", choices=DATASETS, help="folder = ImageNet layout")
    a("--limit", type=int, default=0, help="use N training images, balanced over the classes and drawn with "
      "--seed (0 = all)")
    a("--image-size", type=int, default=224, help="crop size of the two views")
    a("--crop-scale", type=float, default=0.08, help="smallest area of a random crop, as a fraction of the image "
      "(Barlow Twins: 0.08); small images may want milder crops (README, small-scale protocol)")
    a("--arch", default="resnet50", choices=ARCHS, help="torchvision ResNet (§3.1: resnet50)")
    a("--blocks", default="1,2,3,4", help="stages per block: 1,2,3,4 (§3.1), 12,3,4 merged B1+B2 (Fig. 7), "
      "1234 end-to-end, 12,23,34 LoCo; or a preset: paper, merge12, e2e, loco")
    a("--mode", default="simultaneous", choices=("simultaneous", "sequential"),
      help="train all blocks at once, or block k for --epochs then freeze it (and its BN) (§3.1, Fig. 4)")
    a("--frozen", default="", help="blocks (1-based, e.g. 1,2,3) kept frozen: random init (Fig. 4 "
      "random baseline) or loaded from --init (Fig. 7)")
    a("--init", default="", help="trunk weights (trunk.pth or checkpoint.pth) for the --frozen blocks")
    a("--loss", default="barlowtwins", choices=losses.LOSSES, help="§3.2 Barlow Twins, Fig. 5 VICReg / "
      "SimCLR, §5 supervised blockwise")
    a("--lambd", default="0.0051", help="Barlow Twins lambda, Eq. (2); a comma list sets it per block (App. A)")
    a("--target", default="1.0", help="invariance target of C_ii; per block e.g. 0.6,0.75,0.9,1.0 (App. A)")
    a("--scale-loss", type=float, default=0.024, help="Barlow Twins loss scale of the released run")
    a("--temperature", type=float, default=0.1, help="SimCLR temperature")
    a("--pooling", default="cbe", choices=POOLINGS, help="block head (§3.3, Fig. 3, Fig. 6)")
    a("--head-dim", type=int, default=2048, help="width of the lsp/cbe head output")
    a("--kernel-size", type=int, default=1, help="CbE convolution kernel (Fig. 12)")
    a("--groups", type=int, default=1, help="CbE convolution groups (App. B)")
    a("--noise", type=float, default=0.25, help="sigma of the training noise, relative to std(x) (§5)")
    a("--projector", default="8192-8192-8192", help="projector widths (§3.4)")
    a("--epochs", type=int, default=300, help="epochs (per block in sequential mode)")
    a("--batch-size", type=int, default=2048, help="global batch size, over all processes")
    a("--lr", type=float, default=0.2, help="base learning rate, scaled by batch-size / 256")
    a("--warmup-epochs", type=float, default=10, help="linear warm-up from 0")
    a("--weight-decay", type=float, default=1e-6, help="LARS weight decay (not on 1-D parameters)")
    a("--lars-eta", type=float, default=0.001, help="LARS trust coefficient: a step moves a weight by about lr x eta "
      "of its norm. 0.001 suits ImageNet's 187k steps; short runs need more (README, small-scale protocol)")
    a("--grad-scale", type=float, default=1.0, help="multiply every gradient by this before the LARS step; "
      "0.0625 reproduces the released 16-process run, whose gradients were 1/16 of the true ones (README)")
    a("--bf16", action="store_true", help="bfloat16 autocast (losses stay fp32)")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the heads and "
      "projectors: faster and leaner (bench.py); a minute of compiling at the start, and on CPU it needs a "
      "C++ compiler")
    a("--recompute", "--checkpoint", default="none", choices=recompute.MODES, help="recompute in the backward "
      "instead of storing: heads = the CbE maps, all = those and every residual unit (default: %(default)s)")
    a("--workers", type=int, default=min(8, os.cpu_count()), help="data loading processes per process")
    a("--gpu-aug", action="store_true", help="flip, colour jitter, grayscale, blur and solarize run batched on the "
      "device, each image with its own draw; the workers only decode and crop (README, \"The data pipeline\")")
    a("--seed", type=int, default=0, help="seed of the weights, the data order and every augmentation")
    a("--out", default="./runs/blockwise", help="output directory; an existing run in it is resumed")
    a("--print-freq", type=int, default=50, help="steps between progress lines (and at least one every 30 s)")
    a("--timeout", type=float, default=10.0, help="minutes a process waits for the others before the run stops "
      "with an error (a stalled or lost process)")
    a("--monitor-every", type=int, default=1, help="epochs between the online monitors (kNN top-1 and RankMe of "
      "every block on held-out images, README); 0 = off")
    a("--monitor-images", type=int, default=10000, help="images in the monitors' kNN bank (from the training "
      "set) and in their held-out set (from val/ or the test split), each balanced over the classes")
    return p.parse_args(argv)


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in Barlow Twins: the update g + wd * w is rescaled by the trust ratio
    eta * |w| / |g + wd * w|, then SGD with momentum. Every 1-D parameter (biases, BatchNorm) gets
    neither weight decay nor the trust ratio, as the released run."""

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(dp)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), g["eta"] * w_norm / u_norm, 1.0)
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def learning_rate(step, steps, warmup, base):
    """§3.4: linear warm-up from 0, then cosine decay from base to 0.001 x base, per step."""
    if step < warmup:
        return base * step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return base * q + base * 0.001 * (1 - q)


def per_block(value, n, flag):
    """'0.0051' -> [0.0051] * n; '0.6,0.75,0.9,1.0' -> one value per block."""
    vals = [float(v) for v in str(value).split(",")]
    if len(vals) not in (1, n):
        raise ValueError(f"{flag} {value}: give one value or one per block ({n})")
    return vals * n if len(vals) == 1 else vals


def loss_functions(args, n):
    """The loss of each of the n blocks: a function of its two views' projector outputs and the labels."""
    lambds, targets = per_block(args.lambd, n, "--lambd"), per_block(args.target, n, "--target")

    def loss(k):
        if args.loss == "barlowtwins":  # Eq. (2); per-block lambda and invariance target: App. A
            return lambda z1, z2, y: losses.barlow_twins(z1, z2, lambds[k], args.scale_loss, targets[k])
        if args.loss == "vicreg":
            return lambda z1, z2, y: losses.vicreg(z1, z2)
        if args.loss == "simclr":
            return lambda z1, z2, y: losses.simclr(z1, z2, args.temperature)
        return lambda z1, z2, y: (losses.supervised(z1, y) + losses.supervised(z2, y)) / 2  # §5
    return [loss(k) for k in range(n)]


def train_step(model, y1, y2, labels, loss_fns, active, owners, bf16=False):
    """One step of Algorithm 1 on two views y1, y2, lean in memory: block k's loss is back-propagated as
    soon as block k has run, so its graph is freed before block k+1 starts (the released code runs every
    forward first). The gradients are those of the sum of the block losses, since no loss reaches another
    block. `owners[k]`: the parameters whose gradient is final after block k (grad_owners). Returns the
    detached loss of each active block."""
    views = model.blockwise(y1), model.blockwise(y2)
    out, pending = [], []
    for k in range(max(active) + 1):
        with torch.autocast(y1.device.type, torch.bfloat16, enabled=bf16):
            h1, h2 = next(views[0]), next(views[1])
            if k not in active:
                continue  # a frozen block only feeds the next one
            z1, z2 = (model.projectors[k](model.heads[k](h)) for h in (h1, h2))
        loss = loss_fns[k](z1, z2, labels)
        loss.backward()  # Algorithm 1: one backward per block
        pending.append(average_grads(owners[k]))
        out.append(loss.detach())
    for finish in pending:
        finish()
    return torch.stack(out)


def step_seed(seed, rank, epoch, step):
    """The seed of the noise (§5) drawn by one rank at one step: a resumed run draws the same noise."""
    return hash((seed, rank, epoch, step)) & 0xFFFF_FFFF


def set_trainable(model, active):
    """Train the blocks in `active`; every other block is frozen, BatchNorm statistics included (§5)."""
    model.train()
    for k in range(len(model.blocks)):
        for m in model.block_modules(k):
            m.train(False).requires_grad_(False)
    for k in active:
        for m in model.block_modules(k):
            m.train(True).requires_grad_(True)


def grad_owners(model, active):
    """For each active block, the trainable parameters whose gradient is final once its backward is
    done (LoCo's shared stage waits for the later unit)."""
    seen, owners = set(), {}
    for k in reversed(active):
        params = [p for m in model.block_modules(k) for p in m.parameters() if p.requires_grad]
        owners[k] = [p for p in dict.fromkeys(params) if p not in seen]
        seen.update(owners[k])
    return owners


def average_grads(params):
    """Start averaging these gradients over the ranks; returns a function that waits and writes them back.
    We do per block what DDP does per bucket, so a block's all-reduce overlaps the next block's compute."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or losses.world_size() == 1:
        return lambda: None
    flat = torch.cat([g.flatten() for g in grads])
    work = dist.all_reduce(flat, async_op=True)

    def finish():
        work.wait()
        unflatten_into(flat.div_(losses.world_size()), grads)
    return finish


def unflatten_into(flat, tensors):
    """Copy a vector back into the tensors it was concatenated from (one message instead of one each)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_buffers(model):
    """BatchNorm running statistics from rank 0 to all, in one message, as DDP's broadcast_buffers does:
    without SyncBatchNorm (CPU) each rank would otherwise track the statistics of its own images."""
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    flat = torch.cat([b.flatten() for b in bufs])
    dist.broadcast(flat, 0)
    unflatten_into(flat, bufs)


def check_args(args):
    """Flags that cannot make a run are refused before anything starts, naming the flag."""
    rules = [("epochs", args.epochs >= 1, "at least 1"), ("batch_size", args.batch_size >= 1, "at least 1"),
             ("print_freq", args.print_freq >= 1, "at least 1"), ("head_dim", args.head_dim >= 1, "at least 1"),
             ("kernel_size", args.kernel_size >= 1 and args.kernel_size % 2, "odd and positive (an even kernel "
              "grows the map by one)"), ("groups", args.groups >= 1, "at least 1"),
             ("image_size", args.image_size >= 1, "at least 1"), ("lr", args.lr >= 0, "zero or more"),
             ("noise", args.noise >= 0, "zero or more"), ("workers", args.workers >= 0, "zero or more"),
             ("limit", args.limit >= 0, "zero or more"), ("weight_decay", args.weight_decay >= 0, "zero or more"),
             ("warmup_epochs", 0 <= args.warmup_epochs <= args.epochs, f"between 0 and --epochs {args.epochs}"),
             ("lars_eta", args.lars_eta > 0, "positive"),
             ("crop_scale", 0 < args.crop_scale <= 1, "in (0, 1]"), ("grad_scale", args.grad_scale > 0, "positive"),
             ("monitor_every", args.monitor_every >= 0, "zero or more"),
             ("monitor_images", args.monitor_images >= 1, "at least 1"), ("timeout", args.timeout > 0, "positive"),
             ("init", not args.init or args.frozen, "used with --frozen, which names the blocks it fills")]
    for name, ok, what in rules:
        if not ok:
            raise Abort(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {what}")


def main(args):
    check_args(args)
    device, rank, world = setup_distributed(args.timeout)
    if device.type == "cpu":  # torch.compile's probe for a CUDA toolkit; irrelevant to a CPU run
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if args.batch_size % world:
        raise Abort(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    with prepare_out(args.out, rank):  # rank 0 holds the output folder's lock until the run ends
        fit(args, device, rank, world)


def fit(args, device, rank, world):
    """The run: data, model, resume, then the epochs (saving each) and the monitors; at the end, trunk.pth."""
    ckpt_path = os.path.join(args.out, "checkpoint.pth")

    train_set = dataset(args.dataset, args.data, train=True, limit=args.limit, seed=args.seed)
    model, config, phases = build(args, train_set.num_classes, device, world)
    loss_fns = loss_functions(args, len(model.blocks))
    optimizer = LARS(model.parameters(), lr=0, weight_decay=args.weight_decay, eta=args.lars_eta)
    if rank == 0:
        check_free_space(args.out, model)
    start_epoch, start_step = resume(model, optimizer, config, ckpt_path, world, args, len(train_set))

    data = Seeded(train_set, TwoViews(args.image_size, args.crop_scale, on_device=args.gpu_aug), args.seed)
    sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    steps = len(sampler) // (args.batch_size // world)
    if steps == 0:
        raise Abort(f"--batch-size {args.batch_size} is larger than the {len(data)} training images")
    epochs = args.epochs * len(phases)  # sequential mode: --epochs for each block in turn
    monitored = monitor_sets(args)
    stop_on_signals()
    if rank == 0:
        print(f"{args.arch}, blocks {model.blocks}, {args.mode}, {args.loss}, {args.pooling}; {len(data)} images, "
              f"{world} process(es) on {device.type}, {steps} steps/epoch, epochs {start_epoch}->{epochs}", flush=True)

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        data.epoch = epoch
        first = start_step if epoch == start_epoch else 0
        indices = list(sampler)[first * (args.batch_size // world):steps * (args.batch_size // world)]
        loader = torch.utils.data.DataLoader(data, args.batch_size // world, sampler=indices, drop_last=True,
                                             num_workers=args.workers, pin_memory=device.type == "cuda",
                                             worker_init_fn=quiet_worker)
        stopped = train_one_epoch(model, optimizer, loss_fns, loader, phases, epoch, first, steps, args)
        if rank == 0:  # every epoch, and on SIGTERM in the middle of one
            save_checkpoint(ckpt_path, model, optimizer, epoch + (stopped is None), stopped or 0, config, args,
                            len(train_set))
        if stopped is not None:
            if rank == 0:
                print(f"{signal.Signals(STOP[0]).name}: saved {ckpt_path} at epoch {epoch + 1} step {stopped}; "
                      "rerun to resume", flush=True)
            return
        if monitored and (epoch + 1) % args.monitor_every == 0:
            log_monitors(epoch, monitors(model, monitored, train_set.num_classes, args), args)
    same = check_replicas(model) if world > 1 else None
    if rank == 0:
        if same:
            print(same, flush=True)
        save_atomic(model.trunk_state_dict(), os.path.join(args.out, "trunk.pth"))
        print(f"done: {ckpt_path}, trunk (torchvision {args.arch} state_dict) in {args.out}/trunk.pth", flush=True)


def train_one_epoch(model, optimizer, loss_fns, loader, phases, epoch, first, steps, args):
    """Steps first..steps-1 of an epoch, training the blocks of this epoch's phase; returns None, or the
    number of steps done when a SIGTERM stopped the epoch early (all ranks stop at the same step)."""
    rank, world = (dist.get_rank() if dist.is_initialized() else 0), losses.world_size()
    device, epochs = next(model.parameters()).device, args.epochs * len(phases)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    phase = phases[epoch // args.epochs]
    set_trainable(model, phase)
    owners, t0, seen, shown = grad_owners(model, phase), time.time(), 0, 0.0
    for i, ((y1, y2), labels) in enumerate(start_workers(loader), start=first):
        y1, y2 = (to_device(y, device).contiguous(memory_format=fmt) for y in (y1, y2))
        labels = labels.to(device, non_blocking=True)
        in_phase = (epoch % args.epochs) * steps + i  # sequential mode: each block has its own schedule
        lr = learning_rate(in_phase, args.epochs * steps, args.warmup_epochs * steps, args.lr * args.batch_size / 256)
        for g in optimizer.param_groups:
            g["lr"] = lr
        torch.manual_seed(step_seed(args.seed, rank, epoch, i))  # the noise of §5, resumable
        optimizer.zero_grad(set_to_none=True)  # frozen blocks keep grad None, so LARS skips them
        block_losses = train_step(model, y1, y2, labels, loss_fns, phase, owners, args.bf16)
        if not torch.isfinite(block_losses).all():
            k = phase[int((~torch.isfinite(block_losses)).nonzero()[0])]
            raise Abort(f"loss of block {k + 1} is {block_losses.tolist()[phase.index(k)]} at epoch {epoch + 1} "
                        f"step {i}; stopped, {args.out}/checkpoint.pth holds the last good state")
        if args.grad_scale != 1:  # the released run's gradient scale (README, "How this differs")
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(args.grad_scale)
        optimizer.step()
        if world > 1:
            broadcast_buffers(model)
        seen += args.batch_size
        stop = torch.tensor(float(bool(STOP)))
        if world > 1:
            dist.all_reduce(stop)  # every rank stops at the same step
        if rank == 0 and ((i + 1) % args.print_freq == 0 or i + 1 == steps or time.time() - shown > 30):
            shown = time.time()
            rate = seen / (time.time() - t0)
            log = dict(epoch=epoch, step=i + 1, lr=lr, loss=block_losses.tolist(), img_per_s=rate,
                       blocks=[k + 1 for k in phase], time=round(time.time(), 3))
            eta = ((epochs - epoch - 1) * steps + steps - i - 1) * args.batch_size / rate
            print(progress(log, epoch, epochs, i + 1, steps, eta), flush=True)
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(log) + "\n")
        if stop:
            return i + 1
    return None


def monitor_sets(args):
    """The monitors' data, without augmentation: a bank of training images and held-out labelled images."""
    if not args.monitor_every:
        return None
    try:
        held_out = dataset(args.dataset, args.data, train=False, limit=args.monitor_images, seed=args.seed)
    except FileNotFoundError:
        print(f"no held-out images in --data {args.data} (val/): monitors off", flush=True)
        return None
    bank = dataset(args.dataset, args.data, train=True, limit=args.monitor_images, seed=args.seed)
    plain = probe_transforms(args.image_size)[1]
    return Seeded(bank, plain, args.seed), Seeded(held_out, plain, args.seed)


def monitors(model, sets, classes, args):
    """Online monitors: per block, the 20-NN top-1 of the held-out images against the bank (head features)
    and the RankMe of the held-out features (collapse shows as a low effective rank). Features are gathered
    from all ranks, so every rank computes the same numbers."""
    model.eval()  # the next epoch's set_trainable() puts every block back as it was
    probed, batch = list(range(len(model.blocks))), max(1, args.batch_size // losses.world_size())
    (bank_f, bank_y), (f, y) = (probe.cache(model, ds, probed, "head", batch, args.workers) for ds in sets)
    return dict(knn=[probe.knn(b, bank_y, h, y, 20, classes) for b, h in zip(bank_f, f)],
                rankme=[probe.rankme(h) for h in f])


def log_monitors(epoch, found, args):
    if dist.is_initialized() and dist.get_rank():
        return
    print(f"monitors after epoch {epoch + 1}: kNN top-1 per block " + " ".join(f"{v:.2f}" for v in found["knn"]) +
          " | RankMe per block " + " ".join(f"{v:.1f}" for v in found["rankme"]), flush=True)
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(dict(epoch=epoch, monitor=found)) + "\n")


def build(args, num_classes, device, world):
    """The model (same initial weights on every rank), its config, and the phases of training: one phase
    of all trainable blocks (simultaneous), or one per block in turn (sequential, §3.1, Fig. 2)."""
    config = model_config(args, num_classes)
    torch.manual_seed(args.seed)
    model = BlockResNet(**config)
    n = len(model.blocks)
    frozen = {int(k) - 1 for k in args.frozen.split(",") if k}
    if not frozen <= set(range(n)) or len(frozen) == n:
        raise Abort(f"--frozen {args.frozen}: must name some, not all, of blocks 1-{n}")
    if args.init:
        load_frozen_init(model, args.init, frozen)
    trainable = [k for k in range(n) if k not in frozen]
    if device.type == "cuda" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBatchNorm is GPU-only
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    recompute.apply(model, args.recompute)
    if args.compile:
        compile_heads(model)
    return model, config, [[k] for k in trainable] if args.mode == "sequential" else [trainable]


def compile_heads(model):
    """torch.compile each head and projector in place (state_dict keys unchanged): it fuses CbE's BN + ReLU +
    pool and stores less (bench.py). The trunk stays eager (slower compiled, README); so does a LeanCbE head,
    whose hand-written autograd compile would not trace."""
    # The heads share one forward, compiled once per head, mode (train, eval) and batch size (a monitor's last
    # batch): more than dynamo's default of 8, past which it warns and runs the rest eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(model.heads))
    for m in [*model.heads, *model.projectors]:
        if not recompute.is_lean(m):
            m.compile()


def model_config(args, num_classes):
    """The arguments of BlockResNet, stored in every checkpoint so probe.py and resume rebuild it exactly."""
    try:
        widths = [int(w) for w in args.projector.split("-")]
    except ValueError:
        widths = [0]
    if min(widths) < 1:
        raise Abort(f"--projector {args.projector}: expected positive widths like 8192-8192-8192")
    if args.loss == "supervised":  # §3.4: the projector's last layer outputs the classes
        widths[-1] = num_classes
    return dict(arch=args.arch, blocks=args.blocks, pooling=args.pooling, head_dim=args.head_dim,
                kernel_size=args.kernel_size, groups=args.groups, noise=args.noise, projector_widths=widths)


def load_frozen_init(model, path, frozen):
    """Fig. 7: the --frozen blocks take their trunk weights from another run (trunk.pth or checkpoint.pth)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.get("model", sd).items() if not k.startswith(("heads.", "projectors."))}
    except Exception as e:
        raise Abort(f"--init {path}: not a trunk.pth or checkpoint.pth ({one_line(e)[:200]})") from None
    prefixes = tuple(p for k in frozen for s in model.blocks[k]
                     for p in (("conv1.", "bn1.", "layer1.") if s == 1 else (f"layer{s}.",)))
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    bad = [k for k in own if k not in sd or sd[k].shape != own[k].shape]
    if bad:
        raise Abort(f"--init {path}: missing or mis-shaped weights for the frozen blocks, e.g. {bad[0]}")
    model.load_state_dict({k: sd[k] for k in own}, strict=False)


def resume(model, optimizer, config, ckpt_path, world, args, images):
    """Auto-resume from ckpt_path if it exists; else give every rank rank 0's weights. Returns (epoch, step)."""
    if not os.path.exists(ckpt_path):
        if world > 1:
            for t in model.state_dict().values():
                dist.broadcast(t, 0)
        return 0, 0
    ckpt = read_checkpoint(ckpt_path)
    check_config(ckpt["config"], config, ckpt_path)
    check_same_run(ckpt, args, images, ckpt_path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if not dist.is_initialized() or dist.get_rank() == 0:  # log.jsonl: the steps after this line redo earlier ones
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(dict(resume=dict(epoch=ckpt["epoch"], step=ckpt["step"]))) + "\n")
    return ckpt["epoch"], ckpt["step"]


def read_checkpoint(path):
    """A train.py checkpoint, or one line saying why not (unreadable, empty, or another kind of file)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # written atomically, so this is not our own interrupted write
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Abort(f"cannot read {path} ({line}); move it away to start afresh") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "config", "epoch", "step"} <= ckpt.keys():
        raise Abort(f"{path} is not a train.py checkpoint (a trunk.pth?); move it away to start afresh")
    return ckpt


# Flags a resumed run may change: they change neither the model nor its data, only how it is computed (README).
RESUMABLE = {"epochs", "workers", "gpu_aug", "print_freq", "data", "out", "compile", "recompute", "channels_last",
             "monitor_every", "monitor_images", "timeout"}


def check_same_run(ckpt, args, images, path):
    """Refuse to resume with flags that would change the run (one line naming the flag and both values)."""
    saved = ckpt.get("args", {})
    for key, value in vars(args).items():
        if key in saved and key not in RESUMABLE and saved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise Abort(f"{path} was run with {flag} {saved[key]}, not {value}: rerun with {flag} {saved[key]} "
                        "or choose another --out")
    if ckpt.get("images", images) != images:
        raise Abort(f"--data {args.data}: {images} training images, but {path} was trained on {ckpt['images']}")


def save_checkpoint(path, model, optimizer, epoch, step, config, args, images):
    """What resume() needs: weights, LARS momentum, where to go on from, the model's config and the flags."""
    save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, step=step,
                     config=config, args=vars(args), images=images), path)


def check_config(saved, wanted, what):
    diff = [f"{k} {saved.get(k)!r} (asked {v!r})" for k, v in wanted.items() if k != "noise" and saved.get(k) != v]
    if diff:
        raise Abort(f"{what} holds a different model: " + ", ".join(diff))


def save_atomic(obj, path):
    """Write a temporary file of this process's own, flush it to disk, then rename: a crash mid-write leaves
    the previous file whole; a full disk leaves no partial file behind."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise Abort(f"cannot write {path} ({one_line(e)}); the previous {os.path.basename(path)} is kept") from None


def prepare_out(out, rank):
    """The output folder, writable and locked by this run (rank 0 holds the lock)."""
    try:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, f".write-test-{rank}"), "w").close()
        os.remove(os.path.join(out, f".write-test-{rank}"))
    except OSError as e:
        raise Abort(f"--out {out} is not writable ({e.strerror})") from None
    return FolderLock(out) if rank == 0 else contextlib.nullcontext()


def check_free_space(out, model):
    """A checkpoint (weights, BN statistics, LARS momentum) must fit, with its temporary copy, before we start."""
    need = 2.2 * sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *model.parameters()])
    free = shutil.disk_usage(out).free
    if free < need:
        raise Abort(f"--out {out} has {free / 2**30:.2f} GiB free; a checkpoint needs about {need / 2**30:.2f} GiB")


def check_replicas(model):
    """After training, every rank must hold exactly rank 0's weights and BN statistics (gradients
    averaged identically, BN buffers of frozen blocks untouched); a mismatch is a bug, not noise."""
    mine = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
    ref = mine.clone()
    dist.broadcast(ref, 0)
    bad = torch.tensor(float(not torch.equal(mine, ref)))
    dist.all_reduce(bad)
    if bad:
        raise Abort(f"the weights of {int(bad)} rank(s) differ from rank 0's")
    return f"all {dist.get_world_size()} ranks hold identical weights"


def progress(log, epoch, epochs, step, steps, eta_s):
    losses_txt = " ".join(f"{v:.4g}" for v in log["loss"])
    return (f"epoch {epoch + 1}/{epochs} step {step}/{steps} | lr {log['lr']:.4g} | loss per block "
            f"{losses_txt} | {log['img_per_s']:.1f} img/s | ETA {clock(eta_s)}")


if __name__ == "__main__":
    run(main, get_args(), "train.py")
