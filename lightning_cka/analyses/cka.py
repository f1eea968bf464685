"""Minibatch CKA heatmaps: the callback's layers against each other, and against a reference model."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_cka.analyses.base import Analysis, AnalysisSkipped, MeasuredBatch, Report, SetupContext
from lightning_cka.compare import CKAResult
from lightning_cka.metric import MinibatchCKA

__all__ = ["ReferenceCKA", "SelfCKA"]


def _plain(t: Tensor) -> Tensor:
    """A CPU copy that is an ordinary tensor even when made under Lightning's inference mode."""
    with torch.inference_mode(False):
        return t.detach().cpu().clone()


class _CKAHeatmap(Analysis):
    """Shared part of the two heatmaps: one :class:`MinibatchCKA`, a figure, an ``.npz`` file."""

    title: ClassVar[str]
    xlabel: ClassVar[str]

    def __init__(self, log_prefix: str = "cka") -> None:
        self.log_prefix = log_prefix
        self.metric: MinibatchCKA | None = None
        self.rows: list[str] = []
        self.cols: list[str] = []
        self.row_labels: list[str] = []
        self.col_labels: list[str] = []
        self._sum_over_ranks: Any = None

    def reset(self, device: torch.device) -> None:
        assert self.metric is not None
        self.metric.to(device).reset()

    def compute(self) -> CKAResult | None:
        assert self.metric is not None and self._sum_over_ranks is not None
        # Every rank calls compute() (a collective); skip only when no rank had a usable batch.
        if int(self._sum_over_ranks(self.metric.num_batches.clone())) == 0:
            return None
        return CKAResult(_plain(self.metric.compute()), list(self.rows), list(self.cols))

    def report(self, value: CKAResult, epoch: int, step: int) -> Report:
        from lightning_cka.plotting import plot_cka_heatmap

        title = f"{self.title}, epoch {epoch} (step {step})"
        fig, _ = plot_cka_heatmap(
            value.matrix, self.row_labels, self.col_labels, title=title, xlabel=self.xlabel, ylabel="layer"
        )
        tag = f"{self.log_prefix}/{self.key}"
        report = Report(scalars=self.summary(value), figures={tag: fig}, matrices={self.key: value})
        report.captions[tag] = self.caption
        report.layouts = {f"{self.log_prefix} {self.key}": self.charts()}
        return report

    caption: ClassVar[str]

    def charts(self) -> dict[str, list[str]]:
        """TensorBoard custom-scalar charts of this heatmap's summary scalars."""
        raise NotImplementedError

    def summary(self, value: CKAResult) -> dict[str, float]:
        raise NotImplementedError


class SelfCKA(_CKAHeatmap):
    """Layer x layer minibatch CKA of the callback's layers.

    Logs the image ``{prefix}/self``, scalars ``{prefix}/self/adjacent_mean`` (mean CKA of
    consecutive layers) and ``{prefix}/self/to_last/<layer>`` (each layer's CKA to the last),
    and the file ``self_step<step>.npz``.
    """

    key = "self"
    title = "Self CKA"
    xlabel = "layer"
    caption = (
        "Minibatch CKA between every pair of the chosen layers (1 = same representation up to rotation and "
        "scale, 0 = unrelated). Bright blocks are groups of layers that represent the input alike. On ViT "
        "sublayers (attn/mlp branches) an early checkerboard is expected: attention and MLP outputs differ "
        "from each other; the residual stream (layers='stream') is far more uniform (Raghu et al. 2021)."
    )

    def charts(self) -> dict[str, list[str]]:
        prefix = f"{self.log_prefix}/self"
        return {
            "CKA of each layer to the last": [f"{prefix}/to_last/.*"],
            "mean CKA of adjacent layers": [f"{prefix}/adjacent_mean"],
        }

    def setup(self, context: SetupContext) -> bool:
        self.rows = self.cols = list(context.layers)
        self.row_labels = self.col_labels = list(context.short_names or context.layers)
        self.metric = MinibatchCKA(num_layers=len(self.rows), precision=context.precision, layer_names=self.rows)
        self._sum_over_ranks = context.sum_over_ranks
        return True

    def update(self, batch: MeasuredBatch) -> None:
        assert self.metric is not None
        if batch.grams is not None:
            self.metric.update_grams(batch.grams)

    def summary(self, value: CKAResult) -> dict[str, float]:
        m, prefix = value.matrix, f"{self.log_prefix}/self"
        out = {f"{prefix}/to_last/{row}": float(m[i, -1]) for i, row in enumerate(value.rows)}
        if m.shape[0] > 1:
            out[f"{prefix}/adjacent_mean"] = float(torch.diagonal(m, offset=1).nanmean())
        return out


class ReferenceCKA(_CKAHeatmap):
    """Model x reference minibatch CKA: the callback's layers (rows) against the reference
    model's layers (columns), both run on the same validation inputs.

    Logs the image ``{prefix}/reference``, the scalar ``{prefix}/reference/best_match_mean``
    (mean over rows of the best-matching column) and the file ``reference_step<step>.npz``.
    Batches on which the model's layers and the reference saw different numbers of examples
    (test-time augmentation inside ``validation_step``) are skipped with a warning.
    """

    key = "reference"
    title = "Model x reference CKA"
    xlabel = "reference layer"
    caption = (
        "Minibatch CKA between each layer of the trained model (rows) and each layer of the reference model "
        "(columns) on the same inputs. A bright diagonal band means the two models build their "
        "representations in the same order; the best-matching column of each row is summarised in "
        "best_match_mean."
    )

    def charts(self) -> dict[str, list[str]]:
        return {"mean best-match CKA to the reference": [f"{self.log_prefix}/reference/best_match_mean"]}

    def setup(self, context: SetupContext) -> bool:
        if context.reference is None:
            return False
        self.rows, self.cols = list(context.layers), list(context.reference_layers)
        self.row_labels = list(context.short_names or context.layers)
        self.col_labels = list(context.reference_short_names or context.reference_layers)
        self.metric = MinibatchCKA(
            num_layers=len(self.rows),
            num_reference_layers=len(self.cols),
            precision=context.precision,
            layer_names=self.rows,
            reference_layer_names=self.cols,
        )
        self._sum_over_ranks = context.sum_over_ranks
        return True

    def update(self, batch: MeasuredBatch) -> None:
        assert self.metric is not None
        if batch.grams is None:
            return
        reference = batch.reference_grams()
        if reference is None:
            return
        n, m = batch.grams.shape[-1], reference.shape[-1]
        if n != m:
            raise AnalysisSkipped(
                f"the model's layers saw {n} examples but the reference saw {m} (the batch's input): "
                "validation_step runs the model on other inputs than the batch holds (e.g. test-time "
                "augmentation); model x reference CKA skips such batches"
            )
        self.metric.update_grams(batch.grams, reference.to(batch.grams.device))

    def summary(self, value: CKAResult) -> dict[str, float]:
        best = torch.nan_to_num(value.matrix, nan=-1.0).amax(dim=1).mean()
        return {f"{self.log_prefix}/reference/best_match_mean": float(best)}
