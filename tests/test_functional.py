"""lightning_cka.functional against the independent reference in tests/reference.py."""

import numpy as np
import pytest
import reference as ref
import torch

from lightning_cka import functional as F

TOL64 = 1e-10
TOL32 = 1e-5


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
        assert _rel(float(got), expected) < TOL64


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
    assert _rel(inner, expected) < TOL64
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
    assert _rel(float(F.hsic1(k, F.gram(y))), ref.hsic1(_gram64(x), _gram64(y))) < TOL64


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
        assert _rel(float(kk[i]), ref.hsic1(ks[i], ks[i])) < TOL64
        for j in range(2):
            assert _rel(float(kl[i, j]), ref.hsic1(ks[i], ls[j])) < TOL64
    for j in range(2):
        assert _rel(float(ll[j]), ref.hsic1(ls[j], ls[j])) < TOL64

    # Self-similarity: (L, L) matrix, both self terms equal.
    kk_mat, kk1, kk2 = F.hsic1_pairwise(ks)
    assert kk_mat.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            assert _rel(float(kk_mat[i, j]), ref.hsic1(ks[i], ks[j])) < TOL64
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
    tol = TOL64 if dtype == torch.float64 else TOL32
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
    assert ref.max_abs_err(got, ref.minibatch_cka(batches_x)) < TOL32
    cross = F.minibatch_cka(batches_x, batches_y)
    assert cross.shape == (2, 1)
    assert ref.max_abs_err(cross, ref.minibatch_cka(batches_x, batches_y)) < TOL32
    with pytest.raises(ValueError):
        F.minibatch_cka([])


def test_cka_from_sums_nan_for_non_positive_self_terms():
    sum_xy = torch.tensor([[1.0, 0.5], [0.2, 0.3]], dtype=torch.float64)
    out = F.cka_from_sums(sum_xy, torch.tensor([4.0, 0.0], dtype=torch.float64), torch.tensor([1.0, -2.0]).double())
    assert out[0, 0] == pytest.approx(0.5)
    assert torch.isnan(out[1]).all() and torch.isnan(out[:, 1]).all()
    assert np.isfinite(float(out[0, 0]))
