"""Blockwise self-supervised pre-training (Siddiqui et al., TMLR 2024). Defaults are the paper's ImageNet run.

    python train.py --data /imagenet                                   # one process (CPU or 1 GPU)
    torchrun --nproc_per_node=8 train.py --data /imagenet --bf16 --gpu-aug     # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...

The run writes DIR/checkpoint.pth every epoch (and on SIGTERM, SIGUSR1, SIGHUP or Ctrl-C) and resumes from it by
itself, DIR/log.jsonl (one JSON object per line), and at the end DIR/trunk.pth, a torchvision state_dict.
"""
import argparse
import math
import os
import signal
import time
import types

import torch

import bookkeeping
import distributed
import losses
import recompute
import routing
import vit
from augment import SET_PRESETS, SETS, augment, normalize, view_sets
from blockwise import ARCHS, BLOCK_PRESETS, POOLINGS, parse_blocks
from cli import (COUNT, FRACTION, NON_NEGATIVE, ODD, POSITIVE, POSITIVE_INT, SEED, STOP, Abort, Parser, block_split,
                 clock, number_list, numbers, one_line, run, start_workers, stop_on_signals, widths, worker_died)
from data import DATASETS, dataset, training_loader
from evaluation import monitor_sets, monitors


def get_args(argv=None):
    p = Parser(__doc__)
    a = p.add_argument_group("model (§3.1, §3.3, §3.4)").add_argument
    a("--arch", default="resnet50", choices=ARCHS + tuple(vit.VITS), help="torchvision ResNet (§3.1: resnet50), or "
      "VisionTransformer (vit.py, the paper's future work: 12 layers as 4 stages of 3)")
    a("--blocks", default="1,2,3,4", type=block_split, help="stages per block: 1,2,3,4 (§3.1), 12,3,4 merged B1+B2 "
      f"(Fig. 7), 1234 end-to-end, 12,23,34 LoCo; or a preset: {', '.join(BLOCK_PRESETS)}")
    a("--pooling", default="cbe", choices=tuple(dict.fromkeys(POOLINGS + vit.POOLINGS)), help="block head (§3.3, "
      "Fig. 3, Fig. 6); a ViT's: gsp (mean of the patch tokens), cls (the class token), cbe (token-wise expansion)")
    a("--head-dim", type=POSITIVE_INT, default=2048, help="width of the lsp/cbe head output")
    a("--kernel-size", type=ODD, default=1, help="CbE convolution kernel (Fig. 12)")
    a("--groups", type=POSITIVE_INT, default=1, help="CbE convolution groups (App. B)")
    a("--projector", default="8192-8192-8192", type=widths, help="projector widths (§3.4)")
    a("--patch-size", type=POSITIVE_INT, default=16, help="ViT patch size (4 for 32 px images)")
    a("--mask", default="0", type=number_list, help="ViT: the fraction of the image's patch tokens each block does "
      "not see in training (§6), one value or one per block, non-decreasing, e.g. 0,0.25,0.5,0.75 (nested masks)")
    a("--mask-views", default="one", choices=("one", "both"), help="ViT: mask the first view only, or both")
    a = p.add_argument_group("loss (§3.2, Fig. 5, §5, App. A)").add_argument
    a("--loss", default="barlowtwins", choices=losses.LOSSES, help="§3.2 Barlow Twins, Fig. 5 VICReg / SimCLR, "
      "§5 supervised blockwise")
    a("--lambd", default="0.0051", type=number_list, help="Barlow Twins lambda, Eq. (2); a comma list sets it per "
      "block (Fig. 10)")
    a("--target", default="1.0", type=number_list, help="invariance target of C_ii; per block e.g. 0.6,0.75,0.9,1.0 "
      "(App. A)")
    a("--scale-loss", type=POSITIVE, default=0.024, help="Barlow Twins loss scale of the released run")
    a("--temperature", type=POSITIVE, default=0.1, help="SimCLR temperature")
    a("--route", default="none", choices=routing.SCHEMES, help="App. A's difficulty-based routing (routing.py): below "
      "= an example trains its block and those below it; weight = its block, and the others with --route-weight")
    a("--route-weight", type=FRACTION, default=0.5, help="--route weight: the weight of the blocks an example is not "
      "routed to")
    a = p.add_argument_group("noise (§5)").add_argument
    a("--noise", type=NON_NEGATIVE, default=0.25, help="sigma of the training noise, relative to std(x)")
    a = p.add_argument_group("which blocks train, and on what (§3.1, Fig. 4, Fig. 7, App. A)").add_argument
    a("--mode", default="simultaneous", choices=("simultaneous", "sequential"),
      help="train all blocks at once, or block k for --epochs then freeze it (and its BN)")
    a("--frozen", default="", help="blocks (1-based, e.g. 1,2,3) kept frozen: random init (Fig. 4 random baseline) "
      "or loaded from --init (Fig. 7)")
    a("--init", default="", help="trunk weights (trunk.pth or checkpoint.pth) for the --frozen blocks")
    a("--augmentations", default="full", help=f"the views' set, one for every block, or one per block in sequential "
      f"mode (App. A): from {', '.join(SETS)}, or the preset {', '.join(f'{k} = {v}' for k, v in SET_PRESETS.items())}")
    a = p.add_argument_group("optimisation (§3.4)").add_argument
    a("--epochs", type=POSITIVE_INT, default=300, help="epochs (per block in sequential mode)")
    a("--batch-size", type=POSITIVE_INT, default=2048, help="global batch size, over all processes")
    a("--lr", type=NON_NEGATIVE, default=0.2, help="base learning rate, scaled by batch-size / 256")
    a("--warmup-epochs", type=NON_NEGATIVE, default=10, help="linear warm-up from 0")
    a("--weight-decay", type=NON_NEGATIVE, default=1e-6, help="LARS weight decay (not on 1-D parameters)")
    a("--lars-eta", type=POSITIVE, default=0.001, help="LARS trust coefficient: a step moves a weight by about lr x "
      "eta of its norm. 0.001 suits ImageNet's 187k steps; short runs need more (results/README.md)")
    a("--optimizer", default="lars", choices=("lars", "adamw"), help="LARS (§3.4), or AdamW, the usual ViT "
      "optimiser (1-D parameters without weight decay; --lr is then its base lr, scaled by batch-size / 256)")
    a("--grad-scale", type=POSITIVE, default=1.0, help="multiply every gradient by this before the LARS step; "
      "0.0625 reproduces the released 16-process run, whose gradients were 1/16 of the true ones (README)")
    a = p.add_argument_group("data").add_argument
    a("--data", default="./data", help="dataset root (for folder: root/train, root/val)")
    a("--dataset", default="folder", choices=DATASETS, help="folder = ImageNet layout")
    a("--limit", type=COUNT, default=0, help="use N training images, balanced over the classes and drawn with "
      "--seed (0 = all)")
    a("--image-size", type=POSITIVE_INT, default=224, help="crop size of the two views")
    a("--crop-scale", type=FRACTION, default=0.08, help="smallest area of a random crop, as a fraction of the image "
      "(Barlow Twins: 0.08); small images may want milder crops (results/README.md)")
    a("--workers", type=COUNT, default=min(8, os.cpu_count()), help="data loading processes per process")
    a("--gpu-aug", action="store_true", help="the workers only decode and crop; flip, colour jitter, grayscale, blur "
      "and solarize run batched on the device, each image with its own draw (docs/performance.md)")
    a = p.add_argument_group("run").add_argument
    a("--out", default="./runs/blockwise", help="output directory; an existing run in it is resumed")
    a("--seed", type=SEED, default=0, help="seed of the weights, the data order and every augmentation")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: a GPU if one is usable; --bf16, "
      "--gpu-aug or several processes without one are refused unless --device cpu")
    a("--bf16", action="store_true", help="bfloat16 autocast (losses stay fp32)")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the heads and "
      "projectors: faster and leaner (bench.py); a minute of compiling at the start, and on CPU a C++ compiler")
    a("--recompute", default="none", choices=recompute.MODES, help="recompute in the backward instead of storing: "
      "heads = the CbE maps, all = those and every residual unit")
    a("--print-freq", type=POSITIVE_INT, default=50, help="steps between progress lines (and at least one every 30 s)")
    a("--timeout", type=POSITIVE, default=10.0, help="minutes a process waits for the others before the run stops "
      "with an error (a stalled or lost process)")
    a("--monitor-every", type=COUNT, default=1, help="epochs between the online monitors (kNN top-1 and RankMe of "
      "every block on held-out images, README); 0 = off")
    a("--monitor-images", type=POSITIVE_INT, default=10000, help="images in the monitors' kNN bank (from the "
      "training set) and in their held-out set (from val/ or the test split), each balanced over the classes")
    return p.parse_args(argv)


def check_args(args, world):
    """What no single flag can say alone, refused before anything starts, naming the flag."""
    if args.warmup_epochs > args.epochs:
        raise Abort(f"--warmup-epochs {args.warmup_epochs:g}: must be between 0 and --epochs {args.epochs}")
    if args.init and not args.frozen:
        raise Abort(f"--init {args.init}: used with --frozen, which names the blocks it fills")
    if args.batch_size % world:
        raise Abort(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.arch in vit.VITS and args.recompute != "none":
        raise Abort(f"--recompute {args.recompute}: for ResNets only (a ViT has no CbE maps or residual units to "
                    "recompute)")
    if args.arch not in vit.VITS and args.mask != "0":
        raise Abort(f"--mask {args.mask}: masking drops a ViT's patch tokens (--arch vit_tiny, vit_small, vit_base)")
    if args.route != "none" and (args.loss != "barlowtwins" or args.mode != "simultaneous"):
        raise Abort(f"--route {args.route}: routes Barlow Twins' examples among blocks trained together (--loss "
                    "barlowtwins, --mode simultaneous)")
    if args.batch_size // world < 2:
        raise Abort(f"--batch-size {args.batch_size}: each of the {world} processes needs at least 2 images "
                    "(BatchNorm's batch statistics)")


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in Barlow Twins: the update g + wd * w is rescaled by the trust ratio
    eta * |w| / |g + wd * w|, then SGD with momentum. Every 1-D parameter (biases, BatchNorm) gets
    neither weight decay nor the trust ratio, as the released run. Hand-written: torch has no LARS, and the
    exclusion of 1-D parameters from both is the released run's."""

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


def loss_functions(args, n):
    """The loss of each of the n blocks: a function of its two views' projector outputs and the labels."""
    lambds, targets = numbers(args.lambd, "--lambd", n), numbers(args.target, "--target", n)

    def loss(k):
        if args.loss == "barlowtwins":  # Eq. (2); per-block lambda (Fig. 10) and invariance target (App. A)
            return lambda z1, z2, y, w=None: losses.barlow_twins(z1, z2, lambds[k], args.scale_loss, targets[k], w)
        if args.loss == "vicreg":
            return lambda z1, z2, y: losses.vicreg(z1, z2)
        if args.loss == "simclr":
            return lambda z1, z2, y: losses.simclr(z1, z2, args.temperature)
        return lambda z1, z2, y: (losses.supervised(z1, y) + losses.supervised(z2, y)) / 2  # §5
    return [loss(k) for k in range(n)]


def train_step(model, y1, y2, labels, loss_fns, trained, owners, bf16=False, drops=(None, None), weights=None,
               measure=None):
    """One step of Algorithm 1 on two views y1, y2, lean in memory: block k's loss is back-propagated as
    soon as block k has run, so its graph is freed before block k+1 starts (the released code runs every
    forward first). The gradients are those of the sum of the block losses, since no loss reaches another
    block. `trained`: the blocks that learn this step; `owners[k]`: the parameters whose gradient is final after
    block k (grad_owners). `drops`: each view's masking (ViT, §6); `weights[k]`: block k's sample weights (App. A's
    routing); `measure` is called with the last block's outputs. Returns the detached loss of each trained block."""
    views = model.blockwise(y1, drops[0]), model.blockwise(y2, drops[1])
    out, pending = [], []
    for k in range(max(trained) + 1):
        with torch.autocast(y1.device.type, torch.bfloat16, enabled=bf16):
            h1, h2 = next(views[0]), next(views[1])
            if k not in trained:
                continue  # a frozen block only feeds the next one
            loss = block_loss(model, k, h1, h2, labels, loss_fns[k], weights[k] if weights else None)
        loss.backward()  # Algorithm 1: one backward per block
        pending.append(distributed.average_grads(owners[k]))
        out.append(loss.detach())
        if measure and k == len(model.blocks) - 1:
            measure(h1.detach(), h2.detach())
    for finish in pending:
        finish()
    return torch.stack(out)


def block_loss(model, k, h1, h2, labels, loss_fn, weight=None):
    """Block k's loss from its two views' outputs: its head (§3.3), its projector (§3.4), its loss. With `weight`
    (App. A's routing), only the examples of non-zero weight reach the head, and the loss weighs them."""
    if weight is not None:
        keep = weight > 0
        h1, h2, weight, labels = h1[keep], h2[keep], weight[keep], labels[keep] if labels is not None else None
    z1, z2 = (model.projectors[k](model.heads[k](h)) for h in (h1, h2))
    return loss_fn(z1, z2, labels) if weight is None else loss_fn(z1, z2, labels, weight)


def main(args):
    device = distributed.setup(args.device, args.timeout, needs_gpu=" and ".join(
        f for f, on in (("--bf16", args.bf16), ("--gpu-aug", args.gpu_aug)) if on))
    check_args(args, distributed.world())
    with bookkeeping.prepare_out(args.out):  # rank 0 holds the output folder's lock until the run ends
        fit(prepare(args, device))


def prepare(args, device):
    """Everything a run needs, in a namespace: data, model, loss per block, optimizer, resume point."""
    run = types.SimpleNamespace(args=args, log=bookkeeping.Log(args.out), path=os.path.join(args.out, "checkpoint.pth"))
    stop_on_signals()  # from here on, a stop signal saves (at the first step, if it comes during the set-up)
    run.log(env=bookkeeping.environment())
    run.train_set = dataset(args.dataset, args.data, train=True, limit=args.limit, seed=args.seed)
    run.config = model_config(args, run.train_set.num_classes)
    run.model = model = build(run.config, args, device)
    run.synced_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    n = len(model.blocks)
    run.phases, run.sets = training_phases(args, n), view_sets(args.augmentations, n, args.crop_scale)
    if len(set(run.sets)) > 1 and args.mode != "sequential":
        raise Abort(f"--augmentations {args.augmentations}: one set per block needs --mode sequential (App. A)")
    run.loss_fns, run.drops, run.optimizer = loss_functions(args, n), masks(args, n), optimizer(model, args)
    run.router = routing.Router(len(run.train_set), n, args.route, args.route_weight, device) \
        if args.route != "none" else None
    if distributed.rank() == 0:
        bookkeeping.check_free_space(args.out, model)
    run.data = bookkeeping.fingerprint(run.train_set)
    run.epochs = args.epochs * len(run.phases)  # sequential: --epochs per block
    run.start = bookkeeping.resume(run)
    run.loader, run.local = training_loader(run.train_set, run.sets, args), args.batch_size // distributed.world()
    run.steps = len(run.loader.sampler.epoch_keys(0)) // run.local
    if run.steps == 0:
        raise Abort(f"--batch-size {args.batch_size} is larger than the {len(run.train_set)} training images")
    run.monitored = monitor_sets(args.data, args.dataset, args.monitor_images, args.image_size, args.seed) \
        if args.monitor_every else None
    return run


def fit(run):
    """The epochs (each saved, then monitored), from where the run stopped; at the end, trunk.pth."""
    args, (start_epoch, start_step) = run.args, run.start
    if distributed.rank() == 0:
        print(f"{args.arch}, blocks {run.model.blocks}, {args.mode}, {args.loss}, {args.pooling}; "
              f"{len(run.train_set)} images, {distributed.world()} process(es) on {distributed.DEVICE}, {run.steps} "
              f"steps/epoch, epochs {start_epoch}->{run.epochs}", flush=True)
    for epoch in range(start_epoch, run.epochs):
        trained = run.phases[epoch // args.epochs]
        first = start_step if epoch == start_epoch else 0
        run.loader.sampler.keys = run.loader.sampler.epoch_keys(epoch, first * run.local, run.steps * run.local,
                                                                trained[0])  # this block's set of views (App. A)
        stopped = train_one_epoch(run, trained, epoch, first)
        if distributed.rank() == 0:  # every epoch, and when a signal or a failure stopped one
            done = (epoch, stopped[0]) if stopped else (epoch + 1, 0)
            bookkeeping.save_checkpoint(run.path, run.model, run.optimizer, *done, run.config, args, run.data,
                                        **(dict(router=run.router.table) if run.router else {}))
        if stopped:
            return report_stop(*stopped, epoch, run.path)
        if run.monitored and (epoch + 1) % args.monitor_every == 0:
            log_monitors(epoch, run.model, run.monitored, run.train_set.num_classes, args, run.log)
    finish(run.model, args)


def train_one_epoch(run, trained, epoch, first):
    """Steps first..run.steps-1 of one epoch, training the blocks `trained`. Returns None, or (steps done, the
    failure or None) when a stop signal or a failure in any process stopped the epoch early: every process stops at
    the same step. Losses are checked for NaN at each progress line and at the end, not at every step (that would
    wait for the GPU): a checkpoint is never written after a non-finite loss."""
    args, model, optimizer = run.args, run.model, run.optimizer
    device, fmt = distributed.DEVICE, torch.channels_last if args.channels_last else torch.contiguous_format
    set_trainable(model, trained)
    owners, progress, batches = grad_owners(model, trained), Progress(epoch, first, run), start_workers(run.loader)
    for i in range(first, run.steps):
        batch, failure = fetch(batches)
        signalled, failed = distributed.agree(STOP, failure is not None)
        if signalled or failed:
            progress.check(trained)
            return i, failure, failed
        views, labels = batch
        if args.gpu_aug:  # the workers only cropped: flip, jitter, grayscale, blur, solarize run here (augment.py)
            views = [augment(crops.to(device, non_blocking=True), choices) for crops, choices in views]
        y1, y2 = (normalize(v.to(device, non_blocking=True)).contiguous(memory_format=fmt) for v in views)
        set_lr(optimizer, (epoch % args.epochs) * run.steps + i, run.steps, args)  # sequential: each block's own
        torch.manual_seed(step_seed(args.seed, distributed.rank(), epoch, i))  # the noise of §5, resumable
        optimizer.zero_grad(set_to_none=True)  # frozen blocks keep grad None, so LARS skips them
        routes = routed(run, i - first) if run.router else ()  # App. A: sample weights per block, and difficulties
        block_losses = train_step(model, y1, y2, labels.to(device, non_blocking=True), run.loss_fns, trained, owners,
                                  args.bf16, run.drops, *routes)
        scale_grads(model, args.grad_scale)
        optimizer.step()
        if not run.synced_bn:  # SyncBatchNorm keeps the statistics equal; plain BatchNorm (CPU) needs rank 0's
            distributed.broadcast_buffers(model)
        progress(i, block_losses, optimizer.param_groups[0]["lr"], trained, run.log)
    progress.check(trained)
    return None


def fetch(batches):
    """The next batch, or the error that fetching it raised (a corrupt image, a data-loading worker that died)."""
    try:
        return next(batches), None
    except Exception as e:  # noqa: BLE001 (any failure must first be agreed on, so that rank 0 can save)
        return None, e


class Progress:
    """The progress line and log.jsonl entry (rank 0) after the first step, every --print-freq steps and at least
    every 30 s, with images/s and the ETA; and the NaN check of the losses since the last check."""

    def __init__(self, epoch, first, run):
        self.epoch, self.first, self.steps, self.args, self.epochs = epoch, first, run.steps, run.args, run.epochs
        self.path = run.path
        self.t0 = self.shown = time.time()
        self.window, self.seen = [], 0

    def __call__(self, i, block_losses, lr, trained, log):
        self.window.append((i, block_losses))
        self.seen += self.args.batch_size
        if (i + 1) % self.args.print_freq and i + 1 < self.steps and i > self.first and time.time() - self.shown < 30:
            return
        self.check(trained)
        self.shown, rate = time.time(), self.seen / (time.time() - self.t0)
        entry = dict(epoch=self.epoch, step=i + 1, lr=lr, loss=block_losses.tolist(), img_per_s=rate,
                     blocks=[k + 1 for k in trained], time=round(time.time(), 3))
        log(**entry)
        left = ((self.epochs - self.epoch - 1) * self.steps + self.steps - i - 1) * self.args.batch_size
        if distributed.rank() == 0:
            print(f"epoch {self.epoch + 1}/{self.epochs} step {i + 1}/{self.steps} | lr {lr:.4g} | loss per block "
                  f"{' '.join(f'{v:.4g}' for v in entry['loss'])} | {rate:.1f} img/s | ETA {clock(left / rate)}",
                  flush=True)

    def check(self, trained):
        """Stop (one line) if a loss since the last check is not finite: before anything is saved."""
        if not self.window:
            return
        steps, values = zip(*self.window)
        values, self.window = torch.stack(values).cpu(), []
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            kept = f"{self.path} holds the last good state" if os.path.exists(self.path) else \
                "no checkpoint was written"
            raise Abort(f"loss of block {trained[col] + 1} is {values[row, col].item()} at epoch {self.epoch + 1} "
                        f"step {steps[row] + 1}; stopped, {kept}")


def report_stop(step, failure, failed_elsewhere, epoch, path):
    """After every process agreed to stop and rank 0 saved: a stop signal ends the run with exit 0; a failure with
    one line in the process that failed, and one in the others."""
    where = f"saved {path} at epoch {epoch + 1} step {step}; rerun to resume"
    if failure is not None:
        cause = one_line(failure)
        if worker_died(failure):
            cause = (f"a data-loading worker died ({cause[:160]}): out of memory, or a /dev/shm too small for "
                     "--workers x the batch; try fewer --workers or a larger /dev/shm")
        raise Abort(f"{cause}; {where}")
    if failed_elsewhere:
        raise Abort(f"stopped: another process failed (see its line); {where}")
    if distributed.rank() == 0:
        why = signal.Signals(STOP[0]).name if STOP else "another process was signalled"
        print(f"{why}: {where}", flush=True)


def log_monitors(epoch, model, sets, classes, args, log):
    found = monitors(model, sets, classes, max(1, args.batch_size // distributed.world()), args.workers)
    if found is not None:  # rank 0
        print(f"monitors after epoch {epoch + 1}: kNN top-1 per block " + " ".join(f"{v:.2f}" for v in found["knn"])
              + " | RankMe per block " + " ".join(f"{v:.1f}" for v in found["rankme"]), flush=True)
        log(epoch=epoch, monitor=found)


def finish(model, args):
    """Every process must hold rank 0's weights; then trunk.pth, torchvision's state_dict of the trunk."""
    same = distributed.check_replicas(model) if distributed.active() else None
    if distributed.rank() == 0:
        if same:
            print(same, flush=True)
        bookkeeping.save_atomic(model.trunk_state_dict(), os.path.join(args.out, "trunk.pth"))
        kind = "VisionTransformer" if args.arch in vit.VITS else args.arch
        print(f"done: {args.out}/checkpoint.pth, trunk (torchvision {kind} state_dict) in {args.out}/trunk.pth",
              flush=True)


def routed(run, j):
    """train_step's `weights` and `measure` for App. A's routing, for the j-th batch of this epoch's keys: its sample
    weights per block, and the recording of its difficulties."""
    keys = run.loader.sampler.keys[j * run.local:(j + 1) * run.local]
    index = torch.tensor([key[1] for key in keys], device=run.router.table.device)
    record = lambda h1, h2: run.router.record(index, routing.difficulty(h1, h2, run.model.pool_trunk))  # noqa: E731
    return run.router.weights(index), record


def optimizer(model, args):
    """LARS (§3.4); or AdamW, with the same exclusion of 1-D parameters from weight decay."""
    if args.optimizer == "lars":
        return LARS(model.parameters(), lr=0, weight_decay=args.weight_decay, eta=args.lars_eta)
    params = list(model.parameters())
    return torch.optim.AdamW([dict(params=[p for p in params if p.ndim > 1]),
                              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)],
                             lr=0, weight_decay=args.weight_decay)


def masks(args, n):
    """--mask as each view's per-block fractions (ViT, §6), or (None, None) when nothing is masked."""
    fractions = numbers(args.mask, "--mask", n)
    if any(not 0 <= f < 1 for f in fractions) or fractions != sorted(fractions):
        raise Abort(f"--mask {args.mask}: fractions in [0, 1) that do not decrease from block to block (nested masks)")
    if not any(fractions):
        return None, None
    return fractions, fractions if args.mask_views == "both" else None


def set_lr(optimizer, step, steps, args):
    for g in optimizer.param_groups:
        g["lr"] = learning_rate(step, args.epochs * steps, args.warmup_epochs * steps, args.lr * args.batch_size / 256)


def step_seed(seed, rank, epoch, step):
    """The seed of the noise (§5) drawn by one process at one step: a resumed run draws the same noise."""
    return hash((seed, rank, epoch, step)) & 0xFFFF_FFFF


def scale_grads(model, scale):
    if scale != 1:  # the released run's gradient scale (README, "How this differs")
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)


def set_trainable(model, trained):
    """Train the blocks in `trained`; every other block is frozen, BatchNorm statistics included (§5)."""
    model.train()
    for k in range(len(model.blocks)):
        for m in model.block_modules(k):
            m.train(False).requires_grad_(False)
    for k in trained:
        for m in model.block_modules(k):
            m.train(True).requires_grad_(True)


def grad_owners(model, trained):
    """For each trained block, the trainable parameters whose gradient is final once its backward is done
    (LoCo's shared stage waits for the later unit)."""
    seen, owners = set(), {}
    for k in reversed(trained):
        params = [p for m in model.block_modules(k) for p in m.parameters() if p.requires_grad]
        owners[k] = [p for p in dict.fromkeys(params) if p not in seen]
        seen.update(owners[k])
    return owners


def frozen_blocks(args, n):
    """--frozen as 0-based block numbers, checked against the n blocks."""
    try:
        frozen = {int(k) - 1 for k in args.frozen.split(",") if k}
    except ValueError:
        frozen = {-1}
    if not frozen <= set(range(n)) or len(frozen) == n:
        raise Abort(f"--frozen {args.frozen}: must name some, not all, of blocks 1-{n}")
    return frozen


def training_phases(args, n):
    """The blocks trained together, phase after phase: every block but the --frozen ones at once (simultaneous), or
    one after another, each for --epochs (sequential, §3.1, Fig. 2)."""
    trained = [k for k in range(n) if k not in frozen_blocks(args, n)]
    return [[k] for k in trained] if args.mode == "sequential" else [trained]


def build(config, args, device):
    """The model, with the same initial weights in every process (seeded; --init fills the --frozen blocks), on
    its device, SyncBatchNorm on GPUs under torchrun, the --recompute mode, compiled heads."""
    model = bookkeeping.network(config, args.seed, frozen_blocks(args, len(parse_blocks(args.blocks))), args.init)
    if device.type == "cuda" and distributed.active():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBatchNorm is GPU-only
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if args.recompute != "none":
        recompute.apply(model, args.recompute)
    if args.compile:
        compile_heads(model)
    return model


def compile_heads(model):
    """torch.compile each head and projector in place (state_dict keys unchanged): it fuses CbE's BN + ReLU +
    pool and stores less (bench.py). The trunk stays eager (slower compiled, docs/performance.md); so does a LeanCbE
    head, whose hand-written autograd compile would not trace."""
    # The heads share one forward, compiled once per head, mode (train, eval) and batch size (a monitor's last
    # batch): more than dynamo's default of 8, past which it warns and runs the rest eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(model.heads))
    for m in [*model.heads, *model.projectors]:
        if not recompute.is_lean(m):
            m.compile()


def model_config(args, num_classes):
    """The arguments of BlockResNet (or vit.BlockViT), stored in every checkpoint so probe.py and resume rebuild the
    model exactly."""
    widths = [int(w) for w in args.projector.split("-")]
    if args.loss == "supervised":  # §3.4: the projector's last layer outputs the classes
        widths[-1] = num_classes
    config = dict(arch=args.arch, blocks=args.blocks, pooling=args.pooling, head_dim=args.head_dim, noise=args.noise,
                  projector_widths=widths)
    if args.arch in vit.VITS:
        return dict(config, image_size=args.image_size, patch_size=args.patch_size)
    return dict(config, kernel_size=args.kernel_size, groups=args.groups)


if __name__ == "__main__":
    run(main, get_args(), "train.py")
