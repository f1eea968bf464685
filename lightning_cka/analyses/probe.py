"""Per-layer linear probes: held-out accuracy of a closed-form linear classifier on each layer.

Raghu et al. 2021 (linear-probe section and appendix) fit a linear probe on each block's
representation, either the class token or the average over tokens, "in closed form": ridge
regression to one-hot labels, predicted class = argmax. A CLS-trained ViT's class-token probes
are good only near the top, while token-average probes are good throughout.

What is measured, per layer of the callback (``context.layers``) and per *pool*:

- ViT token activations ``(n, T, C)`` (a layer inside a backbone with ``is_vit``): ``"cls"``
  (token 0, only when the backbone has a class token) and ``"mean"`` (average over the patch
  tokens, after the ``num_prefix_tokens`` class/register tokens);
- convolutional ``(n, C, H, W)`` activations: ``"mean"`` (global average pool);
- ``(n, C)`` activations: ``"mean"`` is the activation itself (one name for "the layer's
  vector" whatever the architecture); other 3-D activations: ``"mean"`` over dim 1.

Pooling happens inside the forward hook, so in-place operations after the module cannot change
what is recorded. Pooled features wider than ``probe_dim`` are multiplied by a fixed random
Gaussian projection ``(C, probe_dim)`` (entries ``N(0, 1 / probe_dim)``, seeded by ``seed`` and
the layer name). The first ``max_examples`` examples are kept (the last batch is truncated),
as float32 on the model's device: ``max_examples x sum over layers of pools x min(C, probe_dim)``
floats.

The probe (:func:`_fit_probes`), per layer and pool, on ``N`` examples with integer labels
(the number of classes, for chance, is the largest label + 1; the one-hot targets are the
classes present):

1. examples are split into ``folds`` folds, stratified by class (a seeded permutation, then
   round robin within each class), so every example is scored exactly once, by a probe that
   was not fitted on it;
2. on each training fold the features are centred and divided by one scalar, the RMS of the
   centred training features (so the ridge strengths are relative to the features' scale and
   an affine rescaling of a layer changes nothing); the one-hot targets are centred, so the
   bias is fitted and not penalised;
3. the ridge strength is chosen from ``ridge_grid`` by exact leave-one-out on the training fold
   (the closed form ``(y_i - yhat_i) / (1 - h_ii)``, smallest squared error summed over
   examples and classes, as scikit-learn's ``RidgeCV``); ties go to the smallest strength;
4. the probe ``W = (X'X + alpha I)^-1 X'Y`` is fitted on the whole training fold and scores the
   held-out fold (predicted class = argmax); the reported accuracy is the fraction of all
   ``N`` examples classified correctly. Features that are not finite give NaN.

Solves are float32 (eigendecomposition of the ``p x p`` training covariance, ``p <= probe_dim``),
on the features' device. Cost per layer and pool and fold: about ``2 n p^2 + 10 p^3`` flops plus
``n p K`` per ridge strength (``n`` training examples, ``K`` classes); sets of one width are
solved batched.

Under DDP the pooled features and labels of every rank are gathered (padded to
``max_examples`` rows, then the padding dropped), so every rank fits the same probes on the same
examples, in rank order, as a single process would; ``max_examples`` caps each rank, and each
rank holds ``world_size`` times its own features while fitting.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_cka.analyses.base import Analysis, AnalysisSkipped, MeasuredBatch, Report, SetupContext
from lightning_cka.capture import HookSet, OutputSelector, extract_input, select_output
from lightning_cka.layers import LayerSpec, backbone_of, hook_points

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["RIDGE_GRID", "LinearProbe", "ProbeResult", "linear_probe"]

#: Default ridge strengths (relative to the features' scale, see the module docstring).
RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

_POOL_ORDER = ("cls", "mean")
# Elements (floats) of one batched feature block in the solver; bounds its memory (~64 MiB a copy).
_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- options
def _check_options(
    label_key: Any, max_examples: Any, folds: Any, probe_dim: Any, ridge_grid: Any, seed: Any
) -> tuple[float, ...]:
    """Validate the probe options (ValueError naming the argument and value); returns the grid."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not (is_int(label_key) or isinstance(label_key, str)):
        raise ValueError(f"label_key must be an int (tuple batches) or a str (dict batches), got {label_key!r}.")
    if not is_int(folds) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}.")
    if not is_int(max_examples) or max_examples < folds:
        raise ValueError(f"max_examples must be an int >= folds ({folds}), got {max_examples!r}.")
    if not is_int(probe_dim) or probe_dim < 1:
        raise ValueError(f"probe_dim must be a positive int, got {probe_dim!r}.")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    if isinstance(ridge_grid, str | bytes) or not isinstance(ridge_grid, Iterable):
        raise ValueError(f"ridge_grid must be a non-empty sequence of positive numbers, got {ridge_grid!r}.")
    grid = tuple(ridge_grid)
    ok = bool(grid) and all(
        isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) and a > 0 for a in grid
    )
    if not ok:
        raise ValueError(f"ridge_grid must be a non-empty sequence of finite numbers > 0, got {ridge_grid!r}.")
    return tuple(float(a) for a in grid)


def _extract_labels(batch: Any, key: int | str) -> Tensor:
    """Integer class labels ``(n,)`` at ``batch[key]``; :class:`AnalysisSkipped` when there are none."""
    if isinstance(batch, Mapping):
        if key not in batch:
            raise AnalysisSkipped(
                f"no labels: the batch is a dict without key {key!r} (keys {sorted(map(str, batch))}); "
                "pass LinearProbe(label_key=...)"
            )
        labels = batch[key]
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        if not isinstance(key, int) or not -len(batch) <= key < len(batch):
            raise AnalysisSkipped(
                f"no labels: the batch is a {type(batch).__name__} of {len(batch)} element(s) and label_key is "
                f"{key!r}; pass LinearProbe(label_key=...)"
            )
        labels = batch[key]
    else:
        raise AnalysisSkipped(f"no labels: the batch is a {type(batch).__name__}, not a tuple/list/dict holding labels")
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise AnalysisSkipped(f"batch[{key!r}] is a {type(labels).__name__}, not integer class labels") from None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim != 1:
        raise AnalysisSkipped(
            f"batch[{key!r}] holds {labels.dtype} values of shape {tuple(labels.shape)}, not integer class "
            "labels of shape (n,)"
        )
    return labels


# ----------------------------------------------------------------------------- features
@dataclass
class _Layer:
    """One probed layer: where it is hooked and how its activation is pooled."""

    name: str
    module: nn.Module
    on_input: bool
    vit: bool
    has_class_token: bool
    num_prefix_tokens: int
    pools: tuple[str, ...] | None = None  # fixed by the first activation seen
    projection: Tensor | None = None


class _FeatureStore:
    """Forward hooks that pool each layer's activation into ``(n, pools, dims)`` float32
    features, and the first ``max_examples`` of them, kept on the activations' device.

    A batch is kept only as a whole (:meth:`commit`): every layer pooled it and its labels match.
    """

    def __init__(
        self, root: nn.Module, names: LayerSpec, max_examples: int, probe_dim: int, seed: int, output: OutputSelector
    ) -> None:
        self.layers: list[_Layer] = []
        for name, point in hook_points(root, names).items():
            backbone = backbone_of(root, name)
            self.layers.append(
                _Layer(
                    name,
                    point.module,
                    point.on_input,
                    vit=backbone is not None and backbone.is_vit,
                    has_class_token=backbone is not None and backbone.has_class_token,
                    num_prefix_tokens=0 if backbone is None else backbone.num_prefix_tokens,
                )
            )
        self.names = [layer.name for layer in self.layers]
        self.max_examples = max_examples
        self.probe_dim = probe_dim
        self.seed = seed
        self.output = output
        self.count = 0
        self._chunks: list[list[Tensor]] = [[] for _ in self.layers]
        self._labels: list[Tensor] = []
        self._pending: list[Tensor | None] = [None] * len(self.layers)
        self._seen: list[int] = [0] * len(self.layers)  # batch size each layer saw (before truncation)
        self._errors: list[str | None] = [None] * len(self.layers)

    @property
    def full(self) -> bool:
        return self.count >= self.max_examples

    def reset(self) -> None:
        """Forget every kept example."""
        self.count = 0
        self._chunks = [[] for _ in self.layers]
        self._labels = []
        self.clear()

    def clear(self) -> None:
        """Forget what the hooks recorded for the current batch."""
        self._pending = [None] * len(self.layers)
        self._seen = [0] * len(self.layers)
        self._errors = [None] * len(self.layers)

    def attach(self, hooks: HookSet) -> None:
        """One forward hook (pre-hook for ``":in"`` names) per layer."""
        for index, layer in enumerate(self.layers):
            if layer.on_input:
                hooks.forward_pre(layer.module, self._pre_hook(index))
            else:
                hooks.forward(layer.module, self._hook(index))

    def _hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(index, lambda: select_output(output, self.output))

        return hook

    def _pre_hook(self, index: int) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            def first_input() -> Tensor:
                if not args or not isinstance(args[0], Tensor):
                    raise TypeError("the module's first positional input is not a tensor")
                return args[0]

            self._record(index, first_input)

        return pre_hook

    def _record(self, index: int, activation: Callable[[], Tensor]) -> None:
        if self.full or self._pending[index] is not None or self._errors[index] is not None:
            return  # nothing more to keep, or the module ran again in this forward pass
        try:
            with torch.no_grad():
                x = activation().detach()
                self._seen[index] = int(x.shape[0])
                self._pending[index] = self._pool(self.layers[index], x[: self.max_examples - self.count])
        except Exception as err:  # never break the user's forward pass; update() reports it
            self._errors[index] = f"{type(err).__name__}: {err}"

    def _pool(self, layer: _Layer, x: Tensor) -> Tensor:
        """``(n, ...) -> (n, pools, min(C, probe_dim))`` float32, a new tensor."""
        if x.ndim < 2:
            raise ValueError(f"activation of shape {tuple(x.shape)} has no feature dimension")
        f32 = torch.float32  # averages are accumulated in float32 also for half-precision activations
        if x.ndim == 3 and layer.vit:
            if x.shape[1] <= layer.num_prefix_tokens:
                raise ValueError(f"{x.shape[1]} tokens but {layer.num_prefix_tokens} prefix tokens")
            mean = x[:, layer.num_prefix_tokens :].mean(dim=1, dtype=f32)
            pools, values = (("cls", "mean"), [x[:, 0].float(), mean]) if layer.has_class_token else (("mean",), [mean])
        elif x.ndim == 2:
            pools, values = ("mean",), [x.float()]
        elif x.ndim == 3:
            pools, values = ("mean",), [x.mean(dim=1, dtype=f32)]
        else:
            pools, values = ("mean",), [x.flatten(2).mean(dim=2, dtype=f32)]
        if layer.pools is None:
            layer.pools = pools
        elif layer.pools != pools:
            raise ValueError(f"pools {pools} differ from the {layer.pools} of earlier batches")
        features = torch.stack(values, dim=1)  # a copy: later in-place ops cannot reach it
        width = features.shape[-1]
        if width > self.probe_dim:
            features = features @ self._projection(layer, width, features.device)
        return features

    def _projection(self, layer: _Layer, width: int, device: torch.device) -> Tensor:
        proj = layer.projection
        if proj is None or proj.shape[0] != width:
            seed = (self.seed * 0x9E3779B1 + zlib.crc32(layer.name.encode())) % (1 << 63)
            generator = torch.Generator().manual_seed(seed)
            proj = torch.randn(width, self.probe_dim, generator=generator) / math.sqrt(self.probe_dim)
        layer.projection = proj = proj.to(device)
        return proj

    def commit(self, labels: Tensor) -> None:
        """Keep the pending batch with its ``(n,)`` labels; :class:`AnalysisSkipped` when it is unusable."""
        if self.full:
            self.clear()
            return
        problems = []
        for layer, pending, error in zip(self.layers, self._pending, self._errors, strict=True):
            if error is not None:
                problems.append(f"{layer.name!r} could not be pooled ({error})")
            elif pending is None:
                problems.append(f"{layer.name!r} did not run")
        if problems:
            self.clear()
            raise AnalysisSkipped(f"linear-probe features are missing for this batch: {'; '.join(problems)}")
        sizes = set(self._seen)
        if sizes != {labels.shape[0]}:
            self.clear()
            raise AnalysisSkipped(
                f"the layers saw {sorted(sizes)} example(s) but the batch has {labels.shape[0]} label(s) (the "
                "model ran on other inputs than the batch holds, e.g. test-time augmentation); linear probes skip "
                "such batches"
            )
        pending = [p for p in self._pending if p is not None]
        n = pending[0].shape[0]
        for chunks, features in zip(self._chunks, pending, strict=True):
            chunks.append(features)
        self._labels.append(labels[:n].to(device=pending[0].device, dtype=torch.long, non_blocking=True))
        self.count += n
        self.clear()

    def pools(self) -> list[tuple[str, ...]]:
        """Pool names per layer (empty for a layer not seen yet)."""
        return [layer.pools or () for layer in self.layers]

    def features(self, index: int) -> Tensor | None:
        """``(count, pools, dims)`` kept features of layer ``index`` (``None`` before any batch)."""
        chunks = self._chunks[index]
        return torch.cat(chunks) if chunks else None

    def labels(self) -> Tensor | None:
        """``(count,)`` kept labels."""
        return torch.cat(self._labels) if self._labels else None


# ----------------------------------------------------------------------------- probes
@dataclass
class _ProbeFit:
    """Result of :func:`_fit_probes` for ``S`` feature sets.

    Attributes:
        accuracy: ``(S,)`` float64 k-fold cross-validated accuracy in [0, 1].
        alphas: ``(S, folds)`` float64 ridge strength chosen in each outer training fold.
        folds: ``(N,)`` fold of each example.
    """

    accuracy: Tensor
    alphas: Tensor
    folds: Tensor


def _fold_ids(labels: Tensor, folds: int, seed: int) -> Tensor:
    """``(N,)`` stratified fold of each example: a permutation seeded by ``seed`` (drawn on the
    CPU, so the same on every device), sorted stably by class, dealt round robin."""
    n = labels.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(labels.device)
    order = perm[torch.sort(labels[perm], stable=True).indices]
    ids = torch.empty_like(labels)
    ids[order] = torch.arange(n, device=labels.device) % folds
    return ids


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run the enclosed work with one intra-op thread, then restore the thread count.

    The probe solver is many small operations on small matrices: with several intra-op threads,
    each pays a barrier, and a batched CPU ``eigh`` pays one per step of each reduction (measured
    on a two-core machine shared with other jobs: ``torch.linalg.eigh`` of 48 matrices of
    192 x 192 took 0.6 to 10 s with two threads, 0.16 s with one). :func:`_fit_probes` therefore
    runs single-threaded operations and spreads blocks of feature sets over a thread pool instead.
    ``torch`` has no per-call setting, so this is process-wide; concurrent fits (e.g. ranks as
    threads) share one counter: the first to enter saves the count, the last to leave restores it.
    """
    global _saved_threads, _single_thread_users
    with _thread_lock:
        if _single_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            if _saved_threads != 1:
                torch.set_num_threads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _thread_lock:
            _single_thread_users -= 1
            if _single_thread_users == 0 and _saved_threads != 1:
                torch.set_num_threads(_saved_threads)


_thread_lock = threading.Lock()
_saved_threads = 1
_single_thread_users = 0


def _fit_fold(
    xtr: Tensor, gram: Tensor, mean: Tensor, ytr: Tensor, num_classes: int, xte: Tensor, yte: Tensor, grid: Tensor
) -> tuple[Tensor, Tensor]:
    """One outer fold for ``B`` feature sets of one width ``p``: one eigendecomposition of the
    training covariance, shared by every ridge strength (a strength only rescales the eigenvalues:
    leave-one-out errors and the final probe need no further factorisation).

    Args:
        xtr: ``(B, n, p)`` training features (read only; any batch stride).
        gram: ``(B, p, p)`` their centred Gram ``(xtr - mean)' (xtr - mean)`` (only its lower
            triangle is read).
        mean: ``(B, 1, p)`` their mean.
        ytr: ``(n,)`` training labels in ``[0, num_classes)``.
        num_classes: ``K``.
        xte: ``(B, m, p)`` held-out features; yte: ``(m,)`` held-out labels.
        grid: ``(G,)`` ridge strengths.

    Returns:
        ``(B,)`` held-out examples classified correctly, and ``(B,)`` index into ``grid`` of the
        strength chosen by leave-one-out on the training fold.
    """
    sets, n, p = xtr.shape
    # One scale per set, the RMS of the centred training features, folded into the eigenbasis.
    scale2 = torch.diagonal(gram, dim1=1, dim2=2).sum(dim=1) / (n * p)
    scale2 = torch.where(scale2 > 0, scale2, torch.ones_like(scale2))[:, None, None]
    eigenvalues, vectors = torch.linalg.eigh(gram / scale2)  # (B, p), (B, p, p)
    eigenvalues = eigenvalues.clamp_min(0)
    vectors = vectors / scale2.sqrt()  # maps centred features to scaled eigen-coordinates
    u = (xtr @ vectors).sub_(mean @ vectors)  # (B, n, p): centred training features in that basis
    onehot = torch.nn.functional.one_hot(ytr, num_classes).to(u.dtype)
    ybar = onehot.mean(dim=0)
    yc = onehot - ybar
    q = u.mT @ yc  # (B, p, K)
    inverse = 1.0 / (eigenvalues[:, None, :] + grid[None, :, None])  # (B, G, p)
    hat = u.square() @ inverse.mT + 1.0 / n  # (B, n, G): hat diagonal, the bias included
    loo_scale2 = (1.0 - hat).square_().reciprocal_()  # (B, n, G): 1 / (1 - h_ii)^2
    sse = torch.empty(sets, grid.shape[0], dtype=u.dtype, device=u.device)
    if num_classes <= p:  # residuals directly, several strengths per product
        step = max(1, p // num_classes)
        for g0 in range(0, grid.shape[0], step):
            g1 = min(g0 + step, grid.shape[0])
            coef = (inverse[:, g0:g1, :, None] * q[:, None]).permute(0, 2, 1, 3).reshape(sets, p, -1)
            residual = (u @ coef).view(sets, n, g1 - g0, num_classes).sub_(yc[None, :, None, :])
            squared = torch.einsum("bngk,bngk->bng", residual, residual)  # (B, n, g1 - g0)
            sse[:, g0:g1] = (squared * loo_scale2[:, :, g0:g1]).sum(dim=1)
    else:  # many classes: ||yc_i - a_i Q||^2 = ||yc_i||^2 - 2 a_i . (Q yc_i) + a_i (Q Q') a_i'
        qq = q @ q.mT  # (B, p, p)
        cross = q[:, :, ytr].mT - (q @ ybar)[:, None, :]  # (B, n, p): row i is Q yc_i
        norms = 1.0 - 2.0 * ybar[ytr] + ybar.square().sum()  # (n,): ||yc_i||^2
        for g in range(grid.shape[0]):
            a = u * inverse[:, g, None, :]
            residual2 = norms - 2.0 * (a * cross).sum(dim=-1) + ((a @ qq) * a).sum(dim=-1)
            sse[:, g] = (residual2 * loo_scale2[:, :, g]).sum(dim=1)
    best = torch.nan_to_num(sse, nan=math.inf).argmin(dim=1)  # first minimum: the smallest strength
    chosen = inverse[torch.arange(sets, device=u.device), best]  # (B, p)
    weights = vectors @ (chosen[:, :, None] * q)  # (B, p, K), acting on centred unscaled features
    scores = (xte - mean) @ weights + ybar
    correct = (scores.argmax(dim=-1) == yte).sum(dim=1)
    return correct, best


def _fit_block(
    features: Sequence[Tensor], order: Tensor, bounds: Sequence[int], labels: Tensor, num_classes: int, grid: Tensor
) -> tuple[Tensor, Tensor, list[bool]]:
    """Every outer fold for ``B`` feature sets of one width.

    The examples are taken in fold order (``order``; fold ``f`` is ``bounds[f]:bounds[f + 1]``,
    ``labels`` already in that order) and stored twice in a row, so that each held-out fold and
    each training fold (the folds after it, then those before it) is a slice: no copy per fold.
    The features are centred on the mean of all examples (an exact shift, that each training
    fold's own centring removes; it keeps the float32 sums below free of cancellation), the
    ``p x p`` Gram of each fold is formed once, and each training fold's covariance is the total
    minus its held-out fold's, corrected for the training mean: ``2 N p^2`` flops for all folds'
    covariances instead of ``2 (k - 1) N p^2``.

    Returns ``(B,)`` held-out examples classified correctly, ``(B, folds)`` index of the chosen
    strength per fold, and whether each set's features were finite (a set that is not is fitted
    on zeros, harmlessly).
    """
    device = labels.device
    n = int(order.shape[0])
    doubled = torch.empty(len(features), 2 * n, features[0].shape[1], dtype=torch.float32, device=device)
    x = doubled[:, :n]
    for i, f in enumerate(features):
        x[i] = f.to(device=device, dtype=torch.float32).index_select(0, order)
    low, high = torch.aminmax(x.flatten(1), dim=1)  # NaN propagates, so both finite <=> all finite
    finite = torch.isfinite(low) & torch.isfinite(high)
    finite_list = finite.tolist()
    if not all(finite_list):
        x[~finite] = 0.0
    x -= x.mean(dim=1, keepdim=True)
    doubled[:, n:] = x
    labels2 = labels.repeat(2)
    folds = len(bounds) - 1
    parts = [x[:, bounds[f] : bounds[f + 1]] for f in range(folds)]  # views
    sums = torch.stack([part.sum(dim=1) for part in parts])  # (folds, B, p)
    grams = torch.stack([part.mT @ part for part in parts])  # (folds, B, p, p)
    total_sum, total_gram = sums.sum(dim=0), grams.sum(dim=0)
    correct = torch.zeros(len(features), dtype=torch.long, device=device)
    chosen = torch.zeros(len(features), folds, dtype=torch.long, device=device)
    for f in range(folds):
        a, b = bounds[f], bounds[f + 1]
        count = n - (b - a)
        mean = ((total_sum - sums[f]) / count)[:, None, :]  # (B, 1, p)
        gram = (total_gram - grams[f]) - count * (mean.mT @ mean)
        train = slice(b, a + n)  # the folds after f, then those before it
        hits, best = _fit_fold(doubled[:, train], gram, mean, labels2[train], num_classes, parts[f], labels[a:b], grid)
        correct += hits
        chosen[:, f] = best
    return correct, chosen, finite_list


def _fit_probes(
    features: Sequence[Tensor],
    labels: Tensor,
    num_classes: int,
    folds: int = 5,
    ridge_grid: Sequence[float] = RIDGE_GRID,
    seed: int = 0,
) -> _ProbeFit:
    """k-fold cross-validated accuracy of ridge probes on ``S`` feature sets (see the module docstring).

    Sets of one width are solved together (:func:`_fit_block`), in blocks bounded in memory. On
    the CPU the operations run single-threaded and the blocks are spread over as many worker
    threads as ``torch.get_num_threads()`` allows (:func:`_one_intra_op_thread`); the result does
    not depend on how the sets are split into blocks.

    Args:
        features: ``S`` tensors ``(N, p_s)`` of the same ``N`` examples (any widths), on
            ``labels``' device.
        labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        num_classes: ``K``, the width of the one-hot targets.
        folds: outer folds (stratified, seeded by ``seed``); ``N >= folds``.
        ridge_grid: candidate ridge strengths, chosen per set and outer fold by leave-one-out.
        seed: seed of the fold assignment.

    Returns:
        a :class:`_ProbeFit` (accuracy, chosen strengths, folds), on the CPU; the accuracy of a
        set with non-finite features is NaN.
    """
    labels = labels.long()
    n, device = labels.shape[0], labels.device
    fold_ids = _fold_ids(labels, folds, seed)
    grid = torch.tensor(list(ridge_grid), dtype=torch.float32, device=device)
    by_width: dict[int, list[int]] = {}
    for s, x in enumerate(features):
        if x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"features[{s}] has shape {tuple(x.shape)}, expected ({n}, p).")
        by_width.setdefault(int(x.shape[1]), []).append(s)
    order = torch.sort(fold_ids, stable=True).indices  # examples in fold order
    bounds = [0, *torch.bincount(fold_ids, minlength=folds).cumsum(0).tolist()]
    sorted_labels = labels[order]
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    jobs: list[list[int]] = []
    for width, members in by_width.items():
        # Blocks bounded in memory (all workers' blocks together), at least one per worker.
        block = max(1, _BLOCK_ELEMENTS // (workers * n * max(width, num_classes)))
        block = min(block, -(-len(members) // workers))
        jobs += [members[i : i + block] for i in range(0, len(members), block)]

    def run(sel: list[int]) -> tuple[Tensor, Tensor, list[bool]]:
        with torch.no_grad():
            return _fit_block([features[s] for s in sel], order, bounds, sorted_labels, num_classes, grid)

    if workers > 1 and len(jobs) > 1:
        with _one_intra_op_thread(), ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(sel) for sel in jobs]
    correct = torch.zeros(len(features), dtype=torch.long)
    chosen = torch.zeros(len(features), folds, dtype=torch.long)
    broken: list[int] = []  # sets with non-finite features
    for sel, (hits, best, finite) in zip(jobs, results, strict=True):
        correct[sel] = hits.cpu()
        chosen[sel] = best.cpu()
        broken += [s for s, ok in zip(sel, finite, strict=True) if not ok]
    accuracy = correct.double() / n
    accuracy[broken] = math.nan
    return _ProbeFit(accuracy, grid.double().cpu()[chosen], fold_ids.cpu())


def _probe_layers(
    names: Sequence[str],
    pools: Sequence[Sequence[str]],
    features: Sequence[Tensor],
    labels: Tensor,
    folds: int,
    ridge_grid: Sequence[float],
    seed: int,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]], int]:
    """Probe every (layer, pool): ``features[i]`` is ``(N, pools, dims)`` of layer ``names[i]``.

    Returns ``({layer: {pool: accuracy}}, {layer: {pool: [strength per fold]}}, num_classes)``
    with ``num_classes`` the largest label + 1 (the one-hot targets are the classes present);
    :class:`AnalysisSkipped` for labels that cannot be probed.
    """
    n = int(labels.shape[0])
    if n < folds:
        raise AnalysisSkipped(f"{n} labelled example(s) for {folds}-fold cross-validation; need at least {folds}")
    low, high = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
    if low < 0:
        raise AnalysisSkipped(f"labels must be class indices >= 0, got {low}")
    num_classes = high + 1
    # Targets are the classes present (one-hot width <= N, and a class no example has is never predicted).
    present, targets = torch.unique(labels, return_inverse=True)
    if present.shape[0] < 2:
        raise AnalysisSkipped(f"every label is {high}: a probe needs at least 2 classes")
    sets = [
        (name, pool, x[:, p])
        for name, layer_pools, x in zip(names, pools, features, strict=True)
        for p, pool in enumerate(layer_pools)
    ]
    fit = _fit_probes([s[2] for s in sets], targets, int(present.shape[0]), folds, ridge_grid, seed)
    accuracy: dict[str, dict[str, float]] = {}
    alphas: dict[str, dict[str, list[float]]] = {}
    for s, (name, pool, _) in enumerate(sets):
        accuracy.setdefault(name, {})[pool] = float(fit.accuracy[s])
        alphas.setdefault(name, {})[pool] = [float(a) for a in fit.alphas[s]]
    return accuracy, alphas, num_classes


# ----------------------------------------------------------------------------- plotting
def _plot_accuracy(
    accuracy: Mapping[str, Mapping[str, float]],
    num_classes: int,
    labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> tuple[Figure, Axes]:
    """Accuracy against layer index, one line per pool, chance ``1 / num_classes`` dashed."""
    from matplotlib.figure import Figure

    layers = list(accuracy)
    labels = list(labels) if labels is not None else layers
    if ax is None:
        fig = Figure(figsize=(max(6.0, min(14.0, 2.0 + 0.35 * len(layers))), 4.5), dpi=100)
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    seen = {pool for pools in accuracy.values() for pool in pools}
    pools = [p for p in _POOL_ORDER if p in seen] + sorted(seen - set(_POOL_ORDER))
    xs = list(range(len(layers)))
    for pool in pools:
        ax.plot(xs, [accuracy[layer].get(pool, math.nan) for layer in layers], marker="o", markersize=3, label=pool)
    ax.axhline(1.0 / num_classes, linestyle="--", color="grey", linewidth=1, label=f"chance (1/{num_classes})")
    step = max(1, math.ceil(len(layers) / 32))
    ax.set_xticks(xs[::step])
    ax.set_xticklabels(labels[::step], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out accuracy")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax


# ----------------------------------------------------------------------------- live analysis
class LinearProbe(Analysis):
    """Held-out accuracy of a ridge-regression linear probe on each of the callback's layers.

    Per measured validation, the pooled features (``"cls"`` and ``"mean"`` for ViT token
    activations, ``"mean"`` otherwise; see :mod:`lightning_cka.analyses.probe`) of the first
    ``max_examples`` measured examples of each rank are kept on the model's device; at the end,
    gathered over ranks, a ridge probe per layer and pool is scored by stratified
    ``folds``-fold cross-validation, the ridge strength chosen from ``ridge_grid`` by
    leave-one-out inside each training fold (Raghu et al. 2021 fit such probes in closed form).

    Logs scalars ``probe/<layer>/<pool>`` (accuracy in [0, 1]) and the image ``probe/accuracy``
    (accuracy against layer, one line per pool, chance level dashed, with a caption the first
    time); ``history`` holds ``{layer: {pool: accuracy}}``. Batches without integer class labels
    at ``label_key`` are skipped with one warning; with no labelled batch nothing is logged. Only
    the batches the callback measures are seen (its ``max_batches`` / ``max_examples`` apply).
    With too few examples for a reliable number (a few per class and fold), expect noisy
    accuracies: the default ``max_examples=4096`` suits up to a few hundred classes.

    Args:
        label_key: where the labels sit in a batch (tuple index or dict key); integer class
            indices ``(n,)``, the number of classes is the largest label + 1 over all ranks.
        max_examples: examples kept per rank (whole batches, the last one truncated).
        folds: cross-validation folds (>= 2).
        probe_dim: pooled features wider than this are randomly projected to this many dims.
        ridge_grid: candidate ridge strengths (> 0), relative to the features' scale.
        seed: seed of the fold assignment and the projections.

    Raises:
        ValueError: an option out of range, naming it.

    Example:
        >>> probe = LinearProbe(label_key="label", max_examples=2048, folds=4)
        >>> probe.key, probe.folds, probe.ridge_grid[:2]
        ('probe', 4, (0.001, 0.01))
        >>> LinearProbe(folds=1)
        Traceback (most recent call last):
        ...
        ValueError: folds must be an int >= 2, got 1.
    """

    key = "probe"

    def __init__(
        self,
        label_key: int | str = 1,
        max_examples: int = 4096,
        folds: int = 5,
        probe_dim: int = 512,
        ridge_grid: Sequence[float] = RIDGE_GRID,
        seed: int = 0,
    ) -> None:
        self.ridge_grid = _check_options(label_key, max_examples, folds, probe_dim, ridge_grid, seed)
        self.label_key = label_key
        self.max_examples = max_examples
        self.folds = folds
        self.probe_dim = probe_dim
        self.seed = seed
        self.store: _FeatureStore | None = None
        self.layers: list[str] = []
        self.labels: list[str] = []
        self.num_classes = 0
        self.num_examples = 0
        self._device = torch.device("cpu")
        self._world_size = 1
        self._all_gather: Callable[[Tensor], Tensor] = lambda t: t.unsqueeze(0)
        self._caption_logged = False

    def setup(self, context: SetupContext) -> bool:
        self.store = _FeatureStore(context.module, context.layers, self.max_examples, self.probe_dim, self.seed, 0)
        self.layers = list(self.store.names)
        self.labels = list(context.short_names) if len(context.short_names) == len(self.layers) else self.layers
        self._all_gather = context.all_gather
        self._world_size = context.world_size
        self._caption_logged = False
        return bool(self.layers)

    def attach(self, hooks: HookSet) -> None:
        assert self.store is not None
        if not self.store.full:
            self.store.attach(hooks)

    def reset(self, device: torch.device) -> None:
        assert self.store is not None
        self.store.reset()
        self._device = device

    def update(self, batch: MeasuredBatch) -> None:
        assert self.store is not None
        if self.store.full:
            self.store.clear()
            return
        labels = _extract_labels(batch.batch, self.label_key)
        self.store.commit(labels)

    def clear(self) -> None:
        if self.store is not None:
            self.store.clear()

    def compute(self) -> dict[str, dict[str, float]] | None:
        """Gather the features of all ranks and fit the probes (a collective: every rank calls it)."""
        assert self.store is not None
        with torch.no_grad():
            gathered = self._gather(self.store)
            if gathered is None:
                return None
            pools, features, labels = gathered
            accuracy, _, self.num_classes = _probe_layers(
                self.layers, pools, features, labels, self.folds, self.ridge_grid, self.seed
            )
        self.num_examples = int(labels.shape[0])
        return accuracy

    def _gather(self, store: _FeatureStore) -> tuple[list[tuple[str, ...]], list[Tensor], Tensor] | None:
        """Every rank's kept features and labels, in rank order: ``(pools per layer, [(N, P, d)], (N,))``."""
        local_pools = store.pools()
        if self._world_size == 1:
            labels = store.labels()
            if labels is None:
                return None
            return local_pools, [f for f in map(store.features, range(len(self.layers))) if f is not None], labels
        device, cap = self._device, self.max_examples
        # Shapes first: a rank that kept nothing still has to send tensors of the right shape.
        shape = [store.count]
        for i, pools in enumerate(local_pools):
            features = store.features(i)
            shape += [len(pools), 0 if features is None else int(features.shape[-1])]
        info = self._all_gather(torch.tensor(shape, dtype=torch.long, device=device)).reshape(-1, len(shape))
        counts = info[:, 0]
        if int(counts.sum()) == 0:
            return None
        dims = info[:, 1:].reshape(info.shape[0], -1, 2).amax(dim=0).tolist()
        keep = (torch.arange(cap, device=device)[None, :] < counts[:, None]).flatten()
        labels = torch.full((cap,), -1, dtype=torch.long, device=device)
        local_labels = store.labels()
        if local_labels is not None:
            labels[: store.count] = local_labels
        all_labels = self._all_gather(labels).reshape(-1)[keep]
        features = []
        for i, (num_pools, dim) in enumerate(dims):
            padded = torch.zeros(cap, num_pools, dim, dtype=torch.float32, device=device)
            local = store.features(i)
            if local is not None:
                padded[: store.count] = local
            features.append(self._all_gather(padded).reshape(-1, num_pools, dim)[keep])
        pools = [("cls", "mean") if num_pools == 2 else ("mean",) for num_pools, _ in dims]
        return pools, features, all_labels

    def report(self, value: Mapping[str, Mapping[str, float]], epoch: int, step: int) -> Report:
        title = (
            f"Linear probe accuracy, epoch {epoch} (step {step})\n"
            f"{self.folds}-fold CV on {self.num_examples} examples, {self.num_classes} classes"
        )
        labels = self.labels if list(value) == self.layers else list(value)
        fig, _ = _plot_accuracy(value, max(self.num_classes, 1), labels, title=title)
        report = Report(
            scalars={f"probe/{layer}/{pool}": acc for layer, pools in value.items() for pool, acc in pools.items()},
            figures={"probe/accuracy": fig},
        )
        if not self._caption_logged:
            report.captions = {"probe/accuracy": _CAPTION.format(folds=self.folds)}
            self._caption_logged = True
        return report


_CAPTION = (
    "Held-out accuracy of a linear probe (ridge regression to one-hot labels, argmax) fitted on each layer's "
    "pooled features of the measured validation examples, scored by {folds}-fold cross-validation, so no "
    "example is scored by a probe fitted on it. 'cls' = the class token, 'mean' = the average over patch tokens "
    "(or the global average pool / the layer's vector); dashed line = chance (1 / number of classes). Higher "
    "means the classes are more linearly decodable at that depth (Raghu et al. 2021: with a CLS-trained ViT, "
    "CLS probes are good only near the top, token-average probes throughout)."
)


# ----------------------------------------------------------------------------- offline
@dataclass
class ProbeResult:
    """Cross-validated linear-probe accuracies of a model's layers.

    Attributes:
        accuracy: ``{layer: {pool: accuracy in [0, 1]}}``, layers in the order probed.
        num_classes: classes (largest label + 1); chance is ``1 / num_classes``.
        num_examples: examples the probes were fitted and scored on.
        folds: cross-validation folds.
        ridge: ``{layer: {pool: [chosen ridge strength per fold]}}``.

    Example:
        >>> import tempfile
        >>> result = ProbeResult({"blocks.0": {"cls": 0.5, "mean": 0.75}}, num_classes=4, num_examples=100)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     loaded = ProbeResult.load(result.save(f"{tmp}/probe"))
        >>> loaded == result, loaded.chance
        (True, 0.25)
    """

    accuracy: dict[str, dict[str, float]]
    num_classes: int
    num_examples: int
    folds: int = 5
    ridge: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        """Chance accuracy ``1 / num_classes``."""
        return 1.0 / self.num_classes

    def plot(self, ax: Axes | None = None, title: str | None = None) -> tuple[Figure, Axes]:
        """Accuracy against layer, one line per pool, chance dashed; returns ``(fig, ax)``."""
        from lightning_cka.plotting import short_names

        return _plot_accuracy(self.accuracy, self.num_classes, short_names(list(self.accuracy)), ax=ax, title=title)

    def save(self, path: str | Path) -> Path:
        """Write a ``.json`` file (the suffix is added when missing); returns its path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "accuracy": self.accuracy,
            "num_classes": self.num_classes,
            "num_examples": self.num_examples,
            "folds": self.folds,
            "ridge": self.ridge,
        }
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read a file written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        return cls(
            accuracy=data["accuracy"],
            num_classes=int(data["num_classes"]),
            num_examples=int(data["num_examples"]),
            folds=int(data.get("folds", 5)),
            ridge=data.get("ridge", {}),
        )


def linear_probe(
    model: nn.Module,
    dataloader: Iterable[Any],
    layers: LayerSpec = "auto",
    label_key: int | str = 1,
    input_key: int | str = 0,
    max_examples: int = 4096,
    folds: int = 5,
    probe_dim: int = 512,
    max_batches: int | None = None,
    seed: int = 0,
    ridge_grid: Sequence[float] = RIDGE_GRID,
) -> ProbeResult:
    """Cross-validated linear-probe accuracy of each layer of ``model`` on a dataloader's examples.

    The same features and probes as :class:`LinearProbe` (see :mod:`lightning_cka.analyses.probe`),
    offline: the model runs in eval mode without gradients (modes restored, hooks removed
    afterwards), on the first ``max_examples`` examples of at most ``max_batches`` batches.

    Args:
        model: the network to hook.
        dataloader: batches holding the input at ``input_key`` and integer labels at ``label_key``.
        layers: as :func:`lightning_cka.compare` (names, ``":in"`` points, globs, types, presets).
        label_key: tuple index or dict key of the labels.
        input_key: tuple index or dict key of the model input.
        max_examples: examples used (the last batch is truncated).
        folds: cross-validation folds (>= 2).
        probe_dim: pooled features wider than this are randomly projected to this many dims.
        max_batches: batches read at most (``None``: until ``max_examples``).
        seed: seed of the fold assignment and the projections.
        ridge_grid: candidate ridge strengths (> 0), relative to the features' scale.

    Returns:
        a :class:`ProbeResult`.

    Raises:
        ValueError: an invalid option, a batch without integer labels, fewer than ``folds``
            examples or fewer than 2 classes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(60) % 3
        >>> x = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(60, 3, generator=g)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> result = linear_probe(net, [(x[:30], y[:30]), (x[30:], y[30:])], layers=["0", "2"])
        >>> result.accuracy["0"]["mean"], result.num_classes, result.num_examples
        (1.0, 3, 60)
    """
    from lightning_cka.compare import eval_mode, to_model_input
    from lightning_cka.compiled import EagerWhileMeasuring

    grid = _check_options(label_key, max_examples, folds, probe_dim, ridge_grid, seed)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}.")
    store = _FeatureStore(model, layers, max_examples, probe_dim, seed, 0)
    eager = EagerWhileMeasuring(model)  # hooks do not fire inside compiled graphs
    batches = 0
    try:
        with HookSet() as hooks, eval_mode(model), torch.no_grad():
            eager.enter()
            store.attach(hooks)
            for batch in dataloader:
                if store.full or (max_batches is not None and batches >= max_batches):
                    break
                batches += 1
                model(to_model_input(extract_input(batch, input_key), model))
                store.commit(_extract_labels(batch, label_key))
        labels = store.labels()
        if labels is None:
            raise AnalysisSkipped("the dataloader gave no batch")
        features = [f for f in map(store.features, range(len(store.names))) if f is not None]
        accuracy, alphas, num_classes = _probe_layers(store.names, store.pools(), features, labels, folds, grid, seed)
    except AnalysisSkipped as err:
        raise ValueError(f"linear_probe: {err}.") from None
    finally:
        eager.exit()
    return ProbeResult(accuracy, num_classes, int(labels.shape[0]), folds, alphas)
