"""The two views (Barlow Twins' augmentations, used unchanged by the paper), written once as a table, and the two
pipelines that apply it from the same random draws:
- on the CPU (the default): the data-loading workers crop, draw and apply every operation with PIL;
- on the device (`--gpu-aug`): the workers crop and draw; `augment` applies the draws to the whole batch.
Appendix A's adaptive augmentations are more sets of the same table, one per block (`SETS`).
"""
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class View:
    """One view's augmentations: a probability for each random operation, and its range."""
    crop: tuple = (0.08, 1.0)  # RandomResizedCrop's area scale (bicubic, aspect ratio 3/4 to 4/3)
    flip: float = 0.5  # horizontal flip
    jitter: float = 0.8  # ColorJitter, its four operations in a random order, with these strengths:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray: float = 0.2  # grayscale
    blur: float = 1.0  # Gaussian blur, sigma drawn uniformly in `sigma`
    sigma: tuple = (0.1, 2.0)
    solarize: float = 0.0  # solarize at 128


BARLOW_TWINS = (View(blur=1.0, solarize=0.0), View(blur=0.1, solarize=0.2))  # view A, view B
JITTER_ONLY = View(crop=(1.0, 1.0), flip=0.0, gray=0.0, blur=0.0)
# App. A, adaptive augmentations: "we only applied color jitter at the first block. We additionally applied small
# random crops at the second block. For the third and fourth blocks, we applied the full set" (README, our reading)
SETS = {"full": BARLOW_TWINS, "jitter": (JITTER_ONLY,) * 2,
        "jitter-crop": (dataclasses.replace(JITTER_ONLY, crop=(0.5, 1.0)),) * 2}
SET_PRESETS = {"adaptive": "jitter,jitter-crop,full,full"}


def view_sets(spec, n, crop_scale=0.08):
    """--augmentations: one set name for every block, or one per block (a preset name works too); returns n pairs
    of views. `crop_scale` is the smallest crop of the full set (--crop-scale). Raises ValueError naming the flag."""
    names = SET_PRESETS.get(spec, spec).split(",")
    if any(name not in SETS for name in names):
        raise ValueError(f"--augmentations {spec}: give one of {', '.join([*SETS, *SET_PRESETS])}, or one set per "
                         f"block ({n}) from {', '.join(SETS)}")
    if len(names) not in (1, n):
        raise ValueError(f"--augmentations {spec}: {len(names)} sets for {n} blocks (--blocks); give one set, "
                         f"or one per block")
    full = tuple(dataclasses.replace(v, crop=(crop_scale, 1.0)) for v in BARLOW_TWINS)
    return [full if name == "full" else SETS[name] for name in names * (n // len(names))]


def table(columns):
    """A markdown table of views, `columns`: title -> views (a cell shows each view's value, A / B where they
    differ). README.md shows table({"view A": (A,), "view B": (B,)}) of BARLOW_TWINS (tested)."""
    def cell(get, views):
        return " / ".join(dict.fromkeys(get(v) for v in views))
    rows = [("random resized crop, area", lambda v: "none" if v.crop == (1.0, 1.0) else f"{v.crop[0]:g}-{v.crop[1]:g}"),
            ("horizontal flip", lambda v: f"p {v.flip:g}"),
            ("colour jitter (brightness, contrast, saturation, hue)",
             lambda v: f"p {v.jitter:g} ({v.brightness:g}, {v.contrast:g}, {v.saturation:g}, {v.hue:g})"),
            ("grayscale", lambda v: f"p {v.gray:g}"),
            ("Gaussian blur (PIL's), sigma", lambda v: f"p {v.blur:g}, {v.sigma[0]:g}-{v.sigma[1]:g}"),
            ("solarize at 128", lambda v: f"p {v.solarize:g}")]
    lines = ["| | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(get, views) for views in columns.values()) + " |" for name, get in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- the draws, and the CPU pipeline (PIL)

def draw(view):
    """The random choices of one view after its crop, from torch's CPU generator (seeded per image by
    data.Seeded): flip, colour jitter (its order as torchvision's ColorJitter, and its four factors), grayscale,
    blur sigma (None: no blur), solarize. Every probability is drawn, even 0 or 1, so that one table entry's
    change does not shift the draws of the others."""
    u = lambda a, b: torch.empty(1).uniform_(a, b).item()  # noqa: E731
    c = dict(flip=torch.rand(1).item() < view.flip, jitter=None, gray=False, sigma=None, solarize=False)
    if torch.rand(1).item() < view.jitter:
        c["jitter"] = (torch.randperm(4).tolist(), u(1 - view.brightness, 1 + view.brightness),
                       u(1 - view.contrast, 1 + view.contrast), u(1 - view.saturation, 1 + view.saturation),
                       u(-view.hue, view.hue))
    c["gray"] = torch.rand(1).item() < view.gray
    if torch.rand(1).item() < view.blur:
        c["sigma"] = u(*view.sigma)
    c["solarize"] = torch.rand(1).item() < view.solarize
    return c


JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def apply_pil(img, c):
    """One view's choices `c` (draw) on a cropped RGB PIL image; returns a uint8 C x H x W tensor."""
    if c["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if c["jitter"]:
        order, *factors = c["jitter"]
        for k in order:
            img = JITTER[k](img, factors[k])
    if c["gray"]:
        img = img.convert("L").convert("RGB")
    if c["sigma"] is not None:  # PIL's blur, as Barlow Twins; torchvision's is 5x slower on an image
        img = img.filter(ImageFilter.GaussianBlur(radius=c["sigma"]))
    if c["solarize"]:
        img = ImageOps.solarize(img, 128)
    return to_tensor(img)


def decode(img, boxes, size):
    """Decode `img` (opened, maybe not read yet) at the smallest JPEG scale (1/2, 1/4, 1/8: draft mode) at
    which every crop box still has `size` pixels a side; returns it as RGB with the boxes rescaled."""
    full = img.size
    if getattr(img, "format", None) == "JPEG":  # a no-op once the image is read
        reduce = min(min(h, w) for _, _, h, w in boxes) / size  # how far the smallest crop is downscaled
        img.draft("RGB", (int(img.width / reduce), int(img.height / reduce)))
    try:
        img = img.convert("RGB")
    except OSError as e:
        raise ValueError(f"unreadable image {getattr(img, 'filename', '')}: {e}") from None
    f = 1 / 2 ** round(math.log2(full[0] / img.width))  # JPEG decodes at 1, 1/2, 1/4 or 1/8 of its size
    return img, [(j * f, i * f, (j + w) * f, (i + h) * f) for i, j, h, w in boxes]


class TwoViews:
    """The two views of an image (`views`: a pair from the table). Both crops are drawn first, so that the image is
    decoded once, at the smallest scale both allow. Returns two uint8 tensors, to `normalize` on the device; with
    `on_device`, two (uint8 crop, its packed choices) pairs, for `augment` on the device."""

    def __init__(self, size=224, views=BARLOW_TWINS, on_device=False):
        self.size, self.views, self.on_device = size, tuple(views), on_device

    def __call__(self, img):
        boxes = [T.RandomResizedCrop.get_params(img, v.crop, (3 / 4, 4 / 3)) for v in self.views]
        img, boxes = decode(img, boxes, self.size)
        crops = [img.resize((self.size, self.size), Image.BICUBIC, box=box) for box in boxes]
        if self.on_device:
            return tuple((to_tensor(crop), pack(draw(v))) for crop, v in zip(crops, self.views))
        return tuple(apply_pil(crop, draw(v)) for crop, v in zip(crops, self.views))


def to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # RGB PIL image -> uint8 C x H x W


def normalize(x):
    """Images with values in [0, 255] (uint8, or floats from `augment`), B x 3 x H x W -> floats normalised with
    ImageNet's mean and std, on x's device (the same numbers as torchvision's ToTensor + Normalize)."""
    mean, std = (host_to(torch.tensor(v).view(1, 3, 1, 1) * 255, x.device) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x.float() - mean) / std


# ---------------------------------------------------------------- the device pipeline (--gpu-aug)

def pack(c):
    """One view's choices (draw) as named tensors, which DataLoader's collate stacks into a batch's."""
    order, *factors = c["jitter"] or ([0, 1, 2, 3], 1.0, 1.0, 1.0, 0.0)
    return dict(flip=torch.tensor(c["flip"]), jitter=torch.tensor(c["jitter"] is not None),
                order=torch.tensor(order), factors=torch.tensor(factors, dtype=torch.float32),
                gray=torch.tensor(c["gray"]), sigma=torch.tensor(c["sigma"] or 0.0, dtype=torch.float32),
                solarize=torch.tensor(c["solarize"]))


def gray(x):
    """Luma (ITU-R 601-2, as PIL's and torchvision's grayscale), B x 1 x H x W. Here and below no tensor is made
    from Python numbers on the device: that copy would wait for the GPU."""
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]


def rotate_hue(x, hue):
    """Hue of RGB x (in [0, 1]) turned by `hue` (a turn is 1): through HSV, the closed form of HSV -> RGB."""
    v, m = x.max(1).values, x.min(1).values
    r, g, b, d = *x.unbind(1), (v - m).clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = (h / 6 + hue.view(-1, 1, 1)) % 1
    k = torch.stack([(n + 6 * h) % 6 for n in (5, 3, 1)], 1)  # R, G, B
    return v.unsqueeze(1) - (v - m).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def blend(x, y, f):
    return (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * y).clamp(0, 1)


JITTER_BATCH = (lambda x, f: blend(x, 0, f),  # brightness, contrast, saturation, hue: as torchvision's tensor ops
                lambda x, f: blend(x, gray(x).mean((1, 2, 3), keepdim=True), f),
                lambda x, f: blend(x, gray(x), f),
                rotate_hue)


def blur(x, sigma, radius=8):
    """A Gaussian blur with one sigma per image (radius 8 = 4 x the largest sigma), separable, the edge pixels
    repeated (as PIL's); one grouped convolution over the batch for each direction."""
    n, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=x.device) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    x = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k.view(n * c, 1, 1, -1), groups=n * c)
    return F.conv2d(x, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)


def augment(x, c):
    """A batch's choices `c` (pack, collated) applied to its uint8 crops x on their device, each image with its own:
    the operations of `apply_pil`, in float. Returns floats in [0, 255] for `normalize`. The choices stay on the
    host: which images each operation takes is known there, so the device is never waited for."""
    c, x = {k: v.cpu() for k, v in c.items()}, x.float() / 255

    def apply(chosen, op, *factors):  # op on the images `chosen`, with their factors
        idx = chosen.nonzero().squeeze(1)
        if len(idx):
            i, f = host_to(idx, x.device), [host_to(f[idx], x.device) for f in factors]
            x.index_copy_(0, i, op(x.index_select(0, i), *f))

    apply(c["flip"], lambda y: y.flip(-1))
    for j in range(4):  # the jitter's four operations, in each image's own order
        for op in range(4):
            apply(c["jitter"] & (c["order"][:, j] == op), JITTER_BATCH[op], c["factors"][:, op])
    apply(c["gray"], lambda y: gray(y).expand(-1, 3, -1, -1))
    apply(c["sigma"] > 0, blur, c["sigma"])
    apply(c["solarize"], lambda y: torch.where(y >= 128 / 255, 1 - y, y))
    return x * 255


def host_to(t, device):
    """A small host tensor to `device` without waiting: a copy from pageable memory would wait for the GPU."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def to_device(batch, device, gpu_aug=False, channels_last=False):
    """A batch's two views on the device, normalised (the rest of the augmentations here with
    --gpu-aug: the workers only cropped, augment.py), and its labels."""
    (v1, v2), labels = batch
    if gpu_aug:
        v1, v2 = (augment(crops.to(device, non_blocking=True), c) for crops, c in (v1, v2))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y1, y2 = (normalize(v.to(device, non_blocking=True)).to(torch.get_default_dtype())
              .contiguous(memory_format=fmt) for v in (v1, v2))
    return y1, y2, labels.to(device, non_blocking=True)
