"""lightning_cka.functional against the independent reference in tests/reference.py."""

import helpers as H
import numpy as np
import pytest
import reference as ref
import torch

from lightning_cka import functional as F


def _gram64(x: torch.Tensor) -> torch.Tensor:
    """Plain (uncentred) float64 Gram, as the Song formula is stated for any Gram matrix."""
    m = x.reshape(x.shape[0], -1).double()
    return m @ m.T


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def test_reference_float64_agrees_with_exact_arithmetic(gen):
    # Sanity check of the reference itself on integer data: float64 Song == exact rational Song.
    xs = [torch.randint(-5, 6, (9, 7), generator=gen).double() for _ in range(3)]
    approx = ref.minibatch_cka([xs])
    exact = ref.minibatch_cka_exact([xs])
    assert ref.max_abs_err(approx, exact) < 1e-12


@pytest.mark.parametrize("n", [4, 5, 12])
def test_hsic1_matches_song_formula(gen, n):
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64) + 3.0
    y = torch.randn(n, 2, 5, generator=gen, dtype=torch.float64)
    k, l = _gram64(x), _gram64(y)
    for a, b in [(k, l), (k, k), (l, l), (l, k)]:
        got = F.hsic1(a, b)
        assert got.dtype == torch.float64
        expected = ref.hsic1(a, b)
        assert _rel(float(got), expected) < H.TOL64


def test_hsic1_float32_gram_is_computed_in_float64(gen):
    x = torch.randn(10, 8, generator=gen)
    k = x @ x.T
    assert F.hsic1(k, k).dtype == torch.float64
    assert _rel(float(F.hsic1(k, k)), ref.hsic1(k, k)) < 1e-10


def test_hsic1_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        F.hsic1(torch.eye(5), torch.eye(6))
    with pytest.raises(ValueError):
        F.hsic1(torch.ones(5, 4), torch.ones(5, 4))


@pytest.mark.parametrize("n", [4, 7, 16])
def test_center_gram_unbiased_inner_product_identity(gen, n):
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64) * 2 + 1
    y = torch.randn(n, 9, generator=gen, dtype=torch.float64) - 4
    k, l = _gram64(x), _gram64(y)
    k_u, l_u = F.center_gram_unbiased(k), F.center_gram_unbiased(l)
    assert torch.all(torch.diagonal(k_u) == 0)
    assert torch.allclose(k_u, k_u.T, atol=1e-12, rtol=0)
    inner = float((k_u * l_u).sum())
    expected = n * (n - 3) * ref.hsic1(k, l)
    assert _rel(inner, expected) < H.TOL64
    # Batched input (..., n, n) gives the same per-matrix result.
    both = F.center_gram_unbiased(torch.stack([k, l]))
    assert torch.allclose(both[0], k_u, atol=1e-12, rtol=0)
    assert torch.allclose(both[1], l_u, atol=1e-12, rtol=0)


def test_gram_centring_is_exact_for_hsic1(gen):
    # gram() mean-centres features; HSIC_1 must be unchanged w.r.t. the plain Gram X Xᵀ.
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64) + 5.0
    y = torch.randn(11, 3, 4, generator=gen, dtype=torch.float64) - 2.0
    k = F.gram(x)
    assert k.shape == (11, 11)
    assert _rel(float(F.hsic1(k, F.gram(y))), ref.hsic1(_gram64(x), _gram64(y))) < H.TOL64


def test_gram_dtypes(gen):
    x = torch.randn(6, 4, generator=gen)
    assert F.gram(x).dtype == torch.float32
    assert F.gram(x.bfloat16()).dtype == torch.float32
    assert F.gram(x, precision=torch.bfloat16).dtype == torch.float32
    assert F.gram(x, precision=torch.float64).dtype == torch.float64
    assert F.grams([x, x[:, :2]]).shape == (2, 6, 6)
    with pytest.raises(ValueError):
        F.gram(torch.empty(0, 3))


@pytest.mark.parametrize("precision", [None, torch.bfloat16, torch.float64])
def test_gram_with_workspace_is_identical_and_reuses_it(gen, precision):
    x = torch.randn(40, 7, 9, generator=gen) + 3.0
    ws = F.gram_workspace(x, precision)
    assert ws.dtype == F.gram_dtype(x.dtype, precision) and ws.numel() == x.numel()
    assert torch.equal(F.gram(x, precision, ws), F.gram(x, precision))
    smaller = x[:20, :3]  # a smaller activation reuses the front of the same buffer
    assert torch.equal(F.gram(smaller, precision, ws), F.gram(smaller, precision))


def test_gram_rejects_a_workspace_that_does_not_fit(gen):
    x = torch.randn(8, 5, generator=gen)
    with pytest.raises(ValueError, match="gram_workspace"):
        F.gram(x, None, torch.empty(x.numel() - 1))
    with pytest.raises(ValueError, match="gram_workspace"):
        F.gram(x, torch.bfloat16, torch.empty(x.numel()))  # float32 scratch for a bf16 product


@pytest.mark.parametrize("shape, chunk_bytes", [((37, 300), 5 * 300 * 4), ((6, 1000), 6 * 70 * 4)])
def test_gram_bf16_centring_rounds_once_in_pieces(gen, monkeypatch, shape, chunk_bytes):
    # On CPU, fp32 -> bf16 centring runs in row blocks (or column blocks when one row is larger
    # than a piece); each element is still x - mean in float32 rounded once, so the result equals
    # the one-shot version bit for bit.
    x = torch.randn(*shape, generator=gen) * 0.01 + 100.0
    monkeypatch.setattr(F, "_CHUNK_BYTES", chunk_bytes)
    assert len(F._pieces(*shape, 4)) > 2
    mean = torch.full((1, shape[0]), 1.0 / shape[0]) @ x
    pieces = F._centred(x, torch.empty(shape, dtype=torch.bfloat16))
    assert torch.equal(pieces, (x - mean).bfloat16())
    k = F.gram(x, torch.bfloat16)
    k64 = F.gram(x.double())
    assert (k.double() - k64).abs().max() < 1e-2 * k64.abs().max()  # centred before rounding


@pytest.mark.parametrize("n", [127, 128, 200, 256, 301])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_symmetric_product_equals_the_full_product(gen, n, dtype):
    f = torch.randn(n, 50, generator=gen).to(dtype)
    k = F._symmetric_product(f)
    assert k.dtype == dtype and k.shape == (n, n)
    if n >= 128:  # smaller n takes one full product
        assert torch.equal(k, k.T)  # mirrored, so exactly symmetric
    full = (f.double() @ f.double().T).to(dtype).double()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert (k.double() - full).abs().max() <= tol * full.abs().max()


def _largest_cpu_allocation(fn) -> int:
    """Bytes of the largest CPU allocation made by any op while ``fn`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0], default=0)


@pytest.mark.parametrize(
    "dtype, precision",
    [
        (torch.bfloat16, None),  # bf16-mixed activations, default float32 Grams
        (torch.bfloat16, torch.bfloat16),  # bf16-mixed activations, bf16 Grams: no float32 round trip
        (torch.float16, None),
        (torch.float32, torch.bfloat16),
        (torch.float32, None),
    ],
)
def test_gram_with_workspace_allocates_nothing_activation_sized(gen, monkeypatch, dtype, precision):
    monkeypatch.setattr(F, "_CHUNK_BYTES", 32 * 1024)  # pieces of a small activation, as of a large one
    x = (torch.randn(64, 2000, generator=gen) + 20.0).to(dtype)
    ws = F.gram_workspace(x, precision)
    k = F.gram(x, precision, ws)
    assert _largest_cpu_allocation(lambda: F.gram(x, precision, ws)) < x.numel() * x.element_size() // 4
    # ... and without the workspace the centred copy is allocated: the check can see it
    assert _largest_cpu_allocation(lambda: F.gram(x, precision)) >= x.numel() * ws.element_size()
    k64 = F.gram(x.double())
    torch.testing.assert_close(k.double(), k64, rtol=0, atol=(1e-2 if precision else 1e-5) * k64.abs().max())


def test_gram_of_non_contiguous_and_non_float_activations(gen):
    x = torch.randn(8, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    ws = F.gram_workspace(x)
    torch.testing.assert_close(F.gram(x, None, ws), F.gram(x.contiguous()))
    flags = torch.rand(10, 6, generator=gen) > 0.5
    torch.testing.assert_close(F.gram(flags), F.gram(flags.float()))
    with pytest.raises(ValueError, match="shares memory"):
        F.gram(ws.view(x.shape), None, ws)


def test_hsic1_pairwise_matches_reference_for_all_pairs(gen):
    n = 10
    xs = [torch.randn(n, 7, generator=gen, dtype=torch.float64) + i for i in range(3)]
    ys = [torch.randn(n, 3, 2, generator=gen, dtype=torch.float64) for _ in range(2)]
    ks = torch.stack([_gram64(x) for x in xs])
    ls = torch.stack([_gram64(y) for y in ys])
    kl, kk, ll = F.hsic1_pairwise(ks, ls)
    assert kl.shape == (3, 2) and kk.shape == (3,) and ll.shape == (2,)
    assert kl.dtype == kk.dtype == ll.dtype == torch.float64
    for i in range(3):
        assert _rel(float(kk[i]), ref.hsic1(ks[i], ks[i])) < H.TOL64
        for j in range(2):
            assert _rel(float(kl[i, j]), ref.hsic1(ks[i], ls[j])) < H.TOL64
    for j in range(2):
        assert _rel(float(ll[j]), ref.hsic1(ls[j], ls[j])) < H.TOL64

    # Self-similarity: (L, L) matrix, both self terms equal.
    kk_mat, kk1, kk2 = F.hsic1_pairwise(ks)
    assert kk_mat.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            assert _rel(float(kk_mat[i, j]), ref.hsic1(ks[i], ks[j])) < H.TOL64
    assert torch.equal(kk1, kk2)


def test_hsic1_pairwise_rejects_different_n(gen):
    with pytest.raises(ValueError, match="same n"):
        F.hsic1_pairwise(torch.eye(5).expand(2, 5, 5), torch.eye(6).expand(1, 6, 6))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cka_matches_reference(gen, unbiased, dtype):
    x = (torch.randn(20, 4, 5, generator=gen, dtype=torch.float64) + 2).to(dtype)
    w = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    y = (x.reshape(20, -1).double() @ torch.randn(20, 12, generator=gen, dtype=torch.float64) + w).to(dtype)
    got = F.linear_cka(x, y, unbiased=unbiased)
    assert got.dtype == torch.float64 and got.ndim == 0
    expected = ref.linear_cka(x, y, unbiased=unbiased)
    tol = H.TOL64 if dtype == torch.float64 else H.TOL32
    assert abs(float(got) - expected) < tol
    assert 0.05 < expected < 1.0  # a non-trivial value, so the comparison means something


def test_linear_cka_biased_properties(gen):
    x = torch.randn(15, 6, generator=gen, dtype=torch.float64)
    assert abs(float(F.linear_cka(x, x)) - 1.0) < 1e-12
    y = torch.randn(15, 6, generator=gen, dtype=torch.float64)
    value = float(F.linear_cka(x, y))
    assert 0.0 <= value <= 1.0
    assert abs(value - float(F.linear_cka(y, x))) < 1e-12


def test_linear_cka_rejects_different_n():
    with pytest.raises(ValueError):
        F.linear_cka(torch.randn(5, 3), torch.randn(6, 3))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_n_raises(n):
    k = torch.eye(n, dtype=torch.float64)
    with pytest.raises(ValueError, match="4"):
        F.center_gram_unbiased(k)
    with pytest.raises(ValueError):
        F.hsic1(k, k)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_n_raises_pairwise_and_unbiased_cka(n):
    k = torch.eye(n, dtype=torch.float64)
    with pytest.raises(ValueError, match="4"):
        F.hsic1_pairwise(k.unsqueeze(0))
    with pytest.raises(ValueError, match="4"):
        F.linear_cka(torch.randn(n, 3), torch.randn(n, 3), unbiased=True)


def test_minibatch_cka_function_matches_reference(gen):
    batches_x = [[torch.randn(n, 6, generator=gen), torch.randn(n, 2, 3, generator=gen)] for n in (5, 9, 16)]
    batches_y = [[torch.randn(len(b[0]), 4, generator=gen) + b[0][:, :4]] for b in batches_x]
    got = F.minibatch_cka(batches_x)
    assert got.shape == (2, 2) and got.dtype == torch.float64
    assert ref.max_abs_err(got, ref.minibatch_cka(batches_x)) < H.TOL32
    cross = F.minibatch_cka(batches_x, batches_y)
    assert cross.shape == (2, 1)
    assert ref.max_abs_err(cross, ref.minibatch_cka(batches_x, batches_y)) < H.TOL32
    with pytest.raises(ValueError):
        F.minibatch_cka([])


def test_cka_from_sums_nan_for_non_positive_self_terms():
    sum_xy = torch.tensor([[1.0, 0.5], [0.2, 0.3]], dtype=torch.float64)
    out = F.cka_from_sums(sum_xy, torch.tensor([4.0, 0.0], dtype=torch.float64), torch.tensor([1.0, -2.0]).double())
    assert out[0, 0] == pytest.approx(0.5)
    assert torch.isnan(out[1]).all() and torch.isnan(out[:, 1]).all()
    assert np.isfinite(float(out[0, 0]))


# --------------------------------------------------------------- minibatch_cka and the metric
def _minibatches(gen, sizes, bad=None):
    """Self-similarity minibatches of three layers; ``bad = (minibatch, layer)`` gets a NaN."""
    out = []
    for n in sizes:
        a = torch.randn(n, 6, generator=gen) + 2.0
        b = a @ torch.randn(6, 4, generator=gen) + torch.randn(n, 4, generator=gen)
        out.append([a, b, torch.randn(n, 3, 2, generator=gen)])
    if bad is not None:
        b, i = bad
        out[b][i] = out[b][i].clone()
        out[b][i][1] = float("nan")
    return out


def test_function_and_metric_agree_with_small_and_nonfinite_minibatches(gen):
    batches = _minibatches(gen, (9, 3, 12, 7), bad=(2, 1))
    with pytest.warns(UserWarning) as record:
        got = F.minibatch_cka(batches)
    messages = [str(w.message) for w in record]
    assert any("at least 4" in m for m in messages)
    assert any("non-finite" in m and "#1 (1x)" in m for m in messages)
    with pytest.warns(UserWarning) as record:
        expected = H.metric_over(batches)
    assert any("at least 4" in str(w.message) for w in record)
    assert any("non-finite" in str(w.message) and "#1 (1x)" in str(w.message) for w in record)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # ... and both follow the reference: the n=3 minibatch left out, the NaN layer per pair.
    usable = [b for b in batches if len(b[0]) >= 4]
    for i, j in np.ndindex(3, 3):
        rows = [b for b in usable if torch.isfinite(b[i]).all() and torch.isfinite(b[j]).all()]
        expected_ij = ref.minibatch_cka([[b[i]] for b in rows], [[b[j]] for b in rows])[0, 0]
        assert abs(float(got[i, j]) - expected_ij) < H.TOL32

    # Cross-similarity, with the NaN in a column layer.
    ys = _minibatches(gen, (9, 3, 12, 7), bad=(0, 2))
    for xs, y in zip(batches, ys, strict=True):
        y[0] = xs[0][:, :3] + 0.5 * y[0][:, :3]
    with H.warns("non-finite", "at least 4"):
        cross = F.minibatch_cka(batches, ys)
    with H.warns("non-finite", "at least 4"):
        torch.testing.assert_close(cross, H.metric_over(batches, ys), rtol=0, atol=0)
    assert cross.shape == (3, 3) and torch.isfinite(cross).all()


@pytest.mark.parametrize("precision", ["float64", torch.bfloat16, None])
def test_function_and_metric_agree_on_precision(gen, precision):
    batches = [[t.double() for t in b] for b in _minibatches(gen, (8, 10))]
    torch.testing.assert_close(
        F.minibatch_cka(batches, precision=precision), H.metric_over(batches, precision=precision), rtol=0, atol=0
    )


def test_function_default_precision_is_float32_like_the_metric(gen):
    batches = [[t.double() for t in b] for b in _minibatches(gen, (8, 10))]
    default = F.minibatch_cka(batches)
    assert torch.equal(default, F.minibatch_cka(batches, precision="float32"))
    assert torch.equal(default, H.metric_over(batches))
    wide = F.minibatch_cka(batches, precision=torch.float64)
    assert not torch.equal(default, wide)
    assert ref.max_abs_err(wide, ref.minibatch_cka(batches)) < H.TOL64
    assert ref.max_abs_err(default, ref.minibatch_cka(batches)) < H.TOL32


def test_function_skips_small_minibatches_instead_of_raising(gen):
    batches = _minibatches(gen, (10, 3, 8))
    with pytest.warns(UserWarning, match=r"Skipped 1 minibatch\(es\) with fewer than 4 examples \(sizes \[3\]\)"):
        got = F.minibatch_cka(batches)
    assert ref.max_abs_err(got, ref.minibatch_cka([batches[0], batches[2]])) < H.TOL32


def test_function_without_usable_minibatch_returns_nan_matrix(gen):
    with H.warns("all-NaN 3 x 3 matrix", r"Skipped 2 minibatch\(es\) with fewer than 4 examples"):
        got = F.minibatch_cka(_minibatches(gen, (3, 2)))
    assert got.shape == (3, 3) and got.dtype == torch.float64 and torch.isnan(got).all()
    xs = [[torch.full((8, 4), float("nan"))]]
    with H.warns("all-NaN 1 x 2 matrix", r"non-finite .* row layer\(s\) #0 \(1x"):
        got = F.minibatch_cka(xs, [[torch.randn(8, 2, generator=gen), torch.randn(8, 3, generator=gen)]])
    assert got.shape == (1, 2) and torch.isnan(got).all()


def test_function_rejects_inconsistent_minibatches(gen):
    batches = _minibatches(gen, (8, 8))
    with pytest.raises(ValueError, match="No minibatches"):
        F.minibatch_cka([])
    with pytest.raises(ValueError, match="3 x 3"):
        F.minibatch_cka([batches[0], batches[1][:2]])
    with pytest.raises(ValueError):
        F.minibatch_cka(batches, batches[:1])  # fewer column minibatches
    with pytest.raises(ValueError, match="same examples"):
        F.minibatch_cka(batches[:1], [[torch.randn(7, 2, generator=gen)]])
    with pytest.raises(TypeError):
        F.minibatch_cka([batches[0][0]])  # a tensor, not a list of layers
    with pytest.raises(ValueError, match="precision"):
        F.minibatch_cka(batches, precision="float16")


def test_function_accepts_an_iterator_of_minibatches(gen):
    batches = _minibatches(gen, (8, 9, 10))
    assert torch.equal(F.minibatch_cka(iter(batches)), F.minibatch_cka(batches))


def test_cka_from_sums_with_per_pair_self_sums():
    sum_xy = torch.tensor([[1.0, 0.5], [0.2, 0.3]], dtype=torch.float64)
    pair_xx = torch.tensor([[4.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    pair_yy = torch.tensor([[1.0, 1.0], [4.0, 1.0]], dtype=torch.float64)
    out = F.cka_from_sums(sum_xy, pair_xx, pair_yy)
    expected = torch.tensor([[0.5, 0.5], [0.1, float("nan")]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, equal_nan=True)
    # Vectors and their broadcast matrices give the same result.
    sxx, syy = torch.tensor([4.0, 1.0]).double(), torch.tensor([1.0, 9.0]).double()
    torch.testing.assert_close(
        F.cka_from_sums(sum_xy, sxx, syy), F.cka_from_sums(sum_xy, sxx[:, None].expand(2, 2), syy.expand(2, 2))
    )


def test_hsic1_pairwise_rejects_malformed_stacks():
    with pytest.raises(ValueError, match=r"\(L, n, n\).*\(5, 5\)"):
        F.hsic1_pairwise(torch.eye(5))
    with pytest.raises(ValueError, match=r"\(2, 5, 6\)"):
        F.hsic1_pairwise(torch.ones(2, 5, 6))
    with pytest.raises(ValueError, match=r"`?l`?.*\(5, 5\)"):
        F.hsic1_pairwise(torch.eye(5).expand(2, 5, 5), torch.eye(5))


@pytest.mark.parametrize(
    "value, expected",
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), (torch.float64, torch.float64), (None, None)],
)
def test_resolve_precision(value, expected):
    assert F.resolve_precision(value) is expected


@pytest.mark.parametrize("bad", ["float16", "fp32", 32, torch.int32, torch.float16])
def test_resolve_precision_rejects(bad):
    with pytest.raises(ValueError, match="precision"):
        F.resolve_precision(bad)
