"""Blockwise Vision Transformers: the paper's future work (§6), beside the ResNet of blockwise.py.

torchvision's VisionTransformer (12 encoder layers) cut into 4 stages of 3 layers, grouped into blocks by the same
--blocks grammar and joined by the same stop-gradient: Algorithm 1 is `Blockwise.blockwise`, written once. Each
block has a pooling head on its tokens and its own projector, loss and noise, as the ResNet's blocks.

Per-block masking (§6: "adapt the level of difficulty ... via the fraction of patches masked"): in training,
block k does not see drop[k] of the image's patch tokens. Masks are nested: what block k drops, the blocks after it
do not see either, so each block only drops more (the fractions may not decrease) and compute falls with depth.
A dropped token is removed, not replaced: it changes nothing downstream. Evaluation never masks.
"""
import torch
import torch.nn as nn
import torchvision

from blockwise import Blockwise, parse_blocks, projector

VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads; 12 layers, MLP 4 x
POOLINGS = ("gsp", "cls", "cbe")
LAYERS_PER_STAGE = 3


class TokenPool(nn.Module):
    """A block's pooling head on its tokens (B x (1 + N) x D -> B x dim), the analogues of §3.3's: gsp = the mean of
    the patch tokens (global pooling), cls = the class token, cbe = a token-wise expansion as CbE's 1x1 convolution
    (Linear D -> dim without bias, BatchNorm over every token of the batch, ReLU), then the mean of the patch tokens."""

    def __init__(self, width, kind="cbe", dim=2048):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"--pooling {kind}: a ViT's heads are {', '.join(POOLINGS)}")
        self.kind, self.dim = kind, dim if kind == "cbe" else width
        if kind == "cbe":
            self.expand = nn.Sequential(nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))

    def forward(self, h):
        if self.kind == "cls":
            return h[:, 0]
        patches = h[:, 1:]
        if self.kind == "cbe":
            patches = self.expand(patches.flatten(0, 1)).view(len(h), -1, self.dim)
        return patches.mean(1)


class Stem(nn.Module):
    """torchvision's patch embedding, class token and position embedding (with its dropout): image -> tokens."""

    def __init__(self, vit):
        super().__init__()
        self.conv_proj, self.class_token = vit.conv_proj, vit.class_token
        self.pos_embedding, self.dropout = vit.encoder.pos_embedding, vit.encoder.dropout

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # B x N x D, the patches in raster order
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], 1)
        return self.dropout(x + self.pos_embedding)


def drop_tokens(h, fraction, patches, generator=None):
    """Keep round((1 - fraction) x `patches`) patch tokens of each image (its own random choice, in their order) and
    the class token. Tokens already gone count as dropped: a block drops only what the blocks before it kept."""
    keep = round((1 - fraction) * patches)
    if keep >= h.shape[1] - 1:
        return h
    draw = torch.rand(h.shape[0], h.shape[1] - 1, device=h.device, generator=generator)
    chosen = draw.argsort(1)[:, :keep].sort(1).values + 1
    return torch.cat([h[:, :1], h.gather(1, chosen[..., None].expand(-1, -1, h.shape[2]))], 1)


def masks(text, views, n):
    """--mask `text` as each view's per-block fractions (§6; --mask-views `views`: one or both), or
    None when nothing is masked. Raises ValueError (one line) naming the flag."""
    fractions = [float(f) for f in str(text).split(",")]
    fractions = fractions * n if len(fractions) == 1 else fractions
    if len(fractions) != n:
        raise ValueError(f"--mask {text}: give one value or one per block ({n})")
    if any(not 0 <= f < 1 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"--mask {text}: fractions in [0, 1) that do not decrease from block to "
                        "block (nested masks)")
    if not any(fractions):
        return None
    return fractions, fractions if views == "both" else None


class BlockViT(Blockwise):
    """A torchvision VisionTransformer trained block by block. `trunk_state_dict()` loads into
    `torchvision.models.VisionTransformer(image_size, patch_size, 12, heads, width, 4 * width)` with only its
    classifier missing. `heads[k]` and `projectors[k]` belong to block k; `projector_widths=None` builds none."""

    def __init__(self, arch="vit_tiny", blocks="1,2,3,4", pooling="cbe", head_dim=2048, noise=0.25,
                 projector_widths=(8192, 8192, 8192), image_size=224, patch_size=16):
        super().__init__()
        if arch not in VITS:
            raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(VITS)}")
        if image_size % patch_size:
            raise ValueError(f"--patch-size {patch_size} must divide --image-size {image_size}")
        width, heads = VITS[arch]
        layers = 4 * LAYERS_PER_STAGE
        vit = torchvision.models.VisionTransformer(image_size, patch_size, layers, heads, width, 4 * width)
        self.stem, self.layers, self.ln = Stem(vit), vit.encoder.layers, vit.encoder.ln
        self.patches = (image_size // patch_size) ** 2
        self.blocks, self.noise = parse_blocks(blocks), noise
        self.heads = nn.ModuleList(TokenPool(width, pooling, head_dim) for _ in self.blocks)
        self.projectors = nn.ModuleList(projector(h.dim, projector_widths) for h in self.heads) \
            if projector_widths else None

    def enter(self, h, stage, drop, generator=None):
        """The first block embeds the image; every block drops its share of the patch tokens (training only)."""
        if stage == 1:
            h = self.stem(h)
        return drop_tokens(h, drop, self.patches, generator) if drop else h

    def units(self, s):
        layers = list(self.layers)[LAYERS_PER_STAGE * (s - 1):LAYERS_PER_STAGE * s]
        return layers + [self.ln] if s == 4 else layers  # torchvision's last LayerNorm ends stage 4

    def stage_modules(self, s):
        return ([self.stem] if s == 1 else []) + self.units(s)

    @staticmethod
    def pool_trunk(h):
        """The mean of the patch tokens: probe.py --features trunk, and Fig. 8's diagnostics."""
        return h[:, 1:].mean(1)

    NAMES = (("stem.conv_proj.", "conv_proj."), ("stem.class_token", "class_token"),
             ("stem.pos_embedding", "encoder.pos_embedding"), ("layers.", "encoder.layers."), ("ln.", "encoder.ln."))

    def trunk_state_dict(self, state=None):
        return {rename(k, self.NAMES): v for k, v in super().trunk_state_dict(state).items()}

    def own_names(self, trunk):
        return {rename(k, [(b, a) for a, b in self.NAMES]): v for k, v in trunk.items()}


def rename(key, pairs):
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return key
