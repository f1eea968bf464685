"""MinibatchCKA metric against the independent reference in tests/reference.py."""

import warnings

import helpers as H
import numpy as np
import pytest
import reference as ref
import torch

from lightning_cka import MinibatchCKA
from lightning_cka import functional as F


def _no_warnings_matching(record, text):
    return not any(text in str(w.message) for w in record)


# ---------------------------------------------------------------------------------- values
def test_self_similarity_matches_reference(gen):
    batches = [H.random_layers(gen, n) for n in (16, 16, 16)]
    metric = MinibatchCKA()
    for xs in batches:
        metric.update(xs)
    got = metric.compute()
    assert got.shape == (3, 3) and got.dtype == torch.float64
    expected = ref.minibatch_cka(batches)
    assert ref.max_abs_err(got, expected) < H.TOL32
    # The off-diagonal values are far from trivial, so the comparison can fail.
    assert np.all(np.abs(expected[np.triu_indices(3, 1)] - 1) > 1e-2)
    assert int(metric.num_batches) == 3


def test_cross_similarity_matches_reference(gen):
    batches = [H.random_layers(gen, 12) for _ in range(3)]
    others = [H.random_cross(gen, xs) for xs in batches]
    metric = MinibatchCKA()
    for xs, ys in zip(batches, others, strict=True):
        metric.update(xs, ys)
    got = metric.compute()
    assert got.shape == (3, 2)
    assert ref.max_abs_err(got, ref.minibatch_cka(batches, others)) < H.TOL32


def test_each_minibatch_counts_once_not_pooled(gen):
    # Minibatch CKA over two batches differs from full-batch CKA over their concatenation;
    # the metric must follow the minibatch definition.
    batches = [H.random_layers(gen, 8, shift=s) for s in (0.0, 3.0)]
    metric = MinibatchCKA()
    for xs in batches:
        metric.update(xs)
    pooled = [[torch.cat([b[i] for b in batches]) for i in range(3)]]
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32
    assert ref.max_abs_err(ref.minibatch_cka(pooled), ref.minibatch_cka(batches)) > 1e-3


def test_unequal_minibatch_sizes(gen):
    batches = [H.random_layers(gen, n) for n in (7, 20, 4, 11)]
    metric = MinibatchCKA()
    for xs in batches:
        metric.update(xs)
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32


def test_tail_minibatch_below_four_is_skipped_and_warned_once(gen):
    batches = [H.random_layers(gen, n) for n in (10, 9)]
    metric = MinibatchCKA()
    for xs in batches:
        metric.update(xs)
    with pytest.warns(UserWarning, match="at least 4"):
        metric.update(H.random_layers(gen, 3))
    assert metric.num_skipped_small == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        metric.update(H.random_layers(gen, 2))
        metric.update(H.random_layers(gen, 1))
    assert _no_warnings_matching(record, "at least 4"), [str(w.message) for w in record]
    assert metric.num_skipped_small == 3
    assert int(metric.num_batches) == 2
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32


def test_large_mean_activations_float32_match_exact_reference(gen):
    # n=64, p=512, mean 100 makes the literal Song et al. formula fail in float32. Use values
    # on a 1/16 grid so an exact-arithmetic reference applies (16 * x is integer-valued).
    x = torch.round(16 * (torch.randn(64, 512, generator=gen, dtype=torch.float64) + 100)) / 16
    mix = torch.randn(512, 512, generator=gen, dtype=torch.float64) / 512**0.5
    y = (x - 100) @ mix * 0.3 + 0.1 * torch.randn(64, 512, generator=gen, dtype=torch.float64) + 100
    y = torch.round(16 * y) / 16
    x32, y32 = x.float(), y.float()
    assert torch.equal(x32.double(), x) and torch.equal(y32.double(), y)  # exactly representable
    metric = MinibatchCKA()
    metric.update([x32, y32])
    got = metric.compute()
    expected = ref.minibatch_cka_exact([[16 * x, 16 * y]])
    assert torch.isfinite(got).all()
    assert 0.3 < expected[0, 1] < 0.99
    assert ref.max_abs_err(got, expected) < H.TOL32


def test_bfloat16_input(gen):
    batches = [[t.bfloat16() for t in H.random_layers(gen, 16)] for _ in range(2)]
    metric = MinibatchCKA()
    for xs in batches:
        metric.update(xs)
    got = metric.compute()
    assert got.dtype == torch.float64
    # The reference sees the bf16 values upcast exactly to float64; the Grams are float32.
    assert ref.max_abs_err(got, ref.minibatch_cka(batches)) < H.TOL32


def test_precision_float64(gen):
    batches = [H.random_layers(gen, n, dtype=torch.float64) for n in (9, 13)]
    metric = MinibatchCKA(precision="float64")
    for xs in batches:
        metric.update(xs)
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL64
    # Same via a torch dtype.
    metric = MinibatchCKA(precision=torch.float64)
    for xs in batches:
        metric.update(xs)
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL64


def test_precision_bfloat16(gen):
    batches = [H.random_layers(gen, 32) for _ in range(2)]
    metric = MinibatchCKA(precision="bfloat16")
    for xs in batches:
        metric.update(xs)
    got = metric.compute()
    expected = ref.minibatch_cka(batches)
    err = ref.max_abs_err(got, expected)
    assert err < 2e-3
    assert err > 1e-7  # the products really ran in bfloat16 (float32 gives ~1e-8 here)
    diag = torch.diagonal(got)
    assert torch.allclose(diag, torch.ones_like(diag), atol=1e-2)


@pytest.mark.parametrize("bad", ["float16", "fp32", torch.int32, torch.float16])
def test_invalid_precision_raises(bad):
    with pytest.raises(ValueError, match="precision"):
        MinibatchCKA(precision=bad)


# ------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("scale", [1.0, 3.7, 1e-3])
def test_orthogonal_and_isotropic_scaling_invariance(gen, scale):
    x = torch.randn(24, 10, generator=gen, dtype=torch.float64) + 1.0
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    y = x @ q * scale
    z = torch.randn(24, 10, generator=gen, dtype=torch.float64)
    metric = MinibatchCKA()
    for _ in range(2):
        metric.update([x.float(), y.float(), z.float()])
    got = metric.compute()
    assert abs(float(got[0, 1]) - 1.0) < 1e-6
    assert abs(float(got[1, 0]) - 1.0) < 1e-6
    assert abs(float(got[0, 2]) - 1.0) > 1e-2  # an unrelated layer is not at 1: the test can fail
    cross = MinibatchCKA()
    cross.update([x.float(), z.float()], [y.float(), z.float()])
    assert abs(float(cross.compute()[0, 0]) - 1.0) < 1e-6


def test_self_matrix_symmetric_with_unit_diagonal(gen):
    metric = MinibatchCKA()
    for n in (8, 12, 6):
        metric.update([*H.random_layers(gen, n), torch.randn(n, 4, generator=gen)])
    got = metric.compute()
    assert torch.allclose(got, got.T, atol=1e-12, rtol=0)
    assert torch.allclose(torch.diagonal(got), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.all(got <= 1 + 1e-6)


# --------------------------------------------------------------------------- degenerate data
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_minibatch_is_skipped_and_named_at_compute(gen, bad_value):
    names = ["stem", "blocks.0", "head"]
    batches = [H.random_layers(gen, 10) for _ in range(3)]
    poisoned = [t.clone() for t in batches[1]]
    poisoned[1][2, 0, 0] = bad_value
    metric = MinibatchCKA(layer_names=names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning before compute
        for xs in (batches[0], poisoned, batches[2]):
            metric.update(xs)
    assert int(metric.num_batches) == 3  # the other layers still used the poisoned minibatch
    with pytest.warns(UserWarning, match=r"non-finite.*'blocks\.0' \(1x\)") as record:
        got = metric.compute()
    assert not any("overflow" in str(w.message) for w in record)
    assert torch.isfinite(got).all()
    # Only the bad layer's row and column leave the poisoned minibatch out; every entry is the
    # minibatch CKA over the minibatches in which both of its layers were finite.
    assert ref.max_abs_err(got, H.pairwise_reference([batches[0], poisoned, batches[2]])) < H.TOL32
    assert ref.max_abs_err(got[[0, 2]][:, [0, 2]], ref.minibatch_cka(batches)[[0, 2]][:, [0, 2]]) < H.TOL32
    assert ref.max_abs_err(got[1], ref.minibatch_cka([batches[0], batches[2]])[1]) < H.TOL32


def test_nonfinite_in_cross_layer_is_named(gen):
    xs = [H.random_layers(gen, 8) for _ in range(2)]
    ys = [H.random_cross(gen, b) for b in xs]
    bad = [ys[0][0].clone(), ys[0][1]]
    bad[0][0, 0] = float("nan")
    metric = MinibatchCKA(layer_names=["a", "b", "c"], other_layer_names=["other.x", "other.y"])
    metric.update(xs[0], bad)
    metric.update(xs[1], ys[1])
    with pytest.warns(UserWarning, match=r"column layer\(s\) 'other\.x' \(1x\)"):
        got = metric.compute()
    assert ref.max_abs_err(got, H.pairwise_reference(xs, [bad, ys[1]])) < H.TOL32
    assert ref.max_abs_err(got[:, :1], ref.minibatch_cka(xs[1:], [[y[0]] for y in ys[1:]])) < H.TOL32
    assert ref.max_abs_err(got[:, 1:], ref.minibatch_cka(xs, [[y[1]] for y in ys])) < H.TOL32


@pytest.mark.parametrize("value", [0.0, 0.5, 0.7])
def test_constant_layer_gives_nan_row_and_column(gen, value):
    names = ["live", "dead", "live2"]
    batches = []
    for _ in range(2):
        a = torch.randn(9, 5, generator=gen)
        batches.append([a, torch.full((9, 3, 2), value), a @ torch.randn(5, 4, generator=gen)])
    metric = MinibatchCKA(layer_names=names)
    for xs in batches:
        metric.update(xs)
    with pytest.warns(UserWarning, match="'dead'"):
        got = metric.compute()
    assert torch.isnan(got[1]).all() and torch.isnan(got[:, 1]).all()
    keep = [0, 2]
    expected = ref.minibatch_cka([[b[i] for i in keep] for b in batches])
    assert ref.max_abs_err(got[keep][:, keep], expected) < H.TOL32


# ------------------------------------------------------------------------------ bad usage
def test_layer_count_change_raises(gen):
    metric = MinibatchCKA()
    metric.update(H.random_layers(gen, 8))
    with pytest.raises(ValueError, match="layers"):
        metric.update(H.random_layers(gen, 8)[:2])
    cross = MinibatchCKA()
    xs = H.random_layers(gen, 8)
    cross.update(xs, H.random_cross(gen, xs))
    with pytest.raises(ValueError):
        cross.update(xs, H.random_cross(gen, xs)[:1])


def test_mixing_self_and_cross_updates_raises(gen):
    xs = H.random_layers(gen, 8)
    ys = H.random_cross(gen, xs)
    metric = MinibatchCKA()
    metric.update(xs)
    with pytest.raises(ValueError, match="self-similarity"):
        metric.update(xs, ys)
    metric = MinibatchCKA()
    metric.update(xs, ys)
    with pytest.raises(ValueError, match="cross-similarity"):
        metric.update(xs)


def test_invalid_inputs_raise(gen):
    metric = MinibatchCKA()
    x = torch.randn(8, 4, generator=gen)
    with pytest.raises(TypeError):
        metric.update(x)  # a bare tensor, not a sequence of layers
    with pytest.raises(TypeError):
        metric.update([])
    with pytest.raises(TypeError):
        metric.update([x, x.numpy()])
    with pytest.raises(TypeError):
        metric.update([x, torch.ones(8, 4, dtype=torch.long)])
    with pytest.raises(TypeError):
        metric.update([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="same n"):
        metric.update([x, torch.randn(7, 4, generator=gen)])
    with pytest.raises(ValueError):
        metric.update([x], [torch.randn(9, 4, generator=gen)])
    # Nothing was accumulated by the failed calls.
    assert metric.sum_xy.numel() == 0
    metric.update([x, 2 * x])
    assert int(metric.num_batches) == 1


# ------------------------------------------------------------------ inference mode / reset
def test_update_in_inference_mode_compute_outside(gen):
    batches = [H.random_layers(gen, 8) for _ in range(3)]
    metric = MinibatchCKA()
    with torch.inference_mode():
        metric.update(batches[0])
        metric.update(batches[1])
    metric.update(batches[2])
    got = metric.compute()
    assert ref.max_abs_err(got, ref.minibatch_cka(batches)) < H.TOL32


def test_update_outside_compute_in_inference_mode(gen):
    batches = [H.random_layers(gen, 8) for _ in range(3)]
    metric = MinibatchCKA()
    metric.update(batches[0])
    with torch.inference_mode():
        metric.update(batches[1])
        first = metric.compute()
    assert ref.max_abs_err(first, ref.minibatch_cka(batches[:2])) < H.TOL32
    metric.update(batches[2])
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32


def test_reset_then_reuse(gen):
    old = [H.random_layers(gen, 8) for _ in range(2)]
    new = [H.random_layers(gen, 8, shift=2.0) for _ in range(2)]
    metric = MinibatchCKA()
    for xs in old:
        metric.update(xs)
    with pytest.warns(UserWarning, match="at least 4"):
        metric.update(H.random_layers(gen, 3))
    assert metric.num_skipped_small == 1
    metric.compute()
    metric.reset()
    assert metric.num_skipped_small == 0
    with torch.inference_mode():
        metric.update(new[0])
    metric.update(new[1])
    assert int(metric.num_batches) == 2
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(new)) < H.TOL32
    # The layer count stays fixed after reset.
    metric.reset()
    with pytest.raises(ValueError):
        metric.update(H.random_layers(gen, 8)[:2])


def test_compute_result_is_not_stale_after_more_updates(gen):
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    metric = MinibatchCKA()
    metric.update(batches[0])
    first = metric.compute().clone()
    metric.update(batches[1])
    second = metric.compute()
    assert ref.max_abs_err(second, ref.minibatch_cka(batches)) < H.TOL32
    assert not torch.allclose(first, second)


# ------------------------------------------------------------------------- preset / plot
@H.computes_before_update
def test_preset_num_layers(gen):
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    metric = MinibatchCKA(num_layers=3)
    assert metric.sum_xy.shape == (3, 3)
    with pytest.warns(UserWarning, match="without any usable minibatch.*all-NaN 3 x 3 matrix"):
        empty = metric.compute()
    assert empty.shape == (3, 3) and torch.isnan(empty).all()
    for xs in batches:
        metric.update(xs)
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32
    with pytest.raises(ValueError):
        MinibatchCKA(num_layers=2).update(batches[0])


def test_preset_cross_shape(gen):
    xs = H.random_layers(gen, 8)
    ys = H.random_cross(gen, xs)
    metric = MinibatchCKA(num_layers=3, num_other_layers=2)
    assert metric.sum_xy.shape == (3, 2)
    with pytest.raises(ValueError):
        metric.update(xs)  # preset as cross-similarity
    metric.update(xs, ys)
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka([xs], [ys])) < H.TOL32
    with pytest.raises(ValueError):
        MinibatchCKA(num_layers=3, num_other_layers=3).update(xs, ys)


def test_layer_names_fix_num_layers(gen):
    metric = MinibatchCKA(layer_names=["a", "b"])
    assert metric.sum_xy.shape == (2, 2)
    with pytest.raises(ValueError):
        metric.update(H.random_layers(gen, 8))


def test_plot_returns_fig_and_ax_with_layer_names(gen):
    names = ["stem", "blocks.0.attn", "blocks.0.mlp"]
    metric = MinibatchCKA(layer_names=names)
    metric.update(H.random_layers(gen, 8))
    fig, ax = metric.plot()
    assert fig is ax.get_figure()
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    image = ax.get_images()[0].get_array()
    assert np.allclose(np.asarray(image), metric.compute().numpy())

    xs = H.random_layers(gen, 8)
    cross = MinibatchCKA(layer_names=names, other_layer_names=["o1", "o2"])
    cross.update(xs, H.random_cross(gen, xs))
    fig, ax = cross.plot()
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == ["o1", "o2"]


def test_forward_call_accumulates(gen):
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    metric = MinibatchCKA()
    batch_value = metric(batches[0])
    assert ref.max_abs_err(batch_value, ref.minibatch_cka(batches[:1])) < H.TOL32
    metric(batches[1])
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32


def test_forward_call_with_preset_num_layers(gen):
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    metric = MinibatchCKA(num_layers=3)
    batch_value = metric(batches[0])
    assert ref.max_abs_err(batch_value, ref.minibatch_cka(batches[:1])) < H.TOL32
    metric(batches[1])
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32


def test_single_layer_result_keeps_matrix_shape(gen):
    x = torch.randn(8, 4, generator=gen)
    metric = MinibatchCKA()
    metric.update([x])
    assert metric.compute().shape == (1, 1)


def test_cross_with_unsorted_other_layer_names_keeps_the_given_order(gen):
    xs = [H.random_layers(gen, 10) for _ in range(2)]
    ys = [[torch.randn(10, 3, generator=gen), x[0][:, :5] + 0.2 * torch.randn(10, 5, generator=gen), x[1]] for x in xs]
    other_names = ["z.last", "a.first", "m.middle"]
    metric = MinibatchCKA(layer_names=["stem", "tokens", "conv"], other_layer_names=other_names)
    for x, y in zip(xs, ys, strict=True):
        metric.update(x, y)
    got = metric.compute()
    assert ref.max_abs_err(got, ref.minibatch_cka(xs, ys)) < H.TOL32
    assert metric.other_layer_names == other_names
    _, ax = metric.plot(got)
    assert [t.get_text() for t in ax.get_xticklabels()] == other_names
    # Column j really is ys[j]: the columns differ, so a reordering would be caught.
    assert float(got[1, 2]) > 0.99 > float(got[0, 1]) > float(got[0, 0])


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", ["num_layers", "num_other_layers"])
@pytest.mark.parametrize("value", [0, -2, 2.0, "3", True])
def test_invalid_layer_counts_raise_naming_the_argument(name, value):
    kwargs = {"num_layers": 2, name: value}
    with pytest.raises(ValueError, match=rf"`{name}`.*{value!r}"):
        MinibatchCKA(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer_names": "abc"}, "`layer_names`"),
        ({"layer_names": []}, "`layer_names`"),
        ({"layer_names": ["a", 2]}, "`layer_names`"),
        ({"layer_names": ["a", "b"], "num_layers": 3}, "`num_layers`=3"),
        ({"num_layers": 2, "other_layer_names": ["x"], "num_other_layers": 2}, "`num_other_layers`=2"),
        ({"num_other_layers": 2}, "`num_layers`"),
        ({"other_layer_names": ["x"]}, "`num_layers`"),
    ],
)
def test_invalid_layer_names_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MinibatchCKA(**kwargs)


def test_malformed_gram_stacks_raise_clear_errors(gen):
    k = F.grams(H.random_layers(gen, 8))
    metric = MinibatchCKA()
    with pytest.raises(ValueError, match=r"`?k`? must be a stack .*\(L, n, n\).*\(8, 8\)"):
        metric.update_grams(k[0])  # one Gram, not a stack
    with pytest.raises(ValueError, match=r"\(3, 8, 7\)"):
        metric.update_grams(k[:, :, :7])  # not square
    with pytest.raises(ValueError, match=r"\(0, 8, 8\)"):
        metric.update_grams(k[:0])
    with pytest.raises(ValueError, match=r"same n.*n=8.*n=9"):
        metric.update_grams(k, F.grams([torch.randn(9, 3, generator=gen)]))
    with pytest.raises(ValueError, match=r"`?l`? must be a stack"):
        metric.update_grams(k, k[0])
    with pytest.raises(TypeError, match="tensor"):
        metric.update_grams(k.numpy())
    with pytest.raises(TypeError, match="floating"):
        metric.update_grams(k.long())
    with pytest.raises(ValueError, match="grams"):
        metric.update(grams=k[0])
    with pytest.raises(ValueError, match="not both"):
        metric.update(H.random_layers(gen, 8), grams=k)
    with pytest.raises(TypeError, match="xs"):
        metric.update()
    assert metric.sum_xy.numel() == 0  # nothing was accumulated by the failed calls
    metric.update_grams(k)
    with pytest.raises(ValueError, match="set up for 3 x 3 layers but got 2 x 2"):
        metric.update_grams(k[:2])  # L mismatch with earlier updates
    assert int(metric.num_batches) == 1


def test_small_gram_stack_is_skipped_like_small_activations(gen):
    metric = MinibatchCKA()
    with pytest.warns(UserWarning, match="at least 4"):
        metric.update_grams(F.grams(H.random_layers(gen, 3)))
    assert metric.num_skipped_small == 1 and metric.sum_xy.shape == (3, 3)
