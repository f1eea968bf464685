"""Rendering: CKA heatmaps and line/scatter figures with matplotlib.

Figures are built with :class:`matplotlib.figure.Figure` directly (not ``pyplot``), so
nothing is registered globally and a figure is freed as soon as it is dropped; this
keeps memory flat when a figure is rendered every validation epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

__all__ = [
    "READABLE",
    "common_prefix",
    "figure_to_array",
    "plot_cka_heatmap",
    "plot_series",
    "readable",
    "short_names",
]

P = ParamSpec("P")
R = TypeVar("R")

#: Font sizes for figures logged as images: TensorBoard shows them as ~350 px wide cards, so text
#: is sized for that, not for a full-size page.
READABLE = {
    "font.size": 13,
    "axes.titlesize": 13,
    "axes.labelsize": 13,
    "xtick.labelsize": 12,
    "ytick.labelsize": 12,
    "legend.fontsize": 11,
    "figure.titlesize": 14,
}


def readable(draw: Callable[P, R]) -> Callable[P, R]:
    """Draw with :data:`READABLE` font sizes (a decorator for plotting functions)."""

    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(READABLE):
            return draw(*args, **kwargs)

    return wrapper


#: Most tick labels drawn along one heatmap axis; more layers are labelled every k-th.
_MAX_TICKS = 20


def _label_size(count: int) -> float:
    """Tick label font size (points) for ``count`` labels on a ~4-inch axis: large for a few
    layers, never below 7 pt."""
    return float(np.clip(180.0 / max(count, 1), 7.0, 12.0))


def _ticks(ax_set_ticks: Any, ax_set_labels: Any, names: Sequence[str] | None, size: int) -> None:
    if names is None:
        names = [str(i) for i in range(size)]
    step = max(1, int(np.ceil(size / _MAX_TICKS)))
    idx = list(range(0, size, step))
    ax_set_ticks(idx)
    ax_set_labels([names[i] for i in idx], fontsize=_label_size(len(idx)))


@readable
def plot_cka_heatmap(
    matrix: torch.Tensor | np.ndarray,
    rows: Sequence[str] | None = None,
    cols: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    cmap: str = "magma",
) -> tuple[Figure, Axes]:
    """Draw an ``(L, M)`` CKA matrix as a heatmap on a fixed 0..1 colour scale.

    Row ``i`` is drawn from the top, so layer 0 sits in the top-left corner. NaN entries
    (undefined CKA) are drawn grey. Returns ``(fig, ax)``.
    """
    values = (
        matrix.detach().double().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, dtype=float)
    )
    if values.ndim != 2:
        raise ValueError(f"Expected a 2-D CKA matrix, got shape {values.shape}.")
    n_rows, n_cols = values.shape
    if ax is None:
        # One size for every layer count (readable at TensorBoard's default image width);
        # labels are thinned and their font chosen for the count instead.
        fig = Figure(figsize=(5.6, 4.8), dpi=100)
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    image = ax.imshow(
        np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap=colormap, interpolation="nearest", aspect="auto"
    )
    fig.colorbar(image, ax=ax, label="CKA")
    _ticks(ax.set_yticks, ax.set_yticklabels, rows, n_rows)
    _ticks(ax.set_xticks, ax.set_xticklabels, cols, n_cols)
    ax.tick_params(axis="x", labelrotation=90)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig, ax


@readable
def plot_series(
    series: Mapping[str, Sequence[float]],
    x: Sequence[float] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    xlabel: str = "block",
    ylabel: str = "",
    scatter: bool = False,
    logy: bool = False,
    xticklabels: Sequence[str] | None = None,
    hlines: Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
) -> tuple[Figure, Axes]:
    """Lines (or scatter points) of named series against a shared x axis; returns ``(fig, ax)``.

    With ``scatter=True`` each value of a series may itself be a sequence (e.g. one point per
    attention head), drawn as several points at the same x.

    Args:
        xticklabels: names of the x positions ``0, 1, ...`` (e.g. short layer names), drawn
            instead of numbers.
        hlines: labelled horizontal reference lines (chance level, uniform attention, ...).
        ylim: fixed y range (e.g. the possible range of the quantity).
    """
    if ax is None:
        fig = Figure(figsize=(6.0, 4.4), dpi=100)
        ax = fig.add_subplot()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    for label, values in series.items():
        xs = list(x) if x is not None else list(range(len(values)))
        if scatter:
            px = [xi for xi, v in zip(xs, values, strict=False) for _ in np.atleast_1d(v)]
            py = [float(u) for v in values for u in np.atleast_1d(v)]
            ax.scatter(px, py, s=14, alpha=0.8, label=label)
        else:
            ax.plot(xs[: len(values)], list(values), marker="o", markersize=3, label=label)
    for index, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, color="0.35", linestyle=("--", ":", "-.")[index % 3], linewidth=1.2, label=label)
    if logy:
        ax.set_yscale("log")
        # plain numbers (0.5, 2, 10) rather than powers of ten
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    if ylim is not None:
        ax.set_ylim(*ylim)
    if xticklabels is not None:
        positions = list(range(len(xticklabels)))
        step = max(1, int(np.ceil(len(positions) / _MAX_TICKS)))
        ax.set_xticks(positions[::step])
        ax.set_xticklabels(list(xticklabels)[::step], rotation=90, fontsize=_label_size(len(positions[::step])))
    elif all(float(v).is_integer() for v in (x if x is not None else [0])):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if series or hlines:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, ax


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an ``(H, W, 3)`` uint8 RGB array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix that :func:`short_names` removes (``""`` when none), e.g. the
    LightningModule attribute holding the network.

    Example:
        >>> common_prefix(["model.blocks.0.attn", "model.blocks.1.attn"])
        'model.'
        >>> common_prefix(["blocks.0", "blocks.1"])
        ''
    """
    names = list(names)
    if not names:
        return ""
    short = short_names(names)
    return names[0][: len(names[0]) - len(short[0])]


def short_names(names: Sequence[str]) -> list[str]:
    """Display names: ``names`` without the dotted prefix they all share (a container name such
    as ``blocks`` stays before an index; a lone name is kept whole).

    Example:
        >>> short_names(["model.blocks.0.attn", "model.blocks.1.attn"])
        ['blocks.0.attn', 'blocks.1.attn']
        >>> short_names(["model.layer1.0", "model.layer2.0"])
        ['layer1.0', 'layer2.0']
    """
    names = list(names)
    if len(names) < 2:
        return [n.split(".", 1)[1] if "." in n and len(n.split(".")) > 2 else n for n in names]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if common and parts[0][common].split(":")[0].isdigit():
        common -= 1
    return [".".join(p[common:]) for p in parts]
