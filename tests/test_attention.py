"""Mean attention distance: hand-built patterns, brute force, and timm's own attention."""

from __future__ import annotations

import copy
import itertools
import math

import helpers as H
import pytest
import torch
from helpers import Wrapper, timm_vit_tiny
from torch import Tensor, nn

from lightning_cka.attention import (
    AttentionDistance,
    AttentionDistanceCapture,
    attention_weights,
    mean_attention_distance,
    plot_attention_distances,
)
from lightning_cka.capture import HookSet


def _brute_force(attn: Tensor, grid: tuple[int, int], patch: tuple[int, int], prefix: int) -> Tensor:
    """Per-head mean over examples and query patches of sum_j A_ij d(i, j), with explicit loops
    for the distances; patch rows renormalised. Returns (H,) float64."""
    gh, gw = grid
    positions = [(r, c) for r in range(gh) for c in range(gw)]
    dist = torch.tensor(
        [[math.hypot((ri - rj) * patch[0], (ci - cj) * patch[1]) for rj, cj in positions] for ri, ci in positions],
        dtype=torch.float64,
    )
    a = attn[:, :, prefix:, prefix:].double()
    a = a / a.sum(-1, keepdim=True)
    return torch.einsum("nhij,ij->nhi", a, dist).mean(dim=(0, 2))


def _mean(attn: Tensor, grid: tuple[int, int], patch: tuple[int, int], prefix: int = 0) -> Tensor:
    sums, counts = mean_attention_distance(attn, grid, patch, prefix)
    return sums / counts


# ----------------------------------------------------------------------------- pure function
def test_attending_to_itself_is_zero() -> None:
    n_patches = 12
    attn = torch.eye(1 + n_patches)[None, None].repeat(2, 3, 1, 1)
    sums, counts = mean_attention_distance(attn, (3, 4), (16, 16), num_prefix_tokens=1)
    assert sums.shape == (3,) and sums.dtype == torch.float64
    torch.testing.assert_close(counts, torch.full((3,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(sums, torch.zeros(3, dtype=torch.float64))


def test_uniform_attention_is_mean_pairwise_distance() -> None:
    grid, patch = (4, 4), (8, 8)
    positions = list(itertools.product(range(grid[0]), range(grid[1])))
    pairwise = [math.hypot((a[0] - b[0]) * 8, (a[1] - b[1]) * 8) for a in positions for b in positions]
    expected = sum(pairwise) / len(pairwise)
    tokens = 16
    uniform = torch.full((1, 2, tokens, tokens), 1.0 / tokens)
    torch.testing.assert_close(_mean(uniform, grid, patch), torch.full((2,), expected, dtype=torch.float64))
    # Half the mass on the class token: renormalising the patch rows gives the same distance.
    with_cls = torch.zeros(1, 2, tokens + 1, tokens + 1)
    with_cls[..., 0] = 0.5
    with_cls[..., 1:] = 0.5 / tokens
    torch.testing.assert_close(_mean(with_cls, grid, patch, 1), torch.full((2,), expected, dtype=torch.float64))


def test_neighbour_pattern_on_non_square_grid_with_rectangular_patches() -> None:
    """Each patch attends to its right neighbour (head 0) or the one below (head 1); the last
    column / row attends to itself."""
    gh, gw, ph, pw = 3, 5, 4, 6
    n = gh * gw
    attn = torch.zeros(1, 2, n, n)
    for r, c in itertools.product(range(gh), range(gw)):
        i = r * gw + c
        attn[0, 0, i, i + 1 if c + 1 < gw else i] = 1
        attn[0, 1, i, i + gw if r + 1 < gh else i] = 1
    expected = torch.tensor([pw * gh * (gw - 1) / n, ph * (gh - 1) * gw / n], dtype=torch.float64)
    torch.testing.assert_close(_mean(attn, (gh, gw), (ph, pw)), expected)


def test_random_attention_matches_brute_force() -> None:
    torch.manual_seed(0)
    grid, patch, prefix = (3, 5), (4, 6), 3
    attn = torch.randn(4, 3, prefix + 15, prefix + 15).mul(3).softmax(-1)
    torch.testing.assert_close(_mean(attn, grid, patch, prefix), _brute_force(attn, grid, patch, prefix))
    with pytest.raises(ValueError, match="patches"):
        mean_attention_distance(attn, (4, 4), patch, prefix)


def test_examples_without_patch_attention_are_left_out() -> None:
    attn = torch.zeros(2, 1, 5, 5)
    attn[..., 0] = 1.0  # everything on the class token
    attn[1, 0, 1:, 1:] = torch.eye(4)  # example 1: patches attend to themselves (mass > 1 is fine)
    sums, counts = mean_attention_distance(attn, (2, 2), (1, 1), 1)
    assert counts.tolist() == [1.0] and sums.tolist() == [0.0]


# ----------------------------------------------------------------------------- timm attention
def _timm_attention(vit: nn.Module, x: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Attention inputs and the softmax weights of timm's own non-fused path (a copy with
    ``fused_attn = False``), read at the input of ``attn_drop``."""
    slow = copy.deepcopy(vit)
    inputs: dict[int, Tensor] = {}
    weights: dict[int, Tensor] = {}
    handles = []
    for i, blk in enumerate(slow.blocks):
        blk.attn.fused_attn = False
        handles.append(blk.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].clone())))
        handles.append(blk.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: weights.__setitem__(i, a[0])))
    with torch.no_grad():
        slow(x)
    for h in handles:
        h.remove()
    assert len(weights) == len(slow.blocks)
    return inputs, weights


@pytest.mark.parametrize("kwargs", [dict(), dict(qk_norm=True, reg_tokens=2)], ids=["plain", "qk_norm+reg"])
def test_attention_weights_match_timm_non_fused(kwargs: dict) -> None:
    vit = timm_vit_tiny(**kwargs)
    assert all(blk.attn.fused_attn for blk in vit.blocks)  # the model itself keeps fused attention
    x = torch.randn(3, 3, 32, 32)
    inputs, weights = _timm_attention(vit, x)
    for i, blk in enumerate(vit.blocks):
        with torch.no_grad():
            got = attention_weights(blk.attn, inputs[i])
        assert got.shape == (3, 3, 64 + vit.num_prefix_tokens, 64 + vit.num_prefix_tokens)
        torch.testing.assert_close(got, weights[i], rtol=1e-5, atol=1e-6)
    if kwargs.get("qk_norm"):  # q_norm/k_norm matter: without them the weights differ
        blk = copy.deepcopy(vit.blocks[0])
        blk.attn.q_norm, blk.attn.k_norm = nn.Identity(), nn.Identity()
        with torch.no_grad():
            assert not torch.allclose(attention_weights(blk.attn, inputs[0]), weights[0], atol=1e-4)


def _expected(vit: nn.Module, batches: list[Tensor], grid: tuple[int, int], patch: tuple[int, int]) -> list[Tensor]:
    per_layer: list[list[Tensor]] = [[] for _ in vit.blocks]
    counts = 0
    for x in batches:
        _, weights = _timm_attention(vit, x)
        for i in range(len(vit.blocks)):
            per_layer[i].append(_brute_force(weights[i], grid, patch, vit.num_prefix_tokens) * x.shape[0])
        counts += x.shape[0]
    return [torch.stack(v).sum(0) / counts for v in per_layer]


def _capture(root: nn.Module, batches: list[Tensor], **kwargs: object) -> dict[str, Tensor]:
    capture = AttentionDistanceCapture(root, **kwargs)
    with HookSet() as hooks:
        capture.attach(hooks)
        for x in batches:
            with torch.inference_mode():
                root(x)
    assert capture.layers == ["model.blocks.0.attn", "model.blocks.1.attn"]
    return capture.compute()


@pytest.mark.parametrize(
    ("kwargs", "image", "grid", "patch"),
    [
        (dict(), (32, 32), (8, 8), (4, 4)),
        (dict(reg_tokens=2, qk_norm=True), (32, 32), (8, 8), (4, 4)),
        (dict(class_token=False, global_pool="avg"), (32, 32), (8, 8), (4, 4)),
        (dict(img_size=(32, 48), patch_size=(4, 6)), (32, 48), (8, 8), (4, 6)),
        (dict(img_size=(32, 48)), (32, 48), (8, 12), (4, 4)),
        (dict(dynamic_img_size=True), (48, 24), (12, 6), (4, 4)),
    ],
    ids=["cls", "reg+qk_norm", "no-cls", "rect-patch", "non-square", "dynamic"],
)
def test_capture_matches_brute_force(
    kwargs: dict, image: tuple[int, int], grid: tuple[int, int], patch: tuple[int, int]
) -> None:
    vit = timm_vit_tiny(**kwargs)
    torch.manual_seed(1)
    batches = [torch.randn(3, 3, *image), torch.randn(2, 3, *image)]
    got = _capture(Wrapper(vit), batches)
    expected = _expected(vit, batches, grid, patch)
    for name, want in zip(["model.blocks.0.attn", "model.blocks.1.attn"], expected, strict=True):
        assert got[name].shape == (3,)
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-4)


def test_max_examples_and_chunking() -> None:
    vit = timm_vit_tiny()
    torch.manual_seed(1)
    x = torch.randn(5, 3, 32, 32)
    got = _capture(Wrapper(vit), [x], max_examples_per_batch=2, chunk_size=1)
    expected = _expected(vit, [x[:2]], (8, 8), (4, 4))
    everything = _expected(vit, [x], (8, 8), (4, 4))
    torch.testing.assert_close(got["model.blocks.0.attn"], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["model.blocks.1.attn"], expected[1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected[0], everything[0], rtol=1e-4)


@H.computes_before_update
def test_no_vit_raises_and_failing_hook_warns_once() -> None:
    with pytest.raises(ValueError, match="VisionTransformer"):
        AttentionDistanceCapture(nn.Sequential(nn.Linear(2, 2)))
    vit = timm_vit_tiny()
    capture = AttentionDistanceCapture(vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vit(x)
    # wrong geometry: the hooks fail, the forward must not
    vit.patch_embed.grid_size = (7, 7)
    vit.patch_embed.dynamic_feat_size = lambda size: (7, 7)
    with HookSet() as hooks, pytest.warns(UserWarning, match="could not be measured") as caught:
        capture.attach(hooks)
        with torch.no_grad():
            out = vit(x)
            vit(x)
    torch.testing.assert_close(out, expected)
    assert len([w for w in caught if "could not be measured" in str(w.message)]) == 2  # once per layer
    values = capture.compute()
    assert list(values) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(torch.isnan(v).all() for v in values.values())


# ----------------------------------------------------------------------------- metric and plot
def test_metric_pads_heads_and_works_under_inference_mode() -> None:
    metric = AttentionDistance([3, 2])
    with torch.inference_mode():
        metric.update(torch.tensor([2.0, 4.0, 6.0]), torch.tensor([2.0, 2.0, 2.0]), layer=0)
        metric.update(torch.tensor([3.0, 3.0]), 3, layer=1)
    values = metric.compute()
    metric.update(torch.tensor([4.0, 4.0, 4.0]), 2, layer=0)  # outside inference mode
    values = metric.compute()
    assert values.shape == (2, 3) and values.dtype == torch.float64
    torch.testing.assert_close(values[0], torch.tensor([1.5, 2.0, 2.5], dtype=torch.float64))
    torch.testing.assert_close(values[1, :2], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert math.isnan(values[1, 2].item())
    with pytest.raises(ValueError):
        metric.update(torch.ones(4), 1, layer=0)


def test_plot_one_point_per_head() -> None:
    values = {f"model.blocks.{i}.attn": torch.arange(3, dtype=torch.float64) + 10 * i for i in range(4)}
    _fig, ax = plot_attention_distances(values, title="distances")
    offsets = ax.collections[0].get_offsets()
    assert offsets.shape == (12, 2)
    assert sorted(set(offsets[:, 0].tolist())) == [0.0, 1.0, 2.0, 3.0]
    assert offsets[:, 1].tolist() == [float(v) for i in range(4) for v in range(10 * i, 10 * i + 3)]
    assert ax.get_title() == "distances"
