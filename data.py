"""Data: Barlow Twins' two-view augmentations (used unchanged by the paper) and the datasets."""
import gzip
import os
import shutil

import torch
import torchvision
import torchvision.transforms as T

DATASETS = ("folder", "cifar10", "fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


def to_rgb(img):
    return img.convert("RGB")  # Fashion-MNIST is grey; the ResNet stem wants 3 channels


def view(size, blur_p, solarize_p):
    """One view of Barlow Twins' augmentations (README, "How this differs"). The blur kernel is ~10% of the
    image (23 px at 224), as Barlow Twins."""
    kernel = int(0.1 * size) // 2 * 2 + 1
    return T.Compose([
        to_rgb,
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomSolarize(128, p=solarize_p),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViews:
    """Barlow Twins' asymmetric pair: view A always blurred and never solarized, view B blurred with
    p 0.1 and solarized with p 0.2."""

    def __init__(self, size=224):
        self.a, self.b = view(size, blur_p=1.0, solarize_p=0.0), view(size, blur_p=0.1, solarize_p=0.2)

    def __call__(self, img):
        return self.a(img), self.b(img)


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


class Seeded(torch.utils.data.Dataset):
    """Draws sample i's augmentations from a generator seeded by (seed, epoch, i), so a run's data is
    the same whatever the number of workers or ranks, and after a resume in the middle of an epoch."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            img, label = self.dataset[i]
        except OSError as e:  # a corrupt or unreadable file stops the run, naming it (README)
            raise ValueError(f"unreadable image #{i} {image_path(self.dataset, i)}: {e}") from None
        torch.manual_seed(hash((self.seed, self.epoch, i)) & 0xFFFF_FFFF)  # transforms draw from torch's RNG
        return self.transform(img), label


def image_path(ds, i):
    """The file behind sample i of an ImageFolder, possibly inside a Subset ('' if there is none)."""
    if isinstance(ds, torch.utils.data.Subset):
        return image_path(ds.dataset, ds.indices[i])
    return ds.samples[i][0] if hasattr(ds, "samples") else ""


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


def dataset(name, root, train=True, limit=0, seed=0):
    """Returns an (image, label) dataset; `limit` keeps N images, balanced over the classes (quick runs).
    folder: root/train and root/val in the ImageNet layout. cifar10 / fashion-mnist: torchvision's,
    downloaded into root when missing (Fashion-MNIST is taken from Debian's package when present)."""
    if name == "folder":
        path = os.path.join(root, "train" if train else "val")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--data {root}: no {'train' if train else 'val'}/ folder (ImageNet layout)")
        ds = torchvision.datasets.ImageFolder(path)  # raises FileNotFoundError when it holds no images
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
