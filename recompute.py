"""Less memory for the same step: recompute in the backward what would otherwise be stored.

Not part of the paper's method (blockwise.py): `apply(model, mode)` makes a BlockResNet recompute
nothing ("none"), its CbE heads' maps ("heads": `LeanCbE`), or those and every residual unit ("all").
Results are the same (tested); memory and speed are measured by bench.py (README, Performance).
It patches `forward` on module instances, so state_dict keys do not change.
"""
import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import distributed
from blockwise import global_pool

MODES = ("none", "heads", "all")


def apply(model, mode):
    """Set what `model` recomputes in its backward; `apply(model, "none")` undoes an earlier call."""
    if mode not in MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose from {', '.join(MODES)}")
    units = [unit for s in (1, 2, 3, 4) for unit in getattr(model, f"layer{s}")]
    for m in [model, *model.heads, *units]:
        for name in ("stem", "forward"):
            m.__dict__.pop(name, None)  # back to the class's own method
    if mode == "none":
        return
    for head in model.heads:
        if head.kind.startswith("cbe"):
            head.forward = functools.partial(lean_cbe, head)
    if mode == "all":
        model.stem = recomputed(model.stem, model.bn1)
        for unit in units:
            unit.forward = recomputed(unit.forward, unit)


def is_lean(head):
    """Whether apply() gave this head LeanCbE's hand-written autograd (which torch.compile should not trace)."""
    return "forward" in head.__dict__


def lean_cbe(head, x):
    """A CbE head's forward that stores none of its maps in training; the plain one in evaluation."""
    if not head.training:
        return type(head).forward(head, x)
    conv, bn = head.expand[0], head.expand[1]
    return LeanCbE.apply(x, conv.weight, bn.weight, bn.bias, head)


def recomputed(forward, bn_owner):
    """`forward` (one residual unit, or the stem) storing only its input: the backward runs it again."""
    def run(x):
        if not (bn_owner.training and torch.is_grad_enabled()):
            return forward(x)
        return checkpoint(forward, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), bn_stats_frozen(bn_owner)))
    return run


@contextlib.contextmanager
def bn_stats_frozen(module):
    """BatchNorm layers that normalise with the batch but leave their running statistics alone: a unit
    recomputed in the backward must not count its batch twice."""
    bns = [(m, m.momentum, m.num_batches_tracked.clone()) for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _, _ in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, count in bns:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class LeanCbE(torch.autograd.Function):
    """CbE in training mode (Conv -> BatchNorm -> ReLU -> global pool, §3.3) without storing any map of
    the head's width: at block 1 of a ResNet-50 that map is 2048 x 56 x 56 per image, the largest
    activation of the model, and autograd would keep two of them. Work goes in CHUNKS slices of the batch.

    BatchNorm couples the images of a batch, but in the backward only through two sums per channel,
    sum(dz) and sum(dz * y_hat) over the batch (z = gamma * y_hat + beta is BN's output). Here
    dz = g[n, c] * w[n, c, h, w] with w = d pool(relu(z)) / dz, which does not depend on the incoming
    gradient g; so the forward stores s1 = sum_hw w and s2 = sum_hw w * y_hat per image and channel,
    and the backward knows both sums before it recomputes the conv one slice at a time.
    Costs two extra convolutions (one in the forward for BN's statistics, one in the backward).
    Under distributed.SyncBatchNorm (several processes) the statistics and the two sums are all-reduced.
    """
    CHUNKS = 8

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, head):
        conv, bn = head.expand[0], head.expand[1]
        group = distributed.DP if isinstance(bn, distributed.SyncBatchNorm) and distributed.dp_world() > 1 \
            else False
        ctx.conv = lambda xc, w: F.conv2d(xc, w, None, 1, conv.padding, 1, conv.groups)
        ctx.kind, ctx.group = head.kind, group
        device = x.device.type  # the backward recomputes the conv as the forward ran it, autocast or not
        ctx.autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device),
                            enabled=torch.is_autocast_enabled(device))
        chunks = x.split(math.ceil(len(x) / LeanCbE.CHUNKS))
        # Pass 1: the batch statistics of y = conv(x), summed in float64 so E[y^2] - E[y]^2 stays exact.
        # Rows: count (repeated per channel, so that one all_reduce carries it), sum, sum of squares.
        sums = x.new_zeros(3, weight.shape[0], dtype=torch.float64)
        for xc in chunks:
            y = ctx.conv(xc, weight)
            sums[0] += y[0, 0].numel() * len(xc)
            sums[1] += y.sum((0, 2, 3), dtype=torch.float64)
            sums[2] += y.square().sum((0, 2, 3), dtype=torch.float64)
        if group is not False:
            distributed.all_reduce(sums, group=group)
        count, mean = sums[0], sums[1] / sums[0]  # the count stays on the device: reading it would wait for it
        var = sums[2] / sums[0] - mean ** 2
        bn.num_batches_tracked += 1
        m = bn.momentum if bn.momentum is not None else 1 / bn.num_batches_tracked.item()
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
        bn.running_var.lerp_((var * count / (count - 1)).to(bn.running_var.dtype), m)
        ctx.stats = mean.to(gamma.dtype), (var + bn.eps).rsqrt().to(gamma.dtype)
        # Pass 2: the pooled output, and s1, s2 for the backward.
        out, s1, s2 = [], [], []
        for xc in chunks:
            y_hat, w, pooled = LeanCbE.bn_relu_pool(ctx, ctx.conv(xc, weight), gamma, beta, None)
            out.append(pooled)
            s1.append(w.sum((2, 3)))
            s2.append((w * y_hat).sum((2, 3)))
        ctx.count = count.to(gamma.dtype)
        ctx.save_for_backward(x, weight, gamma, beta, torch.cat(s1), torch.cat(s2))
        return torch.cat(out)

    @staticmethod
    def bn_relu_pool(ctx, y, gamma, beta, g):
        """BN with the batch's statistics, ReLU and pool on one slice y = conv(x), which is overwritten.
        Returns y_hat, the gradient dz of sum(pooled * g) with respect to z (g = None: of sum(pooled),
        which is w), and pooled."""
        mean, invstd = ctx.stats
        y_hat = y.to(gamma.dtype).sub_(mean[:, None, None]).mul_(invstd[:, None, None])
        with torch.enable_grad():
            z = torch.addcmul(beta[:, None, None], y_hat, gamma[:, None, None]).requires_grad_()
            pooled = global_pool(ctx.kind, F.relu(z))
            dz, = torch.autograd.grad(pooled, z, torch.ones_like(pooled) if g is None else g)
        return y_hat, dz, pooled.detach()

    @staticmethod
    def backward(ctx, g):
        x, weight, gamma, beta, s1, s2 = ctx.saved_tensors
        g = g.to(gamma.dtype)
        d = torch.stack([(g * s1).sum(0), (g * s2).sum(0)])  # d beta = sum dz, d gamma = sum dz * y_hat
        dbeta, dgamma = d.clone()
        if ctx.group is not False:
            distributed.all_reduce(d, group=ctx.group)
        a, b = (d / ctx.count)[:, :, None, None]
        scale = (gamma * ctx.stats[1])[:, None, None]
        dx, dweight, n = torch.empty_like(x), torch.zeros_like(weight), math.ceil(len(x) / LeanCbE.CHUNKS)
        for i in range(0, len(x), n):
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                xc, wc = x[i:i + n].detach().requires_grad_(), weight.detach().requires_grad_()
                y = ctx.conv(xc, wc)  # the conv's backward needs xc and wc, not y: y may be overwritten
            y_hat, dz, _ = LeanCbE.bn_relu_pool(ctx, y.detach(), gamma, beta, g[i:i + n])
            # BN's backward (Ioffe & Szegedy, 2015): dy = gamma / sigma * (dz - a - y_hat * b)
            dy = dz.sub_(a).addcmul_(y_hat, b, value=-1).mul_(scale)
            dx[i:i + n], gw = torch.autograd.grad(y, (xc, wc), dy.to(y.dtype))
            dweight += gw
        return dx, dweight, dgamma, dbeta, None


def compile_heads(model):
    """torch.compile each head and projector in place (state_dict keys unchanged): it fuses CbE's
    BN + ReLU + pool and stores less (bench.py). The trunk stays eager (slower compiled,
    docs/performance.md); so does a LeanCbE head, whose hand-written autograd would not trace."""
    # The heads share one forward, compiled once per head, mode (train, eval) and batch size (a
    # monitor's last batch): more than dynamo's default of 8, past which it runs the rest eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               8 * len(model.heads))
    for m in [*model.heads, *model.projectors]:
        if not is_lean(m):
            m.compile()
