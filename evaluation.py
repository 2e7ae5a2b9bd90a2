"""What is measured on a frozen network: every block's features, the kNN classifier, RankMe, and train.py's online
monitors (both on the device, once). probe.py's linear probes (Fig. 4 right) build on these."""
import torch
import torch.nn.functional as F

import distributed
from cli import Ticker, quiet_worker
from data import Seeded, dataset, probe_transforms


@torch.no_grad()
def block_features(model, x, kind, probed):
    """The features of the probed blocks for a batch of images, in fp32: each block's head output, or
    (kind "trunk") its global average pool. The network is frozen and in eval mode, so there is no noise;
    Algorithm 1 stops after the last probed block."""
    feats = {}
    for k, h in enumerate(model.blockwise(x)):
        if k in probed:
            feats[k] = model.heads[k](h) if kind == "head" else model.pool_trunk(h)
        if k == max(probed):
            break
    return [feats[k].float() for k in probed]


def features(model, ds, probed, kind="head", batch_size=256, workers=0):
    """The probed blocks' features of a whole dataset, and its labels, on the device. Each process extracts every
    world-th image and every process gets all of them, so what follows is the same for any number of processes."""
    rank, world, device = distributed.rank(), distributed.world(), next(model.parameters()).device
    dl = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(rank, len(ds), world)), batch_size,
                                     num_workers=workers, worker_init_fn=quiet_worker)
    feats, ys, tick = [[] for _ in probed], [], Ticker(f"features of {len(ds)} images", len(dl))
    for n, (x, y) in enumerate(dl):
        for i, f in enumerate(block_features(model, x.to(device, non_blocking=True), kind, probed)):
            feats[i].append(f)
        ys.append(y.to(device))
        tick(n + 1)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return ([distributed.gather_rows(torch.cat(f), len(ds)) for f in feats],
            distributed.gather_rows(torch.cat(ys) if ys else empty, len(ds)))


@torch.no_grad()
def knn(train_f, train_y, test_f, test_y, k, classes, temperature=1.0):
    """Cosine k-NN: each of the k nearest training features votes for its label with weight exp(cos / temperature)
    (1.0 here; DINO and solo-learn use 0.07, probe.py --knn-temperature). Returns top-1 (%)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim, idx = (test_f[i:i + 1024] @ train_f.T).topk(min(k, len(train_f)), dim=1)
        weights = (sim / temperature).exp()
        votes = sim.new_zeros(len(idx), classes).scatter_add_(1, train_y[idx], weights)
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum()
    return 100 * float(correct) / len(test_f)


@torch.no_grad()
def rankme(f, eps=1e-7):
    """RankMe (Garrido et al., 2023): the effective rank exp(entropy) of the normalised singular values of
    a feature matrix; low means dimensional collapse, the known failure of deep blocks in blockwise SSL.
    The singular values come from the eigenvalues of the smaller Gram matrix (d x d for n >= d features),
    several times faster than an SVD of the n x d matrix; they lose only values below ~1e-8 of the
    largest, which the eps below outweighs."""
    f = f.double()
    gram = f.T @ f if len(f) >= f.shape[1] else f @ f.T
    s = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    p = s / s.sum() + eps
    return torch.exp(-(p * p.log()).sum()).item()


def monitor_sets(data, name, images, image_size, seed):
    """The monitors' data, without augmentation: a bank of `images` training images and `images` held-out ones
    (val/, or the test split), each balanced over the classes. None when there is no held-out split."""
    try:
        held_out = dataset(name, data, train=False, limit=images, seed=seed)
    except FileNotFoundError:
        if distributed.rank() == 0:
            print(f"no held-out images in --data {data} (val/): monitors off", flush=True)
        return None
    bank = dataset(name, data, train=True, limit=images, seed=seed)
    plain = probe_transforms(image_size)[1]
    return Seeded(bank, plain, seed), Seeded(held_out, plain, seed)


def monitors(model, sets, classes, batch_size, workers, k=20):
    """Online monitors (README): per block, the k-NN top-1 (k = 20, temperature 1) of the held-out images against
    the bank (head features), and the RankMe of the held-out features (collapse shows as a low effective rank).
    The features are gathered from every process; rank 0 computes the numbers, on the device, and returns them
    (the others return None). Leaves the model in eval mode."""
    model.eval()
    probed = list(range(len(model.blocks)))
    (bank_f, bank_y), (f, y) = (features(model, ds, probed, "head", batch_size, workers) for ds in sets)
    if distributed.rank():
        return None
    return dict(knn=[knn(b, bank_y, h, y, k, classes) for b, h in zip(bank_f, f)], rankme=[rankme(h) for h in f])


def log_monitors(epoch, run):
    """The online monitors (kNN top-1 and RankMe per block, README), printed and logged."""
    found = monitors(run.model, run.monitored, run.train_set.num_classes,
                     max(1, run.args.batch_size // distributed.world()), run.args.workers)
    if found is not None:  # rank 0
        print(f"monitors after epoch {epoch + 1}: kNN top-1 per block "
              + " ".join(f"{v:.2f}" for v in found["knn"]) + " | RankMe per block "
              + " ".join(f"{v:.1f}" for v in found["rankme"]), flush=True)
        run.log(epoch=epoch, monitor=found)
