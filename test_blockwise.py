"""Tests of what the paper says: the model, the ViT, recomputation, the losses, the views, the step, LARS and
its schedule, routing, exactness under several processes and in a pipeline, evaluation, the README slide, and
the GPU tests: python -m pytest -q test_blockwise.py test_run.py (conftest.py holds the shared helpers).

Run under torchrun, this file is also the worker of the distributed tests (see `dist_worker`).
"""
import contextlib
import dataclasses
import copy
import fnmatch
import functools
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
import losses
import pipeline
import probe
import recompute
import routing
import train
import vit
from blockwise import POOLINGS, BlockResNet, Pool, add_noise, parse_blocks
import augment as aug
import bookkeeping
import cli
import distributed
import evaluation
from augment import View, apply_pil, augment, decode, draw, normalize, pack, to_tensor
from data import Seeded, balanced_subset, load_image, plain_transform, probe_transforms
from data import dataset as load_dataset
from train import LARS
from vit import BlockViT
from conftest import *  # noqa: F401,F403 (the shared helpers and constants)


# ---------------- the model (blockwise.py)


def small_model(**kw):
    torch.manual_seed(0)
    return BlockResNet(**{**TINY, **kw})


def block_params(model, k):
    return {id(p) for m in model.block_modules(k) for p in m.parameters()}


def assert_each_block_loss_reaches_only_its_block(model, every_parameter=False):
    """Block k's loss gives a gradient to block k's parameters (to each of them with every_parameter) and to no
    other block's: the stop-gradient of Algorithm 1."""
    x = torch.randn(4, 3, 32, 32)
    for k in range(len(model.blocks)):
        model.zero_grad(set_to_none=True)
        model.projectors[k](model(x)[k]).pow(2).sum().backward()
        own = block_params(model, k)
        for p in model.parameters():
            if id(p) in own:
                assert p.grad is not None and (p.grad.abs().sum() > 0 or not every_parameter), \
                    f"block {k + 1} parameter without gradient"
            else:
                assert p.grad is None or p.grad.abs().max() == 0, f"block {k + 1}'s loss leaked to another block"
        assert sum(model.get_parameter(n).grad.abs().sum() for n, p in model.named_parameters()
                   if id(p) in own and p.grad is not None) > 0


@pytest.mark.parametrize("blocks", ["1,2,3,4", "12,3,4", "1234"])
def test_each_block_loss_reaches_only_its_block(blocks):
    assert_each_block_loss_reaches_only_its_block(small_model(blocks=blocks).train())


def test_loco_shared_stage_gets_gradients_from_both_units():
    model = small_model(blocks="loco").train()
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for k in range(2):
        model.zero_grad(set_to_none=True)
        model.projectors[k](model(x)[k]).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})
    assert any(n.startswith("layer2.") for n in grads[0]) and any(n.startswith("layer2.") for n in grads[1])
    assert not any(n.startswith("layer3.") for n in grads[0])  # unit 1-2 stops below stage 3
    assert not any(n.startswith(("conv1.", "layer1.")) for n in grads[1])  # unit 2-3 input is detached


def test_parse_blocks():
    assert parse_blocks("paper") == [(1,), (2,), (3,), (4,)]
    assert parse_blocks("12,3,4") == [(1, 2), (3,), (4,)]
    assert parse_blocks("loco") == [(1, 2), (2, 3), (3, 4)]
    for bad in ("13,4", "5", "a,b", ""):
        with pytest.raises(ValueError):
            parse_blocks(bad)


@pytest.mark.parametrize("arch,channels", [("resnet18", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_shapes(arch, channels, pooling):
    torch.manual_seed(0)
    model = BlockResNet(arch, pooling=pooling, projector_widths=(32, 16)).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 64))
    want = list(channels) if pooling == "gsp" else [2048] * 4
    assert [tuple(f.shape) for f in feats] == [(2, d) for d in want]
    assert [tuple(model.projectors[k](f).shape) for k, f in enumerate(feats)] == [(2, 16)] * 4


def test_cbe_kernel_and_groups():
    head = BlockResNet("resnet18", pooling="cbe", kernel_size=3, groups=4, head_dim=128, projector_widths=None).heads[0]
    conv = head.expand[0]
    assert conv.kernel_size == (3, 3) and conv.groups == 4 and conv.padding == (1, 1) and conv.bias is None
    assert head(torch.randn(2, 64, 8, 8)).shape == (2, 128)


def test_lsp_is_the_average_of_each_spatial_bin():
    head = BlockResNet("resnet50", pooling="lsp", projector_widths=None).heads[0]  # 256 channels -> 8 bins
    x = torch.randn(2, 256, 8, 8)
    manual = torch.stack([x[:, :, r * 4:(r + 1) * 4, c * 2:(c + 1) * 2].mean((2, 3))
                          for r in range(2) for c in range(4)], dim=2)  # B x C x bins, bins as a 2 x 4 grid
    assert torch.allclose(head(x), manual.flatten(1), atol=1e-6)


def test_noise_only_in_training_and_relative_to_std():
    torch.manual_seed(0)
    x = 3.0 * torch.randn(64, 32, 16, 16)
    assert torch.equal(add_noise(x, 0.25, training=False), x)
    delta = add_noise(x, 0.25, training=True) - x
    assert abs(delta.std().item() / x.std().item() - 0.25) < 0.01 and abs(delta.mean().item()) < 0.01
    model = small_model(noise=0.5)
    y = torch.randn(2, 3, 32, 32)
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(model(y), model(y)))  # deterministic without noise


def test_noise_uses_one_std_over_the_whole_tensor_and_passes_gradients_through_it():
    """§5 (the released noise type "all"): x + sigma * std(x) * N(0, 1) with one std over the whole tensor,
    the same scale in a quiet channel as in a loud one, and the std not detached."""
    torch.manual_seed(0)
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64) * torch.tensor([1.0, 100.0], dtype=torch.float64)[:, None, None]
    x.requires_grad_()
    g = torch.randn_like(x)
    torch.manual_seed(1)
    y = add_noise(x, 0.25, training=True)
    (y * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y_ref = x_ref + 0.25 * x_ref.std() * torch.randn_like(x_ref)
    (y_ref * g).sum().backward()
    assert torch.allclose(y, y_ref, rtol=1e-12) and torch.allclose(x.grad, x_ref.grad, rtol=1e-12)
    assert not torch.allclose(x.grad, torch.ones_like(x.grad))  # d std / dx is part of the gradient
    quiet = (y - x)[:, 0].std() / x.std()
    assert 0.2 < quiet < 0.3  # in the quiet channel too, the noise is 0.25 x the whole tensor's std


def test_next_block_and_head_receive_the_noised_output():
    """§5: the noise is added before the head and before the next block, both of which see the same tensor."""
    model = small_model(noise=0.25).train()
    seen = {}
    model.layer1[-1].register_forward_hook(lambda m, i, o: seen.setdefault("layer1", o))
    model.layer2[0].register_forward_pre_hook(lambda m, i: seen.setdefault("block2", i[0]))
    model.heads[0].register_forward_pre_hook(lambda m, i: seen.setdefault("head1", i[0]))
    torch.manual_seed(0)
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(seen["block2"], seen["head1"])
    assert not torch.allclose(seen["block2"], seen["layer1"])
    assert abs((seen["block2"] - seen["layer1"]).std() / seen["layer1"].std() - 0.25) < 0.05


def test_residual_units_start_as_their_shortcut():
    """zero_init_residual, as the released run and Barlow Twins: the last BN of every residual unit starts at 0."""
    for arch, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        model = BlockResNet(arch, projector_widths=None)
        units = [u for s in (1, 2, 3, 4) for u in getattr(model, f"layer{s}")]
        assert all(getattr(u, last).weight.abs().sum() == 0 for u in units)
        assert all(u.bn1.weight.abs().sum() > 0 for u in units)


def test_projectors_are_initialised_independently():
    model = small_model()
    w = [p[0].weight for p in model.projectors[1:]]
    assert not torch.equal(w[0], w[1]) and model.projectors[0][0].bias is None


def test_trunk_loads_strictly_into_torchvision():
    for arch in ("resnet18", "resnet50"):
        model = BlockResNet(arch, pooling="cbe", projector_widths=(32, 16))
        reference = getattr(torchvision.models, arch)()
        missing, unexpected = reference.load_state_dict(model.trunk_state_dict(), strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


# ---------------- the blockwise Vision Transformer and its masking (vit.py, §6)

def small_vit(**kw):
    torch.manual_seed(0)
    return BlockViT(**{**dict(arch="vit_tiny", image_size=32, patch_size=8, head_dim=64, projector_widths=(32, 32)),
                       **kw})


def test_vit_blocks_are_torchvisions_layers_and_its_trunk_loads_back():
    """In evaluation, Algorithm 1 on the ViT gives torchvision's VisionTransformer, stage by stage (3 encoder layers
    each, the last LayerNorm ending stage 4); trunk_state_dict loads into it with only the classifier missing."""
    model = small_vit(noise=0.0).eval()
    vit = torchvision.models.VisionTransformer(32, 8, 12, 3, 192, 768).eval()
    missing, unexpected = vit.load_state_dict(model.trunk_state_dict(), strict=False)
    assert sorted(missing) == ["heads.head.bias", "heads.head.weight"] and unexpected == []
    assert model.own_names(model.trunk_state_dict()).keys() == {k for k in model.state_dict()
                                                               if not k.startswith(("heads.", "projectors."))}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = list(model.blockwise(x))
        tokens = torch.cat([vit.class_token.expand(2, -1, -1), vit._process_input(x)], 1) + vit.encoder.pos_embedding
        for k in range(4):
            tokens = vit.encoder.layers[3 * k:3 * k + 3](tokens)
            want = vit.encoder.ln(tokens) if k == 3 else tokens
            assert torch.allclose(outs[k], want, atol=1e-5), k
    assert model.stage_keys(1) == ("stem.", *(f"layers.encoder_layer_{i}." for i in range(3)))


@pytest.mark.parametrize("blocks", ["1,2,3,4", "12,34"])
def test_vit_block_loss_reaches_only_its_block(blocks):
    assert_each_block_loss_reaches_only_its_block(small_vit(blocks=blocks).train(), every_parameter=True)


def test_a_masked_token_changes_nothing_downstream():
    """Per-block masking (§6): block 1 drops a quarter of the 16 patches of each image (its own choice, seeded);
    changing the pixels of a patch it dropped changes no block's output; changing a kept patch does."""
    model = small_vit().train()
    model.mask = ([0.25, 0.5, 0.5, 0.75], None)  # the first view's masks
    x = torch.rand(3, 3, 32, 32)

    def run(images):
        torch.manual_seed(7)
        return [h.detach() for h in model.blockwise(images)]
    torch.manual_seed(7)
    order = torch.rand(3, 16).argsort(1)  # drop_tokens' first draw: the patches block 1 keeps come first
    gone, kept = order[0, 12].item(), order[0, 0].item()
    outs = run(x)
    for patch, same in ((gone, True), (kept, False)):
        y = x.clone()
        r, c = divmod(patch, 4)
        y[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = torch.rand(3, 8, 8)
        changed = run(y)
        assert all(torch.equal(a, b) for a, b in zip(outs, changed)) == same, patch
    assert [h.shape[1] for h in outs] == [1 + 12, 1 + 8, 1 + 8, 1 + 4]  # the class token and the kept patches
    model.eval()
    assert [h.shape[1] for h in model.blockwise(x)] == [17] * 4  # evaluation never masks


def test_token_masks_are_nested_per_image_and_keep_the_order():
    h = torch.arange(17.0)[None, :, None].expand(4, 17, 2).clone()  # each token's value is its position
    torch.manual_seed(0)
    a = vit.drop_tokens(h, 0.5, 16)
    b = vit.drop_tokens(a, 0.75, 16)
    assert a.shape == (4, 9, 2) and b.shape == (4, 5, 2)
    for i in range(4):
        pa, pb = a[i, :, 0].tolist(), b[i, :, 0].tolist()
        assert pa[0] == pb[0] == 0 and pa == sorted(pa) and set(pb) <= set(pa)
    assert len({tuple(a[i, :, 0].tolist()) for i in range(4)}) > 1  # each image its own choice
    assert torch.equal(vit.drop_tokens(b, 0.5, 16), b)  # a block never sees again what an earlier one dropped


# ---------------- recomputation that changes no result (recompute.py)


def lean_copy(head):
    """A copy of a CbE head that computes with LeanCbE (recompute.py) in training."""
    lean = copy.deepcopy(head)
    lean.forward = functools.partial(recompute.lean_cbe, lean)
    return lean


def run_head(head, x, g):
    """Output, input gradient, parameter gradients and BN buffers of one training step of a head."""
    x = x.clone().requires_grad_()
    out = head(x)
    (out * g).sum().backward()
    return [out, x.grad, *(p.grad for p in head.parameters()), *head.buffers()]


@pytest.mark.parametrize("kind,kernel_size,groups,momentum", [("cbe", 1, 1, 0.1), ("cbe-l2", 1, 1, 0.1),
                         ("cbe-sqrt", 1, 1, 0.1), ("cbe", 3, 2, None)])
def test_checkpointed_cbe_equals_the_stored_one(kind, kernel_size, groups, momentum):
    """LeanCbE (nothing of the head's width stored, the batch done in slices) = Conv -> BN -> ReLU -> pool,
    in float64: output, every gradient, BN running statistics, over two steps."""
    torch.manual_seed(0)
    head = Pool(8, kind, 16, kernel_size, groups).double().train()
    head.expand[1].momentum = momentum
    with torch.no_grad():
        head.expand[1].weight.normal_()
        head.expand[1].bias.normal_()
    lean = lean_copy(head)
    for _ in range(2):
        x, g = torch.randn(11, 8, 5, 6, dtype=torch.float64), torch.randn(11, 16, dtype=torch.float64)
        for a, b in zip(run_head(head, x, g), run_head(lean, x, g)):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert lean.expand[1].num_batches_tracked == 2
    assert torch.allclose(lean.eval()(x), head.eval()(x), rtol=1e-9, atol=1e-12)


def test_checkpointed_cbe_under_bf16_autocast():
    torch.manual_seed(0)
    head = Pool(8, "cbe", 16).train()
    lean = lean_copy(head)
    x, g = torch.randn(4, 8, 6, 6), torch.randn(4, 16)
    with torch.autocast("cpu", torch.bfloat16):
        ref, got = run_head(head, x, g), run_head(lean, x, g)
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype or a.dtype == torch.bfloat16  # the lean head returns fp32 features
        assert torch.allclose(a.float(), b.float(), rtol=0.05, atol=0.05 * a.float().abs().max().item())


def test_recomputed_trunk_gives_the_same_step():
    """recompute="all" (every residual unit and every CbE head recomputed in the backward): the same
    losses, gradients and BN running statistics as storing everything, noise included, in float64."""
    torch.manual_seed(0)
    y1, y2 = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    results = []
    for mode in ("none", "all"):
        model = small_model(noise=0.25).double().train()
        recompute.apply(model, mode)
        torch.manual_seed(1)
        loss = train.train_step(model, y1, y2, None, train.head_losses(model, BT4),
                                train.grad_owners(model, [0, 1, 2, 3]))[0]
        results.append([loss, *(p.grad for p in model.parameters()), *model.buffers()])
    for a, b in zip(*results):
        assert torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12 * a.double().abs().max().item())


# ---------------- the losses against naive float64 formulas (losses.py)


def naive_standardize(z):
    b, d = z.shape
    out = torch.empty_like(z)
    for i in range(d):
        m = sum(z[n, i] for n in range(b)) / b
        v = sum((z[n, i] - m) ** 2 for n in range(b)) / b
        out[:, i] = (z[:, i] - m) / math.sqrt(v + 1e-5)
    return out


def naive_barlow_twins(z1, z2, lambd, scale, target):
    a, b = naive_standardize(z1), naive_standardize(z2)
    n, d = a.shape
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss += (target - c) ** 2 if i == j else lambd * c ** 2
    return scale * loss


def naive_vicreg(z1, z2):
    n, d = z1.shape
    sim = sum((z1[k, i] - z2[k, i]) ** 2 for k in range(n) for i in range(d)) / (n * d)
    var, cov = 0.0, 0.0
    for z in (z1, z2):
        x = z - z.mean(0)
        for i in range(d):
            var += max(0.0, 1 - math.sqrt(sum(x[k, i] ** 2 for k in range(n)) / (n - 1) + 1e-4)) / d / 2
            for j in range(d):
                if i != j:
                    cov += (sum(x[k, i] * x[k, j] for k in range(n)) / (n - 1)) ** 2 / d
    return 25 * sim + 25 * var + cov


def naive_simclr(z1, z2, t):
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        denom = sum(math.exp(float(z[a] @ z[k]) / t) for k in range(2 * n) if k != a)
        total += -math.log(math.exp(float(z[a] @ z[pos]) / t) / denom)
    return total / (2 * n)


def naive_cross_entropy(logits, labels):
    return sum(-math.log(math.exp(logits[k, labels[k]]) / sum(math.exp(v) for v in logits[k]))
               for k in range(len(labels))) / len(labels)


def test_losses_match_naive_formulas():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for lambd, scale, target in ((0.0051, 0.024, 1.0), (0.3, 1.0, 0.6)):
        assert math.isclose(losses.barlow_twins(z1, z2, lambd, scale, target).item(),
                            naive_barlow_twins(z1, z2, lambd, scale, target), rel_tol=1e-9)
    assert math.isclose(losses.vicreg(z1, z2).item(), naive_vicreg(z1, z2), rel_tol=1e-9)
    assert math.isclose(losses.simclr(z1, z2, 0.5).item(), naive_simclr(z1, z2, 0.5), rel_tol=1e-9)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    assert math.isclose(losses.supervised(z1, labels).item(), naive_cross_entropy(z1, labels), rel_tol=1e-9)


def test_loss_minima():
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)
    z = torch.kron(h, h)[:, 1:6]  # 16 x 5: zero-mean, unit-variance, mutually orthogonal columns
    assert losses.barlow_twins(z, z).item() < 1e-5  # C = I
    assert losses.barlow_twins(z, -z).item() > 0.09  # C = -I: invariance term 4 per dim
    assert losses.vicreg(2 * z, 2 * z).item() < 1e-9  # no distance, std 2 > 1, no covariance
    far = torch.eye(16, dtype=torch.float64)[:8]  # twins identical, all others orthogonal
    assert losses.simclr(far, far, 0.1).item() < 1e-3 < losses.simclr(far, far.roll(1, 0), 0.1).item()


def test_losses_are_fp32_under_autocast():
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    with torch.autocast("cpu", torch.bfloat16):
        for fn in (losses.barlow_twins, losses.vicreg, losses.simclr):
            assert fn(z1.bfloat16(), z2.bfloat16()).dtype == torch.float32


def naive_standardize_weighted(z, w):
    out = torch.empty_like(z)
    for i in range(z.shape[1]):
        m = sum(w[n] * z[n, i] for n in range(len(z))) / w.sum()
        v = sum(w[n] * (z[n, i] - m) ** 2 for n in range(len(z))) / w.sum()
        out[:, i] = (z[:, i] - m) / math.sqrt(v + 1e-5)
    return out


def test_weighted_barlow_twins_is_sample_duplication():
    """App. A's routing weighs examples in Barlow Twins' batch statistics: weight 2 is the example twice, weight 0
    is the example gone, and a naive float64 formula with weights agrees."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    w = torch.tensor([2.0, 1, 1, 0, 1, 0.5], dtype=torch.float64)
    twice = [0, 0, 1, 2, 4]  # weights 2, 1, 1, 0, 1
    assert math.isclose(losses.barlow_twins(z1[:5], z2[:5], 0.1, 1.0, weight=w[:5]).item(),
                        losses.barlow_twins(z1[twice], z2[twice], 0.1, 1.0).item(), rel_tol=1e-12)
    a, b = (naive_standardize_weighted(z, w) for z in (z1, z2))
    c = (w[:, None] * a).T @ b / w.sum()
    naive = (1 - c.diagonal()).pow(2).sum() + 0.1 * (c.pow(2).sum() - c.diagonal().pow(2).sum())
    assert math.isclose(losses.barlow_twins(z1, z2, 0.1, 1.0, weight=w).item(), naive.item(), rel_tol=1e-10)


# ---------------- the two views (augment.py)


def test_view_choices_follow_the_table():
    """Over 4000 draws with a fixed seed: each choice's frequency (binomial std <= 0.8 points, tested within
    3 points) and each factor's range, for both views (view A always blurred, never solarized; view B 10% and
    20%), as Barlow Twins and the README's table."""
    torch.manual_seed(0)
    for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)):
        draws = [draw(View(blur=blur_p, solarize=solarize_p)) for _ in range(4000)]
        rate = lambda f: np.mean([bool(f(d)) for d in draws])  # noqa: E731
        for got, want in ((rate(lambda d: d["flip"]), 0.5), (rate(lambda d: d["jitter"]), 0.8),
                          (rate(lambda d: d["gray"]), 0.2), (rate(lambda d: d["sigma"] is not None), blur_p),
                          (rate(lambda d: d["solarize"]), solarize_p)):
            assert abs(got - want) < 0.03, (got, want)
        jit = np.array([d["jitter"][1:] for d in draws if d["jitter"]])
        for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            assert lo <= jit[:, k].min() < lo + 0.01 and hi - 0.01 < jit[:, k].max() <= hi
        orders = {tuple(d["jitter"][0]) for d in draws if d["jitter"]}
        assert len(orders) == 24  # every order of the four colour operations
        sigmas = [d["sigma"] for d in draws if d["sigma"] is not None]
        assert 0.1 <= min(sigmas) < 0.12 and 1.98 < max(sigmas) <= 2.0
    other = [draw(View(brightness=0.1, contrast=0.3, saturation=0.2, hue=0.05)) for _ in range(2000)]
    jit = np.array([d["jitter"][1:] for d in other if d["jitter"]])  # each strength reaches its own factor
    for k, (lo, hi) in enumerate([(0.9, 1.1), (0.7, 1.3), (0.8, 1.2), (-0.05, 0.05)]):
        assert lo <= jit[:, k].min() < lo + 0.01 and hi - 0.01 < jit[:, k].max() <= hi


def test_the_table_is_barlow_twins_and_the_readme_shows_it():
    """The two views as the code builds them (TwoViews' default), every entry of the table, and README.md's table
    rendered from the same objects: changing one without the other fails here."""
    a, b = aug.TwoViews().views
    assert (a, b) == aug.BARLOW_TWINS
    common = dict(crop=(0.08, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                  gray=0.2, sigma=(0.1, 2.0))
    assert a == View(**common, blur=1.0, solarize=0.0) and b == View(**common, blur=0.1, solarize=0.2)
    readme = open(os.path.join(HERE, "README.md")).read()
    assert aug.table({"view A": (a,), "view B": (b,)}) in readme


def test_adaptive_sets_follow_the_table_per_block():
    """App. A's sets (colour jitter only; plus mild crops; the full set), drawn 4,000 times each: their frequencies
    and ranges are the table's, and the crops of the first set leave the whole image."""
    sets = aug.view_sets("adaptive", 4, crop_scale=0.3)
    assert sets[2] == sets[3] == tuple(dataclasses.replace(v, crop=(0.3, 1.0)) for v in aug.BARLOW_TWINS)
    torch.manual_seed(0)
    for views in sets[:2]:
        for view in views:
            draws = [draw(view) for _ in range(4000)]
            assert not any(d["flip"] or d["gray"] or d["sigma"] or d["solarize"] for d in draws)
            assert abs(np.mean([d["jitter"] is not None for d in draws]) - 0.8) < 0.03
    img = Image.fromarray(np.arange(48 * 48 * 3, dtype=np.uint8).reshape(48, 48, 3))
    whole = aug.TwoViews(48, sets[0], on_device=True)(img)[0][0]
    assert torch.equal(whole, to_tensor(img))  # no crop, no resize: the image itself
    with pytest.raises(ValueError, match="--augmentations"):
        aug.view_sets("jitter,full", 4)


def test_view_operations_are_torchvisions():
    """PIL's blur (as Barlow Twins), flip, grayscale and solarization in `apply_view` equal torchvision's (the blur
    to within its kernel's truncation and rounding), so the faster pipeline draws from the same distributions."""
    import torchvision.transforms.functional as TF
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).filter(ImageFilter.SMOOTH)
    ours = apply_pil(img, dict(flip=True, jitter=None, gray=True, sigma=1.5, solarize=True)).float()
    ref = TF.solarize(TF.gaussian_blur(TF.rgb_to_grayscale(TF.hflip(img), 3), 23, 1.5), 128)
    assert (ours - TF.pil_to_tensor(ref).float()).abs().mean() < 2.0  # of 255


def test_training_normalisation_is_torchvisions():
    """The training path's uint8 -> float normalisation on the device is torchvision's ToTensor + Normalize, which
    the probe path uses, on the same image."""
    import torchvision.transforms as T
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    ref = T.Compose([T.ToTensor(), T.Normalize(aug.IMAGENET_MEAN, aug.IMAGENET_STD)])(img)
    assert torch.allclose(normalize(to_tensor(img)[None])[0], ref, atol=1e-5)
    assert torch.allclose(normalize(to_tensor(img)[None].float())[0], ref, atol=1e-5)  # augment's float output


def test_device_augmentation_is_the_pil_path_batched_per_image():
    """--gpu-aug's `augment` gives each image of a batch its own choices, and what the PIL path gives from the
    same choices to within that path's uint8 rounding (mean < 2 of 255; two jitter orders differ by ~10):
    each operation alone at the ends of its range, two orders of the jitter, and everything at once."""
    rng = np.random.default_rng(0)
    jitter = lambda order, *f: dict(jitter=(order, *f))  # noqa: E731
    cases = [dict(flip=True), dict(gray=True), dict(sigma=0.1), dict(sigma=2.0), dict(solarize=True),
             *(jitter([0, 1, 2, 3], *f) for f in ((1.4, 1, 1, 0), (0.6, 1, 1, 0), (1, 0.6, 1, 0), (1, 1.4, 1, 0),
                                                (1, 1, 0.8, 0), (1, 1, 1.2, 0), (1, 1, 1, -0.1), (1, 1, 1, 0.1))),
             jitter([0, 1, 2, 3], 1.4, 0.6, 1.2, 0.1), jitter([3, 2, 1, 0], 1.4, 0.6, 1.2, 0.1),
             dict(flip=True, gray=True, sigma=1.0, solarize=True, jitter=([2, 0, 3, 1], 0.7, 1.3, 0.9, -0.05))]
    choices = [dict(dict(flip=False, jitter=None, gray=False, sigma=None, solarize=False), **c) for c in cases]
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).resize((64, 64), Image.BICUBIC)
              for _ in choices]  # smooth, and each its own
    packed = torch.utils.data.default_collate([pack(c) for c in choices])
    got = augment(torch.stack([to_tensor(i) for i in images]), packed)
    for img, c, g in zip(images, choices, got):
        assert (g - apply_pil(img, c).float()).abs().mean() < 2.0, c


def test_device_augmentation_draws_the_cpu_paths_views(tmp_path):
    """TwoViews(on_device=True) makes the same crops and draws the same choices as the PIL path, so both
    pipelines sample one distribution (README's table) and a --gpu-aug run's data is seeded like any other.
    On these noise images the two paths' rounding differs by up to ~4 of 255; another crop or flip gives ~25+."""
    ds = load_dataset("folder", image_folder(tmp_path, per_class=6, splits=("train",)))
    cpu, gpu = (Seeded(ds, aug.TwoViews(32, on_device=d), seed=0) for d in (False, True))
    for i in range(len(ds)):
        for want, (crop, p) in zip(cpu[i][0], gpu[i][0]):
            one = augment(crop[None], {k: v[None] for k, v in p.items()})[0]
            assert crop.dtype == torch.uint8 and (one - want).abs().mean() < 5.0


def test_two_views_decode_a_jpeg_once_at_the_scale_its_crops_allow(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    torch.manual_seed(0)
    boxes = [(0, 0, 200, 200), (100, 100, 150, 150)]
    img, scaled = decode(load_image(tmp_path / "a.jpg"), boxes, 32)
    assert img.size == (125, 94)  # 1/4 (JPEG draft): the smaller crop keeps 37 px a side, 1/8 would leave 18
    assert scaled[1] == (25.0, 25.0, 62.5, 62.5)
    views = aug.TwoViews(32)(load_image(tmp_path / "a.jpg"))
    assert [(v.dtype, tuple(v.shape)) for v in views] == [(torch.uint8, (3, 32, 32))] * 2


# ---------------- training (train.py)


def test_lars_by_hand():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.02)
    hw, hb = w.detach().numpy().astype(np.float64).copy(), b.detach().numpy().astype(np.float64).copy()
    mw, mb = np.zeros_like(hw), np.zeros_like(hb)
    for step in range(3):
        gw, gb = torch.randn(3, 4), torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        u = gw.numpy() + 0.1 * hw  # weight decay on the matrix only
        u = u * (0.02 * np.linalg.norm(hw) / np.linalg.norm(u))  # trust ratio on the matrix only
        mw, mb = 0.9 * mw + u, 0.9 * mb + gb.numpy()  # the bias: plain momentum SGD
        hw, hb = hw - 0.5 * mw, hb - 0.5 * mb
        assert np.allclose(w.detach().numpy(), hw, atol=1e-6) and np.allclose(b.detach().numpy(), hb, atol=1e-6)


def test_lars_equals_the_formula_per_parameter_in_float64():
    """The foreach LARS against the update written out for each parameter (You et al., 2017, as Barlow
    Twins): matrices of several shapes, a zero matrix (no trust ratio: its norm is 0), vectors, a parameter
    without gradient, two groups; rtol 1e-12 over 4 steps."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4, 2, 3, 3), (7,), (2, 2), (3,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    ps[3].data.zero_()
    ref = [p.detach().clone() for p in ps]
    mu = [torch.zeros_like(p) for p in ps]
    opt = LARS([dict(params=ps[:3]), dict(params=ps[3:], weight_decay=0.3)], lr=0.4, weight_decay=0.1, eta=0.02)
    for _ in range(4):
        for i, p in enumerate(ps):
            p.grad = None if i == 4 else torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        for i, (p, w) in enumerate(zip(ps, ref)):
            if p.grad is None:
                continue
            u = p.grad.clone()
            if p.ndim > 1:
                u += (0.1 if i < 3 else 0.3) * w
                wn, un = w.norm().item(), u.norm().item()
                u *= 0.02 * wn / un if wn > 0 and un > 0 else 1.0
            mu[i] = 0.9 * mu[i] + u
            w -= 0.4 * mu[i]
        for p, w in zip(ps, ref):
            assert torch.allclose(p, w, rtol=1e-12, atol=1e-14)
    assert torch.equal(ps[4], ref[4]) and ps[4] not in opt.state


def test_lars_skips_parameters_without_gradient():
    p = torch.nn.Parameter(torch.ones(2, 2))
    LARS([p], lr=1.0).step()
    assert torch.equal(p, torch.ones(2, 2))


def test_learning_rate_schedule():
    assert train.learning_rate(0, 100, 10, 0.4) == 0
    assert math.isclose(train.learning_rate(5, 100, 10, 0.4), 0.2)
    assert math.isclose(train.learning_rate(10, 100, 10, 0.4), 0.4)
    assert math.isclose(train.learning_rate(100, 100, 10, 0.4), 0.4 * 0.001)


def test_defaults_are_the_papers_imagenet_run():
    a = vars(train.get_args([]))
    paper = dict(dataset="folder", limit=0, image_size=224, arch="resnet50", blocks="1,2,3,4", mode="simultaneous",
                 frozen="", init="", loss="barlowtwins", lambd="0.0051", target="1.0", scale_loss=0.024,
                 pooling="cbe", head_dim=2048, kernel_size=1, groups=1, noise=0.25, projector="8192-8192-8192",
                 epochs=300, batch_size=2048, lr=0.2, warmup_epochs=10, weight_decay=1e-6, grad_scale=1.0,
                 bf16=False, seed=0)
    assert {k: a[k] for k in paper} == paper
    lars = train.LARS([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1)
    assert lars.defaults["momentum"] == 0.9 and lars.defaults["eta"] == 0.001
    assert math.isclose(train.learning_rate(10**6, 10**6, 10, 1.0), 0.001)  # cosine ends at 0.001 x base
    probe_defaults = vars(probe.get_args(["x"]))
    assert {k: probe_defaults[k] for k in ("epochs", "batch_size", "lr", "weight_decay")} == \
        dict(epochs=100, batch_size=256, lr=0.1, weight_decay=1e-6)


def test_lean_step_gives_the_gradients_of_the_summed_losses():
    model = small_model(noise=0.0).train()
    twin = small_model(noise=0.0).train()
    y1, y2, labels = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    train.train_step(model, y1, y2, labels, train.head_losses(model, BT4), train.grad_owners(model, [0, 1, 2, 3]))
    f1, f2 = twin(y1), twin(y2)
    sum(losses.barlow_twins(proj(a), proj(b)) for proj, a, b in zip(twin.projectors, f1, f2)).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_sequential_keeps_the_frozen_block_and_its_bn_statistics_fixed():
    model = small_model(blocks="1,2")
    train.set_trainable(model, [1])
    block1 = ("conv1", "bn1", "layer1", "heads.0", "projectors.0")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(block1)}
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("layer2")}
    opt = LARS(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        train.train_step(model, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), None,
                         train.head_losses(model, BT4), train.grad_owners(model, [1]))
        opt.step()
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
    assert not torch.equal(now["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])
    assert not torch.equal(now["layer2.0.bn1.running_mean"], before["layer2.0.bn1.running_mean"])


@pytest.mark.parametrize("extra", [["--loss", "vicreg", "--pooling", "lsp", "--head-dim", "512"],
                                   ["--loss", "simclr", "--pooling", "gsp"],
                                   ["--loss", "supervised", "--blocks", "loco"],
                                   ["--mode", "sequential", "--blocks", "12,3", "--recompute", "all"],
                                   ["--lambd", "0.1,0.01", "--target", "0.6,1", "--blocks", "1,2",
                                    "--pooling", "cbe-l2", "--recompute", "heads"],
                                   ["--arch", "vit_tiny", "--patch-size", "8", "--blocks", "12,34", "--mask",
                                    "0.25,0.5", "--mask-views", "both", "--optimizer", "adamw", "--pooling", "cls"],
                                   ["--route", "below", "--epochs", "2"],
                                   ["--mode", "sequential", "--blocks", "12,3", "--augmentations", "jitter,full"]])
def test_every_variant_trains(tmp_path, extra):
    data = image_folder(tmp_path / "data")
    run_train(data, tmp_path / "out", "--epochs", "1", "--batch-size", "8", *extra)
    log = step_log(tmp_path / "out")
    assert all(math.isfinite(v) for entry in log for v in entry["loss"])
    if "sequential" in extra:  # block 2 starts its own schedule once block 1 is done (§3.1)
        assert [e["blocks"] for e in log] == [[1], [1], [2], [2]]
        lrs = [e["lr"] for e in log]
        assert lrs[:2] == lrs[2:] and lrs[0] > lrs[1] > 0


def test_second_epoch_draws_new_views_and_noise(tmp_path):
    """With lr 0 the weights stay put, so the loss of the first step of epoch 2 depends only on that epoch's
    augmentations (seeded by seed, epoch, image) and noise (seeded by seed, rank, epoch, step): rebuilt
    here from those seeds, it must match the logged one, and differ from epoch 1's."""
    data = image_folder(tmp_path / "data", per_class=4)
    argv = ["--data", data, *SMALL, "--epochs", "2", "--batch-size", "8", "--lr", "0"]
    train.main(train.get_args([*argv, "--out", str(tmp_path / "out")]))
    logged = [e["loss"] for e in step_log(tmp_path / "out")]
    args = train.get_args(argv)
    ds = Seeded(load_dataset("folder", data), aug.TwoViews(32), seed=0)
    ds.epoch = 1
    sampler = torch.utils.data.DistributedSampler(ds, 1, 0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(1)
    (y1, y2), labels = torch.utils.data.default_collate([ds[i] for i in sampler])
    y1, y2 = normalize(y1), normalize(y2)
    torch.manual_seed(0)
    model = BlockResNet(**bookkeeping.model_config(args, 2)).train()
    model.seed = train.step_seed(0, 0, 1, 0)
    loss = train.train_step(model, y1, y2, labels, train.head_losses(model, train.loss_functions(args, 4)),
                            train.grad_owners(model, [0, 1, 2, 3]))[0]
    assert np.allclose(loss.tolist(), logged[1], rtol=1e-5) and not np.allclose(logged[0], logged[1], rtol=1e-3)
    assert len({train.step_seed(0, r, e, i) for r in (0, 1) for e in (0, 1) for i in (0, 1)}) == 8


def test_grad_scale_scales_the_1d_updates_only(tmp_path):
    """--grad-scale 0.5: BN parameters (no trust ratio) move half as far; 2-D weights (LARS trust ratio) as far."""
    data = image_folder(tmp_path / "data", per_class=4)
    torch.manual_seed(0)
    start = BlockResNet(**bookkeeping.model_config(train.get_args(SMALL), 2)).state_dict()
    moved = {}
    for scale in ("1", "0.5"):
        run_train(data, tmp_path / scale, "--epochs", "1", "--batch-size", "8", "--grad-scale", scale)
        w = weights(tmp_path / scale)["model"]
        moved[scale] = [(w[k] - start[k]).norm().item() for k in ("bn1.bias", "conv1.weight")]
    assert min(moved["1"]) > 0 and math.isclose(moved["0.5"][0], moved["1"][0] / 2, rel_tol=1e-3)
    assert math.isclose(moved["0.5"][1], moved["1"][1], rel_tol=1e-3)


def test_compiled_heads_train_like_eager_ones(tmp_path):
    """--compile (the default) changes the speed, not the training: the same losses, the same checkpoint keys."""
    data = image_folder(tmp_path / "data")
    for flag in ("--compile", "--no-compile"):
        run_train(data, tmp_path / flag, "--epochs", "1", "--batch-size", "8", flag)
    logs = [[e["loss"] for e in step_log(tmp_path / flag)] for flag in ("--compile", "--no-compile")]
    assert np.allclose(*logs, rtol=1e-3)
    assert weights(tmp_path / "--compile")["model"].keys() == weights(tmp_path / "--no-compile")["model"].keys()


def test_frozen_first_block_from_another_run(tmp_path):
    data = image_folder(tmp_path / "data")
    run_train(data, tmp_path / "a", "--epochs", "1", "--batch-size", "8")
    run_train(data, tmp_path / "b", "--epochs", "1", "--batch-size", "8", "--frozen", "1", "--init",
              str(tmp_path / "a" / "trunk.pth"), "--seed", "1")
    a, b = torch.load(tmp_path / "a" / "trunk.pth", weights_only=True), weights(tmp_path / "b")["model"]
    first = [k for k in a if k.startswith(("conv1", "bn1", "layer1"))]
    assert first and all(torch.equal(a[k], b[k]) for k in first)
    assert not torch.equal(a["layer2.0.conv1.weight"], b["layer2.0.conv1.weight"])


def test_cifar10_runs_from_a_local_copy_with_the_app_d_recipe(tmp_path, capsys):
    """App. D: --dataset cifar10 from a local copy in its python format (checksums of one's own export differ from
    the published archive's: used, and said), with the App. D recipe's flags, for a few steps."""
    root = write_cifar10(tmp_path / "cifar")
    assert len(load_dataset("cifar10", root)) == 100 and len(load_dataset("cifar10", root, train=False)) == 20
    assert "checksums differ" in capsys.readouterr().out
    run_train(root, tmp_path / "out", "--dataset", "cifar10", "--batch-size", "16", "--lr", "0.01", "--epochs", "1",
              "--mode", "sequential", "--noise", "0", "--limit", "32", "--monitor-images", "20")
    assert [e["blocks"] for e in step_log(tmp_path / "out")] == [[1], [1], [2], [2], [3], [3], [4], [4]]
    assert len(step_log(tmp_path / "out", "monitor")) == 4


def readme_excerpt():
    """The teaching excerpt of README.md, its sizes shrunk to a small network."""
    text = open(os.path.join(HERE, "README.md")).read()
    code = text.split("<!-- teaching excerpt: begin -->")[1].split("<!-- teaching excerpt: end -->")[0]
    code = code.strip().removeprefix("```python").removesuffix("```")
    line = 'arch, dim, width, sigma = "resnet50", 2048, 8192, 0.25'
    assert line in code and len(code.strip().splitlines()) <= 45
    return code.replace(line, 'arch, dim, width, sigma = "resnet18", 32, 16, 0.25')


def test_readme_excerpt_is_the_method():
    """The README's one-slide method gives, in float64, the losses and gradients of the full implementation."""
    ns = {}
    exec(compile(readme_excerpt(), "README.md", "exec"), ns)
    model = BlockResNet("resnet18", head_dim=32, projector_widths=(16, 16, 16), noise=0.25).double().train()
    with torch.no_grad():
        for m in model.modules():  # zero_init_residual would leave the residual branches without gradients
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    twin = [*ns["blocks"], *ns["heads"], *ns["projectors"]]
    for m in twin:
        m.double().train()
    ns["r"].load_state_dict(model.trunk_state_dict(), strict=False)
    for k in range(4):
        ns["heads"][k][0].load_state_dict(model.heads[k].expand[0].state_dict())
        ns["heads"][k][1].load_state_dict(model.heads[k].expand[1].state_dict())
        ns["projectors"][k].load_state_dict(model.projectors[k].state_dict())
    torch.manual_seed(0)
    x1, x2 = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randn(6, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    owners = train.grad_owners(model, [0, 1, 2, 3])
    ref = train.train_step(model, x1, x2, None, train.head_losses(model, BT4), owners)[0]
    torch.manual_seed(1)
    got = ns["train_step"](x1, x2)
    assert np.allclose(got, ref.tolist(), rtol=1e-10)
    mine = {id(p): p for m in twin for p in m.parameters()}
    assert len(mine) == len(list(model.parameters()))
    theirs = [*(p for n, p in ns["r"].named_parameters() if not n.startswith("fc.")),
              *(p for m in [*ns["heads"], *ns["projectors"]] for p in m.parameters())]
    for p, q in zip(model.parameters(), theirs):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12)


# ---------------- App. A's difficulty-based routing (routing.py)

def test_router_ranks_examples_by_difficulty_into_blocks():
    """8 examples of difficulty 7, 6, ..., 0 and 4 blocks: the two easiest go to block 1, the two hardest to block 4.
    'below': weight 1 at the routed block and under it, 0 above; 'weight': 1 at the routed block, w elsewhere.
    An example never measured trains every block with weight 1. Every block gets a tensor, ones included, so that
    every process issues the same collectives."""
    below = routing.Router(10, 4, "below", 0.5, torch.device("cpu"))
    below.record(torch.arange(8), torch.arange(8, 0, -1).float())
    w = below.weights(torch.arange(8))
    route = [3, 3, 2, 2, 1, 1, 0, 0]
    assert all(w[k].tolist() == [float(r >= k) for r in route] for k in range(4))
    weight = routing.Router(10, 4, "weight", 0.25, torch.device("cpu"))
    weight.table.copy_(below.table)
    w = weight.weights(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    assert all(w[k].tolist() == [1.0 if r == k else 0.25 for r in route] for k in range(4))
    assert all(w.tolist() == [1.0, 1.0] for w in below.weights(torch.tensor([8, 9])))  # never measured
    assert all(w.tolist() == [1.0] * 8 for w in routing.Router(10, 4, "weight", 1.0, torch.device("cpu"))
               .weights(torch.arange(8)))


def test_routing_issues_the_same_collectives_when_only_one_process_has_unseen_images(tmp_path):
    """App. A over 2 processes: a 1-process routed epoch, then rank 1's images of the next epoch made unseen (no
    difficulty: weight 1 at every block) while rank 0's stay routed, so block 4 sees 1 image on rank 0 and 4 on
    rank 1. The processes must still issue the same collectives (losses, BatchNorm, gradients): the run ends,
    both holding the same weights."""
    data = image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    run_train(data, out, "--epochs", "1", "--batch-size", "8", "--route", "below")
    ckpt = weights(out)
    sampler = torch.utils.data.DistributedSampler(load_dataset("folder", data), 2, 0, shuffle=True, seed=0,
                                                  drop_last=True)
    sampler.set_epoch(1)
    table = torch.full_like(ckpt["router"], float("nan"))
    table[list(sampler)] = ckpt["router"][list(sampler)]  # rank 0's images of epoch 2 keep their difficulty
    torch.save(dict(ckpt, router=table), out / "checkpoint.pth")
    r = torchrun("train.py", "--data", data, "--out", str(out), *SMALL, "--epochs", "2", "--batch-size", "8",
                 "--route", "below", timeout=300)
    assert r.returncode == 0 and "all 2 ranks hold identical weights" in r.stdout, r.stderr[-3000:]
    assert not weights(out)["router"].isnan().any()


def test_an_example_routed_below_never_reaches_the_head_above():
    """'below' (routing.Routed around the per-block losses): the two easiest of 6 examples are routed to block 1, so
    at block 2 they have weight 0 and do not reach its head: their gradient is exactly 0, and the loss is the loss of
    the other examples."""
    model = small_model(noise=0.0).train()
    weighted = [lambda z1, z2, y, w=None: losses.barlow_twins(z1, z2, weight=w)] * 4
    router = routing.Router(6, 4, "below", 0.5, torch.device("cpu"))
    router.record(torch.arange(6), torch.arange(6).float())  # image 0 the easiest
    routed = routing.Routed(train.head_losses(model, weighted), router, model.pool_trunk)
    routed.batch([(0, i, 0) for i in range(6)])
    h1, h2 = (torch.randn(6, 128, 4, 4, requires_grad=True) for _ in range(2))
    loss = routed(1, h1, h2, None)
    loss.backward()
    assert h1.grad[:2].abs().max() == 0 and h1.grad[2:].abs().sum() > 0
    plain = train.head_losses(model, BT4)(1, h1[2:], h2[2:], None)
    assert torch.allclose(loss, plain)


def test_routing_with_weight_one_is_the_plain_run_exactly(tmp_path):
    data = image_folder(tmp_path / "data", per_class=4)
    run_train(data, tmp_path / "plain", "--epochs", "2", "--batch-size", "8")
    run_train(data, tmp_path / "routed", "--epochs", "2", "--batch-size", "8", "--route", "weight", "--route-weight",
              "1")
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "routed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not b["router"].isnan().any()  # every image's difficulty was measured


# ---------------- exactness under torch.distributed (distributed.py), in real gloo processes


LOSS_FNS = {"barlowtwins": lambda z1, z2, y: losses.barlow_twins(z1, z2, 0.2, 1.0),
            "vicreg": lambda z1, z2, y: losses.vicreg(z1, z2),
            "simclr": lambda z1, z2, y: losses.simclr(z1, z2, 0.5),
            "supervised": lambda z1, z2, y: losses.supervised(z1, y)}


def toy_problem():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return x1, x2, w, torch.randint(0, 5, (8,), generator=g)


def synced_cbe_problem():
    torch.manual_seed(0)
    x, g = torch.randn(8, 6, 4, 5, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
    return Pool(6, "cbe", 10).double().train(), x, g


def synced_bn_cases():
    """Modules whose BatchNorm distributed.SyncBatchNorm replaces, an input, an output gradient, and how
    many of the 8 images the first of 2 processes holds (the second: the rest, perhaps none)."""
    torch.manual_seed(0)
    shift = torch.arange(6.0, dtype=torch.float64)[:, None, None] * 3  # means away from 0
    x2d, x1d = torch.randn(8, 6, 3, 4, dtype=torch.float64) + shift, torch.randn(8, 5, dtype=torch.float64)
    bn2d, bn1d = torch.nn.BatchNorm2d(6).double(), torch.nn.BatchNorm1d(5, momentum=None).double()
    for bn in bn2d, bn1d:
        torch.nn.init.uniform_(bn.weight, 0.5, 2)
        torch.nn.init.uniform_(bn.bias, -1, 1)
    head = Pool(6, "cbe", 10).double().train()
    return {"bn2d": (bn2d, x2d, torch.randn_like(x2d), 5), "bn1d-empty-rank": (bn1d, x1d, torch.randn_like(x1d), 8),
            "cbe-head": (head, x2d, torch.randn(8, 10, dtype=torch.float64), 4),
            "compiled": (copy.deepcopy(bn2d), x2d, torch.randn_like(x2d), 3)}


SYNCED_BN = synced_bn_cases()


def dist_worker(out_dir):
    """Each of N ranks holds 8/N samples of the toy problem; it records its loss and its gradient
    after averaging over ranks, as DDP does."""
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x1, x2, w0, y = toy_problem()
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    result = {}
    for name, fn in LOSS_FNS.items():
        w = w0.clone().requires_grad_()
        loss = fn(x1[part] @ w, x2[part] @ w, y[part])
        loss.backward()
        torch.distributed.all_reduce(w.grad)
        result[name] = dict(loss=loss.item(), grad=(w.grad / world).flatten().tolist())
    head = distributed.sync_batchnorm(synced_cbe_problem()[0])
    head.forward = functools.partial(recompute.lean_cbe, head)
    x, g = synced_cbe_problem()[1:]
    got = run_head(head, x[part], g[part])
    for t in got[2:5]:  # parameter gradients summed over ranks: the gradient of the full batch's sum
        torch.distributed.all_reduce(t)
    result["lean_cbe"] = [t.flatten().tolist() for t in got]
    for case, (module, x, g, split) in SYNCED_BN.items():  # distributed.SyncBatchNorm, two steps
        module = distributed.sync_batchnorm(module)
        step = torch.compile(module) if case == "compiled" else module
        part = slice(*((0, split), (split, len(x)))[rank])
        for _ in range(2):
            got = run_head(step, x[part], g[part])
        for p in module.parameters():
            torch.distributed.all_reduce(p.grad)
        result[case] = [t.flatten().tolist() for t in got]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_losses_and_synced_cbe_exact_in_two_processes(tmp_path):
    r = torchrun("test_blockwise.py", "dist-worker", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    x1, x2, w0, y = toy_problem()
    for rank in range(2):
        got = json.load(open(tmp_path / f"rank{rank}.json"))
        for name, fn in LOSS_FNS.items():
            w = w0.clone().requires_grad_()
            loss = fn(x1 @ w, x2 @ w, y)
            loss.backward()
            assert math.isclose(got[name]["loss"], loss.item(), rel_tol=1e-10), name
            assert np.allclose(got[name]["grad"], w.grad.flatten().numpy(), rtol=1e-9, atol=1e-12), name
        # LeanCbE under SyncBatchNorm on 2 x 4 images = the plain CbE head on 8 (rank's share of out / x.grad)
        head, x, g = synced_cbe_problem()
        ref = run_head(head, x, g)
        part = slice(rank * 4, rank * 4 + 4)
        ref[:2] = [t[part] for t in ref[:2]]
        for a, b in zip(got["lean_cbe"], ref):
            assert np.allclose(a, b.detach().flatten().numpy(), rtol=1e-9, atol=1e-12)
        # distributed.SyncBatchNorm over 2 processes = nn.BatchNorm on the 8 images: outputs and input
        # gradients (this rank's rows), parameter gradients, running statistics, after two steps
        for case, (module, x, g, split) in synced_bn_cases().items():
            part = slice(*((0, split), (split, len(x)))[rank])
            for _ in range(2):
                ref = run_head(module, x, g)
            ref[:2] = [t[part] for t in ref[:2]]
            assert len(got[case]) == len(ref), case
            for a, b in zip(got[case], ref):
                assert np.allclose(a, b.detach().flatten().numpy(), rtol=1e-9, atol=1e-12), case


@pytest.mark.parametrize("split", [[], ["--blocks", "loco"], ["--arch", "vit_tiny", "--patch-size", "8"]],
                         ids=["paper", "loco", "vit"])
def test_two_processes_are_the_one_process_run(tmp_path, split):
    """2 gloo processes x 4 images = one process holding the 8, in float64, step by step: every block's
    loss, the weights, LARS's momentum and BatchNorm's running statistics (distributed.SyncBatchNorm
    normalises over the global batch), for the paper's split, LoCo's overlapping units and a ViT (merged
    and frozen blocks: the pipeline tests). Without §5's noise: it is drawn per replica. The paper's
    split also compares the monitors, from features gathered over both processes, with one process's."""
    data = image_folder(tmp_path / "data", per_class=4)
    extra = ["--noise", "0", *split, *(["--monitor-every", "1"] if not split else [])]
    float64_run(data, tmp_path / "one", *extra)
    float64_run(data, tmp_path / "two", *extra, nproc=2)
    assert_same_float64_run(tmp_path / "one", tmp_path / "two")
    if not split:
        assert step_log(tmp_path / "one", "monitor") == step_log(tmp_path / "two", "monitor") != []


def test_compile_threads_are_the_node_cores_shared_among_its_processes(monkeypatch):
    """Inductor reads TORCHINDUCTOR_COMPILE_THREADS when torch imports it: configure() sets its config
    instead, cores / processes per node, and leaves a user's own setting alone."""
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor, "compile_threads", inductor.compile_threads)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(os.cpu_count() * 2))
    distributed.configure(torch.device("cpu"))
    assert inductor.compile_threads == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    distributed.configure(torch.device("cpu"))
    assert inductor.compile_threads == os.cpu_count()
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    inductor.compile_threads = 3  # as inductor read it at import
    distributed.configure(torch.device("cpu"))
    assert inductor.compile_threads == 3


def test_collectives_take_their_tensor_to_the_group_device_and_back(monkeypatch):
    """The NCCL group serves its device only, the CONTROL group the host: a tensor made elsewhere is copied to the
    group's device, reduced there, and copied back in place. Here the group's device is cpu:0, which .to() copies
    to; the collective is a recording one (the function under test takes it as an argument)."""
    seen = []

    def collective(t, group=None, **kw):
        seen.append(t)
        t.add_(1)
    monkeypatch.setattr(distributed, "DEVICE", torch.device("cpu", 0))
    monkeypatch.setattr(distributed, "CONTROL", object())
    t = torch.zeros(3)
    distributed._on_group_device(collective, t, group=distributed.CONTROL)
    assert seen[-1] is t and t.tolist() == [1, 1, 1]  # the host's group: reduced where it is
    t = torch.zeros(3)
    distributed._on_group_device(collective, t)
    assert seen[-1] is not t and t.tolist() == [1, 1, 1]  # copied there, reduced, copied back


def test_checkpoints_are_moved_to_the_host():
    """bookkeeping.to_cpu calls .cpu() on every tensor of a nested checkpoint (on a GPU: a CUDA tensor's copy)."""
    calls = []

    class Watched(torch.Tensor):
        def cpu(self, *args, **kwargs):
            calls.append(1)
            return super().cpu(*args, **kwargs)
    out = bookkeeping.to_cpu({"a": [torch.ones(2).as_subclass(Watched), 3], "b": {"c": torch.zeros(1)}})
    assert calls == [1] and out["a"][1] == 3 and torch.equal(out["b"]["c"], torch.zeros(1))


def test_one_process_under_torchrun_takes_the_distributed_path(tmp_path):
    """BLOCKWISE_DISTRIBUTED=1: one process joins a process group and runs every collective 8 ranks would run
    (.ci/gpu does this with NCCL on one GPU); the run is the one-process run exactly."""
    data = image_folder(tmp_path / "data", per_class=4)
    argv = ["--data", data, *SMALL, "--epochs", "1", "--batch-size", "8"]
    r = torchrun("train.py", *argv, "--out", str(tmp_path / "forced"), nproc=1,
                 env={**os.environ, "BLOCKWISE_DISTRIBUTED": "1"})
    assert r.returncode == 0 and "all 1 ranks hold identical weights" in r.stdout, r.stderr[-3000:]
    run_train(data, tmp_path / "plain", "--epochs", "1", "--batch-size", "8")
    a, b = weights(tmp_path / "forced"), weights(tmp_path / "plain")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["env"]["processes"] == 1 and b["world"] == 1


def test_collectives_are_issued_in_one_place():
    """NCCL takes CUDA tensors only: every collective outside the losses' autograd-aware ones goes through
    distributed.py, which puts its tensor on the group's device (the review found three CPU tensors all-reduced
    on the NCCL group: the stop flag, the replica check, the probe's counts)."""
    import ast
    names = {"all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all", "barrier", "reduce", "gather",
             "scatter", "all_gather_into_tensor", "broadcast_object_list", "all_gather_object"}
    for path in sorted(f for f in os.listdir(HERE) if f.endswith(".py") and f not in ("distributed.py", "losses.py",
                                                                                     "test_blockwise.py")):
        for node in ast.walk(ast.parse(open(os.path.join(HERE, path)).read())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
                assert not (isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"), \
                    f"{path}:{node.lineno}: dist.{node.func.attr} outside distributed.py"


# ---------------- blocks on separate devices (pipeline.py): the same run, laid out over processes

def test_best_split_minimises_the_costliest_stage():
    assert pipeline.best_split([5, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert pipeline.best_split([1, 1, 1, 5], 2) == [[0, 1, 2], [3]]
    assert pipeline.best_split([2, 2, 2, 2], 2) == [[0, 1], [2, 3]]
    assert pipeline.best_split([3, 1, 2, 2], 3) == [[0], [1, 2], [3]]


@pytest.mark.parametrize("stages,nproc,extra", [("auto", 2, []), ("1,2,3,4", 4, []), ("12,34", 2, VIT_MASKED),
                                                ("1,23", 2, ["--blocks", "12,3,4", "--frozen", "1"])],
                         ids=["2-stages-auto", "4-stages", "vit-masked", "merged-frozen"])
def test_a_pipeline_is_the_one_process_run(one_process_runs, tmp_path, stages, nproc, extra):
    """Stage s runs batch t - s at tick t and sends its last block's noised outputs forward: every block sees batch
    b with its weights after b updates, so the run is the one-process simultaneous run (float64, rtol 1e-10).
    --stages auto picks a 2-stage split from rank 0's measurement of the blocks (any split is the same run)."""
    data, one = one_process_runs(*extra)
    r = float64_run(data, tmp_path / "pipe", "--stages", stages, *extra, nproc=nproc)
    assert stages != "auto" or re.search(r"--stages auto: \d+,\d+ \(forward", r.stdout), r.stdout
    assert_same_float64_run(one, tmp_path / "pipe")
    trunk = torch.load(tmp_path / "pipe" / "trunk.pth", weights_only=True)
    assert all(torch.equal(v, weights(one)["model"].get(k, v)) for k, v in trunk.items())


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The one-process float64 run with some flags (each made once), on 16 images: 2 steps an epoch."""
    root, made = tmp_path_factory.mktemp("one"), {}

    def run(*extra):
        if extra not in made:
            out = root / f"run{len(made)}"
            made[extra] = image_folder(root / "data", per_class=8), out
            float64_run(made[extra][0], out, *extra)
        return made[extra]
    return run


def test_two_stages_of_two_replicas_are_two_data_parallel_processes(tmp_path):
    """4 processes as 2 stages x 2 replicas = 2 data-parallel processes: the noise is seeded per block and replica
    (not per process rank), and each stage reduces its losses and gradients among its own replicas."""
    data = image_folder(tmp_path / "data", per_class=8)  # 2 steps an epoch
    float64_run(data, tmp_path / "dp", nproc=2)
    float64_run(data, tmp_path / "pipe", "--stages", "1,234", nproc=4)
    assert_same_float64_run(tmp_path / "dp", tmp_path / "pipe")


def test_a_stage_holds_only_its_own_blocks():
    """Layout.place keeps this stage's blocks, heads and projectors; the others' weights go to the meta device."""
    model = small_model()
    layout = pipeline.Layout.__new__(pipeline.Layout)
    layout.stages, layout.stage, layout.depth = [[0], [1, 2, 3]], 1, 2
    layout.place(model)
    mine = {id(p) for k in (1, 2, 3) for m in model.block_modules(k) for p in m.parameters()}
    assert all(p.is_meta != (id(p) in mine) for p in model.parameters())
    assert (model.first, model.last) == (1, 3)


@pytest.mark.parametrize("flags,fragment", [(["--stages", "2,134"], "--stages 2,134: groups"),
                                            (["--stages", "12,3"], "--stages 12,3: groups"),
                                            (["--blocks", "loco", "--stages", "1,23"], "LoCo"),
                                            (["--stages", "1,234", "--mode", "sequential"], "--mode sequential"),
                                            (["--stages", "1,234", "--route", "below"], "--route"),
                                            (["--stages", "1,234", "--monitor-every", "1"], "--monitor-every 0"),
                                            (["--stages", "1,2,3,4", "--monitor-every", "0"], "4 processes")])
def test_a_pipeline_refuses_what_it_cannot_run_in_one_line(tmp_path, capsys, flags, fragment):
    data = image_folder(tmp_path / "data", per_class=2)
    argv = ["--data", data, "--out", str(tmp_path / "o"), *SMALL, "--batch-size", "4", *flags]
    if "--monitor-every" not in flags:
        argv += ["--monitor-every", "0"]
    expect_one_line_error(capsys, argv, fragment)


# ---------------- evaluation (evaluation.py, probe.py)




def test_probe_writes_one_entry_per_block_and_leaves_the_network_alone(trained, tmp_path):
    data, ckpt = trained
    corrupted = tmp_path / "imagenet-c"
    for corruption in ("fog", "gaussian_noise"):
        for severity in ("1", "2"):  # severity 2 adds a class the probes cannot predict: a higher error
            image_folder(corrupted / corruption / severity, per_class=2, classes=int(severity) + 1, splits=(".",))
    for extra in (["--fast", "--corruptions", str(corrupted)], [],
                  ["--features", "trunk", "--blocks-to-probe", "2,4", "--diagnostics"]):
        res = probe.main(probe_args(ckpt, data, "--out", str(tmp_path), *extra))
        saved = json.load(open(tmp_path / "probe.json"))
        assert [b["block"] for b in saved["blocks"]] == ([2, 4] if "trunk" in extra else [1, 2, 3, 4])
        assert all(0 <= b["top1"] <= 100 and b["top5"] >= b["top1"] for b in saved["blocks"])
        assert res["blocks"] == saved["blocks"]
        if "--fast" in extra:  # App. C: per corruption, the mean and std of the error over its severities
            errors = [saved["corruptions"]["fog"][s][-1] for s in ("1", "2")]
            assert saved["corruption_summary"]["fog"] == dict(mean=np.mean(errors), std=np.std(errors))
            assert math.isclose(saved["corruption_mean_error"], np.mean(
                [v["mean"] for v in saved["corruption_summary"].values()]))
    assert [d["stage"] for d in saved["diagnostics"]] == [1, 2, 3, 4]
    assert -1.01 < saved["diagnostics"][0]["on_mean"] < 1.01
    model = probe.load_frozen(ckpt, probe_args(ckpt, data), torch.device("cpu"))[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = Seeded(load_dataset("folder", data), probe_transforms(32)[0])
    batches = lambda epoch: ((evaluation.block_features(model, x, "head", [0, 3]), y)  # noqa: E731
                             for x, y in torch.utils.data.DataLoader(ds, 8))
    probe.sgd_epochs(probe.Probes([128, 128], 2), batches, probe_args(ckpt, data), 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN statistics


def test_corrupted_images_are_fed_as_they_are():
    """App. C: ImageNet-C's images are 224 px already; no resize, no crop, only normalisation."""
    img = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    x = plain_transform()(img)
    assert x.shape == (3, 30, 40)
    assert torch.allclose(x[0, 0, :3] * 0.229 + 0.485, torch.tensor([0.0, 3.0, 6.0]) / 255, atol=1e-6)


def probe_in_one_and_two_processes(trained, tmp_path, *flags):
    """probe.py's results in one process and under torchrun in two, on 6 training and 9 validation images."""
    data = image_folder(tmp_path / "data", per_class=2, classes=3, splits=("train",))
    image_folder(tmp_path / "data", per_class=3, classes=3, splits=("val",))
    argv = probe_argv(trained[1], data, *flags, "--batch-size", "6")
    one = probe.main(probe.get_args([*argv, "--out", str(tmp_path / "one")]))
    r = torchrun("probe.py", *argv, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    return one, json.load(open(tmp_path / "two" / "probe.json"))


def test_probe_is_the_same_in_one_and_two_processes(trained, tmp_path):
    """--fast: features, standardisation and the kNN bank cover the whole dataset on every rank (here 9 validation
    images: 5 and 4 per rank); diagnostics: C over the global batch. The number of processes changes nothing."""
    one, two = probe_in_one_and_two_processes(trained, tmp_path, "--fast", "--diagnostics")
    for a, b in zip(one["blocks"], two["blocks"]):
        assert np.allclose([a[k] for k in ("top1", "top5", "knn")], [b[k] for k in ("top1", "top5", "knn")])
    for a, b in zip(one["diagnostics"], two["diagnostics"]):
        assert np.allclose(a["on_q10_50_90"] + a["off_q10_50_90"], b["on_q10_50_90"] + b["off_q10_50_90"], atol=1e-5)


def test_probe_counts_are_exact_for_any_number_of_processes(trained, tmp_path):
    """The released protocol with 9 validation images (5 and 4 per process): no image counted twice, so the
    accuracies of 1 and 2 processes are the same (DistributedSampler's padding scored 10)."""
    one, two = probe_in_one_and_two_processes(trained, tmp_path, "--epochs", "1")
    for a, b in zip(one["blocks"], two["blocks"]):
        assert np.allclose([a["top1"], a["top5"]], [b["top1"], b["top5"]], atol=1e-4)
        assert round(a["top1"] * 9 / 100, 6) == round(a["top1"] * 9 / 100)  # a whole number of the 9 images


def test_rankme_counts_the_directions_used():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2000, 8, generator=g)
    assert 7.5 < evaluation.rankme(spread) <= 8
    collapsed = torch.randn(2000, 1, generator=g) @ torch.randn(1, 8, generator=g) + 1e-4 * spread
    assert evaluation.rankme(collapsed) < 1.1
    for f in spread, collapsed, spread[:5], torch.randn(300, 64, generator=g) @ torch.randn(64, 512, generator=g):
        p = torch.linalg.svdvals(f.double())  # the oracle: an SVD of the features themselves
        p = p / p.sum() + 1e-7
        assert math.isclose(evaluation.rankme(f), math.exp(-(p * p.log()).sum()), rel_tol=1e-6)


def test_probe_learns_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    f = torch.randn(600, 16, generator=g) + 4 * F.one_hot(y, 16).float()
    probes = probe.Probes([16], 3)
    args = probe.get_args(["x", "--epochs", "20", "--lr", "0.1"])
    probe.sgd_epochs(probes, lambda epoch: (([f[i:i + 50]], y[i:i + 50]) for i in range(0, 600, 50)), args, 12)
    assert probe.accuracy(probes, [([f], y)])[0]["top1"] > 95
    assert evaluation.knn(f[:500], y[:500], f[500:], y[500:], 10, 3) > 95


def test_corruption_tree_walker(tmp_path):
    for corruption in ("fog", "gaussian_noise"):
        for severity in ("1", "5"):
            image_folder(tmp_path / corruption / severity, per_class=2, splits=(".",))
    found = [(c, s, len(ds)) for c, s, ds in probe.corruption_sets(str(tmp_path))]
    assert found == [("fog", "1", 4), ("fog", "5", 4), ("gaussian_noise", "1", 4), ("gaussian_noise", "5", 4)]


def test_monitors_compare_held_out_images_with_a_training_bank_without_augmentation(tmp_path):
    """The bank comes from train/, the held-out images from val/ (disjoint files), both through the probe's
    deterministic evaluation transform; k = 20; RankMe is the exp-entropy of the normalised singular values."""
    data = image_folder(tmp_path / "data", per_class=6)
    bank, held = evaluation.monitor_sets(data, "folder", 8, 32, 0)
    files = [{os.path.basename(os.path.dirname(os.path.dirname(p))) for p, _ in s.dataset.dataset.samples}
             for s in (bank, held)]
    assert files == [{"train"}, {"val"}] and len(bank) == len(held) == 8
    assert torch.equal(bank[0][0], bank[0][0])  # no random augmentation
    assert inspect.signature(evaluation.monitors).parameters["k"].default == 20
    f = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = torch.tensor([0.75, 0.25]) + 1e-7
    assert math.isclose(evaluation.rankme(f), math.exp(-(p * p.log()).sum().item()), rel_tol=1e-6)


def test_monitors_use_20_neighbours_and_knn_weighs_votes_by_temperature(monkeypatch):
    """The monitors' kNN takes the documented k = 20 (their bank here has 30 images, so k matters); and the vote
    weight exp(cos / T): one neighbour of class 0 at cosine 0.9 against two of class 1 at 0.5 wins at T = 0.1, not at
    T = 1 (DINO's 0.07 against our 1)."""
    ks, g = [], torch.Generator().manual_seed(0)
    monkeypatch.setattr(evaluation, "features", lambda *a: ([torch.randn(30, 4, generator=g)], torch.arange(30) % 2))
    monkeypatch.setattr(evaluation, "knn", lambda *a, **kw: ks.append(a[4]) or 0.0)
    evaluation.monitors(small_model(blocks="1234").eval(), (None, None), 2, 8, 0)
    assert ks == [20]
    monkeypatch.undo()
    q, y = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0, 1, 1])
    bank = torch.tensor([[0.9, math.sqrt(1 - 0.81), 0.0], [0.5, 0.0, math.sqrt(0.75)], [0.5, 0.0, -math.sqrt(0.75)]])
    assert evaluation.knn(bank, y, q, torch.tensor([1]), 3, 2, temperature=1.0) == 100.0
    assert evaluation.knn(bank, y, q, torch.tensor([0]), 3, 2, temperature=0.1) == 100.0


def test_fast_probe_standardises_with_training_features_only(trained, tmp_path):
    data, ckpt = trained
    args = probe_args(ckpt, data, "--fast")
    model = probe.load_frozen(ckpt, args, torch.device("cpu"))[0]
    ds = load_dataset("folder", data)
    _, _, standardised = probe.fast_probe(model, ds, load_dataset("folder", data, train=False), [0], args,
                                          torch.device("cpu"))
    tr = evaluation.features(model, Seeded(ds, probe_transforms(32)[1]), [0])[0][0]
    z = standardised([tr])[0]
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(z.std(0), tr.std(0) / (tr.std(0) + 1e-6), atol=1e-4)  # 1, but for the +1e-6 of std


def test_released_probe_draws_new_augmentations_every_epoch(trained):
    data, ckpt = trained
    args = probe_args(ckpt, data)
    model = probe.load_frozen(ckpt, args, torch.device("cpu"))[0]
    ds, train_t = load_dataset("folder", data), probe_transforms(32)[0]
    feats = [next(probe.augmented(model, ds, train_t, True, epoch, [3], args, torch.device("cpu")))[0][0]
             for epoch in (0, 0, 1)]
    assert torch.equal(feats[0], feats[1]) and not torch.allclose(feats[0], feats[2])


def test_untrained_baseline_is_the_network_train_started_from(tmp_path):
    """--untrained rebuilds the run's starting point: its seed (not the probe's), and its --init weights for the
    --frozen blocks; without --image-size the probe uses the size the checkpoint was trained at."""
    data, _ = train_tiny(tmp_path)
    run_train(data, tmp_path / "b", "--epochs", "1", "--batch-size", "8", "--frozen", "1", "--init",
              str(tmp_path / "run" / "trunk.pth"), "--seed", "3")
    ckpt = str(tmp_path / "b" / "checkpoint.pth")
    args = probe.get_args([ckpt, "--seed", "5"])
    untrained = probe.load_frozen(ckpt, args, torch.device("cpu"), untrained=True)[0].state_dict()
    init = torch.load(tmp_path / "run" / "trunk.pth", weights_only=True)
    assert all(torch.equal(untrained[k], init[k]) for k in init if k.startswith(("conv1", "bn1", "layer1")))
    torch.manual_seed(3)
    fresh = BlockResNet(**{**weights(tmp_path / "b")["config"], "projector_widths": None}).state_dict()
    assert all(torch.equal(untrained[k], fresh[k]) for k in fresh if k.startswith(("layer2", "heads.1")))
    res = probe.main(probe.get_args([ckpt, "--data", data, "--workers", "0", "--batch-size", "8", "--epochs", "1",
                                     "--fast", "--device", "cpu", "--out", str(tmp_path / "p")]))
    assert res["image_size"] == 32


# ---------------- on a GPU (skipped without one: .ci/gpu runs them)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (.ci/gpu runs these)")


@CUDA
def test_cuda_lean_cbe_equals_the_plain_head_in_fp32_and_bf16():
    torch.manual_seed(0)
    head = Pool(64, "cbe", 128).cuda().train()
    lean = lean_copy(head)
    x, g = torch.randn(16, 64, 8, 8, device="cuda"), torch.randn(16, 128, device="cuda")
    for a, b in zip(run_head(head, x, g), run_head(lean, x, g)):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * a.float().abs().max().item())
    with torch.autocast("cuda", torch.bfloat16):
        ref, got = run_head(head, x, g), run_head(lean, x, g)
    for a, b in zip(ref, got):
        assert torch.allclose(a.float(), b.float(), rtol=0.05, atol=0.05 * a.float().abs().max().item())


@CUDA
def test_cuda_compiled_heads_equal_eager_ones():
    model = small_model().cuda().train()
    y1, y2 = torch.randn(8, 3, 32, 32, device="cuda"), torch.randn(8, 3, 32, 32, device="cuda")
    owners = train.grad_owners(model, [0, 1, 2, 3])
    torch.manual_seed(1)
    eager = train.train_step(model, y1, y2, None, train.head_losses(model, BT4), owners)[0]
    compiled = copy.deepcopy(model)
    recompute.compile_heads(compiled)
    torch.manual_seed(1)
    got = train.train_step(compiled, y1, y2, None, train.head_losses(compiled, BT4),
                           train.grad_owners(compiled, [0, 1, 2, 3]))[0]
    assert torch.allclose(eager, got, rtol=1e-3)


@CUDA
def test_cuda_device_augmentation_is_the_pil_path():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).resize((64, 64), Image.BICUBIC)
              for _ in range(16)]
    choices = [draw(aug.BARLOW_TWINS[i % 2]) for i in range(16)]
    got = augment(torch.stack([to_tensor(i) for i in images]).cuda(),
                  torch.utils.data.default_collate([pack(c) for c in choices])).cpu()
    for img, c, g in zip(images, choices, got):
        assert (g - apply_pil(img, c).float()).abs().mean() < 2.0, c


@CUDA
def test_cuda_losses_equal_cpu_losses_and_checkpoints_load_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 16), torch.randn(32, 16)
    for fn in (losses.barlow_twins, losses.vicreg, lambda a, b: losses.simclr(a, b, 0.5)):
        assert torch.allclose(fn(z1, z2), fn(z1.cuda(), z2.cuda()).cpu(), rtol=1e-4)
    model = small_model().cuda()
    bookkeeping.save_atomic(model.trunk_state_dict(), str(tmp_path / "trunk.pth"))
    sd = torch.load(tmp_path / "trunk.pth", weights_only=True)  # no map_location: CPU tensors
    assert all(t.device.type == "cpu" for t in sd.values())


if __name__ == "__main__" and sys.argv[1] == "dist-worker":
    dist_worker(sys.argv[2])
