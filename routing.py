"""Appendix A's example difficulty-based routing (Fig. 11): "routing examples with the smallest loss to the initial
blocks while routing examples with the highest loss to the highest blocks", from their training dynamics.

Barlow Twins' loss is a loss of the batch, so an example's difficulty is defined here as its share of the invariance
term at the last block: with a, b the two views' globally pooled last-block outputs, standardised over the global
batch (Fig. 8's C), 1 - C_jj = mean_b (a_bj - b_bj)^2 / 2, so example b's share is d_b = mean_j (a_bj - b_bj)^2 / 2.
It is recorded every time an example is trained on, and used the next time it is seen (the next epoch): an
example seen for the first time trains every block with weight 1.

Within each process's share of the batch, examples are ranked by difficulty and split into as many equal groups as
there are blocks, the easiest routed to block 1. Schemes: "below", an example trains the block it is routed to and
every block below it, and no block above it (its weight there is 0: the block's head never sees it); "weight", it
trains its block with weight 1 and every other block with a reduced weight w. The weights enter Barlow Twins'
batch statistics as sample weights (losses.barlow_twins), so w = 1 is the plain step, exactly.
"""
import torch

import distributed
import losses

SCHEMES = ("none", "below", "weight")


@torch.no_grad()
def difficulty(h1, h2, pool):
    """Each example's share of the invariance term of its two views' pooled block outputs h1, h2 (see above)."""
    a, b = losses.standardize(pool(h1).float()), losses.standardize(pool(h2).float())
    return (a - b).pow(2).mean(1) / 2


class Router:
    """The difficulty of every training image (NaN: never measured), the same in every process, and the per-block
    sample weights it gives a batch."""

    def __init__(self, images, blocks, scheme, weight, device):
        self.blocks, self.scheme, self.weight = blocks, scheme, weight
        self.table = torch.full((images,), float("nan"), device=device)

    def weights(self, index):
        """For a batch of image indices: per block, a tensor of sample weights."""
        d = self.table[index]
        known = ~d.isnan()
        rank = torch.empty_like(d).scatter_(0, d.argsort(), torch.arange(len(d), device=d.device, dtype=d.dtype))
        route = (rank * self.blocks / len(d)).floor()  # 0 = the easiest share, routed to block 1
        out = []
        for k in range(self.blocks):
            w = (route >= k).to(d.dtype) if self.scheme == "below" else torch.where(route == k, 1.0, self.weight)
            w = torch.where(known, w, 1.0)
            out.append(w)  # never None on one process only: every process issues the same collectives
        return out

    def record(self, index, d):
        """Write this step's difficulties of every process's examples into every process's table."""
        if distributed.active():
            index, d = (distributed.gather_rows(t, len(t) * distributed.world()) for t in (index, d))
        self.table[index] = d.to(self.table.dtype)


class Routed:
    """App. A's routing around the per-block losses (train.head_losses): block k's loss weighs the batch's
    examples by their routing weights, and those of weight 0 never reach its head; the last block records the
    batch's difficulties, for the next time its images are seen."""

    def __init__(self, block_loss, router, pool):
        self.block_loss, self.router, self.pool = block_loss, router, pool

    def batch(self, keys):
        """The next batch's Seeded keys (epoch, image, view set): its images' weights per block."""
        self.index = torch.tensor([key[1] for key in keys], device=self.router.table.device)
        self.w = self.router.weights(self.index)

    def __call__(self, k, h1, h2, labels):
        if k == self.router.blocks - 1:
            self.router.record(self.index, difficulty(h1, h2, self.pool))
        keep = self.w[k] > 0
        return self.block_loss(k, h1[keep], h2[keep], None if labels is None else labels[keep], self.w[k][keep])
