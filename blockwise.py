"""The model of "Blockwise Self-Supervised Learning at Scale" (Siddiqui et al., TMLR 2024).

A torchvision ResNet cut into blocks joined by `.detach()` (§3.1, Fig. 2, Algorithm 1). Each block
has its own pooling head (§3.3, Fig. 3) and its own projector (§3.4); training noise (§5) is added
to each block's output. The stop-gradient lives in one place: `BlockResNet.block_input`.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint

ARCHS = ("resnet18", "resnet34", "resnet50")
POOLINGS = ("cbe", "cbe-l2", "cbe-sqrt", "gsp", "lsp")
CHECKPOINTS = ("none", "heads", "all")  # what the backward recomputes instead of storing: nothing, CbE maps, + trunk
# Block splits of Fig. 7 and of LoCo, written as groups of ResNet stages (1 = stem + layer1).
BLOCK_PRESETS = {"paper": "1,2,3,4", "e2e": "1234", "merge12": "12,3,4", "loco": "12,23,34"}


def parse_blocks(spec):
    """'1,2,3,4' -> [(1,), (2,), (3,), (4,)]; '12,3,4' merges stages 1+2 (Fig. 7); '1234' is
    end-to-end; '12,23,34' are LoCo's overlapping units. A preset name from BLOCK_PRESETS works too."""
    spec = BLOCK_PRESETS.get(spec, spec)
    try:
        blocks = [tuple(int(c) for c in group.strip()) for group in spec.split(",")]
    except ValueError:
        raise ValueError(f"--blocks {spec!r}: expected digit groups like 1,2,3,4 or a preset "
                         f"({', '.join(BLOCK_PRESETS)})") from None
    for b in blocks:
        if not b or any(s not in (1, 2, 3, 4) for s in b) or list(b) != list(range(b[0], b[-1] + 1)):
            raise ValueError(f"--blocks {spec!r}: each block must be consecutive stages from 1-4")
    return blocks


def lsp_grid(bins):
    """§3.3, Fig. 3(b): the spatial bins of LSP, laid out as a near-square grid: 8 -> 2x4, 4 -> 2x2, 2 -> 1x2, 1 -> 1x1."""
    rows = 2 ** (int(math.log2(bins)) // 2)
    return rows, bins // rows


class Pool(nn.Module):
    """A block's pooling head (§3.3, Fig. 3): B x C x H x W -> B x dim.

    gsp: global average pool, dim = C. lsp: average in spatial bins, concatenated to `dim`.
    cbe: Conv(C -> dim, k x k) -> BN -> ReLU -> global pool, where the global pool is the mean
    (cbe), the L2 norm sqrt(mean x^2) (cbe-l2) or mean sqrt(x) (cbe-sqrt) (Fig. 6).
    checkpoint: in training, compute CbE with `LeanCbE`, which stores none of its dim-channel maps.
    """

    def __init__(self, channels, kind="cbe", dim=2048, kernel_size=1, groups=1, checkpoint=False):
        super().__init__()
        self.kind, self.checkpoint = kind, checkpoint
        if kind == "gsp":
            self.dim = channels
        elif kind == "lsp":
            if dim % channels or (dim // channels) & (dim // channels - 1):
                raise ValueError(f"lsp needs {dim} / {channels} channels to be a power of two")
            self.grid, self.dim = lsp_grid(dim // channels), dim
        elif kind.startswith("cbe"):
            self.dim = dim
            self.expand = nn.Sequential(  # Conv-based Expansion, Fig. 3(c); kernel_size: Fig. 12
                nn.Conv2d(channels, dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
                nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"unknown pooling {kind!r}; choose from {', '.join(POOLINGS)}")

    def forward(self, x):
        if self.kind == "gsp":
            return x.mean((2, 3))
        if self.kind == "lsp":
            return F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # C x rows x cols = dim
        if self.checkpoint and self.training:  # the same function, storing no map
            return LeanCbE.apply(x, self.expand[0].weight, self.expand[1].weight, self.expand[1].bias, self)
        return global_pool(self.kind, self.expand(x))


def global_pool(kind, x):
    """The global pool of CbE (Fig. 6): mean (cbe), L2 norm sqrt(mean x^2) (cbe-l2), mean sqrt(x) (cbe-sqrt)."""
    if kind == "cbe-l2":
        return x.pow(2).mean((2, 3)).add(1e-6).sqrt()
    if kind == "cbe-sqrt":
        return x.add(1e-6).sqrt().mean((2, 3))
    return x.mean((2, 3))


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
    Under SyncBatchNorm (GPU, several processes) the statistics and the two sums are all-reduced.
    """
    CHUNKS = 8

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, head):
        conv, bn = head.expand[0], head.expand[1]
        group = bn.process_group if isinstance(bn, nn.SyncBatchNorm) and dist.is_initialized() else False
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
            dist.all_reduce(sums, group=group)
        count, mean = sums[0, 0].item(), sums[1] / sums[0]
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
        ctx.count = count
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
            dist.all_reduce(d, group=ctx.group)
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


@contextlib.contextmanager
def bn_stats_frozen(module):
    """BatchNorm layers that normalise with the batch but leave their running statistics alone: a unit that
    `checkpoint="all"` recomputes in the backward must not count its batch twice."""
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


def add_noise(x, sigma, training):
    """§5: x + sigma * std(x) * N(0, 1), one std over the whole tensor, independent noise per
    feature, training only (the released run's noise type "all"; its std is not detached)."""
    if not training or sigma == 0:
        return x
    return x + sigma * x.std() * torch.randn_like(x)


def projector(in_dim, widths, bias=False):
    """§3.4: Linear -> BN -> ReLU for every layer but the last, which is a plain Linear."""
    dims, layers = [in_dim, *widths], []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=bias), nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=bias))
    return nn.Sequential(*layers)


class BlockResNet(nn.Module):
    """A torchvision ResNet whose forward is Algorithm 1 (Appendix E).

    The trunk keeps torchvision's names (conv1, bn1, layer1..layer4), so `trunk_state_dict()` loads
    into `torchvision.models.<arch>()` with only `fc` missing. `heads[k]` and `projectors[k]` belong
    to block k. `projector=None` builds no projectors (e.g. for probing).
    """

    def __init__(self, arch="resnet50", blocks="1,2,3,4", pooling="cbe", head_dim=2048, kernel_size=1,
                 groups=1, noise=0.25, projector_widths=(8192, 8192, 8192), checkpoint="none"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        if checkpoint not in CHECKPOINTS:
            raise ValueError(f"unknown checkpoint {checkpoint!r}; choose from {', '.join(CHECKPOINTS)}")
        self.checkpoint = checkpoint
        trunk = getattr(torchvision.models, arch)()
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.blocks, self.noise = parse_blocks(blocks), noise
        widths = [64 * trunk.layer1[0].expansion * 2 ** i for i in range(4)]  # channels out of stages 1-4
        self.heads = nn.ModuleList(Pool(widths[b[-1] - 1], pooling, head_dim, kernel_size, groups, checkpoint != "none")
                                   for b in self.blocks)
        # Each projector is built (so initialised) on its own; the released code deep-copies one.
        self.projectors = nn.ModuleList(projector(h.dim, projector_widths) for h in self.heads) \
            if projector_widths else None

    def units(self, s):
        """ResNet stage s as a list of residual units: 1 = stem + layer1 (§3.1 folds the stride-2 stem into
        block 1, as one unit), 2-4 = layer2-4. A unit is what `checkpoint="all"` recomputes at a time."""
        if s == 1:
            return [nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool), *self.layer1]
        return list(getattr(self, f"layer{s}"))

    def block_modules(self, k):
        """Fig. 2: every module that block k trains: its stages, its head (§3.3), its projector (§3.4)."""
        mods = [u for s in self.blocks[k] for u in self.units(s)] + [self.heads[k]]
        return mods + ([self.projectors[k]] if self.projectors is not None else [])

    def block_input(self, k, outs):
        """The input of block k: the output of the stage before its first stage, through the stop-gradient
        `.detach()` of Algorithm 1, so no loss of block k reaches any earlier block."""
        return outs[self.blocks[k][0] - 1].detach()

    def forward_block(self, k, x, outs):
        """Algorithm 1, one block: run the stages of block k on its input x, recording each stage's output in `outs` (a dict
        stage -> tensor: LoCo's next unit starts from a middle stage). Returns the block's output."""
        for s in self.blocks[k]:
            for unit in self.units(s):
                x = self.run_unit(unit, x)
            outs[s] = x
        outs[s] = x = add_noise(x, self.noise, self.training)  # §5: before the head and the next block
        return x

    def run_unit(self, unit, x):
        """One residual unit; under checkpoint="all" its activations are recomputed in the backward, not stored."""
        if self.checkpoint != "all" or not (self.training and torch.is_grad_enabled()):
            return unit(x)
        return checkpoint(unit, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), bn_stats_frozen(unit)))

    def forward(self, x):
        """Algorithm 1: one pooled feature per block, each block fed the previous one's detached output."""
        outs = {0: x}
        return [self.heads[k](self.forward_block(k, self.block_input(k, outs), outs)) for k in range(len(self.blocks))]

    def compile_heads(self):
        """torch.compile each pooling head and projector in place (state_dict keys unchanged): it fuses CbE's
        BN + ReLU + pool and stores less for the backward. A LeanCbE head (its own autograd) stays eager."""
        for m in [*(h for h in self.heads if not h.checkpoint), *(self.projectors or [])]:
            m.compile()

    def trunk_state_dict(self):
        """The ResNet weights alone, under torchvision's names: the network that the paper probes (§3.1)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("heads.", "projectors."))}
