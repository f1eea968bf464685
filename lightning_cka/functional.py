"""Pure tensor functions behind minibatch CKA (linear kernel, unbiased HSIC).

Everything here is stateless and works on any device. The data flow of the library is

    activation (n, ...) --gram--> K (n, n) --center_gram_unbiased--> K_U (n, n)
    stacked K_U's --hsic1_pairwise--> HSIC_1 for all layer pairs at once

and minibatch CKA (Nguyen, Raghu and Kornblith 2021) sums HSIC_1 over minibatches:
``S_xy / sqrt(S_xx S_yy)``. :func:`minibatch_cka` and the :class:`~lightning_cka.MinibatchCKA`
metric share the private ``_minibatch_cka_update`` / ``_minibatch_cka_compute`` helpers, so
both skip small minibatches and non-finite layers the same way.

Shapes: ``n`` examples, ``p`` features per example, ``L``/``M`` layers.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn

__all__ = [
    "MIN_EXAMPLES",
    "Precision",
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
    "resolve_precision",
]

#: Unbiased HSIC_1 is defined only for minibatches of at least this many examples.
MIN_EXAMPLES = 4

#: Names accepted for the dtype of the Gram matrix products.
Precision = Literal["float32", "bfloat16", "float64"]

_PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_precision(precision: Precision | torch.dtype | None) -> torch.dtype | None:
    """Map a Gram precision option to a dtype.

    Args:
        precision: ``"float32"``, ``"bfloat16"``, ``"float64"``, one of those dtypes, or ``None``
            (the activation dtype promoted to at least float32, see :func:`gram_dtype`).

    Raises:
        ValueError: for any other value.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import resolve_precision
        >>> resolve_precision("bfloat16")
        torch.bfloat16
        >>> resolve_precision(torch.float64)
        torch.float64
    """
    if precision is None or isinstance(precision, torch.dtype):
        if precision not in (None, *_PRECISIONS.values()):
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision}.")
        return precision
    if not isinstance(precision, str) or precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
    return _PRECISIONS[precision]


def gram_dtype(dtype: torch.dtype, precision: torch.dtype | None = None) -> torch.dtype:
    """Dtype in which :func:`gram` forms the product for ``dtype`` activations: ``precision``, or
    the activation dtype promoted to at least float32.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import gram_dtype
        >>> gram_dtype(torch.bfloat16)
        torch.float32
        >>> gram_dtype(torch.float32, torch.float64)
        torch.float64
    """
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

    Raises:
        ValueError: if ``x`` has no examples, or ``workspace`` does not fit (wrong dtype, device or
            size, or it shares memory with ``x``).

    Subtracting the per-minibatch feature mean is exact for unbiased HSIC (the unbiased
    centring removes any ``a1ᵀ + 1aᵀ`` term) and avoids catastrophic cancellation for
    activations with a large mean.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import gram
        >>> x = torch.randn(8, 3, 4)
        >>> k = gram(x)
        >>> k.shape, k.dtype
        (torch.Size([8, 8]), torch.float32)
        >>> torch.allclose(k, gram(x + 100.0), atol=1e-3)  # the feature mean does not matter
        True
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
    """A 1-D scratch tensor that :func:`gram` can reuse for activations like ``x`` (and smaller).

    Example:
        >>> import torch
        >>> from lightning_cka.functional import gram, gram_workspace
        >>> x = torch.randn(16, 10)
        >>> ws = gram_workspace(x)
        >>> ws.shape
        torch.Size([160])
        >>> torch.equal(gram(x, None, ws), gram(x))
        True
    """
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
    """Gram matrices of several layers of the same minibatch, stacked to ``(L, n, n)``.

    Args:
        xs: ``L`` activations of the same ``n`` examples, each ``(n, ...)``.
        precision: dtype of the products, as in :func:`gram`.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import grams
        >>> grams([torch.randn(6, 4), torch.randn(6, 2, 3)]).shape
        torch.Size([2, 6, 6])
    """
    return torch.stack([gram(x, precision) for x in xs])


def center_gram_unbiased(k: Tensor) -> Tensor:
    """Unbiased centring of Gram matrices (Kornblith et al.; Song et al. 2012).

    Args:
        k: ``(..., n, n)`` symmetric Gram matrices, ``n >= 4``.

    Returns:
        ``K_U`` of the same shape with ``<K_U, L_U>_F = n (n - 3) HSIC_1(K, L)``.

    Raises:
        ValueError: if ``n < 4``.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import center_gram_unbiased, gram, hsic1
        >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
        >>> k, l = gram(x), gram(y)
        >>> inner = (center_gram_unbiased(k) * center_gram_unbiased(l)).sum()
        >>> torch.allclose(inner, 6 * 3 * hsic1(k, l))
        True
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
    """Unbiased HSIC_1 of two ``(n, n)`` Gram matrices (Song et al. 2012, eq. 5), in float64.

    Raises:
        ValueError: if ``k`` and ``l`` are not square matrices of one shape, or ``n < 4``.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import gram, hsic1
        >>> k = gram(torch.randn(10, 4))
        >>> hsic1(k, k) > 0
        tensor(True)
    """
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

    Raises:
        ValueError: if a stack is not ``(L, n, n)``, the two stacks have different ``n``, or ``n < 4``.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import grams, hsic1_pairwise
        >>> x = torch.randn(12, 5)
        >>> kl, kk, ll = hsic1_pairwise(grams([x, 2 * x, torch.randn(12, 3)]), grams([x]))
        >>> kl.shape, kk.shape, ll.shape, kl.dtype
        (torch.Size([3, 1]), torch.Size([3]), torch.Size([1]), torch.float64)
    """
    n = _check_grams(k, l, ("k", "l"))
    k_u, k_energy = _centred_rows(k)
    scale = 1.0 / (n * (n - 3))
    if l is None:
        products = k_u @ k_u.T
        hsic_kk = _self_hsic(products.diagonal().clone(), k_energy, scale)
        return products * scale, hsic_kk, hsic_kk
    l_u, l_energy = _centred_rows(l)
    hsic_kk = _self_hsic(torch.linalg.vector_norm(k_u, dim=1).square(), k_energy, scale)
    hsic_ll = _self_hsic(torch.linalg.vector_norm(l_u, dim=1).square(), l_energy, scale)
    return (k_u @ l_u.T) * scale, hsic_kk, hsic_ll


def cka_from_sums(sum_xy: Tensor, sum_xx: Tensor, sum_yy: Tensor) -> Tensor:
    """Minibatch CKA ``S_xy / sqrt(S_xx S_yy)`` (Nguyen et al. 2021).

    Entries whose self-HSIC sum is not positive (constant or dead features) are NaN instead
    of an invented value.

    Args:
        sum_xy: ``(L, M)`` summed cross HSIC_1.
        sum_xx: ``(L,)`` summed self HSIC_1 of the row layers, or ``(L, M)`` with one sum per
            pair (summed over the minibatches that pair used).
        sum_yy: ``(M,)`` summed self HSIC_1 of the column layers, or ``(L, M)`` likewise.

    Returns:
        ``(L, M)`` matrix in the dtype of the sums.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import cka_from_sums
        >>> cka_from_sums(torch.tensor([[2.0, 1.0]]), torch.tensor([4.0]), torch.tensor([1.0, 0.0]))
        tensor([[1., nan]])
    """
    nan = torch.tensor(float("nan"), dtype=sum_xy.dtype, device=sum_xy.device)
    sx = torch.where(sum_xx > 0, sum_xx, nan).sqrt()
    sy = torch.where(sum_yy > 0, sum_yy, nan).sqrt()
    if sx.ndim == 1:
        sx = sx.unsqueeze(1)
    if sy.ndim == 1:
        sy = sy.unsqueeze(0)
    return sum_xy / (sx * sy)


# ----------------------------------------------------------------- minibatch CKA helpers
def _check_layers(xs: Sequence[Tensor], what: str) -> int:
    """Validate one minibatch's activations (one tensor per layer); return its ``n``."""
    if isinstance(xs, Tensor) or not isinstance(xs, Sequence) or len(xs) == 0:
        raise TypeError(f"{what} must be a non-empty sequence of tensors (one per layer), got {type(xs).__name__}.")
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor) or x.ndim < 1:
            raise TypeError(f"{what}[{i}] must be a tensor shaped (n, ...), got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"{what}[{i}] must be floating point, got {x.dtype}.")
    sizes = {x.shape[0] for x in xs}
    if len(sizes) != 1:
        raise ValueError(f"All tensors in {what} must hold the same n examples, got sizes {sorted(sizes)}.")
    return xs[0].shape[0]


def _check_grams(k: Tensor, l: Tensor | None, names: tuple[str, str]) -> int:
    """Validate stacks of Gram matrices ``(L, n, n)`` and ``(M, n, n)``; return ``n``."""
    for name, g in zip(names, (k, l), strict=True):
        if g is None:
            continue
        if not isinstance(g, Tensor):
            raise TypeError(f"{name} must be a tensor of shape (L, n, n), got {type(g).__name__}.")
        if g.ndim != 3 or g.shape[1] != g.shape[2] or g.shape[0] == 0:
            raise ValueError(
                f"{name} must be a stack of square Gram matrices of shape (L, n, n) with L >= 1 (one per layer, "
                f"e.g. lightning_cka.functional.grams(...)), got shape {tuple(g.shape)}."
            )
        if not g.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {g.dtype}.")
    if l is not None:
        if l.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"Both sets of Grams must come from the same n examples, got {names[0]} with n={k.shape[-1]} "
                f"and {names[1]} with n={l.shape[-1]}."
            )
        if l.device != k.device:
            raise ValueError(f"{names[0]} is on {k.device} but {names[1]} is on {l.device}; put both on one device.")
    return k.shape[-1]


def _zero_state(rows: int, cols: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Zeroed running states of minibatch CKA for ``rows`` x ``cols`` layers.

    ``sum_xy`` ``(L, M)``, ``sum_xx`` ``(L,)`` and ``sum_yy`` ``(M,)`` are the sums of Nguyen et al.
    2021 (each layer's self sum over the minibatches in which it was finite); ``sum_xx_pair`` and
    ``sum_yy_pair`` ``(L, M)`` are the self sums over the minibatches each pair used; then per-layer
    counts of minibatches skipped as non-finite (``nonfinite_*``, of which ``overflow_*`` had finite
    activations whose Gram overflowed) and the count of minibatches used (``num_batches``).
    Sums are float64, counts int64; all add across processes.
    """
    f64, long = torch.float64, torch.long
    return {
        "sum_xy": torch.zeros(rows, cols, dtype=f64, device=device),
        "sum_xx": torch.zeros(rows, dtype=f64, device=device),
        "sum_yy": torch.zeros(cols, dtype=f64, device=device),
        "sum_xx_pair": torch.zeros(rows, cols, dtype=f64, device=device),
        "sum_yy_pair": torch.zeros(rows, cols, dtype=f64, device=device),
        "nonfinite_x": torch.zeros(rows, dtype=long, device=device),
        "nonfinite_y": torch.zeros(cols, dtype=long, device=device),
        "overflow_x": torch.zeros(rows, dtype=long, device=device),
        "overflow_y": torch.zeros(cols, dtype=long, device=device),
        "num_batches": torch.zeros((), dtype=long, device=device),
    }


def _overflowed(k: Tensor, ok: Tensor) -> Tensor:
    """``(L,)`` mask of non-finite Grams that come from finite activations.

    The diagonal of a Gram of finite (centred) features is a sum of squares: at worst ``+inf``
    when the product overflows, never NaN. A NaN or Inf activation makes :func:`gram`'s centred
    features NaN (``inf - inf``) somewhere, and with them a diagonal entry.
    """
    return ~ok & ~k.diagonal(dim1=-2, dim2=-1).isnan().any(dim=-1)


def _minibatch_cka_update(k: Tensor, l: Tensor | None = None) -> dict[str, Tensor]:
    """Contributions of one minibatch (``n >= 4``) to each state of :func:`_zero_state`.

    A layer whose Gram (hence self-HSIC) is not finite is left out of this minibatch on its own:
    pair ``(i, j)`` takes the minibatch only when layers ``i`` and ``j`` are both finite in it, and
    so do the pair's self sums ``sum_xx_pair``/``sum_yy_pair``. Masks only, no host sync.

    Args:
        k: ``(L, n, n)`` Grams of the row layers.
        l: ``(M, n, n)`` Grams of the column layers, or ``None`` for self-similarity.

    Returns:
        dict of the per-minibatch terms, keyed and shaped like :func:`_zero_state`.
    """
    hsic_xy, hsic_xx, hsic_yy = hsic1_pairwise(k, l)
    ok_x = torch.isfinite(hsic_xx)
    overflow_x = _overflowed(k, ok_x)
    if l is None:
        ok_y, overflow_y = ok_x, overflow_x
    else:
        ok_y = torch.isfinite(hsic_yy)
        overflow_y = _overflowed(l, ok_y)
    pair = ok_x.unsqueeze(1) & ok_y.unsqueeze(0)
    zero = hsic_xy.new_zeros(())
    hsic_xx = torch.where(ok_x, hsic_xx, zero)
    hsic_yy = torch.where(ok_y, hsic_yy, zero)
    return {
        "sum_xy": torch.where(pair, hsic_xy, zero),
        "sum_xx": hsic_xx,
        "sum_yy": hsic_yy,
        "sum_xx_pair": torch.where(pair, hsic_xx.unsqueeze(1), zero),
        "sum_yy_pair": torch.where(pair, hsic_yy.unsqueeze(0), zero),
        "nonfinite_x": (~ok_x).long(),
        "nonfinite_y": (~ok_y).long(),
        "overflow_x": overflow_x.long(),
        "overflow_y": overflow_y.long(),
        "num_batches": pair.any().long(),
    }


_SMALL_ADVICE = (
    f"minibatch CKA needs at least {MIN_EXAMPLES} examples per minibatch (use a larger batch size or drop_last=True)"
)


def _layer_list(names: Sequence[str] | None, idx: Iterable[int]) -> list[str]:
    return [repr(names[i]) if names is not None else f"#{i}" for i in idx]


def _warn_skipped_layers(state: Mapping[str, Tensor], axis: str, names: Sequence[str] | None) -> None:
    """Name the layers left out of some minibatches for non-finite values or Gram overflow."""
    suffix = "x" if axis == "row" else "y"
    nonfinite = state[f"nonfinite_{suffix}"].tolist()
    overflow = state[f"overflow_{suffix}"].tolist()
    empty = (state[f"sum_{suffix}{suffix}"] <= 0).tolist()
    label = _layer_list(names, range(len(nonfinite)))

    def detail(i: int, count: int) -> str:
        return f"{label[i]} ({count}x{'; its row and column are NaN' if empty[i] else ''})"

    bad = [detail(i, c - o) for i, (c, o) in enumerate(zip(nonfinite, overflow, strict=True)) if c > o]
    if bad:
        rank_zero_warn(
            f"Skipped minibatches with non-finite activations (NaN/Inf) in {axis} layer(s) {', '.join(bad)}; "
            "each CKA value of such a layer uses only the minibatches in which both of its layers were finite.",
            UserWarning,
        )
    over = [detail(i, o) for i, o in enumerate(overflow) if o > 0]
    if over:
        rank_zero_warn(
            f"Gram matrices overflowed in {axis} layer(s) {', '.join(over)}: the activations are finite but the "
            'products of their features exceed the range of the Gram dtype. Use precision="float64" (or scale the '
            "activations down); those minibatches were skipped for these layers.",
            UserWarning,
        )


def _minibatch_cka_compute(
    state: Mapping[str, Tensor],
    cross: bool,
    layer_names: Sequence[str] | None = None,
    other_layer_names: Sequence[str] | None = None,
) -> Tensor:
    """The ``(L, M)`` CKA matrix from the states of :func:`_zero_state`, with the warnings.

    Entry ``(i, j)`` is minibatch CKA over the minibatches in which both layers were finite:
    ``sum_xy / sqrt(sum_xx_pair * sum_yy_pair)``. Host syncs (for the warnings) happen here only.
    """
    _warn_skipped_layers(state, "row", layer_names)
    if cross:
        _warn_skipped_layers(state, "column", other_layer_names)
    rows, cols = state["sum_xy"].shape
    usable = int(state["num_batches"])
    if usable == 0:
        returned = (
            f"an all-NaN {rows} x {cols} matrix"
            if rows
            else "an empty 0 x 0 matrix, as the number of layers is not known yet (pass num_layers)"
        )
        rank_zero_warn(
            f"Minibatch CKA was computed without any usable minibatch (each needs at least {MIN_EXAMPLES} examples "
            f"and finite activations); returning {returned}.",
            UserWarning,
        )
    result = cka_from_sums(state["sum_xy"], state["sum_xx_pair"], state["sum_yy_pair"])
    if usable:
        _warn_degenerate(state["sum_xx"], state["nonfinite_x"], layer_names, "row")
        if cross:
            _warn_degenerate(state["sum_yy"], state["nonfinite_y"], other_layer_names, "column")
    return result


def _warn_degenerate(sums: Tensor, nonfinite: Tensor, names: Sequence[str] | None, axis: str) -> None:
    # Layers that were ever non-finite are named by _warn_skipped_layers instead.
    bad = [i for i, (s, c) in enumerate(zip(sums.tolist(), nonfinite.tolist(), strict=True)) if not s > 0 and c == 0]
    if bad:
        rank_zero_warn(
            f"CKA is undefined for {axis} layer(s) {', '.join(_layer_list(names, bad))}: their self-HSIC is not "
            "positive (constant or dead features, or too few examples). Their entries are NaN.",
            UserWarning,
        )


def minibatch_cka(
    batches_x: Iterable[Sequence[Tensor]],
    batches_y: Iterable[Sequence[Tensor]] | None = None,
    precision: Precision | torch.dtype | None = "float32",
) -> Tensor:
    """Minibatch CKA over minibatches (Nguyen et al. 2021), the functional twin of
    :class:`~lightning_cka.MinibatchCKA`.

    Minibatches with fewer than 4 examples are skipped with a warning; a layer with non-finite
    activations (or an overflowing Gram) in a minibatch is left out of that minibatch for its own
    row and column only, and named in a warning. Entry ``(i, j)`` is minibatch CKA over the
    minibatches in which layers ``i`` and ``j`` were both finite.

    Args:
        batches_x: per minibatch, the activations of the ``L`` row layers, each ``(n, ...)``.
        batches_y: per minibatch, the activations of the ``M`` column layers (the same examples),
            or ``None`` for the ``L x L`` self-similarity.
        precision: dtype of the Gram products, as for the metric: ``"float32"`` (default),
            ``"bfloat16"``, ``"float64"``, a dtype, or ``None`` (activation dtype, at least float32).

    Returns:
        ``(L, M)`` float64 matrix; all NaN (with a warning) when no minibatch was usable.

    Raises:
        ValueError: if no minibatch is given, ``batches_y`` has a different number of minibatches,
            the number of layers changes between minibatches, or a minibatch's layers hold different
            numbers of examples; or for an invalid ``precision``.
        TypeError: if a minibatch is not a sequence of floating point tensors.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import minibatch_cka
        >>> batches = [[x, 2 * x + 1] for x in torch.randn(3, 16, 8)]
        >>> cka = minibatch_cka(batches)
        >>> cka.shape, cka.dtype
        (torch.Size([2, 2]), torch.float64)
        >>> torch.allclose(cka, torch.ones(2, 2, dtype=torch.float64))
        True
    """
    dtype = resolve_precision(precision)
    if batches_y is None:
        pairs: Iterable[tuple[Sequence[Tensor], Sequence[Tensor] | None]] = ((xs, None) for xs in batches_x)
    else:
        pairs = zip(batches_x, batches_y, strict=True)
    state: dict[str, Tensor] | None = None
    shape: tuple[int, int] = (0, 0)
    small: list[int] = []
    for i, (xs, ys) in enumerate(pairs):
        n = _check_layers(xs, f"batches_x[{i}]")
        if ys is not None and _check_layers(ys, f"batches_y[{i}]") != n:
            raise ValueError(
                f"batches_x[{i}] and batches_y[{i}] must hold the same examples; got n={n} and n={len(ys[0])}."
            )
        got = (len(xs), len(xs) if ys is None else len(ys))
        if state is None:
            shape, state = got, _zero_state(*got, device=xs[0].device)
        elif got != shape:
            raise ValueError(f"Minibatch {i} has {got[0]} x {got[1]} layers, the first had {shape[0]} x {shape[1]}.")
        if n < MIN_EXAMPLES:
            small.append(n)
            continue
        terms = _minibatch_cka_update(grams(xs, dtype), None if ys is None else grams(ys, dtype))
        state = {name: value + terms[name] for name, value in state.items()}
    if state is None:
        raise ValueError("No minibatches given.")
    if small:
        rank_zero_warn(
            f"Skipped {len(small)} minibatch(es) with fewer than {MIN_EXAMPLES} examples (sizes {small}): "
            f"{_SMALL_ADVICE}.",
            UserWarning,
        )
    return _minibatch_cka_compute(state, cross=batches_y is not None)


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = False) -> Tensor:
    """Full-batch linear CKA of two activations of the same ``n`` examples (Kornblith et al. 2019).

    Args:
        x: ``(n, ...)`` activations, flattened to ``(n, p)``.
        y: ``(n, ...)`` activations, flattened to ``(n, q)``.
        unbiased: use unbiased HSIC_1 (needs ``n >= 4``) instead of the biased
            ``tr(KHLH) / (n - 1)^2`` estimator.

    Returns:
        scalar float64 tensor in ``[0, 1]`` (biased) or roughly so (unbiased).

    Raises:
        ValueError: if ``x`` and ``y`` hold different numbers of examples, or ``unbiased`` with ``n < 4``.

    Example:
        >>> import torch
        >>> from lightning_cka.functional import linear_cka
        >>> x = torch.randn(20, 6)
        >>> q, _ = torch.linalg.qr(torch.randn(6, 6))
        >>> torch.allclose(linear_cka(x, 3 * x @ q), torch.tensor(1.0, dtype=torch.float64))
        True
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
