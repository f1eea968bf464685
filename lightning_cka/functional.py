"""Pure tensor functions behind minibatch CKA (linear kernel, unbiased HSIC).

Everything here is stateless and works on any device. The data flow of the library is

    activation (n, ...) --gram--> K (n, n) --center_gram_unbiased--> K_U (n, n)
    stacked K_U's --hsic1_pairwise--> HSIC_1 for all layer pairs at once

and the :class:`~lightning_cka.MinibatchCKA` metric only adds the three running sums
of REFERENCE.md section 2 on top.

Shapes: ``n`` examples, ``p`` features per example, ``L``/``M`` layers.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "MIN_EXAMPLES",
    "center_gram_unbiased",
    "cka_from_sums",
    "gram",
    "gram_dtype",
    "gram_workspace",
    "grams",
    "hsic1",
    "hsic1_pairwise",
    "linear_cka",
    "minibatch_cka",
]

#: Unbiased HSIC_1 is defined only for minibatches of at least this many examples.
MIN_EXAMPLES = 4


def gram_dtype(dtype: torch.dtype, precision: torch.dtype | None = None) -> torch.dtype:
    """Dtype in which :func:`gram` forms the product for ``dtype`` activations: ``precision``, or
    the activation dtype promoted to at least float32."""
    if precision is not None:
        return precision
    return torch.promote_types(dtype, torch.float32)


def gram(x: Tensor, precision: torch.dtype | None = None, workspace: Tensor | None = None) -> Tensor:
    """Linear-kernel Gram matrix of one layer's minibatch activations.

    Args:
        x: activations of shape ``(n, ...)``; flattened to ``(n, p)``.
        precision: dtype of the matrix product. ``None`` uses the input dtype promoted to
            at least float32 (bf16/fp16 activations are upcast).
        workspace: optional 1-D scratch tensor of the product dtype and ``x``'s device with at
            least ``x.numel()`` elements, reused for the centred copy of ``x`` (see
            :func:`gram_workspace`); without it that copy is allocated for every call.

    Returns:
        ``(n, n)`` Gram matrix ``X_c X_cᵀ`` of the mean-centred features, in float32 or
        wider (a bfloat16 product is returned as float32).

    Subtracting the per-minibatch feature mean is exact for unbiased HSIC (the unbiased
    centring removes any ``a1ᵀ + 1aᵀ`` term) and avoids catastrophic cancellation for
    activations with a large mean.
    """
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"Expected activations of shape (n, ...) with n > 0, got {tuple(x.shape)}.")
    work_dtype = gram_dtype(x.dtype, precision)
    centred = _centred(x, _scratch(workspace, x, work_dtype))
    if work_dtype in (torch.bfloat16, torch.float16) and centred.is_cuda:
        # Keep the float32 accumulator instead of rounding the Gram to 16 bits (torch >= 2.8).
        with contextlib.suppress(TypeError, RuntimeError):
            return torch.mm(centred, centred.T, out_dtype=torch.float32)
    product = _symmetric_product(centred) if centred.device.type == "cpu" else centred @ centred.T
    return product.to(torch.promote_types(work_dtype, torch.float32))


def gram_workspace(x: Tensor, precision: torch.dtype | None = None) -> Tensor:
    """A scratch tensor that :func:`gram` can reuse for activations like ``x`` (and smaller)."""
    return torch.empty(x.numel(), dtype=gram_dtype(x.dtype, precision), device=x.device)


def _scratch(workspace: Tensor | None, x: Tensor, dtype: torch.dtype) -> Tensor:
    """An ``(n, p)`` tensor of ``dtype`` for the centred copy of ``x``: a view of ``workspace``
    or a new allocation."""
    shape = torch.Size((x.shape[0], x[0].numel()))
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=x.device)
    numel = shape.numel()
    if workspace.dtype != dtype or workspace.device != x.device or workspace.numel() < numel:
        raise ValueError(
            f"workspace must be a {dtype} tensor on {x.device} with at least {numel} elements, got a "
            f"{workspace.dtype} tensor on {workspace.device} with {workspace.numel()}; use gram_workspace()."
        )
    if workspace.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError("workspace shares memory with the activations it would overwrite; pass a separate tensor.")
    return workspace.view(-1)[:numel].view(shape)


def _centred(x: Tensor, out: Tensor) -> Tensor:
    """``out`` = the ``(n, p)`` features of ``x`` minus their mean over the minibatch, centred in
    the wider of ``x.dtype`` and ``out.dtype`` and rounded at most once.

    Any shift shared by all rows is exact for HSIC_1, so the mean only has to be close: a GEMV
    with 1/n, far faster on CPU than a column reduction. No activation-sized temporary is made:
    an input narrower than ``out`` (bf16 activations, float32 product) or not laid out as
    ``(n, p)`` is converted into ``out`` first and centred in place; an input wider than ``out``
    (float32 activations, bf16 product) is centred in cache-sized pieces.
    """
    n = x.shape[0]
    ones = torch.full((1, n), 1.0 / n, dtype=torch.promote_types(x.dtype, out.dtype), device=x.device)
    if x.dtype == out.dtype and x.is_contiguous():
        flat = x.view(n, -1)
        return torch.sub(flat, ones @ flat, out=out)
    if torch.promote_types(x.dtype, out.dtype) == out.dtype:
        out.view(x.shape).copy_(x)
        return out.sub_(ones @ out)
    flat = x.reshape(n, -1)
    mean = ones @ flat
    if not flat.is_cpu:
        return torch.sub(flat, mean, out=out)  # CUDA's caching allocator recycles the temporary
    for rows, cols in _pieces(n, flat.shape[1], flat.element_size()):
        if cols is None:
            torch.sub(flat[rows], mean, out=out[rows])
        else:
            torch.sub(flat[:, cols], mean[:, cols], out=out[:, cols])
    return out


#: Size of one piece (bytes of its temporary) when centring rounds to a narrower dtype on CPU.
_CHUNK_BYTES = 1 << 21


def _pieces(n: int, p: int, itemsize: int) -> list[tuple[slice, None] | tuple[None, slice]]:
    """``(rows, None)`` blocks of about ``_CHUNK_BYTES``, or ``(None, columns)`` blocks of all
    rows when one row is larger than that."""
    budget = max(1, _CHUNK_BYTES // itemsize)
    if p <= budget:
        step = max(1, budget // max(1, p))
        return [(slice(r, r + step), None) for r in range(0, n, step)]
    step = max(1, budget // n)
    return [(None, slice(c, c + step)) for c in range(0, p, step)]


def _symmetric_product(f: Tensor, blocks: int = 4) -> Tensor:
    """``f @ f.T`` from its lower block triangle only, mirrored: 10/16 of the multiply-adds
    for 4 blocks. Used on CPU, where the GEMM is compute-bound; a GPU keeps one GEMM.

    Column block ``j`` is ``f[a_j:] @ f[a_j:b_j].T`` (tall and narrow, which CPU GEMMs run faster
    than wide row blocks), with block edges on multiples of 16 rows.
    """
    n = f.shape[0]
    if n < 32 * blocks:
        return f @ f.T
    k = torch.empty(n, n, dtype=f.dtype, device=f.device)
    edges = sorted({min(n, 16 * round(i * n / blocks / 16)) for i in range(blocks)} | {n})
    for start, stop in itertools.pairwise(edges):
        torch.mm(f[start:], f[start:stop].T, out=k[start:, start:stop])
    lower = k.tril()
    return lower + lower.tril(-1).T


def grams(xs: Sequence[Tensor], precision: torch.dtype | None = None) -> Tensor:
    """Gram matrices of several layers of the same minibatch, stacked to ``(L, n, n)``."""
    return torch.stack([gram(x, precision) for x in xs])


def center_gram_unbiased(k: Tensor) -> Tensor:
    """Unbiased centring of Gram matrices (Kornblith et al.; Song et al. 2012).

    Args:
        k: ``(..., n, n)`` symmetric Gram matrices, ``n >= 4``.

    Returns:
        ``K_U`` of the same shape with ``<K_U, L_U>_F = n (n - 3) HSIC_1(K, L)``.
    """
    _check_examples(k.shape[-1])
    return _center_unbiased_(k.clone())


def _check_examples(n: int) -> None:
    if n < MIN_EXAMPLES:
        raise ValueError(f"Unbiased HSIC needs at least {MIN_EXAMPLES} examples, got n={n}.")


def _center_unbiased_(k: Tensor) -> Tensor:
    """In-place :func:`center_gram_unbiased` of a tensor the caller owns."""
    n = k.shape[-1]
    diagonal = k.diagonal(dim1=-2, dim2=-1)
    diagonal.zero_()
    means = k.sum(dim=-1) / (n - 2)
    means -= means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    k -= means.unsqueeze(-1)
    k -= means.unsqueeze(-2)
    diagonal.zero_()
    return k


#: A Gram whose centred energy ||K_U||^2 is below this fraction of ||K||^2 is rounding noise
#: (a constant or dead layer); its self-HSIC is reported as 0 so that CKA is undefined.
_NOISE_FLOOR = 1e-10


def _centred_rows(k: Tensor) -> tuple[Tensor, Tensor]:
    """Flattened float64 ``K_U`` ``(L, n*n)`` and the energies ``||K||_F^2`` ``(L,)``."""
    _check_examples(k.shape[-1])
    k64 = k.to(torch.float64, copy=True)
    energy = torch.linalg.vector_norm(k64.flatten(1), dim=1).square()
    return _center_unbiased_(k64).flatten(1), energy


def _self_hsic(k_u_sq: Tensor, energy: Tensor, scale: float) -> Tensor:
    noise = torch.isfinite(energy) & (k_u_sq <= _NOISE_FLOOR * energy)  # NaN/Inf pass through
    return torch.where(noise, torch.zeros_like(k_u_sq), k_u_sq) * scale


def hsic1(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC_1 of two ``(n, n)`` Gram matrices (Song et al. 2012, eq. 5)."""
    if k.shape != l.shape or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(
            f"Expected two square Gram matrices of equal shape, got {tuple(k.shape)} and {tuple(l.shape)}."
        )
    n = k.shape[0]
    k_u, l_u = center_gram_unbiased(k.double()), center_gram_unbiased(l.double())
    return (k_u * l_u).sum() / (n * (n - 3))


def hsic1_pairwise(k: Tensor, l: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Unbiased HSIC_1 for every pair of layers of one minibatch, in float64.

    Args:
        k: ``(L, n, n)`` Gram matrices of the first set of layers.
        l: ``(M, n, n)`` Gram matrices of the second set, or ``None`` for self-similarity.

    Returns:
        ``(hsic_kl, hsic_kk, hsic_ll)`` of shapes ``(L, M)``, ``(L,)``, ``(M,)``. All pairs are
        one matrix product of the flattened, centred Grams. A self-HSIC that is only rounding
        noise (a constant layer) is returned as exactly 0.
    """
    n = k.shape[-1]
    k_u, k_energy = _centred_rows(k)
    scale = 1.0 / (n * (n - 3))
    if l is None:
        products = k_u @ k_u.T
        hsic_kk = _self_hsic(products.diagonal().clone(), k_energy, scale)
        return products * scale, hsic_kk, hsic_kk
    if l.shape[-1] != n:
        raise ValueError(f"Both sets of Grams must come from the same n examples, got n={n} and n={l.shape[-1]}.")
    l_u, l_energy = _centred_rows(l)
    hsic_kk = _self_hsic(torch.linalg.vector_norm(k_u, dim=1).square(), k_energy, scale)
    hsic_ll = _self_hsic(torch.linalg.vector_norm(l_u, dim=1).square(), l_energy, scale)
    return (k_u @ l_u.T) * scale, hsic_kk, hsic_ll


def cka_from_sums(sum_xy: Tensor, sum_xx: Tensor, sum_yy: Tensor) -> Tensor:
    """Minibatch CKA ``S_xy / sqrt(S_xx S_yy)`` (Nguyen et al. 2021).

    Layers whose self-HSIC sum is not positive (constant or dead features) get NaN in
    their row or column instead of an invented value.

    Args:
        sum_xy: ``(L, M)`` summed cross HSIC_1.
        sum_xx: ``(L,)`` summed self HSIC_1 of the row layers.
        sum_yy: ``(M,)`` summed self HSIC_1 of the column layers.
    """
    nan = torch.tensor(float("nan"), dtype=sum_xy.dtype, device=sum_xy.device)
    sx = torch.where(sum_xx > 0, sum_xx, nan).sqrt()
    sy = torch.where(sum_yy > 0, sum_yy, nan).sqrt()
    return sum_xy / (sx.unsqueeze(1) * sy.unsqueeze(0))


def minibatch_cka(
    batches_x: Sequence[Sequence[Tensor]],
    batches_y: Sequence[Sequence[Tensor]] | None = None,
    precision: torch.dtype | None = None,
) -> Tensor:
    """Minibatch CKA over an iterable of minibatches, without the metric's bookkeeping.

    Args:
        batches_x: per minibatch, the activations of the L row layers.
        batches_y: per minibatch, the activations of the M column layers, or ``None``.

    Returns:
        ``(L, M)`` float64 matrix.
    """
    sums: tuple[Tensor, Tensor, Tensor] | None = None
    for i, xs in enumerate(batches_x):
        k = grams(xs, precision)
        ls = None if batches_y is None else grams(batches_y[i], precision)
        parts = hsic1_pairwise(k, ls)
        sums = parts if sums is None else tuple(s + p for s, p in zip(sums, parts, strict=True))  # type: ignore[assignment]
    if sums is None:
        raise ValueError("No minibatches given.")
    return cka_from_sums(*sums)


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = False) -> Tensor:
    """Full-batch linear CKA of two activations of the same ``n`` examples (Kornblith et al. 2019).

    Args:
        x: ``(n, ...)`` activations, flattened to ``(n, p)``.
        y: ``(n, ...)`` activations, flattened to ``(n, q)``.
        unbiased: use unbiased HSIC_1 (needs ``n >= 4``) instead of the biased
            ``tr(KHLH) / (n - 1)^2`` estimator.

    Returns:
        scalar float64 tensor in ``[0, 1]`` (biased) or roughly so (unbiased).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples, got n={x.shape[0]} and n={y.shape[0]}.")
    x64 = x.reshape(x.shape[0], -1).double()
    y64 = y.reshape(y.shape[0], -1).double()
    k, l = gram(x64), gram(y64)
    if unbiased:
        hsic_xy, hsic_xx, hsic_yy = hsic1_pairwise(k.unsqueeze(0), l.unsqueeze(0))
        return cka_from_sums(hsic_xy, hsic_xx, hsic_yy)[0, 0]
    # Features are already mean-centred, so K and L are H K H and H L H.
    return (k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum())
