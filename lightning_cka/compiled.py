"""Running ``torch.compile``'d modules eagerly while hooks must see them.

Forward hooks registered after a module was compiled are not part of the compiled graph
and never fire (pytorch#117758). Rather than recompiling with hooks inside (and paying for
them in every training step), :class:`EagerWhileMeasuring` switches the compiled pieces of a
LightningModule back to their original Python ``forward`` for the validation epochs that are
measured, and restores the compiled callables afterwards. The compiled graphs stay cached,
so switching back does not recompile. Three forms of compilation are recognised:

- ``self.model = torch.compile(net)``: an ``OptimizedModule`` in the tree (its ``forward``);
- ``net.compile()``: a module with ``_compiled_call_impl``;
- ``torch.compile(lightning_module)`` handed to the Trainer: Lightning's ``_compiler_ctx``
  (the compiled ``forward`` and ``validation_step``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["EagerWhileMeasuring"]

# (id(obj), attribute) -> [compiled value, number of EagerWhileMeasuring holding it eager].
# Shared so that two callbacks measuring the same compiled model restore it exactly once.
_SWAPPED: dict[tuple[int, str], list[Any]] = {}


def _optimized_module_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - very old torch
        return None
    return OptimizedModule


class EagerWhileMeasuring:
    """Find the compiled pieces under ``root``; :meth:`enter` makes them eager, :meth:`exit` restores them.

    Attributes:
        names: human-readable names of the compiled pieces (empty when nothing is compiled).
    """

    def __init__(self, root: nn.Module) -> None:
        self._root = root
        self._saved: list[tuple[Any, str]] = []  # (object, attribute) this instance holds eager
        self.names: list[str] = []
        optimized = _optimized_module_type()
        for name, module in root.named_modules():
            if optimized is not None and isinstance(module, optimized):
                self.names.append(f"{name or type(root).__name__} (torch.compile)")
            elif getattr(module, "_compiled_call_impl", None) is not None:
                self.names.append(f"{name or type(root).__name__} (.compile())")
        if getattr(root, "_compiler_ctx", None):
            self.names.append(f"{type(root).__name__} (compiled LightningModule)")

    def __bool__(self) -> bool:
        return bool(self.names)

    def enter(self) -> None:
        """Switch every compiled piece to eager execution (idempotent)."""
        if self._saved:
            return
        optimized = _optimized_module_type()
        for module in self._root.modules():
            if optimized is not None and isinstance(module, optimized):
                self._swap(module, "forward", module._orig_mod.__call__)
            elif getattr(module, "_compiled_call_impl", None) is not None:
                self._swap(module, "_compiled_call_impl", None)
        ctx = getattr(self._root, "_compiler_ctx", None)
        if ctx:
            self._swap(self._root, "forward", ctx["original_forward"])
            self._swap(self._root, "validation_step", ctx["original_validation_step"])

    def _swap(self, obj: Any, attribute: str, eager: Any) -> None:
        entry = _SWAPPED.setdefault((id(obj), attribute), [obj.__dict__[attribute], 0])
        if entry[1] == 0:
            object.__setattr__(obj, attribute, eager)
        entry[1] += 1
        self._saved.append((obj, attribute))

    def exit(self) -> None:
        """Restore the compiled callables once no other instance holds them eager (idempotent)."""
        while self._saved:
            obj, attribute = self._saved.pop()
            entry = _SWAPPED[(id(obj), attribute)]
            entry[1] -= 1
            if entry[1] == 0:
                object.__setattr__(obj, attribute, entry[0])
                del _SWAPPED[(id(obj), attribute)]
