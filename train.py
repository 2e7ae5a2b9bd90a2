"""Blockwise self-supervised pre-training (Siddiqui et al., TMLR 2024). Defaults are the paper's
ImageNet run: a ResNet-50 in 4 blocks joined by a stop-gradient, each block with its own CbE head,
projector and Barlow Twins loss, trained simultaneously with LARS.

The paper's result: a linear probe on block 4 reaches 70.48 % top-1 on ImageNet against 71.57 % for
end-to-end Barlow Twins (Fig. 4). Our small-scale reproduction (results/README.md: ResNet-18, 10,000
Fashion-MNIST images, 6 epochs, 2 CPU cores) gives 82.9 against 84.2 at block 4, 3 seeds each.

    python train.py --data /imagenet                                   # one process (CPU or 1 GPU)
    torchrun --nproc_per_node=8 train.py --data /imagenet --bf16 --gpu-aug     # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        train.py ...                                                   # 4 nodes (README)

The run writes DIR/checkpoint.pth every epoch (and on SIGTERM, SIGUSR1, SIGHUP or Ctrl-C) and
resumes from it by itself, DIR/log.jsonl (one JSON object per line), and at the end DIR/trunk.pth,
a torchvision state_dict.
"""
import argparse
import dataclasses
import math
import itertools
import os

import torch

import bookkeeping
import cli
import distributed
import losses
import pipeline
import recompute
import routing
import vit
from augment import SET_PRESETS, SETS, to_device, view_sets
from blockwise import ARCHS, BLOCK_PRESETS, POOLINGS, Blockwise, parse_blocks
from data import DATASETS, dataset, training_loader
from evaluation import log_monitors, monitor_sets

# ---------------------------------------------------------------- flags (defaults: the paper's run)

def get_args(argv=None):
    p = cli.Parser(__doc__)
    a = p.add_argument_group("model (§3.1, §3.3, §3.4)").add_argument
    a("--arch", default="resnet50", choices=ARCHS + tuple(vit.VITS), help="torchvision ResNet "
      "(§3.1: resnet50), or VisionTransformer (vit.py, the paper's future work: 12 layers as 4 "
      "stages of 3)")
    a("--blocks", default="1,2,3,4", type=cli.block_split, help="stages per block: 1,2,3,4 "
      "(§3.1), 12,3,4 merged B1+B2 (Fig. 7), 1234 end-to-end, 12,23,34 LoCo; or a preset: "
      + ", ".join(BLOCK_PRESETS))
    a("--pooling", default="cbe", choices=tuple(dict.fromkeys(POOLINGS + vit.POOLINGS)),
      help="block head (§3.3, Fig. 3, Fig. 6); a ViT's: gsp (mean of the patch tokens), cls (the "
      "class token), cbe (token-wise expansion)")
    a("--head-dim", type=cli.POSITIVE_INT, default=2048, help="width of the lsp/cbe head output")
    a("--kernel-size", type=cli.ODD, default=1, help="CbE convolution kernel (Fig. 12)")
    a("--groups", type=cli.POSITIVE_INT, default=1, help="CbE convolution groups (App. B)")
    a("--projector", default="8192-8192-8192", type=cli.widths, help="projector widths (§3.4)")
    a("--patch-size", type=cli.POSITIVE_INT, default=16, help="ViT patch size (4 for 32 px images)")
    a("--mask", default="0", type=cli.number_list, help="ViT: the fraction of the image's patch "
      "tokens each block does not see in training (§6), one value or one per block, "
      "non-decreasing, e.g. 0,0.25,0.5,0.75 (nested masks)")
    a("--mask-views", default="one", choices=("one", "both"), help="ViT: mask the first view only, "
      "or both")
    a = p.add_argument_group("loss (§3.2, Fig. 5, §5, App. A)").add_argument
    a("--loss", default="barlowtwins", choices=losses.LOSSES, help="§3.2 Barlow Twins, Fig. 5 "
      "VICReg / SimCLR, §5 supervised blockwise")
    a("--lambd", default="0.0051", type=cli.number_list, help="Barlow Twins lambda, Eq. (2); a "
      "comma list sets it per block (Fig. 10)")
    a("--target", default="1.0", type=cli.number_list, help="invariance target of C_ii; per block "
      "e.g. 0.6,0.75,0.9,1.0 (App. A)")
    a("--scale-loss", type=cli.POSITIVE, default=0.024, help="Barlow Twins loss scale of the "
      "released run")
    a("--temperature", type=cli.POSITIVE, default=0.1, help="SimCLR temperature")
    a("--route", default="none", choices=routing.SCHEMES, help="App. A's difficulty-based routing "
      "(routing.py): below = an example trains its block and those below it; weight = its block, "
      "and the others with --route-weight")
    a("--route-weight", type=cli.FRACTION, default=0.5, help="--route weight: the weight of the "
      "blocks an example is not routed to")
    a = p.add_argument_group("noise (§5)").add_argument
    a("--noise", type=cli.NON_NEGATIVE, default=0.25, help="sigma of the training noise, relative "
      "to std(x)")
    a = p.add_argument_group("which blocks train, on what (§3.1, Fig. 4, 7, App. A)").add_argument
    a("--mode", default="simultaneous", choices=("simultaneous", "sequential"),
      help="train all blocks at once, or block k for --epochs then freeze it (and its BN)")
    a("--frozen", default="", help="blocks (1-based, e.g. 1,2,3) kept frozen: random init (Fig. 4 "
      "random baseline) or loaded from --init (Fig. 7)")
    a("--init", default="", help="trunk weights (trunk.pth or checkpoint.pth) for the --frozen "
      "blocks")
    presets = ", ".join(f"{k} = {v}" for k, v in SET_PRESETS.items())
    a("--augmentations", default="full", help="the views' set, one for every block, or one per "
      f"block in sequential mode (App. A): from {', '.join(SETS)}, or the preset {presets}")
    a = p.add_argument_group("optimisation (§3.4)").add_argument
    a("--epochs", type=cli.POSITIVE_INT, default=300, help="epochs (per block in sequential mode)")
    a("--batch-size", type=cli.POSITIVE_INT, default=2048, help="global batch size, over all "
      "processes")
    a("--lr", type=cli.NON_NEGATIVE, default=0.2, help="base learning rate, scaled by batch-size / "
      "256")
    a("--warmup-epochs", type=cli.NON_NEGATIVE, default=10, help="linear warm-up from 0")
    a("--weight-decay", type=cli.NON_NEGATIVE, default=1e-6, help="LARS weight decay (not on 1-D "
      "parameters)")
    a("--lars-eta", type=cli.POSITIVE, default=0.001, help="LARS trust coefficient: a step moves a "
      "weight by about lr x eta of its norm. 0.001 suits ImageNet's 187k steps; short runs need "
      "more (results/README.md)")
    a("--optimizer", default="lars", choices=("lars", "adamw"), help="LARS (§3.4), or AdamW, the "
      "usual ViT optimiser (1-D parameters without weight decay; --lr is then its base lr, scaled "
      "by batch-size / 256)")
    a("--grad-scale", type=cli.POSITIVE, default=1.0, help="multiply every gradient by this before "
      "the LARS step; 0.0625 reproduces the released 16-process run, whose gradients were 1/16 of "
      "the true ones (README)")
    a = p.add_argument_group("data").add_argument
    a("--data", default="./data", help="dataset root (for folder: root/train, root/val)")
    a("--dataset", default="folder", choices=DATASETS, help="folder = ImageNet layout")
    a("--limit", type=cli.COUNT, default=0, help="use N training images, balanced over the classes "
      "and drawn with --seed (0 = all)")
    a("--image-size", type=cli.POSITIVE_INT, default=224, help="crop size of the two views")
    a("--crop-scale", type=cli.FRACTION, default=0.08, help="smallest area of a random crop, as a "
      "fraction of the image (Barlow Twins: 0.08); small images may want milder crops "
      "(results/README.md)")
    a("--workers", type=cli.COUNT, default=min(8, os.cpu_count()), help="data loading processes "
      "per process")
    a("--gpu-aug", action="store_true", help="the workers only decode and crop; flip, colour "
      "jitter, grayscale, blur and solarize run batched on the device, each image with its own "
      "draw (docs/performance.md)")
    a = p.add_argument_group("run").add_argument
    a("--out", default="./runs/blockwise", help="output directory; an existing run in it is "
      "resumed")
    a("--seed", type=cli.SEED, default=0, help="seed of the weights, the data order and every "
      "augmentation")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: a GPU if one is "
      "usable; --bf16, --gpu-aug or several processes without one are refused unless --device cpu")
    a("--bf16", action="store_true", help="bfloat16 autocast (losses stay fp32)")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the "
      "heads and projectors: faster and leaner (bench.py); a minute of compiling at the start, and "
      "on CPU a C++ compiler")
    a("--recompute", default="none", choices=recompute.MODES, help="recompute in the backward "
      "instead of storing: heads = the CbE maps, all = those and every residual unit")
    a("--print-freq", type=cli.POSITIVE_INT, default=50, help="steps between progress lines (and "
      "at least one every 30 s)")
    a("--stages", default="", help="blocks on separate devices (pipeline.py, README): the blocks "
      "of each pipeline stage, e.g. 1,234 or 1,2,3,4, or auto (one stage per process, the "
      "split whose costliest stage costs least, measured at the start); under torchrun the "
      "processes form stages x replicas, stage = rank // replicas. Exactly the simultaneous run")
    a("--timeout", type=cli.POSITIVE, default=10.0, help="minutes a process waits for the others "
      "before the run stops with an error (a stalled or lost process)")
    a("--monitor-every", type=cli.COUNT, default=1, help="epochs between the online monitors (kNN "
      "top-1 and RankMe of every block on held-out images, README); 0 = off")
    a("--monitor-images", type=cli.POSITIVE_INT, default=10000, help="images in the monitors' kNN "
      "bank (from the training set) and in their held-out set (from val/ or the test split), each "
      "balanced over the classes")
    return p.parse_args(argv)


# ---------------------------------------------------------------- §3.4: LARS and its schedule

class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in Barlow Twins: the update g + wd * w is rescaled by the trust
    ratio eta * |w| / |g + wd * w|, then SGD with momentum. Every 1-D parameter (biases, BatchNorm)
    gets neither weight decay nor the trust ratio, as the released run. Hand-written: torch has no
    LARS, and the exclusion of 1-D parameters from both is the released run's."""

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):  # torch's foreach operations: a few kernels per group, not ~6 per parameter
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:  # (not setdefault: it would allocate the zeros at every step)
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            mus = [self.state[p]["mu"] for p in params]
            mats = [i for i, p in enumerate(params) if p.ndim > 1]
            updates = [p.grad for p in params]
            if mats:  # weight decay and the trust ratio, on matrices only
                w = [params[i] for i in mats]
                u = torch._foreach_add([updates[i] for i in mats], w, alpha=g["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(w))
                u_norm = torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), g["eta"] * w_norm / u_norm, 1.0)
                torch._foreach_mul_(u, list(trust.unbind()))
                for i, ui in zip(mats, u):
                    updates[i] = ui
            torch._foreach_mul_(mus, g["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-g["lr"])


def build_optimizer(params, args):
    """LARS (§3.4); or AdamW, with the same exclusion of 1-D parameters from weight decay."""
    params = list(params)
    if args.optimizer == "lars":
        return LARS(params, lr=0, weight_decay=args.weight_decay, eta=args.lars_eta)
    return torch.optim.AdamW([dict(params=[p for p in params if p.ndim > 1]),
                              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)],
                             lr=0, weight_decay=args.weight_decay)


def learning_rate(step, steps, warmup, base):
    """§3.4: linear warm-up from 0, then cosine decay from base to 0.001 x base, per step."""
    if step < warmup:
        return base * step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return base * q + base * 0.001 * (1 - q)


def set_lr(optimizer, step, steps, args):
    """The learning rate of `step` of `steps` per epoch; the base lr scaled by batch / 256."""
    for g in optimizer.param_groups:
        g["lr"] = learning_rate(step, args.epochs * steps, args.warmup_epochs * steps,
                                args.lr * args.batch_size / 256)


# ---------------------------------------------------------------- Algorithm 1: the losses, the step

def loss_functions(args, n):
    """The loss of each of the n blocks: a function of its two views' projector outputs, the labels
    and (Barlow Twins, for App. A's routing) sample weights."""
    lambds, targets = cli.numbers(args.lambd, "--lambd", n), cli.numbers(args.target, "--target", n)

    def loss(k):
        if args.loss == "barlowtwins":  # Eq. (2); per-block lambda (Fig. 10), target (App. A)
            return lambda z1, z2, y, w=None: losses.barlow_twins(z1, z2, lambds[k], args.scale_loss,
                                                                 targets[k], w)
        if args.loss == "vicreg":
            return lambda z1, z2, y: losses.vicreg(z1, z2)
        if args.loss == "simclr":
            return lambda z1, z2, y: losses.simclr(z1, z2, args.temperature)
        return lambda z1, z2, y: (losses.supervised(z1, y) + losses.supervised(z2, y)) / 2  # §5
    return [loss(k) for k in range(n)]


def head_losses(model, loss_fns):
    """`block_loss(k, h1, h2, labels)`: block k's loss from its two views' outputs, through its
    pooling head (§3.3), its projector (§3.4) and its loss. `weight` is App. A's (routing.py)."""
    def block_loss(k, h1, h2, labels, weight=None):
        z1, z2 = (model.projectors[k](model.heads[k](h)) for h in (h1, h2))
        return loss_fns[k](z1, z2, labels, *(() if weight is None else (weight,)))
    return block_loss


def train_step(model, y1, y2, labels, block_loss, owners, bf16=False):
    """One step of Algorithm 1 on two views y1, y2, lean in memory: block k's loss is
    back-propagated as soon as block k has run, so its graph is freed before block k+1 starts
    (the released code runs every forward first). The gradients are those of the sum of the
    block losses, since no loss reaches another block. `owners`: for each block that learns, in
    order, the parameters whose gradient is final after its backward (grad_owners); other blocks
    only feed the next one. The blocks run are the model's (from `model.first`: y1, y2 are then
    that block's inputs, to `model.last`, or the last that learns). Returns the detached loss of
    each block that learns, and the last block's two outputs."""
    run = range(model.first, max(owners) + 1 if model.last is None else model.last + 1)
    for k in set(run) & set(owners):  # several processes: gradients in one buffer per block
        distributed.bucket_grads(owners[k])
    views = model.blockwise(y1, view=0), model.blockwise(y2, view=1)
    out, pending = [], []
    for k in run:
        with torch.autocast(y1.device.type, torch.bfloat16, enabled=bf16):
            h1, h2 = next(views[0]), next(views[1])
            if k not in owners:
                continue
            loss = block_loss(k, h1, h2, labels)
        loss.backward()  # Algorithm 1: one backward per block
        pending.append(distributed.average_grads(owners[k]))
        out.append(loss.detach())
    for finish in pending:
        finish()
    return torch.stack(out) if out else y1.new_zeros(0), (h1.detach(), h2.detach())


# ---------------------------------------------------------------- which blocks learn (§3.1, §5)

def training_phases(args, n):
    """The blocks trained together, phase after phase: every block but the --frozen ones at once
    (simultaneous), or one after another, each for --epochs (sequential, §3.1, Fig. 2)."""
    trained = [k for k in range(n) if k not in cli.frozen_blocks(args.frozen, n)]
    return [[k] for k in trained] if args.mode == "sequential" else [trained]


def set_trainable(model, trained):
    """Train the blocks in `trained`; every other block is frozen, BatchNorm statistics included."""
    model.train()
    for k in range(len(model.blocks)):
        for m in model.block_modules(k):
            m.train(False).requires_grad_(False)
    for k in trained:
        for m in model.block_modules(k):
            m.train(True).requires_grad_(True)


def grad_owners(model, trained):
    """For each trained block, in order, the trainable parameters whose gradient is final once its
    backward is done (LoCo's shared stage waits for the later unit)."""
    seen, owners = set(), {}
    for k in reversed(trained):
        params = [p for m in model.block_modules(k) for p in m.parameters() if p.requires_grad]
        owners[k] = [p for p in dict.fromkeys(params) if p not in seen]
        seen.update(owners[k])
    return dict(sorted(owners.items()))


# ---------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
    """Everything a run needs, made once by prepare()."""
    args: argparse.Namespace       # the flags
    log: bookkeeping.Log           # log.jsonl
    path: str                      # checkpoint.pth
    train_set: torch.utils.data.Dataset
    config: dict                   # the model's arguments, kept in every checkpoint
    model: Blockwise
    phases: list                   # the blocks trained together, phase after phase
    block_loss: object             # head_losses(), or routing.Routed around it (App. A)
    optimizer: torch.optim.Optimizer
    router: object                 # routing.Router, or None
    data: dict                     # the training set's fingerprint (bookkeeping.fingerprint)
    epochs: int                    # epochs in all (sequential: --epochs per block)
    loader: torch.utils.data.DataLoader
    local: int                     # images per process and step
    steps: int                     # steps per epoch
    monitored: object              # the monitors' images (evaluation.monitor_sets), or None
    layout: pipeline.Layout        # this process's pipeline stage and replica (pipeline.py)


def main(args):
    device = distributed.setup(args.device, args.timeout, needs_gpu=" and ".join(
        f for f, on in (("--bf16", args.bf16), ("--gpu-aug", args.gpu_aug)) if on))
    if os.environ.get("BLOCKWISE_FLOAT64") == "1":  # for tests only: exactness to rounding
        torch.set_default_dtype(torch.float64)
    if args.stages == "auto":  # the split whose costliest stage costs least, measured here
        args.stages = pipeline.auto_stages(lambda images: yardstick(args, device, images),
                                           args.batch_size, distributed.world(),
                                           len(parse_blocks(args.blocks)))
    stages = pipeline.parse_stages(args.stages, parse_blocks(args.blocks)) if args.stages else None
    pipeline.check(args, stages, distributed.world())
    cli.check_train_args(args, distributed.world() // len(stages or [0]))
    layout = pipeline.Layout(stages)
    with bookkeeping.prepare_out(args.out):  # rank 0 holds the folder's lock until the run ends
        fit(prepare(args, device, layout))


def yardstick(args, device, images):
    """--stages auto's: a throwaway model, its per-block losses, a batch of random images."""
    model = bookkeeping.network(bookkeeping.model_config(args, 1000), args.seed).to(device).train()
    y = torch.randn(images, 3, args.image_size, args.image_size, device=device)
    return model, head_losses(model, loss_functions(args, len(model.blocks))), y


def prepare(args, device, layout):
    """The run's data, model, per-block losses and optimizer."""
    log = bookkeeping.Log(args.out)
    cli.stop_on_signals()  # from here on, a stop signal saves (at the first step if during set-up)
    log(env=bookkeeping.environment())
    train_set = dataset(args.dataset, args.data, train=True, limit=args.limit, seed=args.seed)
    config = bookkeeping.model_config(args, train_set.num_classes)
    n = len(parse_blocks(args.blocks))
    model = bookkeeping.build(config, args, device, cli.frozen_blocks(args.frozen, n))
    layout.place(model)  # pipeline.py: the other stages' blocks on meta
    phases, sets = training_phases(args, n), view_sets(args.augmentations, n, args.crop_scale)
    if len(set(sets)) > 1 and args.mode != "sequential":
        raise cli.Abort(f"--augmentations {args.augmentations}: one set per block needs --mode "
                        "sequential (App. A)")
    block_loss, router = head_losses(model, loss_functions(args, n)), None
    if args.route != "none":
        router = routing.Router(len(train_set), n, args.route, args.route_weight, device)
        block_loss = routing.Routed(block_loss, router, model.pool_trunk)
    if distributed.rank() == 0:
        bookkeeping.check_free_space(args.out, model)
    loader = training_loader(train_set, sets, args)
    local = args.batch_size // distributed.dp_world()  # images per process (replica) and step
    steps = len(loader.sampler.epoch_keys(0)) // local
    monitored = monitor_sets(args.data, args.dataset, args.monitor_images, args.image_size,
                             args.seed) if args.monitor_every else None
    return Run(args, log, os.path.join(args.out, "checkpoint.pth"), train_set, config, model,
               phases, block_loss, build_optimizer(model.parameters(), args), router,
               bookkeeping.fingerprint(train_set), args.epochs * len(phases), loader, local, steps,
               monitored, layout)


def fit(run):
    """Resume where the run stopped, run its epochs (each saved, then monitored), then trunk.pth."""
    args = run.args
    start_epoch, start_step = bookkeeping.resume(run)  # refuses another run's folder first
    if run.steps == 0:
        raise cli.Abort(f"--batch-size {args.batch_size} is larger than the {len(run.train_set)} "
                        "training images")
    if distributed.rank() == 0:
        print(f"{args.arch}, blocks {run.model.blocks}, {args.mode}, {args.loss}, {args.pooling}; "
              f"{len(run.train_set)} images, {distributed.world()} process(es) on "
              f"{distributed.DEVICE}, {run.steps} steps/epoch, epochs {start_epoch}->{run.epochs}",
              flush=True)
    for epoch in range(start_epoch, run.epochs):
        trained = run.phases[epoch // args.epochs]
        first = start_step if epoch == start_epoch else 0
        run.loader.sampler.keys = run.loader.sampler.epoch_keys(  # this block's views (App. A)
            epoch, first * run.local, run.steps * run.local, trained[0])
        stopped = train_one_epoch(run, trained, epoch, first)
        state = run.layout.gather_state(run.model, run.optimizer)  # rank 0: the whole model's
        if state:  # every epoch, and when a signal or a failure stopped one
            done = (epoch, stopped[0]) if stopped else (epoch + 1, 0)
            extra = {"router": run.router.table} if run.router else {}
            bookkeeping.save_checkpoint(run.path, state, *done, run.config, args, run.data, **extra)
        if stopped:  # torchrun ends every process when one exits: the save must be whole first
            bookkeeping.wait_for_save(every_process=True)
            return cli.report_stop(*stopped, epoch, run.path)
        if run.monitored and (epoch + 1) % args.monitor_every == 0:
            log_monitors(epoch, run)
    run.layout.report()  # pipeline.py: where each stage's time went
    bookkeeping.export_trunk(run.model, run.layout.gather_state(run.model, run.optimizer), args)


def train_one_epoch(run, trained, epoch, first):
    """Steps first..run.steps-1 of one epoch, training the blocks `trained`. Returns None, or (steps
    done, the failure or None, whether another process failed) when a stop signal or a failure in
    any process stopped the epoch early: every process stops at the same step. A pipeline stage s
    (pipeline.py) runs batch t - s at tick t; a stop lets the batches in flight finish. Losses are
    checked for NaN at each progress line and at the end, not every step (it waits for the GPU)."""
    args, model, layout = run.args, run.model, run.layout
    set_trainable(model, trained)
    owners, feeds = grad_owners(model, trained), layout.stage == 0
    batches = cli.start_workers(run.loader) if feeds else None
    progress = cli.Progress(epoch, first, run.steps, run.epochs, args, run.path)
    limit, stopped, sending = run.steps, None, None
    for t in itertools.count(first):
        i, done = t - layout.stage, t - layout.depth + 1  # this stage's batch; the one completed
        batch, failure = cli.fetch(batches) if feeds and i < limit else (None, None)
        signalled, failed, show = distributed.agree(cli.STOP, failure is not None,
                                                    progress.due(done))
        if (signalled or failed) and not stopped:
            limit, stopped = t, (t, failure, failed)  # the pipeline's batches in flight go on
        received = layout.exchange(sending, first <= i < limit)
        sending = None
        if first <= i < limit:
            inputs = to_device(batch, distributed.DEVICE, args.gpu_aug,
                                                     args.channels_last) if feeds else received
            if run.router:  # App. A: this batch's images, whose difficulty routes them
                run.block_loss.batch(run.loader.sampler.keys[(i - first) * run.local:][:run.local])
            block_losses, sending = learn(run, owners, epoch, i, *inputs)
            progress.record(i, block_losses)
        finished, last = done + 1 >= limit, min(done, limit - 1)  # every batch left the last stage
        if show or finished:
            values = layout.all_losses(progress.flush(last), trained, len(model.blocks))
            progress.show(last, values, run.optimizer.param_groups[0]["lr"], trained, run.log, show)
        if finished:
            return stopped


def learn(run, owners, epoch, i, y1, y2, labels):
    """Batch i's step of the blocks this process trains: returns their losses, and what the next
    pipeline stage receives."""
    args, model, optimizer = run.args, run.model, run.optimizer
    set_lr(optimizer, (epoch % args.epochs) * run.steps + i, run.steps, args)  # seq.: per block
    model.seed = step_seed(args.seed, distributed.dp_rank(), epoch, i)  # §5's noise, per block
    optimizer.zero_grad(set_to_none=True)  # frozen blocks keep grad None: LARS skips them
    block_losses, (h1, h2) = train_step(model, y1, y2, labels, run.block_loss, owners, args.bf16)
    scale_grads(model, args.grad_scale)
    optimizer.step()
    return block_losses, (h1, h2, labels)


# ---------------------------------------------------------------- the rest: model, monitors, export

def step_seed(seed, replica, epoch, step):
    """A replica's seed of a step: §5's noise and masks, drawn per block (Blockwise.generator)."""
    return hash((seed, replica, epoch, step)) & 0xFFFF_FFFF


def scale_grads(model, scale):
    if scale != 1:  # the released run's gradient scale (README, "How this differs")
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)


if __name__ == "__main__":
    cli.run(main, get_args(), "train.py")
