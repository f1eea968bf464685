"""Capture: forward hooks that reduce each chosen layer's activation inside the hook.

Nothing from a batch outlives the hook except its reduction (an ``(n, n)`` Gram matrix, or
the small per-example statistics of :mod:`lightning_cka.norm_ratio`), so in-place
operations that follow a module (ResNet's ``x += shortcut``, in-place ReLU) cannot change
what was recorded, and memory is ``O(L n^2)`` rather than ``O(L n p)``.

:class:`HookSet` is the one hook mechanism of the library: every capture (CKA Grams, norm
ratios, attention distances) registers through it, and removing the set removes them all.

A layer is a :class:`~lightning_cka.layers.HookPoint`: a module's output (forward hook) or,
for names ending in ``":in"``, its first positional input (forward pre-hook), see
:mod:`lightning_cka.layers`. Warnings from hooks go through Lightning's ``rank_zero_warn``,
so a distributed run prints each once, not once per process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_cka.functional import gram, gram_dtype, gram_workspace
from lightning_cka.layers import HookPoint, LayerSpec, hook_points


def _env_rank() -> int:
    """The global rank from the launcher's environment (0 outside distributed runs), as Lightning reads it."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


# rank_zero_warn needs the rank; Lightning sets it on import and again once the Trainer knows it.
# Set it here only when nobody has, so the capture works without Lightning imported.
if getattr(rank_zero_only, "rank", None) is None:
    rank_zero_only.rank = _env_rank()  # type: ignore[attr-defined]

__all__ = [
    "REDUCTIONS",
    "GramCapture",
    "HookPoint",
    "HookSet",
    "Reduction",
    "extract_input",
    "reduce_features",
    "select_output",
]

#: How a layer's activation is reduced before its Gram is formed (see :func:`reduce_features`).
Reduction = Literal["flatten", "mean", "cls"]
REDUCTIONS: tuple[Reduction, ...] = ("flatten", "mean", "cls")
OutputSelector = int | str


class HookSet:
    """A group of hooks on a model that are removed together (also usable as a context manager).

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> with HookSet() as hooks:
        ...     hooks.forward(net, lambda module, args, output: None)
        ...     hooks.forward_pre(net, lambda module, args: None)
        ...     len(hooks), len(net._forward_hooks) + len(net._forward_pre_hooks)
        (2, 2)
        >>> len(net._forward_hooks) + len(net._forward_pre_hooks)
        0
    """

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

    Example:
        >>> import torch
        >>> out, weights = torch.zeros(2, 5, 8), torch.ones(2, 5, 5)
        >>> select_output((out, weights)).shape  # e.g. nn.MultiheadAttention
        torch.Size([2, 5, 8])
        >>> select_output({"logits": out}, "logits").shape
        torch.Size([2, 5, 8])
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

    ``(n, p)`` activations are returned unchanged whatever the reduction.

    Example:
        >>> import torch
        >>> tokens = torch.randn(4, 65, 192)
        >>> reduce_features(tokens, "mean").shape, reduce_features(tokens, "cls").shape
        (torch.Size([4, 192]), torch.Size([4, 192]))
        >>> reduce_features(torch.randn(4, 64, 8, 8), "mean").shape
        torch.Size([4, 64])
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
    element by default) or of a dict (pass the key, e.g. ``"image"``).

    Example:
        >>> import torch
        >>> images, labels = torch.zeros(8, 3, 32, 32), torch.zeros(8)
        >>> extract_input((images, labels)).shape
        torch.Size([8, 3, 32, 32])
        >>> extract_input({"image": images, "label": labels}, "image").shape
        torch.Size([8, 3, 32, 32])
    """
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
    """Hooks that turn each chosen layer's activation into its Gram matrix during a forward pass.

    Args:
        points: layer name -> :class:`~lightning_cka.layers.HookPoint` (a module's output or,
            with ``on_input``, its first positional input), in the order of the CKA matrix. A
            plain ``name -> module`` mapping is accepted too and means the modules' outputs.
        reduction: feature reduction (see :func:`reduce_features`).
        output: which element of a tuple/dict output to use (see :func:`select_output`); input
            points always use the first positional argument.
        precision: Gram product dtype (``None``: at least float32).

    Use :meth:`attach` to register into a :class:`HookSet`, run the model, then
    :meth:`collect` to get the stacked ``(L, n, n)`` Grams of that forward pass. A module that
    runs more than once in a forward pass (a shared block) is measured at its first call.
    :meth:`for_layers` builds a capture from layer names.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
        >>> capture = GramCapture.for_layers(net, ["1:in", "1", "2"])
        >>> x = torch.randn(8, 3)
        >>> with HookSet() as hooks, torch.no_grad():
        ...     capture.attach(hooks)
        ...     _ = net(x)
        ...     grams = capture.collect()
        >>> grams.shape
        torch.Size([3, 8, 8])
        >>> h = net[0](x).detach()  # the input of net[1]
        >>> h = h - h.mean(0)  # Grams are of mean-centred features
        >>> torch.allclose(grams[0], h @ h.T, atol=1e-5)
        True
    """

    def __init__(
        self,
        points: Mapping[str, HookPoint] | Mapping[str, nn.Module],
        reduction: str = "flatten",
        output: OutputSelector = 0,
        precision: torch.dtype | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        self.points: dict[str, HookPoint] = {}
        for name, point in points.items():
            if isinstance(point, nn.Module):
                point = HookPoint(name, point, False)
            elif not isinstance(point, HookPoint):
                raise TypeError(
                    f"GramCapture needs nn.Module or HookPoint values, got {type(point).__name__} for {name!r}."
                )
            self.points[name] = point
        self.names = list(self.points)
        self.modules = {name: point.module for name, point in self.points.items()}
        self.reduction = reduction
        self.output = output
        self.precision = precision
        self._grams: list[Tensor | None] = [None] * len(self.names)
        self._warned: set[str] = set()
        self._workspace: Tensor | None = None  # CPU scratch for one forward pass, see _workspace_for

    @classmethod
    def for_layers(
        cls,
        root: nn.Module,
        names: LayerSpec,
        reduction: str = "flatten",
        output: OutputSelector = 0,
        precision: torch.dtype | None = None,
    ) -> GramCapture:
        """A capture of the layers ``names`` of ``root``: names relative to ``root``, with
        ``":in"`` for inputs, or anything :func:`~lightning_cka.layers.resolve_layers` accepts.

        Example:
            >>> from torch import nn
            >>> GramCapture.for_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "1:in").names
            ['1:in']
        """
        return cls(hook_points(root, names), reduction, output, precision)

    def attach(self, hooks: HookSet) -> None:
        """Register one hook per layer into ``hooks`` (a pre-hook for input points)."""
        for index, name in enumerate(self.names):
            point = self.points[name]
            if point.on_input:
                hooks.forward_pre(point.module, self._pre_hook(index))
            else:
                hooks.forward(point.module, self._hook(index))

    def _record(self, index: int, activation: Callable[[], Tensor]) -> None:
        if self._grams[index] is not None:
            return  # the module ran again in the same step: keep the first call
        try:
            x = reduce_features(activation().detach(), self.reduction)
            with torch.no_grad():
                self._grams[index] = gram(x, self.precision, self._workspace_for(x))
        except Exception as err:  # never break the user's forward pass
            self._warn_once(self.names[index], f"could not be captured ({err}); it is skipped for this batch.")

    def _hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(index, lambda: select_output(output, self.output))

        return hook

    def _pre_hook(self, index: int) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            def first_input() -> Tensor:
                if not args or not isinstance(args[0], Tensor):
                    got = type(args[0]).__name__ if args else "no positional argument"
                    raise TypeError(f"its module's first positional input is not a tensor (got {got})")
                return args[0]

            self._record(index, first_input)

        return pre_hook

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
            rank_zero_warn(f"Layer {name!r} {message}", category=UserWarning)

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
