"""Self-supervised losses (§3.2, §4 Fig. 5) and the supervised one (§5), exact under torch.distributed.

Every loss takes the two views' projector outputs z1, z2 (B x D, this rank's part of the batch) and
returns the loss of the *global* batch, the same number on every rank. Gradients flow back through
the collectives below (the released code's plain all_reduce drops them, README): each rank then
holds world_size x its share of the gradient, and averaging over ranks, as DDP does, gives exactly
the gradient of one process holding the whole batch. Losses are computed in fp32 under autocast.
"""
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("barlowtwins", "vicreg", "simclr", "supervised")


GROUP = None  # the processes a batch is spread over: all (None), or a pipeline stage's replicas


def _distributed():  # §3.4: the paper trains on many GPUs; the loss must be that of the global batch
    return dist.is_available() and dist.is_initialized()  # one process in a group too: the same code path


class _AllReduce(torch.autograd.Function):
    """Sum over ranks (the "sum the cross-correlation matrix between all gpus" of Eq. (1)). Every rank
    uses the sum, so the gradient of x is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, group=GROUP)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=GROUP)
        return grad


class _AllGather(torch.autograd.Function):
    """The global batch of VICReg, SimCLR and the supervised loss (§4, Fig. 5; §5): every rank's x
    concatenated along dim 0; the backward returns this rank's slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(GROUP))]
        dist.all_gather(parts, x.contiguous(), group=GROUP)
        ctx.rank, ctx.n = dist.get_rank(GROUP), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=GROUP)  # gloo has no reduce_scatter; all_reduce then slice is the same sum
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_reduce(x):  # Eq. (1) over all ranks
    return _AllReduce.apply(x) if _distributed() else x


def all_gather(x):  # the global batch (Fig. 5 losses)
    return _AllGather.apply(x) if _distributed() else x


def _world_size():  # §3.4: batch 2048 spread over the processes
    return dist.get_world_size(GROUP) if _distributed() else 1


def fp32(loss):
    """§3.2-§3.4: compute the loss in float32 with autocast off: the cross-correlation and the exponentials of
    NT-Xent overflow or lose precision in half precision."""
    def up(t):  # half types to float32; float64 and integer labels stay as they are
        return t.float() if t.is_floating_point() and t.element_size() < 4 else t

    @functools.wraps(loss)
    def wrapper(z1, z2, *args, **kwargs):
        with torch.autocast(z1.device.type, enabled=False):
            return loss(up(z1), up(z2), *args, **kwargs)
    return wrapper


def standardize(z, eps=1e-5, weight=None):
    """Eq. (1)'s normalisation: standardise each dimension over the global batch
    (BatchNorm1d(affine=False): centred, biased variance). Eq. (1) of the paper omits the centring; the Barlow
    Twins code has it. `weight` (App. A's routing): one weight per sample, as if sample b appeared weight[b] times."""
    w, n = _weights(z, weight)
    mean = all_reduce((w * z).sum(0)) / n
    var = all_reduce((w * (z - mean).pow(2)).sum(0)) / n
    return (z - mean) / (var + eps).sqrt()


def _weights(z, weight):  # a column of sample weights (ones by default), and their sum over the global batch
    if weight is None:
        return z.new_ones(len(z), 1), len(z) * _world_size()
    return weight[:, None], all_reduce(weight.sum())


@fp32
def barlow_twins(z1, z2, lambd=0.0051, scale=0.024, target=1.0, weight=None):
    """Eq. (1)-(2): C = z1^T z2 / B on batch-standardised z;
    loss = scale * (sum_i (target - C_ii)^2 + lambd * sum_{i != j} C_ij^2).
    `target` is the invariance target of Appendix A (1.0 in the paper's main runs); `weight`, one weight per sample
    (App. A's routing): C = sum_b w_b z1_b z2_b^T / sum_b w_b, with z standardised with the same weights."""
    w, n = _weights(z1, weight)
    c = all_reduce((w * standardize(z1, weight=weight)).T @ standardize(z2, weight=weight)) / n  # Eq. (1), all ranks
    on_diag = (target - torch.diagonal(c)).pow(2).sum()  # invariance term
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()  # redundancy reduction term
    return scale * (on_diag + lambd * off_diag)  # Eq. (2)


def _vicreg_var_cov(z):
    """VICReg's variance hinge on the std, and its covariance term (off-diagonal squares / D)."""
    z = z - z.mean(0)
    std = (z.var(0) + 1e-4).sqrt()
    cov = z.T @ z / (z.shape[0] - 1)
    return F.relu(1 - std).mean(), (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


@fp32
def vicreg(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg (Bardes et al., 2022), as the official code: invariance (MSE) + variance + covariance,
    on the gathered global batch."""
    z1, z2 = all_gather(z1), all_gather(z2)
    var1, cov1 = _vicreg_var_cov(z1)
    var2, cov2 = _vicreg_var_cov(z2)
    return sim_coeff * F.mse_loss(z1, z2) + std_coeff * (var1 + var2) / 2 + cov_coeff * (cov1 + cov2)


@fp32
def simclr(z1, z2, temperature=0.1):
    """SimCLR's NT-Xent (Chen et al., 2020): each of the 2N views has its twin as the positive and
    the other 2N - 2 views as negatives; cosine similarity / temperature (0.1: SimCLR's ImageNet value)."""
    z = F.normalize(torch.cat([all_gather(z1), all_gather(z2)]), dim=1)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    twin = torch.cat([torch.arange(n, 2 * n, device=z.device), torch.arange(n, device=z.device)])
    return F.cross_entropy(logits, twin)


@fp32
def supervised(logits, labels):
    """§5, supervised blockwise training: cross-entropy of the projector's class logits."""
    return F.cross_entropy(all_gather(logits), all_gather(labels))
