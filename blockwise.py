"""The model of "Blockwise Self-Supervised Learning at Scale" (Siddiqui et al., TMLR 2024).

A torchvision ResNet cut into blocks joined by a stop-gradient (§3.1, Fig. 2). `Blockwise.blockwise` is
Algorithm 1 (Appendix E): it yields each block's output in turn (for vit.py's ViT too). Each block has its own
pooling head (§3.3, Fig. 3) and its own projector (§3.4); training noise (§5) is added to each block's output.
Recomputing activations to save memory is not part of the method: it lives in recompute.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

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
    ends = [0] + [b[-1] for b in blocks]  # a block starts where the last ended (LoCo) or right after it
    if any(b[0] not in (e, e + 1) or b[-1] <= e for b, e in zip(blocks, ends)):
        raise ValueError(f"--blocks {spec!r}: blocks follow the stages in order from stage 1, with no gap and "
                         "no repeat (e.g. 1,2,3,4, 12,3,4, 1234, or LoCo's 12,23,34)")
    return blocks


def add_noise(x, sigma, training, generator=None):
    """§5: x + sigma * std(x) * N(0, 1), one std over the whole tensor, independent noise per
    feature, training only (the released run's noise type "all"; gradients flow through its std too).
    `generator`: where N(0, 1) is drawn from (None: torch's global one)."""
    if not training or sigma == 0:
        return x
    return x + sigma * x.std() * torch.empty_like(x).normal_(generator=generator)


def lsp_grid(bins):
    """§3.3, Fig. 3(b): LSP's spatial bins as a near-square grid: 8 -> 2x4, 4 -> 2x2, 2 -> 1x2, 1 -> 1x1."""
    rows = 2 ** (int(math.log2(bins)) // 2)
    return rows, bins // rows


def global_pool(kind, x):
    """CbE's global pool (Fig. 6): mean (cbe), L2 norm sqrt(mean x^2) (cbe-l2), mean sqrt(x) (cbe-sqrt)."""
    if kind == "cbe-l2":
        return x.pow(2).mean((2, 3)).add(1e-6).sqrt()
    if kind == "cbe-sqrt":
        return x.add(1e-6).sqrt().mean((2, 3))
    return x.mean((2, 3))


class Pool(nn.Module):
    """A block's pooling head (§3.3, Fig. 3): B x C x H x W -> B x dim.

    gsp: global average pool, dim = C. lsp: average in spatial bins, concatenated to `dim`.
    cbe: Conv(C -> dim, k x k) -> BN -> ReLU -> global pool (Fig. 3(c); the pool of Fig. 6).
    """

    def __init__(self, channels, kind="cbe", dim=2048, kernel_size=1, groups=1):
        super().__init__()
        self.kind = kind
        if kind == "gsp":
            self.dim = channels
        elif kind == "lsp":
            if dim % channels or (dim // channels) & (dim // channels - 1):
                raise ValueError(f"--head-dim {dim}: LSP needs {channels} channels times a power of two")
            self.grid, self.dim = lsp_grid(dim // channels), dim
        elif kind.startswith("cbe"):
            if channels % groups or dim % groups:
                raise ValueError(f"--groups {groups}: must divide the {channels} channels and --head-dim {dim}")
            self.dim = dim
            self.expand = nn.Sequential(  # Conv-based Expansion; kernel_size: Fig. 12; groups: App. B
                nn.Conv2d(channels, dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
                nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"--pooling {kind}: a ResNet's heads are {', '.join(POOLINGS)}")

    def forward(self, x):
        if self.kind == "gsp":
            return x.mean((2, 3))
        if self.kind == "lsp":
            return F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # C x rows x cols = dim
        return global_pool(self.kind, self.expand(x))


def projector(in_dim, widths, bias=False):
    """§3.4: Linear -> BN -> ReLU for every layer but the last, which is a plain Linear."""
    dims, layers = [in_dim, *widths], []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=bias), nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=bias))
    return nn.Sequential(*layers)


class Blockwise(nn.Module):
    """A network trained block by block (§3.1, Fig. 2): `blockwise` is Algorithm 1 (Appendix E), written once for the
    ResNet below and the Vision Transformer of vit.py. A subclass sets `blocks` (groups of stages, parse_blocks),
    `noise`, `heads[k]` and `projectors[k]` (block k's), and gives `units(s)`, what stage s runs, and
    `stage_modules(s)`, what it trains."""

    mask = None  # vit.py (§6): each view's per-block fractions of patch tokens not seen, or None
    seed = None  # the step's seed of the noise (and masks): drawn per block and view; None: global RNG
    first, last = 0, None  # the blocks this process runs (pipeline.py: a stage's); None: to the end

    def blockwise(self, x, view=0):
        """Algorithm 1: yields the output of block 1, 2, ... in turn. Block k starts from the output of
        the stage before its first stage, through the stop-gradient, so that no loss of block k reaches
        an earlier block. A caller that back-propagates block k before asking for block k+1 holds one
        block's graph at a time (train.py); one that needs only the first blocks stops early (probe.py).
        `view` (0 or 1) picks that view's masks (`mask`, vit.py only) and noise. `x` is the input of
        block `first` (the images, unless a pipeline stage runs the blocks from `first` on)."""
        drop = self.mask[view] if self.mask and self.training else None
        outs = {self.blocks[self.first][0] - 1: x}  # every stage's output: LoCo starts inside a unit
        end = len(self.blocks) if self.last is None else self.last + 1
        for k, stages in enumerate(self.blocks[self.first:end], self.first):
            g = self.generator(k, view, x.device)
            h = outs[stages[0] - 1].detach()  # the stop-gradient between blocks (Algorithm 1)
            h = self.enter(h, stages[0], drop[k] if drop else 0.0, g)
            for s in stages:
                for unit in self.units(s):
                    h = unit(h)
                outs[s] = h
            h = outs[s] = add_noise(h, self.noise, self.training, g)  # §5: before head and next block
            yield h

    def generator(self, k, view, device):
        """The random numbers of block k and one view at this step: seeded by (seed, k, view), so that a
        block draws the same whichever process runs it (pipeline.py); None without a seed."""
        if self.seed is None or not self.training:
            return None
        return torch.Generator(device).manual_seed(hash((self.seed, k, view)) & 0xFFFF_FFFF)

    def enter(self, h, stage, drop, generator=None):
        """A block's input as its first stage takes it: for a ResNet, as it is (vit.py: as tokens, some
        dropped, drawn from `generator`)."""
        return h

    def forward(self, x):
        """One pooled feature per block (the inputs of the projectors)."""
        return [head(h) for head, h in zip(self.heads, self.blockwise(x))]

    def block_modules(self, k):
        """Fig. 2: every module that block k trains: its stages, its head (§3.3), its projector (§3.4)."""
        stages = [m for s in self.blocks[k] for m in self.stage_modules(s)]
        return stages + [self.heads[k]] + ([self.projectors[k]] if self.projectors is not None else [])

    def stage_keys(self, s):
        """The state_dict prefixes of stage s's weights."""
        mine = [id(m) for m in self.stage_modules(s)]
        return tuple(name + "." for name, m in self.named_modules() if id(m) in mine)

    def trunk_state_dict(self, state=None):
        """The trunk's weights alone, under torchvision's names: the network that the paper probes (§3.1).
        `state`: a state_dict of this model to take them from (pipeline.py: gathered from the stages)."""
        state = self.state_dict() if state is None else state
        return {k: v for k, v in state.items() if not k.startswith(("heads.", "projectors."))}

    def own_names(self, trunk):
        """A trunk_state_dict's keys as this module's own (the same for a ResNet)."""
        return trunk


class BlockResNet(Blockwise):
    """A torchvision ResNet trained block by block; `blockwise` is Algorithm 1 (Appendix E).

    The trunk keeps torchvision's names (conv1, bn1, layer1..layer4), so `trunk_state_dict()` loads
    into `torchvision.models.<arch>()` with only `fc` missing. The last BatchNorm of every residual unit
    starts at 0 (zero_init_residual), so that each unit starts as its shortcut. `heads[k]` and `projectors[k]` belong
    to block k. `projector_widths=None` builds no projectors (e.g. for probing).
    """

    def __init__(self, arch="resnet50", blocks="1,2,3,4", pooling="cbe", head_dim=2048, kernel_size=1,
                 groups=1, noise=0.25, projector_widths=(8192, 8192, 8192)):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
        trunk = getattr(torchvision.models, arch)(zero_init_residual=True)  # as the released run and Barlow Twins
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.blocks, self.noise = parse_blocks(blocks), noise
        widths = [64 * trunk.layer1[0].expansion * 2 ** i for i in range(4)]  # channels out of stages 1-4
        self.heads = nn.ModuleList(Pool(widths[b[-1] - 1], pooling, head_dim, kernel_size, groups) for b in self.blocks)
        # Each projector is built (so initialised) on its own; the released code deep-copies one.
        self.projectors = nn.ModuleList(projector(h.dim, projector_widths) for h in self.heads) \
            if projector_widths else None

    @staticmethod
    def pool_trunk(h):
        """A block output's global average pool: probe.py --features trunk, and Fig. 8's diagnostics."""
        return h.mean((2, 3))

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def units(self, s):
        """ResNet stage s as its residual units; §3.1 puts the stem in block 1, as one more unit."""
        return [self.stem, *self.layer1] if s == 1 else list(getattr(self, f"layer{s}"))

    def stage_modules(self, s):
        return (self.conv1, self.bn1, self.layer1) if s == 1 else (getattr(self, f"layer{s}"),)
