"""MinibatchCKA with unusable data: non-finite layers, overflowing Grams, no usable minibatch."""

import warnings

import helpers as H
import numpy as np
import pytest
import reference as ref
import torch

from lightning_cka import MinibatchCKA
from lightning_cka import functional as F


def _messages(record):
    return [str(w.message) for w in record]


# --------------------------------------------------------------------------- per-layer skipping
def test_layer_nonfinite_in_every_minibatch_spoils_only_its_row_and_column(gen):
    names = ["a", "dead", "c"]
    batches = [H.random_layers(gen, 10) for _ in range(3)]
    for xs in batches:
        xs[1] = torch.full_like(xs[1], float("nan"))
    metric = MinibatchCKA(layer_names=names)
    for xs in batches:
        metric.update(xs)
    assert int(metric.num_batches) == 3
    with pytest.warns(UserWarning, match=r"'dead' \(3x; its row and column are NaN\)") as record:
        got = metric.compute()
    assert not any("not positive" in m for m in _messages(record))  # named once, as non-finite
    assert torch.isnan(got[1]).all() and torch.isnan(got[:, 1]).all()
    keep = [0, 2]
    expected = ref.minibatch_cka([[xs[i] for i in keep] for xs in batches])
    assert ref.max_abs_err(got[keep][:, keep], expected) < H.TOL32


def test_nan_propagating_downstream_uses_each_pairs_common_minibatches(gen):
    # A NaN in one layer usually reaches every later layer: upstream pairs keep all minibatches,
    # pairs with a poisoned layer use only the minibatches where both were finite.
    batches = [[*H.random_layers(gen, 9), torch.randn(9, 4, generator=gen)] for _ in range(4)]
    for b, first_bad in ((1, 1), (3, 2)):
        for i in range(first_bad, 4):
            batches[b][i] = batches[b][i].clone()
            batches[b][i][0] = float("inf") if i % 2 else float("nan")
    metric = MinibatchCKA()
    for xs in batches:
        metric.update(xs)
    with pytest.warns(UserWarning, match=r"#1 \(1x\), #2 \(2x\), #3 \(2x\)"):
        got = metric.compute()
    expected = H.pairwise_reference(batches)
    assert np.isfinite(expected).all()
    assert ref.max_abs_err(got, expected) < H.TOL32
    assert torch.allclose(got, got.T, atol=1e-12, rtol=0)
    assert torch.allclose(torch.diagonal(got), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    # The per-pair normalisation matters: layer 0's self sum over all four minibatches (it was
    # always finite) with the cross sum over the two common ones would be another value.
    common = [0, 2]
    g0, g3 = [ref.gram(xs[0]) for xs in batches], {b: ref.gram(batches[b][3]) for b in common}
    s_xy = sum(ref.hsic1(g0[b], g3[b]) for b in common)
    s_yy = sum(ref.hsic1(g3[b], g3[b]) for b in common)
    s_xx_all = sum(ref.hsic1(g0[b], g0[b]) for b in range(4))
    assert abs(float(got[0, 3]) - s_xy / np.sqrt(s_xx_all * s_yy)) > 1e-2


def test_cross_layer_nonfinite_everywhere(gen):
    xs = [H.random_layers(gen, 8) for _ in range(2)]
    ys = [[x[0][:, :3] + 0.1 * torch.randn(8, 3, generator=gen), torch.full((8, 2), float("inf"))] for x in xs]
    metric = MinibatchCKA(other_layer_names=["fine", "broken"], layer_names=["p", "q", "r"])
    for x, y in zip(xs, ys, strict=True):
        metric.update(x, y)
    with pytest.warns(UserWarning, match=r"column layer\(s\) 'broken' \(2x"):
        got = metric.compute()
    assert torch.isnan(got[:, 1]).all() and torch.isfinite(got[:, 0]).all()
    assert ref.max_abs_err(got[:, :1], ref.minibatch_cka(xs, [[y[0]] for y in ys])) < H.TOL32


@pytest.mark.parametrize("via", ["activations", "grams"])
def test_update_reads_nothing_back_to_the_host(gen, monkeypatch, via):
    # The non-finite masks stay tensors: on a GPU, update() never waits for the device.
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    batches[0][0] = torch.full_like(batches[0][0], float("nan"))
    metric = MinibatchCKA()
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _name=name: calls.append(_name) or _real(self, *a)
        )
    for xs in batches:
        if via == "grams":
            metric.update_grams(F.grams(xs))
        else:
            metric.update(xs)
        bool(torch.tensor(True))  # the probe works
    monkeypatch.undo()
    assert calls == ["__bool__", "__bool__"]
    with pytest.warns(UserWarning, match="non-finite"):
        metric.compute()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_has_no_host_sync_on_cuda(gen):
    batches = [[t.cuda() for t in H.random_layers(gen, 16)] for _ in range(2)]
    batches[1][2][0] = float("nan")
    metric = MinibatchCKA(num_layers=3).cuda()
    metric.update(batches[0])  # warm-up (lazy CUDA initialisation may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(batches[1])
        metric.update_grams(F.grams(batches[0]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.warns(UserWarning, match="non-finite"):
        metric.compute()


# --------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("n", [12, 130])  # 130: the blocked CPU product of gram()
def test_float32_gram_overflow_is_reported_as_overflow(gen, n):
    big = torch.randn(n, 6, generator=gen) * 1e20
    assert torch.isfinite(big).all() and not torch.isfinite(F.gram(big)).all()
    batches = [[big, torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)] for _ in range(2)]
    batches[1][0] = big * 0.5 + torch.randn(n, 6, generator=gen) * 1e19
    metric = MinibatchCKA(layer_names=["big", "b", "c"])
    for xs in batches:
        metric.update(xs)
    with pytest.warns(UserWarning, match=r"overflowed in row layer\(s\) 'big' \(2x") as record:
        got = metric.compute()
    messages = _messages(record)
    assert any('precision="float64"' in m for m in messages)
    assert not any("non-finite activations" in m for m in messages)
    assert torch.isnan(got[0]).all() and torch.isnan(got[:, 0]).all()
    assert ref.max_abs_err(got[1:, 1:], ref.minibatch_cka([xs[1:] for xs in batches])) < H.TOL32

    # The advice works: float64 Grams of the same activations are fine and match the reference.
    wide = MinibatchCKA(precision="float64")
    for xs in batches:
        wide.update(xs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = wide.compute()
    assert ref.max_abs_err(fixed, ref.minibatch_cka(batches)) < H.TOL32


def test_overflow_of_precomputed_grams_and_in_the_function(gen):
    big = torch.randn(10, 6, generator=gen) * 1e20
    xs = [big, torch.randn(10, 4, generator=gen)]
    metric = MinibatchCKA()
    metric.update_grams(F.grams(xs))
    with pytest.warns(UserWarning, match="overflowed") as record:
        metric.compute()
    assert not any("non-finite" in m for m in _messages(record))
    with pytest.warns(UserWarning, match="overflowed") as record:
        F.minibatch_cka([xs])
    assert not any("non-finite" in m for m in _messages(record))


def test_inf_activation_is_non_finite_not_overflow(gen):
    xs = H.random_layers(gen, 8)
    xs[0] = xs[0].clone()
    xs[0][3, 1] = float("inf")
    metric = MinibatchCKA()
    metric.update(xs)
    metric.update(H.random_layers(gen, 8))
    with pytest.warns(UserWarning, match="non-finite") as record:
        metric.compute()
    assert not any("overflow" in m for m in _messages(record))


# ------------------------------------------------------------------------ no usable minibatch
def test_only_small_minibatches_give_nan_matrix_of_the_right_shape(gen):
    metric = MinibatchCKA()
    with pytest.warns(UserWarning, match="at least 4"):
        metric.update(H.random_layers(gen, 3))
    metric.update(H.random_layers(gen, 2))
    assert metric.num_skipped_small == 2
    with pytest.warns(UserWarning, match="all-NaN 3 x 3 matrix"):
        got = metric.compute()
    assert got.shape == (3, 3) and torch.isnan(got).all()
    # The shape was fixed by the small minibatches too.
    with pytest.raises(ValueError, match="3 x 3"):
        metric.update(H.random_layers(gen, 8)[:2])


def test_only_small_cross_minibatches(gen):
    xs = H.random_layers(gen, 3)
    metric = MinibatchCKA()
    with pytest.warns(UserWarning, match="at least 4"):
        metric.update(xs, xs[:2])
    with pytest.warns(UserWarning, match="all-NaN 3 x 2 matrix"):
        got = metric.compute()
    assert got.shape == (3, 2) and torch.isnan(got).all()


def test_only_nonfinite_minibatches(gen):
    xs = [torch.full((8, 4), float("nan")), torch.full((8, 2), float("inf"))]
    metric = MinibatchCKA()
    metric.update(xs)
    assert int(metric.num_batches) == 0
    with H.warns("all-NaN 2 x 2 matrix", r"non-finite .* row layer\(s\) #0 \(1x.*, #1 \(1x"):
        got = metric.compute()
    assert got.shape == (2, 2) and torch.isnan(got).all()


def test_single_layer_without_usable_minibatch_stays_1x1(gen):
    metric = MinibatchCKA()
    with pytest.warns(UserWarning, match="at least 4"):
        metric.update([torch.randn(2, 5, generator=gen)])
    with pytest.warns(UserWarning, match="all-NaN 1 x 1 matrix"):
        got = metric.compute()
    assert got.shape == (1, 1) and torch.isnan(got).all()


@H.computes_before_update
def test_never_updated_unsized_metric_says_what_it_returns():
    metric = MinibatchCKA()
    with pytest.warns(UserWarning, match="empty 0 x 0 matrix"):
        got = metric.compute()
    assert got.shape == (0, 0)
