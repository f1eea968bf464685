"""Independent float64 reference implementation of the CKA formulas.

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited")
with the unbiased HSIC estimator HSIC_1 (Song et al. 2012, "Feature Selection via Dependence
Maximization", eq. 5), summed over minibatches as minibatch CKA (Nguyen et al. 2021, "Do Wide
and Deep Networks Learn the Same Things?").

Written from the formulas only, with NumPy and explicit sums/traces, deliberately *not* using
the library's code path (no mean-centring of features, no ``K_U`` trick, no batched products).
Every function accepts torch tensors or NumPy arrays and returns Python floats / NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

DTYPE = np.float64


def as_matrix(x: Any, dtype: Any = DTYPE) -> np.ndarray:
    """Activation ``(n, ...)`` -> ``(n, p)`` array in ``dtype`` (bf16/fp16 upcast exactly)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).cpu().numpy()
    x = np.asarray(x, dtype=dtype)
    return x.reshape(x.shape[0], -1)


def gram(x: Any, dtype: Any = DTYPE) -> np.ndarray:
    """Plain linear Gram matrix ``K = X Xᵀ`` (no centring)."""
    m = as_matrix(x, dtype)
    return m @ m.T


def hsic1(k: Any, l: Any, dtype: Any = DTYPE) -> float:
    """Unbiased HSIC_1, literally Song et al. 2012 eq. 5.

    HSIC_1 = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - (2/(n-2)) 1ᵀK̃L̃1] / (n(n-3)),
    with K̃, L̃ the Grams with zeroed diagonals.
    """
    k = np.array(k.detach().double().cpu().numpy() if isinstance(k, torch.Tensor) else k, dtype=dtype)
    l = np.array(l.detach().double().cpu().numpy() if isinstance(l, torch.Tensor) else l, dtype=dtype)
    n = k.shape[0]
    assert k.shape == l.shape == (n, n)
    if n < 4:
        raise ValueError("HSIC_1 needs n >= 4")
    kt = k.copy()
    lt = l.copy()
    for i in range(n):
        kt[i, i] = 0
        lt[i, i] = 0
    ones = np.ones(n, dtype=dtype)
    trace_kl = np.trace(kt @ lt)
    sum_k = ones @ kt @ ones
    sum_l = ones @ lt @ ones
    one_kl_one = ones @ kt @ lt @ ones
    value = trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_kl_one
    return float(value / (n * (n - 3)))


def hsic_biased(k: Any, l: Any, dtype: Any = DTYPE) -> float:
    """Biased HSIC (Gretton 2005): tr(K H L H) / (n-1)^2 with explicit H = I - 11ᵀ/n."""
    k = np.asarray(k, dtype=dtype)
    l = np.asarray(l, dtype=dtype)
    n = k.shape[0]
    h = np.eye(n, dtype=dtype) - np.ones((n, n), dtype=dtype) / n
    return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)


def linear_cka(x: Any, y: Any, unbiased: bool = False, dtype: Any = DTYPE) -> float:
    """Full-batch linear CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    k, l = gram(x, dtype), gram(y, dtype)
    hsic = hsic1 if unbiased else hsic_biased
    return float(hsic(k, l, dtype) / np.sqrt(hsic(k, k, dtype) * hsic(l, l, dtype)))


def minibatch_cka(
    batches_x: Sequence[Sequence[Any]],
    batches_y: Sequence[Sequence[Any]] | None = None,
    dtype: Any = DTYPE,
) -> np.ndarray:
    """Minibatch CKA (Nguyen et al. 2021) over a list of minibatches.

    ``batches_x[i]`` holds the L row-layer activations of minibatch i, ``batches_y[i]`` the M
    column-layer activations (``None``: self-similarity). Returns the ``(L, M)`` matrix
    ``Σ_i HSIC_1(K_i, L_i) / sqrt(Σ_i HSIC_1(K_i, K_i) · Σ_i HSIC_1(L_i, L_i))``; entries whose
    self-HSIC sum is not positive are NaN.
    """
    if batches_y is None:
        batches_y = batches_x
    assert len(batches_x) == len(batches_y) and len(batches_x) > 0
    num_rows, num_cols = len(batches_x[0]), len(batches_y[0])
    s_xy = np.zeros((num_rows, num_cols), dtype=dtype)
    s_xx = np.zeros(num_rows, dtype=dtype)
    s_yy = np.zeros(num_cols, dtype=dtype)
    for xs, ys in zip(batches_x, batches_y, strict=True):
        ks = [gram(x, dtype) for x in xs]
        ls = [gram(y, dtype) for y in ys]
        for i, k in enumerate(ks):
            s_xx[i] += hsic1(k, k, dtype)
            for j, l in enumerate(ls):
                s_xy[i, j] += hsic1(k, l, dtype)
        for j, l in enumerate(ls):
            s_yy[j] += hsic1(l, l, dtype)
    out = np.full((num_rows, num_cols), np.nan, dtype=np.float64)
    for i in range(num_rows):
        for j in range(num_cols):
            if s_xx[i] > 0 and s_yy[j] > 0:
                out[i, j] = float(s_xy[i, j] / np.sqrt(s_xx[i] * s_yy[j]))
    return out


def _integer_gram(x: Any) -> np.ndarray:
    """Exact Gram of integer-valued activations, as an object array of Python ints."""
    m = as_matrix(x)
    if not np.array_equal(m, np.round(m)) or np.abs(m).max() > 2**20:
        raise ValueError("exact reference needs integer-valued activations of moderate size")
    mi = m.astype(np.int64)
    assert (mi.shape[1] * int(np.abs(mi).max()) ** 2) < 2**62, "int64 Gram would overflow"
    return (mi @ mi.T).astype(object)


def hsic1_exact(k: np.ndarray, l: np.ndarray) -> Fraction:
    """Song et al. eq. 5 in exact rational arithmetic, for integer Gram matrices."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    for i in range(n):
        kt[i, i] = 0
        lt[i, i] = 0
    trace_kl = int((kt * lt.T).sum())  # tr(AB) = sum_ij A_ij B_ji
    sum_k, sum_l = int(kt.sum()), int(lt.sum())
    one_kl_one = int(kt.sum(axis=0) @ lt.sum(axis=1))  # (1ᵀK̃)(L̃1)
    value = Fraction(trace_kl) + Fraction(sum_k * sum_l, (n - 1) * (n - 2)) - Fraction(2 * one_kl_one, n - 2)
    return value / (n * (n - 3))


def minibatch_cka_exact(batches_x: Sequence[Sequence[Any]], batches_y: Sequence[Sequence[Any]] | None = None):
    """:func:`minibatch_cka` in exact arithmetic (only the final square root is rounded).

    For activations with a large mean, even float64 loses digits in the literal formula: its
    terms are large and nearly cancel (HSIC_1 of uncentred Grams grows with the squared mean
    while the result does not); this variant needs integer-valued activations (scale
    dyadic values by a power of two first: CKA is scale invariant).
    """
    if batches_y is None:
        batches_y = batches_x
    num_rows, num_cols = len(batches_x[0]), len(batches_y[0])
    s_xy = [[Fraction(0)] * num_cols for _ in range(num_rows)]
    s_xx = [Fraction(0)] * num_rows
    s_yy = [Fraction(0)] * num_cols
    for xs, ys in zip(batches_x, batches_y, strict=True):
        ks = [_integer_gram(x) for x in xs]
        ls = [_integer_gram(y) for y in ys]
        for i, k in enumerate(ks):
            s_xx[i] += hsic1_exact(k, k)
            for j, l in enumerate(ls):
                s_xy[i][j] += hsic1_exact(k, l)
        for j, l in enumerate(ls):
            s_yy[j] += hsic1_exact(l, l)
    out = np.full((num_rows, num_cols), np.nan)
    for i in range(num_rows):
        for j in range(num_cols):
            if s_xx[i] > 0 and s_yy[j] > 0:
                ratio = s_xy[i][j] ** 2 / (s_xx[i] * s_yy[j])  # exact CKA², then one rounding
                out[i, j] = np.sign(float(s_xy[i][j])) * np.sqrt(float(ratio))
    return out


def max_abs_err(actual: Any, expected: Any) -> float:
    """Largest absolute difference (NaNs must coincide)."""
    a = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, float)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"NaN pattern differs:\n{a}\n{e}"
    mask = ~np.isnan(e)
    return float(np.max(np.abs(a[mask] - e[mask]), initial=0.0))
