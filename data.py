"""Data: Barlow Twins' two-view augmentations (used unchanged by the paper) and the datasets."""
import gzip
import math
import multiprocessing
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

DATASETS = ("folder", "cifar10", "fashion-mnist", "fake")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


def to_rgb(img):
    return img.convert("RGB")  # Fashion-MNIST is grey; the ResNet stem wants 3 channels


def draw_view(blur_p, solarize_p):
    """The random choices of one view after its crop (Barlow Twins, README's table), drawn from torch's RNG:
    flip p 0.5; colour jitter p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random
    order, as torchvision's ColorJitter); grayscale p 0.2; blur with sigma in [0.1, 2] with p `blur_p`;
    solarize with p `solarize_p`."""
    u = lambda a, b: torch.empty(1).uniform_(a, b).item()  # noqa: E731
    p = dict(flip=torch.rand(1).item() < 0.5, jitter=None, gray=False, sigma=None, solarize=False)
    if torch.rand(1).item() < 0.8:
        p["jitter"] = (torch.randperm(4).tolist(), u(0.6, 1.4), u(0.6, 1.4), u(0.8, 1.2), u(-0.1, 0.1))
    p["gray"] = torch.rand(1).item() < 0.2
    if torch.rand(1).item() < blur_p:
        p["sigma"] = u(0.1, 2.0)
    p["solarize"] = torch.rand(1).item() < solarize_p
    return p


JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def apply_view(img, p):
    """One view's choices `p` (draw_view) on a cropped RGB PIL image; returns a uint8 C x H x W tensor."""
    if p["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if p["jitter"]:
        order, *factors = p["jitter"]
        for k in order:
            img = JITTER[k](img, factors[k])
    if p["gray"]:
        img = img.convert("L").convert("RGB")
    if p["sigma"] is not None:  # PIL's blur, as Barlow Twins; torchvision's is 5x slower on an image
        img = img.filter(ImageFilter.GaussianBlur(radius=p["sigma"]))
    if p["solarize"]:
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
    """Barlow Twins' asymmetric pair (README's table): view A always blurred and never solarized, view B
    blurred with p 0.1 and solarized with p 0.2. Both crops are drawn first, so that the image is decoded
    once, at the smallest scale both allow. Returns two uint8 tensors: `normalize` them on the device.
    With `on_device`, only the crops are made here, and each view is (uint8 crop, its choices packed):
    `augment` applies them to the batch on the device, from the same draws (README, "The data pipeline")."""

    def __init__(self, size=224, min_scale=0.08, on_device=False):
        self.size, self.scale, self.ratio = size, (min_scale, 1.0), (3 / 4, 4 / 3)
        self.views = (dict(blur_p=1.0, solarize_p=0.0), dict(blur_p=0.1, solarize_p=0.2))
        self.on_device = on_device

    def __call__(self, img):
        boxes = [T.RandomResizedCrop.get_params(img, self.scale, self.ratio) for _ in self.views]
        img, boxes = decode(img, boxes, self.size)
        crops = [img.resize((self.size, self.size), Image.BICUBIC, box=box) for box in boxes]
        if self.on_device:
            return tuple((to_tensor(crop), pack(draw_view(**v))) for crop, v in zip(crops, self.views))
        return tuple(apply_view(crop, draw_view(**v)) for crop, v in zip(crops, self.views))


def to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # RGB PIL image -> uint8 C x H x W


def pack(p):
    """One view's choices (draw_view) as 13 numbers: flip, jitter, its order (4), its factors (4), gray,
    sigma (0: no blur), solarize."""
    order, *factors = p["jitter"] or ([0, 1, 2, 3], 1.0, 1.0, 1.0, 0.0)
    return torch.tensor([p["flip"], p["jitter"] is not None, *order, *factors, p["gray"], p["sigma"] or 0,
                         p["solarize"]], dtype=torch.float32)


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


def augment(x, p):
    """TwoViews' choices `p` (B x 13, `pack`) applied to a batch of uint8 crops x on their device, each image
    with its own: the same operations as `apply_view`, in float. Returns floats in [0, 255] for `normalize`.
    p stays on the host: which images each operation takes is known there, so the device is never waited for."""
    p, x = p.cpu(), x.float() / 255

    def apply(chosen, op, *factors):  # op on the images `chosen`, with their factors
        idx = chosen.nonzero().squeeze(1)
        if len(idx):
            i, f = host_to(idx, x.device), [host_to(f[idx], x.device) for f in factors]
            x.index_copy_(0, i, op(x.index_select(0, i), *f))

    apply(p[:, 0] > 0, lambda y: y.flip(-1))
    for j in range(4):  # the jitter's four operations, in each image's own order
        for op in range(4):
            apply((p[:, 1] > 0) & (p[:, 2 + j] == op), JITTER_BATCH[op], p[:, 6 + op])
    apply(p[:, 10] > 0, lambda y: gray(y).expand(-1, 3, -1, -1))
    apply(p[:, 11] > 0, blur, p[:, 11])
    apply(p[:, 12] > 0, lambda y: torch.where(y >= 128 / 255, 1 - y, y))
    return x * 255


def host_to(t, device):
    """A small host tensor to `device` without waiting: a copy from pageable memory would wait for the GPU."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def to_device(view, device):
    """A batch of one view from TwoViews -> normalised floats on `device`; with `on_device`, augmented there."""
    if isinstance(view, (tuple, list)):  # (uint8 crops, their choices)
        return normalize(augment(view[0].to(device, non_blocking=True), view[1]))
    return normalize(view.to(device, non_blocking=True))


def normalize(x):
    """uint8 images (B x 3 x H x W) -> float, normalised with ImageNet's mean and std, on x's device."""
    mean, std = (host_to(torch.tensor(v).view(1, 3, 1, 1) * 255, x.device) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x.float() - mean) / std


def probe_transforms(size=224):
    """The linear probe's: RandomResizedCrop + flip for training, Resize(256) + CenterCrop(224) for
    evaluation (both scaled with the image size)."""
    train = T.Compose([to_rgb, T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                       T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    val = T.Compose([to_rgb, T.Resize(size * 256 // 224), T.CenterCrop(size), T.ToTensor(),
                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return train, val


def plain_transform():
    """Images fed as they are, only normalised: ImageNet-C's are 224 px already (App. C)."""
    return T.Compose([to_rgb, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_image(path):
    """PIL's loader, with a one-line error naming the file, and 16-bit images scaled to 8 bits (converted
    as they are, they would saturate to white). Float images are refused. A JPEG is only opened here."""
    try:
        img = Image.open(path)
        if img.format != "JPEG":  # a JPEG is read later, by TwoViews, at the scale its crops need
            img.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable image {path}: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"unsupported image {path}: {img.mode} values outside 0-65535")
        img = Image.fromarray((a >> 8).astype(np.uint8))
    elif img.mode == "F":
        raise ValueError(f"unsupported image {path}: floating-point pixels; save it with 8 or 16 bits")
    return img


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, reading with `load_image` and counting each file once, even when symbolic
    links reach it twice (a link loop would otherwise repeat a class some 40 times)."""

    def __init__(self, root, transform=None):
        super().__init__(root, transform, loader=load_image)

    @staticmethod
    def make_dataset(*args, **kwargs):
        seen, samples = set(), []
        for path, label in torchvision.datasets.ImageFolder.make_dataset(*args, **kwargs):
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                samples.append((path, label))
        return samples


class Seeded(torch.utils.data.Dataset):
    """Draws sample i's augmentations from a generator seeded by (seed, epoch, i), so a run's data is
    the same whatever the number of workers or ranks, and after a resume in the middle of an epoch."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]  # a corrupt or unreadable file stops the run, naming it (load_image)
        # The transforms draw from torch's CPU generator; torch.manual_seed would also queue a seeding of every
        # GPU, with a traceback, for each image (half of the time of a small image's views)
        torch.default_generator.manual_seed(hash((self.seed, self.epoch, i)) & 0xFFFF_FFFF)
        return self.transform(img), label


def fashion_mnist_root(root):
    """torchvision reads Fashion-MNIST unzipped from root/FashionMNIST/raw; unzip Debian's copy there."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        src = os.path.join(DEBIAN_FASHION_MNIST, name + ".gz")
        if not os.path.exists(os.path.join(raw, name)) and os.path.exists(src):
            os.makedirs(raw, exist_ok=True)
            with gzip.open(src) as f, open(os.path.join(raw, name) + ".part", "wb") as g:
                shutil.copyfileobj(f, g)
            os.replace(os.path.join(raw, name) + ".part", os.path.join(raw, name))
    return root


def balanced_subset(targets, limit, seed=0):
    """The indices of `limit` samples spread over the classes as evenly as their sizes allow, drawn with a
    seeded generator (the same on every rank and after a resume), in ascending order."""
    targets = torch.as_tensor(targets)
    classes = targets.unique().tolist()
    g, keys = torch.Generator().manual_seed(seed), torch.empty(len(targets), dtype=torch.long)
    for c_i, c in enumerate(classes):
        idx = (targets == c).nonzero().flatten()
        keys[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) * len(classes) + c_i
    return keys.argsort()[:limit].sort().values.tolist()  # round robin: 1st of each class, 2nd of each, ...


def fake_root(root, train_images=1000, classes=10, size=(500, 375)):
    """--dataset fake: JPEGs of a typical ImageNet size (smooth random colours plus grain), generated once into
    root/fake/{train,val}, 1,000 training images and 100 for val, to smoke-test and benchmark without a dataset.
    bench.py --loop asks for more (root/fake-N, an image folder): its steps must outlast the workers' prefetch."""
    train_images = max(train_images, 1000)
    path = os.path.join(root, "fake" if train_images == 1000 else f"fake-{train_images}")
    if not os.path.isdir(path):
        part = f"{path}.{os.getpid()}.part"
        jobs = [(part, split, c, n, size) for split, n in (("train", -(-train_images // classes)), ("val", 10))
                for c in range(classes)]
        with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count())) as pool:
            pool.starmap(fake_class, jobs)
        try:
            os.rename(part, path)
        except OSError:  # another process made it first
            shutil.rmtree(part)
    return path


def fake_class(part, split, c, n, size):
    rng = np.random.default_rng([c, split == "train"])
    os.makedirs(os.path.join(part, split, f"class{c}"))
    for i in range(n):
        smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.normal(0, 12, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(smooth) + grain, 0, 255).astype(np.uint8))
        img.save(os.path.join(part, split, f"class{c}", f"{i}.jpg"), quality=90)


def dataset(name, root, train=True, limit=0, seed=0):
    """Returns an (image, label) dataset; `limit` keeps N images, balanced over the classes (quick runs).
    folder: root/train and root/val in the ImageNet layout. cifar10 / fashion-mnist: torchvision's,
    downloaded into root when missing (Fashion-MNIST is taken from Debian's package when present)."""
    if name in ("folder", "fake"):
        path = os.path.join(fake_root(root) if name == "fake" else root, "train" if train else "val")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--data {root}: no {'train' if train else 'val'}/ folder (ImageNet layout)")
        ds = ImageFolder(path)  # raises FileNotFoundError when it holds no images
    elif name in ("cifar10", "fashion-mnist"):
        try:
            if name == "cifar10":
                ds = torchvision.datasets.CIFAR10(root, train=train, download=True)
            else:
                ds = torchvision.datasets.FashionMNIST(fashion_mnist_root(root), train=train, download=True)
        except (OSError, RuntimeError) as e:  # no internet, or a half-written download
            raise FileNotFoundError(f"--dataset {name}: not in {root} and the download failed ({e})") from None
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    ds.num_classes = len(ds.classes)
    if limit:
        sub = torch.utils.data.Subset(ds, balanced_subset(ds.targets, limit, seed))
        sub.num_classes = ds.num_classes
        return sub
    return ds
