"""Logging sinks: push rendered figures, scalars and raw matrices to whatever loggers a Trainer has.

Call these on global rank zero only (the callback does). Each figure is rendered once to
an RGB array and handed to every logger in the form it understands:

- ``TensorBoardLogger``: ``add_image`` (HWC), ``add_custom_scalars`` layouts;
- loggers with ``log_image`` (``WandbLogger``, ``NeptuneLogger``, ...): that method;
- any other logger: a PNG file under the run directory (:func:`run_dir`);
- no logger at all: nothing (the callback keeps its results in ``history``).

Scalars go through ``logger.log_metrics``, which every Lightning logger implements.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from lightning_cka.plotting import figure_to_array

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["log_custom_scalar_layout", "log_figure", "log_scalars", "log_text", "run_dir", "unique_path"]


def run_dir(trainer: pl.Trainer) -> Path:
    """Directory of the current run: the first logger's ``log_dir`` (TensorBoard, CSV) or
    ``save_dir``, else ``trainer.default_root_dir``. Unlike ``trainer.log_dir`` this is not a
    collective, so it may be called on rank zero alone."""
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None) or logger.save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _is_tensorboard(logger: Any) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def log_figure(trainer: pl.Trainer, tag: str, fig: Figure, step: int) -> None:
    """Render ``fig`` once and send it to every logger of ``trainer`` under ``tag`` at ``step``."""
    image = figure_to_array(fig)
    wrote_file = False
    for logger in trainer.loggers:
        if _is_tensorboard(logger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[image], step=step)
        elif not wrote_file:
            _save_png(trainer, tag, image, step)
            wrote_file = True


def _save_png(trainer: pl.Trainer, tag: str, image: np.ndarray, step: int) -> Path:
    from PIL import Image

    path = unique_path(run_dir(trainer) / "figures" / f"{tag.replace('/', '_')}_step{step:08d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger (no-op without loggers)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


# Layout already written per TensorBoard writer: several analyses (and several CKACallbacks)
# contribute charts, and TensorBoard shows one layout per run, so each write is the union.
_LAYOUTS: dict[int, dict[str, dict[str, list[str]]]] = {}


def log_custom_scalar_layout(trainer: pl.Trainer, layout: Mapping[str, Mapping[str, list[str]]]) -> None:
    """Add charts to the run's TensorBoard custom-scalars layout ``{category: {chart: [tag regex, ...]}}``.

    Each chart is a multi-line chart: every scalar tag matching one of its regexes is a line,
    with a legend. The layout written is the union of everything added so far for that
    writer; nothing is written when ``layout`` adds nothing new. Only TensorBoard has this
    concept; other loggers are left alone.
    """
    for logger in trainer.loggers:
        if not _is_tensorboard(logger):
            continue
        writer = logger.experiment
        merged = _LAYOUTS.setdefault(id(writer), {})
        before = repr(merged)
        for category, charts in layout.items():
            for chart, tags in charts.items():
                existing = merged.setdefault(category, {}).setdefault(chart, [])
                existing.extend(t for t in tags if t not in existing)
        if repr(merged) != before:
            writer.add_custom_scalars(
                {
                    category: {chart: ["Multiline", tags] for chart, tags in charts.items()}
                    for category, charts in merged.items()
                }
            )


def unique_path(path: Path) -> Path:
    """``path``, or the first of ``<stem>-v1<suffix>``, ``<stem>-v2<suffix>``, ... that does not
    exist yet, so that nothing written before is overwritten (like ``ModelCheckpoint``'s
    versioned names)."""
    candidate, version = path, 0
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    return candidate


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int) -> None:
    """Send a short text (how to read a figure) to loggers that take text (TensorBoard's text plugin)."""
    for logger in trainer.loggers:
        if _is_tensorboard(logger):
            logger.experiment.add_text(tag, text, global_step=step)
