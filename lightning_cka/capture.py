"""Capture: forward hooks that reduce each chosen layer's output inside the hook.

Nothing from a batch outlives the hook except its reduction (an ``(n, n)`` Gram matrix, or
the small per-example statistics of :mod:`lightning_cka.norm_ratio`), so in-place
operations that follow a module (ResNet's ``x += shortcut``, in-place ReLU) cannot change
what was recorded, and memory is ``O(L n^2)`` rather than ``O(L n p)``.

:class:`HookSet` is the one hook mechanism of the library: every capture (CKA Grams, norm
ratios, attention distances) registers through it, and removing the set removes them all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_cka.functional import gram, gram_dtype, gram_workspace

__all__ = [
    "REDUCTIONS",
    "GramCapture",
    "HookSet",
    "extract_input",
    "reduce_features",
    "select_output",
]

REDUCTIONS = ("flatten", "mean", "cls")
OutputSelector = int | str


class HookSet:
    """A group of hooks on a model that are removed together (also usable as a context manager)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], None]) -> None:
        """Register ``fn(module, args, output)`` after ``module.forward``."""
        self._handles.append(module.register_forward_hook(fn))

    def forward_pre(self, module: nn.Module, fn: Callable[[nn.Module, Any], None]) -> None:
        """Register ``fn(module, args)`` before ``module.forward``."""
        self._handles.append(module.register_forward_pre_hook(fn))

    def remove(self) -> None:
        """Remove every hook of the set; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def select_output(output: Any, select: OutputSelector = 0) -> Tensor:
    """Pick the activation tensor from a module output.

    A tensor is returned as is; from a tuple/list the element at index ``select`` (default the
    first); from a mapping the value at key ``select`` (with the default ``0``, its first
    tensor value).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(select, str):
            return output[select]
        tensors = [v for v in output.values() if isinstance(v, Tensor)]
        if not tensors:
            raise TypeError("Module returned a mapping without tensors; pass `output=` with the key to use.")
        return tensors[select]
    if isinstance(output, Sequence) and not isinstance(output, str):
        if isinstance(select, str):
            raise TypeError(
                f"Module returned a {type(output).__name__}; select its element with an int, not {select!r}."
            )
        value = output[select]
        if not isinstance(value, Tensor):
            raise TypeError(f"Element {select} of the module output is a {type(value).__name__}, not a tensor.")
        return value
    raise TypeError(f"Cannot take an activation from a module output of type {type(output).__name__}.")


def reduce_features(x: Tensor, reduction: str = "flatten") -> Tensor:
    """Reduce one layer's activation ``(n, ...)`` before its Gram is formed.

    - ``"flatten"``: keep everything (tokens x channels, or C x H x W), the paper's default.
    - ``"mean"``: average over tokens ``(n, T, C) -> (n, C)`` or positions ``(n, C, H, W) -> (n, C)``.
    - ``"cls"``: the first token of ``(n, T, C)`` ViT activations, ``-> (n, C)``.
    """
    if reduction == "flatten" or x.ndim == 2:
        return x
    if reduction == "mean":
        if x.ndim == 3:
            return x.mean(dim=1)
        return x.flatten(2).mean(dim=2)
    if reduction == "cls":
        if x.ndim != 3:
            raise ValueError(f"reduction='cls' needs token activations (n, T, C), got shape {tuple(x.shape)}.")
        return x[:, 0]
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def extract_input(batch: Any, key: str | int = 0) -> Tensor:
    """The model input of a dataloader batch: a tensor, ``batch[key]`` of a tuple/list (first
    element by default) or of a dict (pass the key, e.g. ``"image"``)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if key in batch:
            return batch[key]
        raise KeyError(f"Batch is a dict with keys {sorted(map(str, batch))}; pass the input key (input_key=...).")
    if isinstance(batch, Sequence) and len(batch) > 0:
        return batch[key if isinstance(key, int) else 0]
    raise TypeError(f"Cannot find the model input in a batch of type {type(batch).__name__}.")


class GramCapture:
    """Hooks that turn each chosen layer's output into its Gram matrix during a forward pass.

    Args:
        modules: layer name -> module, in the order of the CKA matrix.
        reduction: feature reduction (see :func:`reduce_features`).
        output: which element of a tuple/dict output to use (see :func:`select_output`).
        precision: Gram product dtype (``None``: at least float32).

    Use :meth:`attach` to register into a :class:`HookSet`, run the model, then
    :meth:`collect` to get the stacked ``(L, n, n)`` Grams of that forward pass.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        reduction: str = "flatten",
        output: OutputSelector = 0,
        precision: torch.dtype | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        self.names = list(modules)
        self.modules = dict(modules)
        self.reduction = reduction
        self.output = output
        self.precision = precision
        self._grams: list[Tensor | None] = [None] * len(self.names)
        self._warned: set[str] = set()
        self._workspace: Tensor | None = None  # CPU scratch for one forward pass, see _workspace_for

    def attach(self, hooks: HookSet) -> None:
        for index, name in enumerate(self.names):
            hooks.forward(self.modules[name], self._hook(index))

    def _hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._grams[index] is not None:
                return  # the module ran again in the same step: keep the first call
            try:
                x = reduce_features(select_output(output, self.output).detach(), self.reduction)
                with torch.no_grad():
                    self._grams[index] = gram(x, self.precision, self._workspace_for(x))
            except Exception as err:  # never break the user's forward pass
                self._warn_once(self.names[index], f"could not be captured ({err}); it is skipped for this batch.")

        return hook

    def _workspace_for(self, x: Tensor) -> Tensor | None:
        """One scratch buffer shared by the layers of a forward pass on CPU, where a fresh
        activation-sized copy per layer is page-faulted in again each time (glibc hands blocks
        that large back to the OS when they are freed). It is released by
        :meth:`collect`/:meth:`clear`, so nothing outlives the batch. CUDA's
        caching allocator already recycles the copies. Like the recorded Grams, the buffer
        assumes the hooked layers of one capture run one after another (one thread)."""
        if x.device.type != "cpu":
            return None
        ws = self._workspace
        if ws is None or ws.dtype != gram_dtype(x.dtype, self.precision) or ws.numel() < x.numel():
            ws = self._workspace = gram_workspace(x, self.precision)
        return ws

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"Layer {name!r} {message}", UserWarning, stacklevel=3)

    def clear(self) -> None:
        """Forget whatever the hooks recorded."""
        self._grams = [None] * len(self.names)
        self._workspace = None

    def collect(self) -> Tensor | None:
        """Stacked ``(L, n, n)`` Grams of the last forward pass, then clear.

        Returns ``None`` (with a warning naming the layers, once) when some layer did not run
        or the layers saw different numbers of examples.
        """
        grams, self._grams = self._grams, [None] * len(self.names)
        self._workspace = None
        missing = [n for n, g in zip(self.names, grams, strict=True) if g is None]
        if missing:
            for name in missing:
                self._warn_once(name, "produced no output during the forward pass; batches without it are skipped.")
            return None
        sizes = {g.shape[-1] for g in grams if g is not None}
        if len(sizes) != 1:
            self._warn_once(self.names[0], f"and its peers saw different batch sizes {sorted(sizes)}; batch skipped.")
            return None
        return torch.stack(grams)  # type: ignore[arg-type]
