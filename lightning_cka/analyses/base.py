"""The analysis plug-in protocol: what :class:`~lightning_cka.CKACallback` asks of every signal.

Data flows one way through a measured validation batch::

    hooks (capture) -> Analysis.update -> torchmetrics Metric -> Analysis.compute -> Analysis.report
        -> Report (figures, scalars, matrices, captions) -> the callback's logging sink

The callback owns the loop: it arms and disarms hooks, applies the batch and example caps,
switches compiled models to eager, captures the Gram matrices of the chosen ("self") layers
once per batch and runs the reference model on demand (:class:`MeasuredBatch`). An analysis
owns one signal: the extra hooks it needs, its metric, and what it logs. Every method the
callback calls is wrapped so that a failure is warned about and skipped, never ending the
user's training (``CKACallback(strict=True)`` raises instead).

A new analysis is one module with one :class:`Analysis` subclass; pass instances with
``CKACallback(analyses=[...])``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_cka.capture import HookSet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_cka.compare import CKAResult

__all__ = ["Analysis", "AnalysisSkipped", "MeasuredBatch", "Report", "SetupContext"]


class AnalysisSkipped(Exception):
    """Raised by an analysis to skip a batch or an epoch for a known reason (warned once per reason)."""


@dataclass
class SetupContext:
    """What an analysis may look at when the callback is set up (before any step).

    Attributes:
        module: the LightningModule (names of ``layers`` are relative to it).
        layers: resolved names of the callback's ``layers`` (the "self" layers).
        reference: the reference model, if any.
        reference_layers: resolved names of ``reference_layers`` (empty without a reference).
        reduction: feature reduction of the self layers (``"flatten"``, ``"mean"``, ``"cls"``).
        precision: Gram product dtype.
        short_names: display names of ``layers`` (common prefix removed), same order.
        reference_short_names: display names of ``reference_layers``.
        sum_over_ranks: all-reduces a tensor by summation over processes (identity in one process);
            a collective, for use in :meth:`Analysis.compute`.
        all_gather: gathers a tensor (same shape on every rank) from all processes into
            ``(world_size, *shape)`` (``(1, *shape)`` in one process); a collective.
        world_size: number of processes.
        input_key: where the model input sits in a batch (see :func:`~lightning_cka.capture.extract_input`).
    """

    module: nn.Module
    layers: list[str]
    reference: nn.Module | None = None
    reference_layers: list[str] = field(default_factory=list)
    reduction: str = "flatten"
    precision: torch.dtype | None = torch.float32
    short_names: list[str] = field(default_factory=list)
    reference_short_names: list[str] = field(default_factory=list)
    sum_over_ranks: Callable[[Tensor], Tensor] = lambda t: t
    all_gather: Callable[[Tensor], Tensor] = lambda t: t.unsqueeze(0)
    world_size: int = 1
    input_key: str | int = 0


class MeasuredBatch:
    """One measured validation batch, as the callback hands it to every analysis.

    Attributes:
        batch: the dataloader batch.
        grams: ``(L, n, n)`` Gram matrices of the self layers from this forward pass, or
            ``None`` when they could not be captured (the reason was warned about).
        index: position of this batch among the measured batches of this validation (0 first).
    """

    def __init__(
        self,
        batch: Any,
        grams: Tensor | None,
        run_reference: Callable[[], Tensor | None],
        input_key: str | int = 0,
        index: int = 0,
    ) -> None:
        self.batch = batch
        self.grams = grams
        self.index = index
        self.input_key = input_key
        self._run_reference = run_reference
        self._reference: Tensor | None = None
        self._reference_done = False

    @property
    def num_examples(self) -> int:
        """Examples the self layers saw (0 when their Grams are missing)."""
        return 0 if self.grams is None else int(self.grams.shape[-1])

    def inputs(self) -> Tensor:
        """The model input of the batch (``batch[input_key]``)."""
        from lightning_cka.capture import extract_input

        return extract_input(self.batch, self.input_key)

    def reference_grams(self) -> Tensor | None:
        """``(M, n, n)`` Grams of the reference layers on the same inputs; the reference model runs
        on the first call only (and never when no analysis asks)."""
        if not self._reference_done:
            self._reference_done = True
            self._reference = self._run_reference()
        return self._reference


@dataclass
class Report:
    """What an analysis logs for one validation; the callback's sink writes it on rank zero.

    Attributes:
        scalars: tag -> value.
        figures: tag -> matplotlib figure (logged as an image).
        matrices: file stem (e.g. ``"self"``) -> result, written as ``<stem>_step<step>.npz``
            under the callback's directory.
        captions: tag -> one-line text saying how to read that image, logged with its first
            appearance.
        layouts: TensorBoard custom-scalar charts ``{category: {chart: [tag regex, ...]}}``.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    matrices: dict[str, CKAResult] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    layouts: dict[str, dict[str, list[str]]] = field(default_factory=dict)


class Analysis(ABC):
    """One signal measured on the validation batches that :class:`~lightning_cka.CKACallback` measures.

    Lifecycle, per callback: :meth:`setup` once per ``fit``/``validate`` (raise ``ValueError``
    for a bad configuration: it surfaces before any step); then per measured validation:
    :meth:`reset`, for each measured batch :meth:`attach` (hooks, before the forward) and
    :meth:`update` (after it), :meth:`clear` whenever hooks are removed, :meth:`compute` on
    every rank at the end (a collective under DDP), and :meth:`report` on global rank zero.

    Attributes:
        key: the entry of the callback's ``history`` records this analysis fills, also used in
            warnings.
        model_wide: ``True`` when the signal belongs to the model rather than to the callback's
            layers (norm ratios, attention distances): only the first callback of a Trainer
            that asks for it runs it.
    """

    key: ClassVar[str]
    model_wide: ClassVar[bool] = False

    @abstractmethod
    def setup(self, context: SetupContext) -> bool:
        """Resolve modules and build metrics. Return ``False`` to switch the analysis off (e.g. an
        architecture it does not apply to); raise ``ValueError`` for a bad configuration."""

    def attach(self, hooks: HookSet) -> None:  # noqa: B027 - optional hook, default none
        """Register the hooks this analysis needs into ``hooks`` (none by default)."""

    def reset(self, device: torch.device) -> None:  # noqa: B027 - optional
        """Start a new measured validation on ``device``."""

    @abstractmethod
    def update(self, batch: MeasuredBatch) -> None:
        """Fold one measured batch into the metric (no host synchronisation where avoidable)."""

    def clear(self) -> None:  # noqa: B027 - optional
        """Forget anything half-recorded by the hooks (called whenever hooks are removed)."""

    @abstractmethod
    def compute(self) -> Any:
        """The value of this validation, stored in ``history[-1][key]``; ``None`` for nothing.
        Called on every rank (metrics all-reduce here)."""

    def report(self, value: Any, epoch: int, step: int) -> Report:
        """What to log for ``value`` (rank zero only); nothing by default."""
        return Report()

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints besides ``history`` (nothing by default)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # noqa: B027 - optional
        """Restore what :meth:`state_dict` returned."""
