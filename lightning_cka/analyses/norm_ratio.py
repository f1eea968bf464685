"""Skip-connection norm ratios ``||z|| / ||f(z)||`` of every residual unit of the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_cka.analyses.base import Analysis, MeasuredBatch, Report, SetupContext
from lightning_cka.capture import HookSet
from lightning_cka.norm_ratio import NormRatioCapture, find_residual_units, plot_norm_ratios

__all__ = ["NormRatioAnalysis"]


class NormRatioAnalysis(Analysis):
    """Norm ratios of the residual units of the timm/torchvision ViT and ResNet blocks found in
    the LightningModule (see :mod:`lightning_cka.norm_ratio`); off for other architectures.

    Logs scalars ``norm_ratio/<block>/<unit>/<tokens>``, the figure ``norm_ratio/curves`` and
    a TensorBoard custom-scalars layout with one chart per unit and token group.
    """

    key = "norm_ratio"
    model_wide = True

    def __init__(self) -> None:
        self.capture: NormRatioCapture | None = None

    def setup(self, context: SetupContext) -> bool:
        units = find_residual_units(context.module)
        self.capture = NormRatioCapture(context.module, units) if units else None
        return self.capture is not None

    def attach(self, hooks: HookSet) -> None:
        assert self.capture is not None
        self.capture.attach(hooks)

    def reset(self, device: torch.device) -> None:
        assert self.capture is not None
        self.capture.metric.to(device)
        self.capture.reset()

    def update(self, batch: MeasuredBatch) -> None:
        """The hooks already folded this batch into the metric."""

    def clear(self) -> None:
        if self.capture is not None:
            self.capture.clear()

    def compute(self) -> dict[str, float] | None:
        assert self.capture is not None
        return self.capture.compute() or None

    def report(self, value: Mapping[str, float], epoch: int, step: int) -> Report:
        fig, _ = plot_norm_ratios(dict(value), title=f"Skip-connection norm ratio, epoch {epoch} (step {step})")
        report = Report(
            scalars={f"norm_ratio/{series}": ratio for series, ratio in value.items()},
            figures={"norm_ratio/curves": fig},
        )
        report.layouts = {"norm ratio": _layout(value)}
        report.captions["norm_ratio/curves"] = (
            "Skip-connection norm ratio ||z|| / ||f(z)|| of every residual unit (log scale): how much larger the "
            "residual stream is than what each block adds to it. Above 1, the skip connection dominates. "
            "Raghu et al. 2021 find much larger ratios in ViTs than in ResNets, and the CLS token and the "
            "spatial tokens swapping roles about halfway through a ViT."
        )
        return report


def _layout(ratios: Mapping[str, float]) -> dict[str, list[str]]:
    """One chart per (unit, token group), each holding that series of every block."""
    charts: dict[str, list[str]] = {}
    for series in ratios:
        _, unit, group = series.rsplit("/", 2)
        charts.setdefault(f"{unit} unit, {group} tokens, per block", [f"norm_ratio/.*/{unit}/{group}$"])
    return charts
