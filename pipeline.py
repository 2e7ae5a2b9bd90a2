"""Blocks on separate devices (README, "Blocks on separate devices"): a pipeline of blocks that is
the simultaneous run itself, laid out over processes.

In simultaneous mode block k+1 depends on block k only through block k's detached, noised output
(Algorithm 1, §5). So stage s (blocks first..last) runs batch t - s at tick t, sends its last
block's two outputs (after the noise) and the labels to stage s+1, back-propagates its own losses
and takes its own optimizer step. Every block then sees batch b with its weights after b updates,
on an input made by the block below after b updates: exactly the one-process run, with no stale
weight and nothing sent backward. The noise and masks are seeded per block and replica
(Blockwise.generator), so a block draws the same whichever process runs it.

Under torchrun the W processes form S stages x R = W / S replicas, stage-major (a stage per node
when R is the node's GPUs): stage = rank // R. A process holds only its stage's blocks, heads,
projectors and optimizer state (the others' on the meta device); gradients, losses and BatchNorm
are reduced among the stage's replicas only (distributed.DP, losses.GROUP).

Point-to-point order (NCCL, SPEC hazards): every tick makes one grouped exchange
(batch_isend_irecv: a lone send facing a lone receive can deadlock), receive and send together,
and waits for it before computing, so no point-to-point traffic is in flight beside the replicas'
all-reduces; shapes and dtypes travel once, in a header exchange before a stage's first payload,
which also opens NCCL's lazy connections before the first step.
"""
import contextlib
import itertools
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import cli
import distributed
import losses

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def block_costs(model, block_loss, y, reps=2):
    """Seconds of one forward + backward of each block of `model` (trunk, head, projector, loss;
    both views of the batch `y`) and its FLOPs, after a warm-up that counts them. `block_loss(k, h1,
    h2, labels)`: train.head_losses'."""
    sync = torch.cuda.synchronize if y.is_cuda else (lambda: None)
    seconds, flops = [0.0] * len(model.blocks), [0.0] * len(model.blocks)
    for rep in range(reps + 1):  # the first is the warm-up
        views = model.blockwise(y, 0), model.blockwise(y, 1)
        for k in range(len(model.blocks)):
            with FlopCounterMode(display=False) if rep == 0 else contextlib.nullcontext() as counter:
                sync()
                t = time.perf_counter()
                block_loss(k, next(views[0]), next(views[1]), None).backward()
                sync()
                seconds[k] += (time.perf_counter() - t) / reps if rep else 0
            flops[k] = counter.get_total_flops() if rep == 0 else flops[k]
    return seconds, flops


def best_split(costs, stages):
    """The split of the blocks into `stages` consecutive groups whose costliest stage costs least."""
    n = len(costs)
    cuts = itertools.combinations(range(1, n), stages - 1)
    groups = [[list(range(a, b)) for a, b in zip((0, *cut), (*cut, n))] for cut in cuts]
    return min(groups, key=lambda g: max(sum(costs[k] for k in s) for s in g))


def auto_stages(make, batch, world, n):
    """--stages auto: one stage per process (at most one per block), split so that the costliest
    stage costs least, as measured with `make(images)` -> (model, block_loss, batch of a replica)
    on each process's device (all measure: the losses' collectives span every process); every
    process takes rank 0's split. Returns it as --stages text (e.g. "12,34")."""
    text, stages = None, min(world, n)
    seconds, _ = block_costs(*make(batch * stages // world))
    if distributed.rank() == 0:
        text = ",".join("".join(str(k + 1) for k in s) for s in best_split(seconds, stages))
        print(f"--stages auto: {text} (forward + backward per block: "
              f"{' '.join(f'{s * 1000:.0f}' for s in seconds)} ms)", flush=True)
    return distributed.broadcast_object(text)


def parse_stages(text, blocks):
    """'1,234' -> [[0], [1, 2, 3]]: the 1-based blocks of each stage, consecutive and in order,
    all of them once. `blocks`: the model's blocks (parse_blocks). Raises ValueError naming
    --stages."""
    n = len(blocks)
    try:
        stages = [[int(c) - 1 for c in group] for group in text.split(",")]
    except ValueError:
        stages = []
    if [k for s in stages for k in s] != list(range(n)) or not all(stages):
        raise ValueError(f"--stages {text}: groups of the blocks 1-{n}, each once and in order, "
                         "e.g. " + ",".join(str(k + 1) for k in range(n)))
    for s in stages[1:]:
        if blocks[s[0] - 1][-1] != blocks[s[0]][0] - 1:
            raise ValueError(f"--stages {text}: block {s[0] + 1} starts inside block {s[0]} "
                             "(LoCo's overlapping units): a stage must start where the last ends")
    return stages


def check(args, stages, world):
    """The options a pipeline refuses, in one line naming the flag and why; the process count. Nothing
    to check without `stages`."""
    if not stages:
        return
    if args.mode == "sequential":
        raise ValueError("--mode sequential: each block trains alone, so there is nothing to "
                         "overlap; run it without --stages")
    if args.route != "none":
        raise ValueError(f"--route {args.route}: a batch's routing is measured at the last block "
                         "and used by every block, which would send it backward")
    if args.monitor_every:
        raise ValueError("--stages: the online monitors need every block in one process; pass "
                         "--monitor-every 0 and probe the checkpoint (probe.py)")
    if world % len(stages):
        raise ValueError(f"--stages {args.stages}: {len(stages)} stages need a multiple of "
                         f"{len(stages)} processes, not {world} (torchrun --nproc_per_node)")


class Layout:
    """This process's place: its stage, its replica, its neighbours' ranks; without a pipeline, one
    stage whose replicas are all the processes."""

    def __init__(self, stages=None):
        self.stages = stages or [None]
        world, rank = distributed.world(), distributed.rank()
        self.depth, self.replicas = len(self.stages), world // len(self.stages)
        self.stage, self.replica = divmod(rank, self.replicas)
        self.prev = rank - self.replicas if self.stage else None
        self.next = rank + self.replicas if self.stage + 1 < self.depth else None
        self.known = {}  # the header of each stream: shape and dtype, set by the first exchange
        self.t0, self.waited = None, [0.0, 0.0]  # since the first exchange: s waiting to receive, to send
        if self.depth > 1:
            cli.STAGE = f" (stage {self.stage})"  # every one-line error names it
            self.join()

    def join(self):
        """One data-parallel group per stage (each created by every process, in one order), for the
        losses, BatchNorm, the gradients (a second communicator) and the replicas' checks."""
        def groups():
            return [dist.new_group(list(range(s * self.replicas, (s + 1) * self.replicas)))
                    for s in range(self.depth)]
        distributed.DP = losses.GROUP = groups()[self.stage]
        distributed.GRADS = groups()[self.stage]

    def place(self, model):
        """Keep this stage's blocks, heads and projectors; put every other block on the meta device
        (no memory), and tell the model which blocks it runs."""
        if self.depth == 1:
            return
        mine = self.stages[self.stage]
        for k in range(len(model.blocks)):
            if k not in mine:
                for m in model.block_modules(k):
                    m.to("meta")
        model.first, model.last = mine[0], mine[-1]

    def exchange(self, sending, receiving):
        """One tick's traffic: `sending` (tensors for the next stage, or None) out, and, if
        `receiving`, the previous stage's tensors in; a header exchange first, the first time either
        side of this process's streams speaks. Returns the received tensors, or None."""
        out = sending if sending is not None and self.next is not None else None
        into = receiving and self.prev is not None
        if (out is not None and "out" not in self.known) or (into and "in" not in self.known):
            self.headers(out, into)
        ops, got = [], None
        if into:
            got = [torch.empty(shape, dtype=dtype, device=distributed.DEVICE)
                   for shape, dtype in self.known["in"]]
            ops += [dist.P2POp(dist.irecv, t, self.prev) for t in got]
        if out is not None:
            ops += [dist.P2POp(dist.isend, t.contiguous(), self.next) for t in out]
        self.t0 = self.t0 or time.perf_counter()
        works, received = dist.batch_isend_irecv(ops) if ops else [], len(got or [])
        for j, part in enumerate((works[:received], works[received:])):  # bench.py: where time goes
            t = time.perf_counter()
            for work in part:
                work.wait()
            self.waited[j] += time.perf_counter() - t
        return got

    def report(self):
        """One line per process (pipeline only): where its time since the first exchange went."""
        if self.depth > 1 and self.t0:
            total = time.perf_counter() - self.t0
            print(f"rank {distributed.rank()} (stage {self.stage}, replica {self.replica}): {total:.1f} s, "
                  f"waiting to receive {self.waited[0]:.1f} s, waiting for its send {self.waited[1]:.1f} s, "
                  f"the rest {total - sum(self.waited):.1f} s", flush=True)

    def headers(self, out, into):
        """Each tensor's dtype and shape (up to 6 dims), 8 integers a tensor, 3 tensors."""
        ops, head = [], None
        if out is not None and "out" not in self.known:
            self.known["out"] = True
            rows = [[DTYPES.index(t.dtype) if t.is_floating_point() else -1, t.ndim, *t.shape,
                     *[0] * (6 - t.ndim)] for t in out]
            ops.append(dist.P2POp(dist.isend, torch.tensor(rows, device=distributed.DEVICE),
                                  self.next))
        if into and "in" not in self.known:
            head = torch.empty(3, 8, dtype=torch.int64, device=distributed.DEVICE)
            ops.append(dist.P2POp(dist.irecv, head, self.prev))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if head is not None:
            self.known["in"] = [(row[2:2 + row[1]], DTYPES[row[0]] if row[0] >= 0 else torch.int64)
                                for row in head.tolist()]

    def all_losses(self, values, trained, n):
        """The losses of the blocks `trained` (of n) on every process: each stage's first replica
        gives its own blocks' `values` (None: none yet), summed on the host group."""
        if self.depth == 1:
            return torch.zeros(len(trained)) if values is None else values
        full = torch.zeros(n, dtype=torch.float64)
        if values is not None and self.replica == 0:
            full[[k for k in trained if k in self.stages[self.stage]]] = values.double()
        distributed.all_reduce(full, group=distributed.CONTROL)
        return full[trained]

    def gather_state(self, model, optimizer):
        """Rank 0: the whole model's state_dict and optimizer state, as one process holds them (the
        stages' first replicas send theirs, host group); None elsewhere. The optimizer is built over
        every parameter (those on meta too), so its indices are a one-process run's."""
        if self.depth == 1:
            return (model.state_dict(), optimizer.state_dict()) if distributed.rank() == 0 else None
        opt, mine = optimizer.state_dict(), None
        if self.replica == 0:  # the other replicas hold the same
            mine = ({k: v.detach().cpu() for k, v in model.state_dict().items() if not v.is_meta},
                    dict(opt, state={i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                                     for i, s in opt["state"].items()}))
        parts = [None] * distributed.world() if distributed.rank() == 0 else None
        dist.gather_object(mine, parts, dst=0, group=distributed.CONTROL)
        if distributed.rank():
            return None
        parts = [p for p in parts if p is not None]
        weights = {k: v for m, _ in parts for k, v in m.items()}
        states = {i: s for _, o in parts for i, s in o["state"].items()}
        return {k: weights[k] for k in model.state_dict()}, dict(opt, state=states)


def own(model, optimizer):
    """After loading a whole checkpoint: drop the optimizer state of the blocks on meta."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        if p.is_meta:
            optimizer.state.pop(p, None)
