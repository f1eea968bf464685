"""``RunningMean``: streaming means of a fixed array of named units, summed across processes.

The per-unit signals (skip-connection norm ratios per residual unit and token group, mean
attention distances per layer and head) are all means over examples and positions. They are
kept as two float64 sums, ``total`` and ``count``, which add across batches and all-reduce by
summation under DDP; the mean is their ratio.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RunningMean"]

Index = int | slice | tuple[int | slice, ...]


class RunningMean(Metric):
    """Streaming means of a ``shape``-shaped array of units.

    Updates are out of place, so the metric may be updated under ``torch.inference_mode()``
    (Lightning's validation) and computed outside it.

    Args:
        shape: shape of the array of units, e.g. ``(S,)`` series or ``(L, H)`` layers x heads.

    Raises:
        ValueError: a negative dimension in ``shape``.

    Example:
        >>> mean = RunningMean((3,))
        >>> mean.update(torch.tensor([2.0, 4.0]), counts=2, index=slice(0, 2))
        >>> mean.update(torch.tensor([1.0, 1.0, 3.0]), counts=1)
        >>> mean.compute()
        tensor([1.0000, 1.6667, 3.0000], dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, shape: int | tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must have non-negative dimensions, got {shape}.")
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: Tensor, counts: Tensor | float, index: Index | None = None) -> None:
        """Add ``sums`` (sums of values) and ``counts`` (how many values each sum holds; a number
        for all) to the units at ``index`` (all units when ``None``). No host synchronisation.

        Raises:
            ValueError: ``sums`` does not fit the units at ``index``.
        """
        sums = torch.as_tensor(sums)
        if sums.device != self.total.device:
            self.to(sums.device)
        target = self.total if index is None else self.total[index]
        if sums.shape != target.shape:
            raise ValueError(
                f"sums of shape {tuple(sums.shape)} do not fit the units at index {index!r} "
                f"(shape {tuple(target.shape)}) of a RunningMean of shape {tuple(self.total.shape)}."
            )
        counts = counts if isinstance(counts, Tensor) else torch.full_like(sums, float(counts))
        self.total = self.total + self._placed(sums, index)
        self.count = self.count + self._placed(counts.to(sums.device), index)

    def _placed(self, values: Tensor, index: Index | None) -> Tensor:
        values = values.to(torch.float64)
        if index is None:
            return values
        full = torch.zeros_like(self.total)
        full[index] = values
        return full

    def compute(self) -> Tensor:
        """float64 means, shaped like the units; NaN for units that received no value."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1.0), torch.nan)
