"""Mean attention distance per head of the model's timm ViTs."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_cka.analyses.base import Analysis, MeasuredBatch, Report, SetupContext
from lightning_cka.attention import AttentionDistanceCapture, plot_attention_distances, uniform_attention_distance
from lightning_cka.capture import HookSet
from lightning_cka.layers import find_backbones

__all__ = ["AttentionDistanceAnalysis"]


class AttentionDistanceAnalysis(Analysis):
    """Mean attention distance (pixels) of every head of the timm ViTs in the LightningModule,
    recomputed from each block's ``qkv`` on the first ``max_examples`` examples of a batch.

    Logs scalars ``attention_distance/<layer>`` (mean over heads) and the per-head scatter
    figure ``attention_distance/heads``; ``history`` holds ``{layer: [distance per head]}``.

    Args:
        max_examples: examples per batch used (recomputing attention costs about one extra
            attention pass per layer); ``None`` for all.
    """

    key = "attention_distance"
    model_wide = True

    def __init__(self, max_examples: int | None = 32) -> None:
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"attention_max_examples must be a positive int or None, got {max_examples}.")
        self.max_examples = max_examples
        self.capture: AttentionDistanceCapture | None = None

    def setup(self, context: SetupContext) -> bool:
        if not any(b.kind == "vit" for b in find_backbones(context.module)):
            return False
        self.capture = AttentionDistanceCapture(context.module, self.max_examples)
        return True

    def attach(self, hooks: HookSet) -> None:
        assert self.capture is not None
        self.capture.attach(hooks)

    def reset(self, device: torch.device) -> None:
        assert self.capture is not None
        self.capture.metric.to(device)
        self.capture.reset()

    def update(self, batch: MeasuredBatch) -> None:
        """The hooks already folded this batch into the metric."""

    def compute(self) -> dict[str, list[float]] | None:
        assert self.capture is not None
        return {layer: heads.tolist() for layer, heads in self.capture.compute().items()} or None

    def report(self, value: Mapping[str, list[float]], epoch: int, step: int) -> Report:
        assert self.capture is not None
        title = f"Mean attention distance per head, epoch {epoch} (step {step})"
        bounds = {}
        if len(self.capture.geometry) == 1:  # one ViT: its uniform-attention line and possible range
            uniform, largest = uniform_attention_distance(*next(iter(self.capture.geometry.values())))
            bounds = {"uniform": uniform, "largest": largest}
        fig, _ = plot_attention_distances({k: torch.tensor(v) for k, v in value.items()}, title=title, **bounds)
        scalars = {f"attention_distance/{layer}": sum(h) / len(h) for layer, h in value.items()}
        report = Report(scalars=scalars, figures={"attention_distance/heads": fig})
        report.captions["attention_distance/heads"] = (
            "Each dot is one attention head: how far (in pixels) it looks on average, per block. Local heads sit "
            "low, global heads near the dashed uniform-attention line. Raghu et al. 2021 find a mix of local and "
            "global heads in early blocks and only global ones late; with little data early heads stay global."
        )
        report.layouts = {"attention distance": {"mean over heads, per block": ["attention_distance/.*"]}}
        return report
