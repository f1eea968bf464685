"""``MinibatchCKA``: a torchmetrics metric holding the running HSIC sums of minibatch CKA."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_cka.functional import MIN_EXAMPLES, cka_from_sums, grams, hsic1_pairwise

__all__ = ["MinibatchCKA"]

_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_precision(precision: str | torch.dtype | None) -> torch.dtype | None:
    """Map a Gram precision option (``"float32"``, ``"bfloat16"``, ``"float64"`` or a dtype) to a dtype."""
    if precision is None or isinstance(precision, torch.dtype):
        if precision not in (None, *_PRECISIONS.values()):
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision}.")
        return precision
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}.")
    return _PRECISIONS[precision]


def _layer_states(rows: int, cols: int, device: torch.device) -> dict[str, Tensor]:
    """Zeroed per-layer states: float64 HSIC sums and counts of non-finite minibatches."""
    f64, long = torch.float64, torch.long
    return {
        "sum_xy": torch.zeros(rows, cols, dtype=f64, device=device),
        "sum_xx": torch.zeros(rows, dtype=f64, device=device),
        "sum_yy": torch.zeros(cols, dtype=f64, device=device),
        "nonfinite_x": torch.zeros(rows, dtype=long, device=device),
        "nonfinite_y": torch.zeros(cols, dtype=long, device=device),
    }


class MinibatchCKA(Metric):
    """Minibatch linear CKA between layers, accumulated over minibatches and processes.

    Keeps only three float64 sums (REFERENCE.md section 2): ``sum_xy`` ``(L, M)``,
    ``sum_xx`` ``(L,)`` and ``sum_yy`` ``(M,)``, all-reduced by summation under DDP, plus
    counters of used and skipped minibatches. Activations are never stored.

    Args:
        num_layers: ``L``, the number of row layers. Fixed by the first update when ``None``;
            pass it when some process may see no data (DDP) so all states have one shape.
        num_other_layers: ``M`` for cross-similarity, ``None`` for self-similarity or to fix
            it at the first update.
        precision: dtype of the Gram matrix products: ``"float32"`` (default; activations in
            bf16/fp16 are upcast), ``"bfloat16"`` (faster on hardware with bf16 matmuls,
            ~1e-4 error) or ``"float64"`` (reference work). Sums are float64 regardless.
        layer_names: optional row names, used by :meth:`plot` and in warnings.
        other_layer_names: optional column names.

    Example:
        >>> metric = MinibatchCKA()
        >>> x = torch.randn(32, 10)
        >>> metric.update([x, 2 * x, torch.randn(32, 5)])
        >>> metric.compute().shape
        torch.Size([3, 3])
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    sum_xy: Tensor
    sum_xx: Tensor
    sum_yy: Tensor
    num_batches: Tensor
    nonfinite_x: Tensor
    nonfinite_y: Tensor

    def __init__(
        self,
        num_layers: int | None = None,
        num_other_layers: int | None = None,
        precision: str | torch.dtype | None = "float32",
        layer_names: Sequence[str] | None = None,
        other_layer_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.precision = resolve_precision(precision)
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.other_layer_names = list(other_layer_names) if other_layer_names is not None else None
        if num_layers is None and self.layer_names is not None:
            num_layers = len(self.layer_names)
        if num_other_layers is None and self.other_layer_names is not None:
            num_other_layers = len(self.other_layer_names)
        if num_other_layers is not None and num_layers is None:
            raise ValueError("num_other_layers needs num_layers (or layer_names) too.")
        self._fixed_shape = (num_layers, num_other_layers)
        rows = num_layers or 0
        cols = num_other_layers if num_other_layers is not None else rows
        for name, default in _layer_states(rows, cols, torch.device("cpu")).items():
            self.add_state(name, default, dist_reduce_fx="sum")
        self.add_state("num_batches", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        #: Minibatches skipped on this process because they had fewer than 4 examples.
        self.num_skipped_small = 0
        self._cross: bool | None = (
            None if num_other_layers is None and num_layers is None else num_other_layers is not None
        )

    # ------------------------------------------------------------------ update
    def update(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None) -> None:
        """Add one minibatch.

        Args:
            xs: L activations of the same n examples, each ``(n, ...)``.
            ys: M activations of the same n examples (e.g. another model), or ``None`` for
                the L x L self-similarity.
        """
        n = self._check_layers(xs, "xs")
        if ys is not None and self._check_layers(ys, "ys") != n:
            raise ValueError(f"xs and ys must hold the same examples; got n={n} and n={ys[0].shape[0]}.")
        if n < MIN_EXAMPLES:
            self._skip_small(n)
            return
        self._accumulate(grams(xs, self.precision), None if ys is None else grams(ys, self.precision))

    def update_grams(self, k: Tensor, l: Tensor | None = None) -> None:
        """Add one minibatch given its Gram matrices (what the capture hooks produce).

        Args:
            k: ``(L, n, n)`` Gram matrices of the row layers (see :func:`~lightning_cka.functional.gram`).
            l: ``(M, n, n)`` Gram matrices of the column layers, or ``None`` for self-similarity.
        """
        if k.device != self.sum_xy.device:
            raise RuntimeError(
                f"Gram matrices are on {k.device} but the metric is on {self.sum_xy.device}; "
                f"move the metric first: MinibatchCKA(...).to({str(k.device)!r})."
            )
        # What torchmetrics' update wrapper does for `update`.
        self._computed = None
        self._update_count += 1
        self._accumulate(k, l)

    def _accumulate(self, k: Tensor, l: Tensor | None) -> None:
        self._fix_shape(k.shape[0], None if l is None else l.shape[0])
        n = k.shape[-1]
        if n < MIN_EXAMPLES:
            self._skip_small(n)
            return
        hsic_xy, hsic_xx, hsic_yy = hsic1_pairwise(k, l)
        # A non-finite activation makes its Gram non-finite; skip the whole minibatch
        # (all pairs) without a host sync and report it at compute().
        bad_x = ~torch.isfinite(hsic_xx)
        bad_y = bad_x if l is None else ~torch.isfinite(hsic_yy)
        ok = ~(bad_x.any() | bad_y.any())
        zero = hsic_xy.new_zeros(())
        self.sum_xy = self.sum_xy + torch.where(ok, hsic_xy, zero)
        self.sum_xx = self.sum_xx + torch.where(ok, hsic_xx, zero)
        self.sum_yy = self.sum_yy + torch.where(ok, hsic_yy, zero)
        self.num_batches = self.num_batches + ok.long()
        self.nonfinite_x = self.nonfinite_x + bad_x.long()
        self.nonfinite_y = self.nonfinite_y + bad_y.long()

    # ----------------------------------------------------------------- compute
    def compute(self) -> Tensor:
        """Return the ``(L, M)`` float64 minibatch CKA matrix (NaN where undefined)."""
        self._warn_nonfinite(self.nonfinite_x, self.layer_names, "row")
        if self._cross:
            self._warn_nonfinite(self.nonfinite_y, self.other_layer_names, "column")
        if int(self.num_batches) == 0:
            rank_zero_warn(
                f"MinibatchCKA.compute() was called without any usable minibatch (each needs >= {MIN_EXAMPLES} "
                "examples and finite activations); returning NaN.",
                UserWarning,
            )
        result = cka_from_sums(self.sum_xy, self.sum_xx, self.sum_yy)
        self._warn_degenerate(self.sum_xx, self.layer_names, "row")
        if self._cross:
            self._warn_degenerate(self.sum_yy, self.other_layer_names, "column")
        return result

    # ------------------------------------------------------------------ plot
    def plot(self, val: Tensor | None = None, ax: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        """Draw the CKA matrix as a labelled heatmap; returns ``(fig, ax)``.

        Args:
            val: a matrix from :meth:`compute`; computed when ``None``.
            ax: matplotlib axes to draw into.
            kwargs: passed to :func:`lightning_cka.plotting.plot_cka_heatmap` (``title``, ...).
        """
        from lightning_cka.plotting import plot_cka_heatmap

        matrix = self.compute() if val is None else val
        cols = self.other_layer_names if self._cross else self.layer_names
        return plot_cka_heatmap(matrix, rows=self.layer_names, cols=cols, ax=ax, **kwargs)

    # ------------------------------------------------------ torchmetrics plumbing
    def _wrap_compute(self, compute: Callable) -> Callable:
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_matrix_shape(*args: Any, **kwargs: Any) -> Any:
            value = wrapped(*args, **kwargs)
            # torchmetrics squeezes one-element results; a 1 x 1 CKA matrix stays (1, 1).
            return value.reshape(1, 1) if isinstance(value, Tensor) and value.ndim == 0 else value

        return keep_matrix_shape

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # forward() merges the batch state into the global one; before the first update the
        # global sums are still unallocated (shape fixed lazily), so take the batch's as is.
        for attr in self._defaults:
            local, incoming = getattr(self, attr), incoming_state[attr]
            setattr(self, attr, local if incoming.numel() == 0 < local.numel() else local + incoming)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _check_layers(xs: Sequence[Tensor], what: str) -> int:
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

    def _fix_shape(self, rows: int, cols: int | None) -> None:
        cross = cols is not None
        if self._cross is not None and cross != self._cross:
            kind = "with ys (cross-similarity)" if self._cross else "without ys (self-similarity)"
            raise ValueError(f"This MinibatchCKA was first updated {kind}; keep calling update the same way.")
        if self._fixed_shape[0] is None:
            self._fixed_shape = (rows, cols)
            self._allocate()
        self._cross = cross
        expected = (self.sum_xy.shape[0], self.sum_xy.shape[1] if cross else self.sum_xy.shape[0])
        got = (rows, cols if cross else rows)
        if expected != got:
            raise ValueError(
                f"MinibatchCKA was set up for {expected[0]} x {expected[1]} layers but got {got[0]} x {got[1]}; "
                "pass the same layers to every update, or call reset() to start over."
            )

    def _skip_small(self, n: int) -> None:
        if self.num_skipped_small == 0:
            rank_zero_warn(
                f"Skipping a minibatch of {n} examples: minibatch CKA needs at least {MIN_EXAMPLES} examples per "
                "minibatch (use a larger batch size or drop_last=True). Further small minibatches are skipped "
                "silently and counted in `num_skipped_small`.",
                UserWarning,
            )
        self.num_skipped_small += 1

    @staticmethod
    def _names(names: list[str] | None, idx: list[int]) -> str:
        return ", ".join(repr(names[i]) if names is not None else f"#{i}" for i in idx)

    def _warn_nonfinite(self, counts: Tensor, names: list[str] | None, axis: str) -> None:
        bad = [i for i, c in enumerate(counts.tolist()) if c > 0]
        if bad:
            detail = ", ".join(f"{self._names(names, [i])} ({int(counts[i])}x)" for i in bad)
            rank_zero_warn(
                f"Skipped minibatches with non-finite activations (NaN/Inf) in {axis} layer(s) {detail}; "
                "those minibatches were left out of every CKA value.",
                UserWarning,
            )

    def _warn_degenerate(self, sums: Tensor, names: list[str] | None, axis: str) -> None:
        if int(self.num_batches) == 0:
            return
        bad = [i for i, s in enumerate(sums.tolist()) if not s > 0]
        if bad:
            rank_zero_warn(
                f"CKA is undefined for {axis} layer(s) {self._names(names, bad)}: their self-HSIC is not positive "
                "(constant or dead features, or too few examples). Their entries are NaN.",
                UserWarning,
            )

    def _allocate(self) -> None:
        """Give the sums the shape fixed by the first update, on the metric's device."""
        rows, cols = self._fixed_shape
        assert rows is not None
        width = cols if cols is not None else rows
        for name, value in _layer_states(rows, width, self.sum_xy.device).items():
            setattr(self, name, value)

    def reset(self) -> None:
        """Clear the sums and counters; the layer counts stay fixed."""
        super().reset()
        self.num_skipped_small = 0
        if self._fixed_shape[0] is not None and self.sum_xy.shape[0] != self._fixed_shape[0]:
            self._allocate()
