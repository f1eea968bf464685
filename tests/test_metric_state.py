"""MinibatchCKA state handling: dtypes, state_dict round trips, merge_state, forward, update paths."""

import warnings

import helpers as H
import pytest
import reference as ref
import torch

from lightning_cka import MinibatchCKA
from lightning_cka import functional as F

SUMS = ("sum_xy", "sum_xx", "sum_yy", "sum_xx_pair", "sum_yy_pair")


# ------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 3}, {"num_layers": 2, "num_other_layers": 4}])
def test_running_sums_are_float64_before_the_first_update(kwargs):
    metric = MinibatchCKA(**kwargs)
    for name in SUMS:
        assert getattr(metric, name).dtype == torch.float64, name
    assert metric.num_batches.dtype == torch.long
    metric.float().half()  # module dtype casts leave metric states alone
    for name in SUMS:
        assert getattr(metric, name).dtype == torch.float64, name
    metric.reset()
    assert metric.sum_xy.dtype == torch.float64


# ----------------------------------------------------------------------------- state_dict
def test_load_state_dict_into_default_metric_then_update(gen):
    batches = [H.random_layers(gen, 8) for _ in range(3)]
    source = MinibatchCKA()
    source.persistent(True)
    for xs in batches[:2]:
        source.update(xs)
    state = source.state_dict()
    assert state["sum_xy"].shape == (3, 3)

    target = MinibatchCKA()  # num_layers=None: shape not fixed yet
    target.load_state_dict(state)
    assert int(target.num_batches) == 2
    target.update(batches[2])
    assert int(target.num_batches) == 3
    assert ref.max_abs_err(target.compute(), ref.minibatch_cka(batches)) < H.TOL32
    # The loaded shape is fixed: other layer counts are refused, also after reset().
    with pytest.raises(ValueError, match="3 x 3"):
        target.update(batches[0][:2])
    target.reset()
    assert target.sum_xy.shape == (3, 3) and int(target.num_batches) == 0
    with pytest.raises(ValueError, match="3 x 3"):
        target.update(batches[0][:2])


def test_load_cross_state_dict_then_compute_and_update(gen):
    xs = [H.random_layers(gen, 8) for _ in range(2)]
    ys = [H.random_cross(gen, b) for b in xs]
    source = MinibatchCKA()
    source.persistent(True)
    source.update(xs[0], ys[0])
    target = MinibatchCKA()
    target.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="3 x 2"):
        target.update(xs[1])  # a (3, 2) state is cross-similarity
    target.update(xs[1], ys[1])
    assert ref.max_abs_err(target.compute(), ref.minibatch_cka(xs, ys)) < H.TOL32


# ---------------------------------------------------------------------------------- merging
def test_merge_populated_into_fresh_and_back(gen):
    batches = [H.random_layers(gen, 8) for _ in range(3)]
    populated = MinibatchCKA()
    for xs in batches[:2]:
        populated.update(xs)
    fresh = MinibatchCKA()
    fresh.merge_state(populated)
    assert ref.max_abs_err(fresh.compute(), ref.minibatch_cka(batches[:2])) < H.TOL32
    fresh.update(batches[2])
    assert ref.max_abs_err(fresh.compute(), ref.minibatch_cka(batches)) < H.TOL32
    # The source is untouched (no aliasing), and merging an empty metric changes nothing.
    before = populated.compute().clone()
    populated.merge_state(MinibatchCKA())
    assert torch.equal(populated.compute(), before)
    assert ref.max_abs_err(before, ref.minibatch_cka(batches[:2])) < H.TOL32


def test_merge_state_dict_into_fresh(gen):
    xs = [H.random_layers(gen, 8) for _ in range(2)]
    ys = [H.random_cross(gen, b) for b in xs]
    a, b = MinibatchCKA(), MinibatchCKA()
    a.update(xs[0], ys[0])
    b.update(xs[1], ys[1])
    merged = MinibatchCKA()
    merged.merge_state(a.metric_state)
    merged.merge_state(b.metric_state)
    assert ref.max_abs_err(merged.compute(), ref.minibatch_cka(xs, ys)) < H.TOL32


def test_merge_state_refuses_mismatches(gen):
    xs = H.random_layers(gen, 8)
    three, two = MinibatchCKA(), MinibatchCKA()
    three.update(xs)
    two.update(xs[:2])
    with pytest.raises(ValueError, match="different layer counts"):
        three.merge_state(two)
    one = MinibatchCKA()
    one.update(xs[:1])
    with pytest.raises(ValueError, match="different layer counts"):
        three.merge_state(one)  # (1, 1) would broadcast silently
    cross = MinibatchCKA()
    cross.update(xs, xs)
    with pytest.raises(ValueError, match="self-similarity"):
        three.merge_state(cross)
    named = MinibatchCKA(layer_names=["a", "b", "c"])
    other = MinibatchCKA(layer_names=["a", "b", "d"])
    with pytest.raises(ValueError, match="layer_names"):
        named.merge_state(other)


def test_merge_state_invalidates_the_cached_result(gen):
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    a, b = MinibatchCKA(), MinibatchCKA()
    a.update(batches[0])
    b.update(batches[1])
    first = a.compute().clone()
    a.merge_state(b)
    merged = a.compute()
    assert not torch.allclose(first, merged)
    assert ref.max_abs_err(merged, ref.minibatch_cka(batches)) < H.TOL32
    fresh = MinibatchCKA()
    fresh.merge_state(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compute called before update" for a merged metric
        fresh.compute()


# ---------------------------------------------------------------------- update paths / forward
def test_update_grams_goes_through_the_update_wrapper(gen):
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    metric = MinibatchCKA()
    metric.update_grams(F.grams(batches[0]))
    assert metric.update_count == 1
    first = metric.compute().clone()
    metric.update_grams(F.grams(batches[1]))
    assert metric.update_count == 2
    second = metric.compute()  # not the cached first result
    assert not torch.allclose(first, second)
    assert ref.max_abs_err(second, ref.minibatch_cka(batches)) < H.TOL32


def test_grams_keyword_equals_activations(gen):
    xs = [H.random_layers(gen, 8) for _ in range(2)]
    ys = [H.random_cross(gen, b) for b in xs]
    by_acts, by_grams, by_method = MinibatchCKA(), MinibatchCKA(), MinibatchCKA()
    for x, y in zip(xs, ys, strict=True):
        by_acts.update(x, y)
        by_grams.update(grams=F.grams(x), other_grams=F.grams(y))
        by_method.update_grams(F.grams(x), F.grams(y))
    assert torch.equal(by_acts.compute(), by_grams.compute())
    assert torch.equal(by_acts.compute(), by_method.compute())
    assert ref.max_abs_err(by_acts.compute(), ref.minibatch_cka(xs, ys)) < H.TOL32


def test_forward_with_grams_and_small_batch_counter(gen):
    batches = [H.random_layers(gen, 8) for _ in range(2)]
    metric = MinibatchCKA()
    value = metric(grams=F.grams(batches[0]))
    assert ref.max_abs_err(value, ref.minibatch_cka(batches[:1])) < H.TOL32
    with pytest.warns(UserWarning, match="at least 4"):
        metric(H.random_layers(gen, 3))
    with pytest.warns(UserWarning, match="at least 4"):
        metric(H.random_layers(gen, 2))
    metric(batches[1])
    assert metric.num_skipped_small == 2  # forward's internal reset does not lose the count
    assert int(metric.num_batches) == 2
    assert ref.max_abs_err(metric.compute(), ref.minibatch_cka(batches)) < H.TOL32


def test_single_layer_forward_and_compute_keep_matrix_shape(gen):
    # Pins the private compute-wrapper override: torchmetrics squeezes one-element results.
    x = torch.randn(8, 4, generator=gen)
    metric = MinibatchCKA()
    assert metric([x]).shape == (1, 1)
    assert metric.compute().shape == (1, 1)
    assert metric(grams=F.grams([x])).shape == (1, 1)
