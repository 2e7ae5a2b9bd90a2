"""Data: the datasets (an ImageNet-layout folder, CIFAR-10, Fashion-MNIST, generated JPEGs), read as they are
meant (hidden files skipped, val/ labelled with train/'s classes), and `Seeded`, which draws every image's
augmentations (augment.py) from its own seed."""
import gzip
import multiprocessing
import os
import pickle
import shutil

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

import distributed
from augment import IMAGENET_MEAN, IMAGENET_STD, TwoViews
from cli import quiet_worker

DATASETS = ("folder", "cifar10", "fashion-mnist", "fake")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


def to_rgb(img):
    return img.convert("RGB")  # Fashion-MNIST is grey; the ResNet stem wants 3 channels


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
    as they are, they would saturate to white). Float images are refused. A JPEG is only opened here (EXIF
    orientation is not applied, as torchvision and Barlow Twins)."""
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


def class_folders(path):
    """The class folders of an image folder, hidden ones (.ipynb_checkpoints, .DS_Store, ...) left out."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, reading with `load_image`, skipping hidden folders and files (a notebook's
    .ipynb_checkpoints/ would become a class; macOS's ._x.png are not images), counting each file once even when
    symbolic links reach it twice (a link loop would repeat a class some 40 times), and labelling with `classes`
    when given (val/ scored with train/'s labels). A class of `classes` that `root` lacks is allowed (empty)."""

    def __init__(self, root, transform=None, classes=None):
        self.wanted = classes
        visible = lambda p: p.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS) and not any(  # noqa: E731
            part.startswith(".") for part in os.path.relpath(p, root).split(os.sep))
        super().__init__(root, transform, loader=load_image, is_valid_file=visible, allow_empty=classes is not None)

    def find_classes(self, directory):
        found = class_folders(directory)
        if self.wanted is None:
            if not found:
                raise FileNotFoundError(f"no class folder in {directory}")
            return found, {c: i for i, c in enumerate(found)}
        extra = [c for c in found if c not in self.wanted]
        if extra:
            raise ValueError(f"{directory}: class folder {extra[0]} is not a class of train/ "
                             f"({len(extra)} such); val/ must use train/'s class names")
        return list(self.wanted), {c: i for i, c in enumerate(self.wanted)}

    @staticmethod
    def make_dataset(*args, **kwargs):
        seen, samples = set(), []
        for path, label in torchvision.datasets.ImageFolder.make_dataset(*args, **kwargs):
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                samples.append((path, label))
        return samples


class LocalCIFAR10(torchvision.datasets.CIFAR10):
    """CIFAR-10 in its python format from a local folder: every file present is enough. A copy whose checksums differ
    from the published archive's (one's own export) is used as it is; downloads keep torchvision's checks."""

    def _check_integrity(self):
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list + [(self.meta["filename"], "")])

    def _load_meta(self):
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class Seeded(torch.utils.data.Dataset):
    """Draws sample i's augmentations from a generator seeded by (seed, epoch, i), so a run's data is the same
    whatever the number of workers or ranks, and after a resume in the middle of an epoch. A key is an index (the
    epoch is then `self.epoch`) or (epoch, index, t): the epoch travels with the index, so persistent workers need
    no message, and t picks the transform when `transform` is a list (one per set of views)."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i, t = key if isinstance(key, tuple) else (self.epoch, key, 0)
        img, label = self.dataset[i]  # a corrupt or unreadable file stops the run, naming it (load_image)
        # The transforms draw from torch's CPU generator; torch.manual_seed would also queue a seeding of every
        # GPU, with a traceback, for each image (half of the time of a small image's views)
        torch.default_generator.manual_seed(hash((self.seed, epoch, i)) & 0xFFFF_FFFF)
        transform = self.transform[t] if isinstance(self.transform, (list, tuple)) else self.transform
        return transform(img), label


class EpochKeys(torch.utils.data.Sampler):
    """This process's share of an epoch as Seeded keys (epoch, image, view set), in a DistributedSampler's order.
    The epoch travels with each image, so the DataLoader's workers can live for the whole run."""

    def __init__(self, n, seed):
        self.n, self.seed, self.keys = n, seed, []

    def epoch_keys(self, epoch, start=0, end=None, views=0):
        order = torch.utils.data.DistributedSampler(range(self.n), distributed.dp_world(), distributed.dp_rank(),
                                                    shuffle=True, seed=self.seed, drop_last=True)
        order.set_epoch(epoch)
        return [(epoch, i, views) for i in list(order)[start:end]]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def training_loader(train_set, sets, args):
    """The two views of every training image, each block's set of views (App. A), `--workers` processes that live
    for the run (persistent: no fork per epoch)."""
    data = Seeded(train_set, [TwoViews(args.image_size, views, on_device=args.gpu_aug) for views in sets], args.seed)
    return torch.utils.data.DataLoader(data, args.batch_size // distributed.dp_world(), sampler=EpochKeys(len(data),
                                       args.seed), drop_last=True, num_workers=args.workers,
                                       pin_memory=distributed.DEVICE.type == "cuda", worker_init_fn=quiet_worker,
                                       persistent_workers=args.workers > 0)


def fashion_mnist_root(root):
    """torchvision reads Fashion-MNIST unzipped from root/FashionMNIST/raw; unzip Debian's copy there."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        src = os.path.join(DEBIAN_FASHION_MNIST, name + ".gz")
        if not os.path.exists(os.path.join(raw, name)) and os.path.exists(src):
            os.makedirs(raw, exist_ok=True)
            part = f"{os.path.join(raw, name)}.{os.getpid()}.part"
            with gzip.open(src) as f, open(part, "wb") as g:
                shutil.copyfileobj(f, g)
            os.replace(part, os.path.join(raw, name))
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


def folder_dataset(root, train):
    """root/train, or root/val labelled with train/'s classes (by name; a class that val/ lacks is said once)."""
    path = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data {root}: no {'train' if train else 'val'}/ folder (ImageNet layout)")
    if train or not os.path.isdir(os.path.join(root, "train")):
        return ImageFolder(path)  # raises FileNotFoundError when it holds no images
    classes = class_folders(os.path.join(root, "train"))
    ds = ImageFolder(path, classes=classes)
    missing = [c for c in classes if c not in set(class_folders(path))]
    if missing and distributed.rank() == 0:
        print(f"--data {root}: val/ lacks {len(missing)} of train/'s {len(classes)} classes ({', '.join(missing[:5])}"
              f"{', ...' if len(missing) > 5 else ''}); they are never scored", flush=True)
    return ds


def cifar10(root, train):
    """torchvision's CIFAR-10: a local copy in root/cifar-10-batches-py as it is, else downloaded (checked)."""
    if not os.path.isdir(os.path.join(root, torchvision.datasets.CIFAR10.base_folder)):
        return torchvision.datasets.CIFAR10(root, train=train, download=True)
    ds = LocalCIFAR10(root, train=train)
    if not torchvision.datasets.CIFAR10._check_integrity(ds) and distributed.rank() == 0 and train:
        print(f"--data {root}: a CIFAR-10 copy whose checksums differ from the published one; used as it is",
              flush=True)
    return ds


def dataset(name, root, train=True, limit=0, seed=0):
    """Returns an (image, label) dataset; `limit` keeps N images, balanced over the classes (quick runs).
    folder: root/train and root/val in the ImageNet layout. cifar10 / fashion-mnist: torchvision's,
    downloaded into root when missing (Fashion-MNIST is taken from Debian's package when present)."""
    if name in ("folder", "fake"):
        ds = folder_dataset(fake_root(root) if name == "fake" else root, train)
    elif name in ("cifar10", "fashion-mnist"):
        try:
            if name == "cifar10":
                ds = cifar10(root, train)
            else:
                ds = torchvision.datasets.FashionMNIST(fashion_mnist_root(root), train=train, download=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, KeyError) as e:  # no internet, a half-written file
            raise FileNotFoundError(f"--dataset {name}: not in {root} and the download failed ({e})") from None
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    ds.num_classes = len(ds.classes)
    if limit:
        sub = torch.utils.data.Subset(ds, balanced_subset(ds.targets, limit, seed))
        sub.num_classes, sub.classes = ds.num_classes, ds.classes
        return sub
    return ds
