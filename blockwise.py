"""The model of "Blockwise Self-Supervised Learning at Scale" (Siddiqui et al., TMLR 2024).

A torchvision ResNet cut into blocks joined by `.detach()` (§3.1, Fig. 2, Algorithm 1). Each block
has its own pooling head (§3.3, Fig. 3) and its own projector (§3.4); training noise (§5) is added
to each block's output. The stop-gradient lives in one place: `BlockResNet.block_input`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint

ARCHS = ("resnet18", "resnet34", "resnet50")
POOLINGS = ("cbe", "cbe-l2", "cbe-sqrt", "gsp", "lsp")
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
    """

    def __init__(self, channels, kind="cbe", dim=2048, kernel_size=1, groups=1):
        super().__init__()
        self.kind = kind
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
        x = self.expand(x)
        if self.kind == "cbe-l2":
            return x.pow(2).mean((2, 3)).add(1e-6).sqrt()
        if self.kind == "cbe-sqrt":
            return x.add(1e-6).sqrt().mean((2, 3))
        return x.mean((2, 3))


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
                 groups=1, noise=0.25, projector_widths=(8192, 8192, 8192), checkpoint_heads=False):
        super().__init__()
        self.checkpoint_heads = checkpoint_heads
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        trunk = getattr(torchvision.models, arch)()
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.blocks, self.noise = parse_blocks(blocks), noise
        widths = [64 * trunk.layer1[0].expansion * 2 ** i for i in range(4)]  # channels out of stages 1-4
        self.heads = nn.ModuleList(Pool(widths[b[-1] - 1], pooling, head_dim, kernel_size, groups)
                                   for b in self.blocks)
        # Each projector is built (so initialised) on its own; the released code deep-copies one.
        self.projectors = nn.ModuleList(projector(h.dim, projector_widths) for h in self.heads) \
            if projector_widths else None

    def stage(self, s):
        """ResNet stage s: 1 = stem + layer1 (§3.1 folds the stride-2 stem into block 1), 2-4 = layer2-4."""
        if s == 1:
            return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1)
        return getattr(self, f"layer{s}")

    def block_modules(self, k):
        """Fig. 2: every module that block k trains: its stages, its head (§3.3), its projector (§3.4)."""
        mods = [self.stage(s) for s in self.blocks[k]] + [self.heads[k]]
        return mods + ([self.projectors[k]] if self.projectors is not None else [])

    def block_input(self, k, outs):
        """The input of block k: the output of the stage before its first stage, through the stop-gradient
        `.detach()` of Algorithm 1, so no loss of block k reaches any earlier block."""
        return outs[self.blocks[k][0] - 1].detach()

    def forward_block(self, k, x, outs):
        """Algorithm 1, one block: run the stages of block k on its input x, recording each stage's output in `outs` (a dict
        stage -> tensor: LoCo's next unit starts from a middle stage). Returns the block's output."""
        for s in self.blocks[k]:
            x = self.stage(s)(x)
            outs[s] = x
        outs[s] = x = add_noise(x, self.noise, self.training)  # §5: before the head and the next block
        return x

    def pool(self, k, x):
        """Block k's pooling head (§3.3). With checkpoint_heads, its activations (CbE's 2048-channel map at the block's
        resolution, the largest of the whole model at block 1) are recomputed in the backward, not stored."""
        if self.checkpoint_heads and torch.is_grad_enabled():
            return checkpoint(self.heads[k], x, use_reentrant=False)
        return self.heads[k](x)

    def forward(self, x):
        """Algorithm 1: one pooled feature per block, each block fed the previous one's detached output."""
        outs = {0: x}
        return [self.pool(k, self.forward_block(k, self.block_input(k, outs), outs)) for k in range(len(self.blocks))]

    def trunk_state_dict(self):
        """The ResNet weights alone, under torchvision's names: the network that the paper probes (§3.1)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("heads.", "projectors."))}
