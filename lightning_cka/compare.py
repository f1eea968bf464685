"""Offline comparison: ``compare(model, dataloader, layers)`` and its :class:`CKAResult`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_cka.capture import REDUCTIONS, GramCapture, HookSet, OutputSelector, Reduction, extract_input
from lightning_cka.compiled import EagerWhileMeasuring
from lightning_cka.functional import Precision
from lightning_cka.layers import LayerSpec, resolve_layers
from lightning_cka.metric import MinibatchCKA, _renamed, resolve_precision

__all__ = ["CKAResult", "compare"]


@dataclass
class CKAResult:
    """A CKA matrix with the names of its rows and columns.

    Attributes:
        matrix: ``(L, M)`` float64 tensor; ``matrix[i, j]`` is CKA(rows[i], cols[j]).
        rows: row layer names.
        cols: column layer names.
        meta: free-form information (epoch, number of batches, ...).

    Example:
        >>> import tempfile
        >>> result = CKAResult(torch.eye(2, dtype=torch.float64), ["a", "b:in"], ["a", "b:in"], {"batches": 3})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     loaded = CKAResult.load(result.save(f"{tmp}/cka"))
        >>> loaded.rows, loaded.meta, torch.equal(loaded.matrix, result.matrix)
        (['a', 'b:in'], {'batches': 3}, True)
    """

    matrix: Tensor
    rows: list[str]
    cols: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def plot(self, ax: Any = None, title: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
        """Heatmap of the matrix (see :func:`lightning_cka.plotting.plot_cka_heatmap`); returns ``(fig, ax)``."""
        from lightning_cka.plotting import plot_cka_heatmap

        return plot_cka_heatmap(self.matrix, self.rows, self.cols, ax=ax, title=title, **kwargs)

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` with arrays ``matrix``, ``rows``, ``cols`` (``np.load(path)["matrix"]``)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: np.asarray(v) for k, v in self.meta.items() if isinstance(v, int | float | str)}
        np.savez(
            path,
            matrix=self.matrix.detach().double().cpu().numpy(),
            rows=np.asarray(self.rows, dtype=str),
            cols=np.asarray(self.cols, dtype=str),
            **{f"meta_{k}": v for k, v in meta.items()},
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> CKAResult:
        """Read a file written by :meth:`save`."""
        with np.load(Path(path)) as data:
            meta = {k[5:]: data[k].item() for k in data.files if k.startswith("meta_")}
            return cls(torch.from_numpy(data["matrix"]), data["rows"].tolist(), data["cols"].tolist(), meta)


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def to_model_input(x: Tensor, model: nn.Module) -> Tensor:
    """Move an input batch to ``model``'s device and (for floating inputs) parameter dtype.

    Example:
        >>> to_model_input(torch.zeros(2, 3), nn.Linear(3, 1).double()).dtype
        torch.float64
    """
    dtype = _float_dtype(model) if x.is_floating_point() else None
    return x.to(device=_device(model), dtype=dtype or x.dtype, non_blocking=True)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode and restore every submodule's own ``training`` flag afterwards.

    A model in training mode with some parts frozen in eval mode (``model.train();
    model.bn.eval()``) comes back exactly so, not flattened by ``model.train(True)``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     [m.training for m in net.modules()]
        [False, False, False]
        >>> [m.training for m in net.modules()]
        [True, True, False]
    """
    previous = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, was_training in reversed(previous):
            m.training = was_training


def _check_arguments(
    model: Any,
    dataloader: Any,
    other: Any,
    max_batches: Any,
    input_key: Any,
    reduction: Any,
    output: Any,
    precision: Any,
) -> torch.dtype | None:
    """Validate :func:`compare`'s arguments before anything runs; returns the Gram dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if other is not None and not isinstance(other, nn.Module):
        raise TypeError(f"`reference` must be a torch.nn.Module or None, got {type(other).__name__}.")
    if isinstance(dataloader, Tensor):
        raise TypeError(
            f"`dataloader` is a single tensor of shape {tuple(dataloader.shape)}; iterating it would yield single "
            "examples. Pass a DataLoader or a list of batches, e.g. [tensor]."
        )
    if not isinstance(dataloader, Iterable) and not hasattr(type(dataloader), "__getitem__"):
        raise TypeError(f"`dataloader` must be an iterable of batches, got {type(dataloader).__name__}.")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)):
        raise TypeError(f"`max_batches` must be a positive int or None, got {max_batches!r}.")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}.")
    if isinstance(input_key, bool) or not isinstance(input_key, str | int):
        raise TypeError(f"`input_key` must be a str (dict batches) or int (tuple batches), got {input_key!r}.")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    if isinstance(output, bool) or not isinstance(output, str | int):
        raise TypeError(f"`output` must be an int (tuple outputs) or str (dict outputs), got {output!r}.")
    try:
        return resolve_precision(precision)
    except (TypeError, ValueError):
        raise ValueError(
            f"`precision` must be one of 'float32', 'bfloat16', 'float64' or a matching torch dtype, got {precision!r}."
        ) from None


def _progress(iterable: Iterable[Any], enabled: bool, total: int | None) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="CKA", unit="batch")


def compare(
    model: nn.Module,
    dataloader: Iterable[Any],
    layers: LayerSpec = "auto",
    reference: nn.Module | None = None,
    reference_layers: LayerSpec | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    input_key: str | int = 0,
    reduction: Reduction = "flatten",
    output: OutputSelector = 0,
    precision: Precision | torch.dtype = "float32",
    *,
    other: nn.Module | None = None,
    other_layers: LayerSpec | None = None,
) -> CKAResult:
    """Minibatch CKA between layers of ``model`` (L x L), or of ``model`` and ``reference`` (L x M).

    Args:
        model: the network to hook.
        dataloader: iterable of batches: tensors, tuples/lists (first element is the input) or
            dicts (``input_key`` names the input).
        layers: names from ``model.named_modules()`` (``"blocks.0"``; ``"blocks.0.norm2:in"`` for a
            module's input), glob patterns, module types or a preset (``"auto"``, ``"blocks"``,
            ``"sublayers"``, ``"stream"``); see :func:`lightning_cka.layers.resolve_layers`. Rows
            follow the order given.
        reference: a second network run on the same inputs (cross-comparison), as in
            ``CKACallback(reference=...)``.
        reference_layers: layers of ``reference`` (columns, in the order given); defaults to ``layers``.
        max_batches: stop after this many batches (a positive int; ``None``: all).
        progress: show a progress bar.
        input_key: dict key or tuple index of the model input in a batch.
        reduction: ``"flatten"`` (paper default), ``"mean"`` or ``"cls"``.
        output: element of tuple/dict module outputs to use.
        precision: Gram product dtype, ``"float32"``, ``"bfloat16"`` or ``"float64"``.
        other: deprecated name of ``reference``.
        other_layers: deprecated name of ``reference_layers``.

    Returns:
        a :class:`CKAResult` with the ``(L, M)`` matrix and the layer names.

    Raises:
        TypeError, ValueError: an invalid argument (named in the message), before any batch is read.
        ValueError: no usable batch was seen.

    Self-comparison runs ``model`` once per batch. Both models run in eval mode under
    ``torch.no_grad()``; their modes are restored and all hooks removed afterwards, also when
    an exception is raised. ``torch.compile``'d models run eagerly here (hooks do not fire
    inside compiled graphs) and are compiled again afterwards. A module that runs more than
    once per forward pass (a shared block) is measured at its first call.

    Example:
        >>> import torch
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        >>> batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
        >>> result = compare(vit, batches, layers="stream", progress=False)
        >>> result.rows
        ['blocks.0.norm2:in', 'blocks.0', 'blocks.1.norm2:in', 'blocks.1']
        >>> result.matrix.shape
        torch.Size([4, 4])
    """
    reference = _renamed("other", other, "reference", reference)
    reference_layers = _renamed("other_layers", other_layers, "reference_layers", reference_layers)
    other, other_layers = reference, reference_layers
    dtype = _check_arguments(model, dataloader, other, max_batches, input_key, reduction, output, precision)
    rows = resolve_layers(model, layers, "layers")
    cols = rows
    if other is not None:
        cols = resolve_layers(other, other_layers if other_layers is not None else layers, "reference_layers")
    capture = GramCapture.for_layers(model, rows, reduction, output, dtype)
    other_capture = None
    if other is not None:
        other_capture = GramCapture.for_layers(other, cols, reduction, output, dtype)
    metric = MinibatchCKA(
        precision=dtype, layer_names=rows, reference_layer_names=cols if other is not None else None
    ).to(_device(model))
    total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    models = (model,) if other is None else (model, other)
    eager = [EagerWhileMeasuring(m) for m in models]  # hooks do not fire inside compiled graphs
    batches = 0
    with HookSet() as hooks, eval_mode(*models), torch.no_grad(), contextlib.ExitStack() as restore:
        for e in eager:
            e.enter()
            restore.callback(e.exit)
        capture.attach(hooks)
        if other_capture is not None:
            other_capture.attach(hooks)
        for batch in _progress(dataloader, progress, total):
            if max_batches is not None and batches >= max_batches:
                break
            x = extract_input(batch, input_key)
            model(to_model_input(x, model))
            k = capture.collect()
            l = None
            if other is not None and other_capture is not None:
                other_capture.clear()  # `other` may share modules with `model`
                other(to_model_input(x, other))
                l = other_capture.collect()
                capture.clear()
                if l is None:
                    continue
            if k is None:
                continue
            metric.update_grams(k, None if l is None else l.to(k.device))
            batches += 1
    used = int(metric.num_batches)
    if used == 0:
        raise ValueError(
            f"compare() saw no usable batch out of {batches}: the dataloader was empty, the chosen layers never ran, "
            "or every batch had fewer than 4 examples or non-finite activations."
        )
    return CKAResult(metric.compute(), rows, list(cols), {"batches": used})
