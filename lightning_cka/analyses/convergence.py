"""Layer convergence over training: each layer's minibatch CKA with itself at earlier states.

Raghu et al. 2017 (SVCCA) compare every layer at checkpoint ``t`` with the same layer at the end
of training on one fixed set of examples and find that networks converge bottom-up: lower
layers reach their final representation first. The same comparison with linear CKA (Kornblith
et al. 2019) in its minibatch form (Nguyen et al. 2021) needs, per minibatch, the HSIC_1 sums of
``(K_l(t), K_l(s))``, ``(K_l(t), K_l(t))`` and ``(K_l(s), K_l(s))`` on the *same* examples:
only the Gram matrices of the past state, never its weights or activations.

- :class:`Convergence` does it live, inside :class:`~lightning_cka.CKACallback`: the only past
  states there are earlier validations, so each layer is compared with itself at the previous
  and at the first measured validation, on the first ``max_examples`` validation examples.
- :func:`convergence` does it offline for a list of checkpoints (e.g. against the last one,
  as in the SVCCA paper).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_cka.analyses.base import Analysis, AnalysisSkipped, MeasuredBatch, Report, SetupContext
from lightning_cka.capture import REDUCTIONS, GramCapture, HookSet, OutputSelector, extract_input
from lightning_cka.compare import CKAResult, eval_mode, to_model_input
from lightning_cka.compiled import EagerWhileMeasuring
from lightning_cka.functional import resolve_precision
from lightning_cka.layers import LayerSpec, resolve_layers
from lightning_cka.metric import MinibatchCKA
from lightning_cka.plotting import short_names

__all__ = ["AGAINST", "Convergence", "convergence"]

#: What :func:`convergence` compares each checkpoint's layers with.
AGAINST = ("last", "first", "previous")

#: Bytes of one kept batch's input fingerprint (four float64 sums).
_FINGERPRINT_BYTES = 4 * 8
#: Relative tolerance of the fingerprint comparison (the sums are accumulated in float64).
_FINGERPRINT_RTOL = 1e-9

# Causes that stop a validation from being compared with the kept references; the order is the
# order of the per-rank flag vector that all ranks sum (index 0 is "this rank has a reference").
_CAUSES = {
    "inputs": "the validation inputs differ from the kept ones (a shuffled validation loader, random "
    "augmentation in the validation data, or a changed dataset)",
    "fewer": "fewer validation batches came than were kept (a smaller validation set or a lower batch cap)",
    "more": "more validation batches came than were kept (the validation set grew)",
    "shape": "a validation batch has another shape than the kept one (another batch size or input size)",
    "failed": "a measured validation batch could not be processed (see the earlier warning)",
    "missing": "some processes have no kept reference (e.g. after resuming, or after a failure on that process)",
}
_CAUSE_ORDER = tuple(_CAUSES)

_CAPTION = (
    "Layer convergence: each column is a measured validation (labelled by epoch), each row a layer "
    "(input side at the top); the colour is the layer's minibatch CKA with itself at the previous "
    "measured validation, on the same validation examples. 1 (bright) means the layer's representation "
    "did not change since then. Layers that settle bottom-up show as a staircase: the top rows turn "
    "bright at earlier epochs than the rows below them. Grey: undefined."
)


@dataclass(eq=False)
class _Kept:
    """What is kept of one validation batch: its Gram matrices and a fingerprint of its inputs.

    Attributes:
        grams: ``(L, n (n + 1) / 2)`` upper triangles (diagonal included) of the layers' raw
            linear Grams of mean-centred features, row by row, in the capture's dtype.
        n: examples in the batch.
        fingerprint: ``(4,)`` float64 sums of the batch's inputs (see :func:`_fingerprint`).
        shape: shape of the batch's input tensor.
    """

    grams: Tensor
    n: int
    fingerprint: Tensor
    shape: tuple[int, ...]

    def to(self, device: torch.device) -> _Kept:
        if self.grams.device == device:
            return self
        return _Kept(self.grams.to(device), self.n, self.fingerprint.to(device), self.shape)

    def as_state(self) -> dict[str, Any]:
        return {"grams": _plain(self.grams), "n": self.n, "fingerprint": _plain(self.fingerprint), "shape": self.shape}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Kept:
        return cls(state["grams"], int(state["n"]), state["fingerprint"], tuple(state["shape"]))


def _plain(t: Tensor) -> Tensor:
    """A CPU copy that is an ordinary tensor even when made under Lightning's inference mode."""
    with torch.inference_mode(False):
        return t.detach().cpu().clone()


def _pack(k: Tensor) -> Tensor:
    """``(L, n, n)`` symmetric Grams -> ``(L, n (n + 1) / 2)`` upper triangles (a copy)."""
    n = k.shape[-1]
    rows, cols = torch.triu_indices(n, n, device=k.device)
    return k[:, rows, cols]


def _unpack(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_pack`: the ``(L, n, n)`` symmetric Grams."""
    rows, cols = torch.triu_indices(n, n, device=packed.device)
    out = packed.new_empty(packed.shape[0], n, n)
    out[:, rows, cols] = packed
    out[:, cols, rows] = packed
    return out


def _fingerprint(x: Tensor) -> Tensor:
    """``(4,)`` float64 fingerprint of an input batch ``(n, ...)``, on its device, no host sync.

    Per example ``i`` the sum ``s_i`` and the sum of squares ``q_i`` of its values (accumulated in
    float64); then ``[sum s_i, sum q_i, sum r_i s_i, sum r_i q_i]`` with the ramp
    ``r_i = (i + 1) / n``, so that the same examples in another order differ too.
    """
    n = x.shape[0] if x.ndim else 1
    flat = x.detach().reshape(n, -1)
    if not flat.is_floating_point():
        flat = flat.double()
    s = flat.sum(dim=1, dtype=torch.float64)
    q = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).square()
    ramp = torch.arange(1, n + 1, dtype=torch.float64, device=flat.device) / n
    return torch.stack([s.sum(), q.sum(), (ramp * s).sum(), (ramp * q).sum()])


def _fingerprints_differ(a: Tensor, b: Tensor, numel: int) -> Tensor:
    """0-d bool tensor: do two fingerprints of ``numel``-element batches differ (beyond rounding)?"""
    b = b.to(a.device)
    scale = a.abs() + b.abs() + torch.sqrt(numel * a[1].abs())  # sum |x| <= sqrt(numel * sum x^2)
    return ((a - b).abs() > _FINGERPRINT_RTOL * scale).any()


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


class Convergence(Analysis):
    """Each layer's minibatch CKA with itself at the previous and at the first measured validation.

    On every measured validation the Gram matrices of the callback's layers on the first
    ``max_examples`` validation examples (whole batches: keeping stops once the kept examples
    reach ``max_examples``) are kept, and on the next ones each layer's Grams are compared with
    the same layer's kept Grams of (a) the previous and (b) the first measured validation, batch
    by batch on the same examples, with the minibatch CKA of :class:`~lightning_cka.MinibatchCKA`
    (Nguyen et al. 2021). No second model and no extra forward pass. This is the SVCCA
    convergence analysis of Raghu et al. 2017 done with CKA while training: in a network that
    settles bottom-up, the lower layers reach CKA ~1 with their previous state first.

    Value stored in ``CKACallback.history[i]["convergence"]``: ``{"previous": {layer: cka},
    "first": {layer: cka}}`` (floats; NaN where undefined). The first measured validation has
    nothing to compare with and stores nothing (its record lacks the key), as does any
    validation that is not compared (below). Logged (``prefix = log_prefix``): scalars
    ``{prefix}/convergence/previous/<layer>`` and ``{prefix}/convergence/first/<layer>``, and
    the image ``{prefix}/convergence``: layers (rows) x measured validations (columns), colour =
    CKA to the previous validation, so that bottom-up settling shows as a staircase; its caption
    (how to read it) goes with its first appearance. The small per-validation table behind the
    image is :attr:`curve` (also in checkpoints).

    Same examples, same order: each kept batch's inputs are fingerprinted (shape and four
    float64 sums, one of them weighted by a ramp over the batch). When a later validation sees
    other inputs (a shuffled validation loader, random validation augmentation, a changed
    dataset), fewer or more batches, or other shapes, it warns once per cause, reports nothing
    for that validation and takes it as the new first (and previous) reference. Under DDP every
    process keeps the Grams of its own examples; the check is summed over processes so that all
    decide alike, and a number is never computed on different examples.

    Memory (on the model's device): per kept batch of ``n`` examples the upper triangles of its
    ``L`` Grams (``L n (n + 1) / 2`` values in the Gram dtype, float32 by default) and 32 bytes of
    fingerprint; two references (first and previous) are kept, and the previous one is replaced
    batch by batch while a validation runs, so there is never a third. See :meth:`kept_bytes`:
    12 layers, 1,024 examples in batches of 256, float32: 12,632,320 bytes (12.6 MB) in all.

    Checkpoints: :meth:`state_dict` holds :attr:`curve` and, when their total size is at most
    ``keep_in_checkpoint_mb`` megabytes (10^6 bytes), the kept Grams (as CPU copies), so a resumed
    run continues both curves. Otherwise (or under DDP, where each process keeps its own Grams
    but a checkpoint holds those of rank zero only) only :attr:`curve` is saved, and the first
    validation after resuming starts a new first reference, with a warning when loading.

    Args:
        max_examples: validation examples (whole batches) compared per validation.
        keep_in_checkpoint_mb: largest total size of the kept Grams (MB) written to checkpoints;
            ``0`` never writes them.
        log_prefix: tag prefix, as ``CKACallback(log_prefix=...)``.

    Raises:
        ValueError: ``max_examples`` not a positive int, ``keep_in_checkpoint_mb`` negative or
            not a number, or an empty ``log_prefix``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_cka.analyses.base import MeasuredBatch, SetupContext
        >>> from lightning_cka.functional import grams
        >>> Convergence.kept_bytes(num_layers=12, max_examples=1024, batch_size=256)
        12632320
        >>> analysis = Convergence(max_examples=16)  # in training: CKACallback(analyses=[analysis])
        >>> analysis.setup(SetupContext(module=nn.Identity(), layers=["a", "b"]))
        True
        >>> x = torch.randn(24, 6)
        >>> def validate(layer_b):  # one measured validation, as CKACallback runs it
        ...     analysis.reset(torch.device("cpu"))
        ...     for i, batch in enumerate(x.split(8)):
        ...         k = grams([batch.tanh(), layer_b(batch)])  # (2, 8, 8)
        ...         analysis.update(MeasuredBatch((batch,), k, lambda: None, index=i))
        ...     return analysis.compute()
        >>> validate(torch.sin) is None  # the first validation: nothing to compare with yet
        True
        >>> value = validate(torch.cos)  # layer "b" changed, layer "a" did not
        >>> round(value["previous"]["a"], 6), value["previous"]["b"] < 0.99
        (1.0, True)
        >>> analysis.kept_memory(), Convergence.kept_bytes(num_layers=2, max_examples=16, batch_size=8)
        (1280, 1280)
    """

    key = "convergence"

    def __init__(self, max_examples: int = 1024, keep_in_checkpoint_mb: float = 64.0, log_prefix: str = "cka") -> None:
        self.max_examples = _check_positive_int(max_examples, "max_examples")
        if (
            isinstance(keep_in_checkpoint_mb, bool)
            or not isinstance(keep_in_checkpoint_mb, int | float)
            or not keep_in_checkpoint_mb >= 0
        ):
            raise ValueError(f"`keep_in_checkpoint_mb` must be a number >= 0, got {keep_in_checkpoint_mb!r}.")
        if not isinstance(log_prefix, str) or not log_prefix.strip("/"):
            raise ValueError(f"`log_prefix` must be a non-empty string, got {log_prefix!r}.")
        self.keep_in_checkpoint_mb = float(keep_in_checkpoint_mb)
        self.log_prefix = log_prefix.rstrip("/")
        self.layers: list[str] = []
        self.labels: list[str] = []
        #: One entry per reported validation, oldest first: ``{"epoch", "step", "previous": [L floats],
        #: "first": [L floats]}`` (layers in :attr:`layers` order).
        self.curve: list[dict[str, Any]] = []
        self._first: list[_Kept] | None = None
        self._previous: list[_Kept | None] | None = None
        self._current: list[_Kept] = []
        self._kept_examples = 0
        self._position = 0
        self._differs: Tensor | None = None
        self._causes: set[str] = set()
        self._in_progress = False
        self._to_previous: MinibatchCKA | None = None
        self._to_first: MinibatchCKA | None = None
        self._module: nn.Module | None = None
        self._sum_over_ranks: Any = lambda t: t
        self._world_size = 1
        self._warned: set[str] = set()
        self._caption_logged = False

    # ------------------------------------------------------------------ memory
    @staticmethod
    def kept_bytes(
        num_layers: int, max_examples: int = 1024, batch_size: int = 256, itemsize: int = 4, references: int = 2
    ) -> int:
        """Bytes the kept Grams and fingerprints take for full batches of ``batch_size`` examples.

        Args:
            num_layers: ``L``, the callback's layers.
            max_examples: as in the constructor.
            batch_size: ``n``, validation batch size.
            itemsize: bytes per Gram value (4 for float32 Grams, 8 for ``precision="float64"``).
            references: references kept (2: first and previous; 1 until the second validation).

        Returns:
            ``references * ceil(max_examples / n) * (L * n (n + 1) / 2 * itemsize + 32)``.

        Example:
            >>> Convergence.kept_bytes(12, 1024, 256) / 1e6  # MB, first + previous
            12.63232
        """
        batches = math.ceil(max_examples / batch_size)
        per_batch = num_layers * batch_size * (batch_size + 1) // 2 * itemsize + _FINGERPRINT_BYTES
        return references * batches * per_batch

    def kept_memory(self) -> int:
        """Bytes of the Grams and fingerprints kept now (shared tensors counted once)."""
        seen: dict[int, int] = {}
        lists: list[Iterable[_Kept | None]] = [self._first or (), self._previous or (), self._current]
        for kept in (k for entries in lists for k in entries if k is not None):
            for t in (kept.grams, kept.fingerprint):
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # --------------------------------------------------------------- protocol
    def setup(self, context: SetupContext) -> bool:
        layers = list(context.layers)
        if layers != self.layers:
            self._drop_references()
            self.curve = []
        self.layers = layers
        self.labels = list(context.short_names or short_names(layers))
        num = len(layers)
        gather = context.all_gather
        self._to_previous, self._to_first = (
            MinibatchCKA(
                num_layers=num,
                num_reference_layers=num,
                precision=context.precision,
                layer_names=layers,
                reference_layer_names=layers,
                # the metrics sync through `context.all_gather`, like every collective of this analysis
                dist_sync_fn=lambda t, group=None: list(gather(t).unbind(0)),
            )
            for _ in range(2)
        )
        self._module = context.module
        self._sum_over_ranks = context.sum_over_ranks
        self._world_size = context.world_size
        return True

    def reset(self, device: torch.device) -> None:
        assert self._to_previous is not None and self._to_first is not None
        if self._in_progress:  # a validation ended without compute(): `previous` is half replaced
            self._warn_once(
                "interrupted",
                "a measured validation ended early (an exception?), so the kept previous reference is incomplete; "
                "the next measured validation starts a new first reference.",
            )
            self._drop_references()
        self._in_progress = True
        self._to_previous.to(device).reset()
        self._to_first.to(device).reset()
        moved = {id(k): k.to(device) for k in self._first or ()}  # keep `previous` sharing `first`'s tensors
        if self._first is not None:
            self._first = [moved[id(k)] for k in self._first]
        if self._previous is not None:
            self._previous = [None if k is None else moved.get(id(k)) or k.to(device) for k in self._previous]
        self._current = []
        self._kept_examples = self._position = 0
        self._differs = torch.zeros((), dtype=torch.bool, device=device)
        self._causes = set()

    def update(self, batch: MeasuredBatch) -> None:
        """Compare the batch's Grams with the kept ones at its position, and keep them while the
        kept examples are fewer than ``max_examples``."""
        if batch.grams is None:
            return
        i = self._position
        self._position += 1
        previous = self._previous[i] if self._previous is not None and i < len(self._previous) else None
        keep = self._kept_examples < self.max_examples
        if previous is None and not keep:
            return
        try:
            self._update(batch.grams, batch, i, previous, keep)
        except Exception:
            self._causes.add("failed")
            raise

    def _update(self, k: Tensor, batch: MeasuredBatch, i: int, previous: _Kept | None, keep: bool) -> None:
        assert self._to_previous is not None and self._to_first is not None and self._differs is not None
        try:
            x = batch.inputs()
        except Exception as err:
            raise AnalysisSkipped(f"the model input of a validation batch could not be read ({err})") from err
        fingerprint, shape, n = _fingerprint(x), tuple(x.shape), int(k.shape[-1])
        if previous is not None:
            assert self._first is not None and self._previous is not None
            first = self._first[i]
            if any(ref.shape != shape or ref.n != n for ref in (previous, first)):
                self._causes.add("shape")
            else:
                self._differs |= _fingerprints_differ(fingerprint, previous.fingerprint, x.numel())
                self._to_previous.update_grams(k, _unpack(previous.grams, n).to(k.device))
                self._to_first.update_grams(k, _unpack(first.grams, n).to(k.device))
            self._previous[i] = None  # free it now (its Grams live on in `first` when shared)
        elif self._previous is not None:
            self._causes.add("more")
        if keep:
            self._current.append(_Kept(_pack(k.detach()), n, fingerprint, shape))
            self._kept_examples += n

    def clear(self) -> None:
        """Nothing is half-recorded between hooks: the Grams arrive whole in :meth:`update`."""

    def compute(self) -> dict[str, dict[str, float]] | None:
        """``{"previous": {layer: cka}, "first": {layer: cka}}``, or ``None`` when not compared.

        A collective under DDP: every process sums its flags, then (when all compare) the metrics.
        When it fails, this process drops its references, so the next validation reports nothing
        and starts new ones on every process (the others see a process without a reference).
        """
        assert self._to_previous is not None and self._to_first is not None
        self._in_progress = False
        try:
            return self._compute()
        except Exception:
            self._drop_references()
            raise

    def _compute(self) -> dict[str, dict[str, float]] | None:
        assert self._to_previous is not None and self._to_first is not None
        has_reference = self._previous is not None
        if any(k is not None for k in self._previous or ()):  # kept batches that no batch came for
            self._causes.add("fewer")
        device = self._to_previous.sum_xy.device
        differs = self._differs if self._differs is not None else torch.zeros((), dtype=torch.bool, device=device)
        flags = torch.stack(
            [
                torch.tensor(float(has_reference), dtype=torch.float64, device=device),
                differs.to(device=device, dtype=torch.float64),
                *(
                    torch.tensor(float(cause in self._causes), dtype=torch.float64, device=device)
                    for cause in _CAUSE_ORDER[1:-1]
                ),
            ]
        )
        agreed = self._sum_over_ranks(flags).tolist()  # the one host sync of this analysis
        with_reference, counts = round(agreed[0]), {c: agreed[j] > 0 for j, c in enumerate(_CAUSE_ORDER[:-1], 1)}
        counts["missing"] = 0 < with_reference < self._world_size
        value = None
        if with_reference == self._world_size and not any(counts.values()):
            value = self._values()
        elif with_reference > 0:
            for cause in (c for c, hit in counts.items() if hit):
                self._warn_once(
                    cause,
                    f"{_CAUSES[cause]}. Layer convergence is only computed on the same examples in the same order, "
                    "so it is not reported for this validation, which becomes the new first (and previous) reference. "
                    "Use an unshuffled validation loader without random augmentation.",
                )
        current = self._current or None
        self._previous = list(current) if current is not None else None
        if value is None:
            self._first = current
        self._current = []
        return value

    def _values(self) -> dict[str, dict[str, float]]:
        assert self._to_previous is not None and self._to_first is not None
        previous = torch.diagonal(self._to_previous.compute()).tolist()
        first = torch.diagonal(self._to_first.compute()).tolist()
        module = self._module
        self.curve.append(
            {
                "epoch": int(getattr(module, "current_epoch", len(self.curve))),
                "step": int(getattr(module, "global_step", len(self.curve))),
                "previous": previous,
                "first": first,
            }
        )
        return {
            "previous": dict(zip(self.layers, previous, strict=True)),
            "first": dict(zip(self.layers, first, strict=True)),
        }

    def report(self, value: Mapping[str, Mapping[str, float]], epoch: int, step: int) -> Report:
        from lightning_cka.plotting import plot_cka_heatmap

        prefix = f"{self.log_prefix}/convergence"
        scalars = {
            f"{prefix}/{against}/{layer}": float(v)
            for against in ("previous", "first")
            for layer, v in value[against].items()
        }
        report = Report(scalars=scalars)
        if self.curve:
            matrix = torch.tensor([entry["previous"] for entry in self.curve], dtype=torch.float64).T
            epochs = [entry["epoch"] for entry in self.curve]
            unique = len(set(epochs)) == len(epochs)
            cols = [str(e["epoch"]) if unique else f"{e['epoch']} (step {e['step']})" for e in self.curve]
            fig, _ = plot_cka_heatmap(
                matrix,
                self.labels,
                cols,
                title=f"Layer CKA to the previous validation, epoch {epoch} (step {step})",
                xlabel="epoch",
                ylabel="layer",
            )
            report.figures[prefix] = fig
            if not self._caption_logged:
                report.captions[prefix] = _CAPTION
                self._caption_logged = True
        return report

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """:attr:`curve`, and the kept Grams when they take at most ``keep_in_checkpoint_mb`` MB."""
        state: dict[str, Any] = {
            "layers": list(self.layers),
            "curve": copy.deepcopy(self.curve),
            "max_examples": self.max_examples,
            "kept": None,
            "kept_mb": self.kept_memory() / 1e6,
        }
        if self._in_progress or self._first is None or self._previous is None or any(k is None for k in self._previous):
            state["kept_skipped"] = "no complete reference"
        elif self._world_size > 1:
            state["kept_skipped"] = "each process keeps the Grams of its own examples"
        elif state["kept_mb"] > self.keep_in_checkpoint_mb:
            state["kept_skipped"] = f"{state['kept_mb']:.1f} MB > keep_in_checkpoint_mb={self.keep_in_checkpoint_mb:g}"
        else:
            shared = all(p is f for p, f in zip(self._previous, self._first, strict=False))
            shared = shared and len(self._previous) == len(self._first)
            state["kept"] = {
                "first": [k.as_state() for k in self._first],
                "previous": None if shared else [k.as_state() for k in self._previous if k is not None],
            }
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :attr:`curve` and, when the checkpoint has them, the kept Grams."""
        saved_layers = list(state_dict.get("layers", []))
        if saved_layers != self.layers:
            rank_zero_warn(
                f"Convergence ({self.log_prefix}): the checkpoint's curve was measured on layers {saved_layers} but "
                f"this callback measures {self.layers}; it was not restored."
            )
            return
        self.curve = copy.deepcopy(list(state_dict.get("curve", [])))
        self._drop_references()
        kept = state_dict.get("kept")
        reason = state_dict.get("kept_skipped")
        if kept is not None and int(state_dict.get("max_examples", self.max_examples)) != self.max_examples:
            kept, reason = None, f"max_examples changed from {state_dict.get('max_examples')} to {self.max_examples}"
        if kept is not None and self._world_size > 1:
            kept, reason = None, "each process keeps the Grams of its own examples"
        if kept is None:
            if self.curve or reason != "no complete reference":
                rank_zero_warn(
                    f"Convergence ({self.log_prefix}): the checkpoint holds no kept Gram matrices ({reason}); the "
                    "first measured validation after resuming starts a new first reference, so its CKA to the first "
                    "and previous validation is not reported. Raise Convergence(keep_in_checkpoint_mb=...) to keep "
                    "them."
                )
            return
        self._first = [_Kept.from_state(k) for k in kept["first"]]
        previous = kept.get("previous")
        self._previous = list(self._first) if previous is None else [_Kept.from_state(k) for k in previous]

    # ---------------------------------------------------------------- helpers
    def _drop_references(self) -> None:
        self._first = self._previous = None
        self._current = []
        self._in_progress = False

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            rank_zero_warn(f"Convergence ({self.log_prefix}): {message}")


# --------------------------------------------------------------------------- offline
def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _grams_of(model: nn.Module, capture: GramCapture, x: Tensor) -> Tensor | None:
    """``(L, n, n)`` Grams of ``capture``'s layers for one forward pass of ``model`` on ``x``."""
    capture.clear()
    with HookSet() as hooks:
        capture.attach(hooks)
        model(to_model_input(x, model))
    return capture.collect()


def convergence(
    models: Sequence[nn.Module],
    dataloader: Iterable[Any],
    layers: LayerSpec = "auto",
    against: Literal["last", "first", "previous"] = "last",
    max_batches: int | None = None,
    input_key: str | int = 0,
    reduction: str = "flatten",
    precision: str | torch.dtype = "float32",
    progress: bool = False,
    output: OutputSelector = 0,
) -> CKAResult:
    """Each layer's minibatch CKA with the same layer of another checkpoint (Raghu et al. 2017).

    All models run on every batch of one pass over ``dataloader`` (so a shuffled loader is
    fine: the pairs always see the same examples), in eval mode under ``torch.no_grad()``.
    Row ``t``, column ``l`` is the minibatch CKA (Nguyen et al. 2021) between layer ``l`` of
    ``models[t]`` and layer ``l`` of ``models[s]``, with ``s`` the last model (``"last"``, the
    SVCCA convergence plot: lower layers reach 1 first), the first one (``"first"``: how far each
    layer moved from initialisation) or ``t - 1`` (``"previous"``; row 0 is NaN). Row ``t``
    equals the diagonal of ``compare(models[t], dataloader, layers, reference=models[s])``.

    Args:
        models: the checkpoints' networks, in training order (same architecture).
        dataloader: iterable of batches (see :func:`~lightning_cka.compare`).
        layers: layers of every model (see :func:`~lightning_cka.layers.resolve_layers`).
        against: ``"last"``, ``"first"`` or ``"previous"``.
        max_batches: stop after this many batches (``None``: all).
        input_key: dict key or tuple index of the model input in a batch.
        reduction: ``"flatten"`` (paper default), ``"mean"`` or ``"cls"``.
        precision: Gram product dtype, ``"float32"``, ``"bfloat16"`` or ``"float64"``.
        progress: show a progress bar.
        output: element of tuple/dict module outputs to use.

    Returns:
        a :class:`~lightning_cka.CKAResult` with the ``(checkpoints, layers)`` float64 matrix,
        rows ``"checkpoint 0"``, ``"checkpoint 1"``, ..., cols the layer names, and ``meta``
        ``{"against": against, "batches": batches used}``.

    Raises:
        ValueError: empty ``models``, an unknown ``against``, ``"previous"`` with one model,
            models whose layers resolve to different names, a bad ``max_batches``, ``reduction``
            or ``precision``, or no usable batch.
        TypeError: a model that is not an ``nn.Module``, or a dataloader that is a single tensor.

    Example:
        >>> import torch
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> _ = torch.manual_seed(0)
        >>> vits = [VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2) for _ in range(3)]
        >>> batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
        >>> result = convergence(vits, batches, layers="blocks", against="last")
        >>> result.rows, result.cols
        (['checkpoint 0', 'checkpoint 1', 'checkpoint 2'], ['blocks.0', 'blocks.1'])
        >>> result.matrix.shape, [round(v, 6) for v in result.matrix[-1].tolist()]  # the last vs itself
        (torch.Size([3, 2]), [1.0, 1.0])
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise ValueError(
            f"`models` must be a sequence of nn.Module (checkpoints in order), got {type(models).__name__}."
        )
    models = list(models)
    if not models:
        raise ValueError("`models` is empty; pass the checkpoints' networks in training order.")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`models[{i}]` must be an nn.Module, got {type(model).__name__}.")
    if against not in AGAINST:
        raise ValueError(f"`against` must be one of {AGAINST}, got {against!r}.")
    if against == "previous" and len(models) < 2:
        raise ValueError("`against='previous'` needs at least two models.")
    if isinstance(dataloader, Tensor):
        raise TypeError(
            f"`dataloader` is a single tensor of shape {tuple(dataloader.shape)}; "
            "pass a DataLoader or a list of batches."
        )
    if max_batches is not None:
        _check_positive_int(max_batches, "max_batches")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    try:
        dtype = resolve_precision(precision)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"`precision` must be 'float32', 'bfloat16' or 'float64', got {precision!r}.") from None
    names = resolve_layers(models[0], layers, "layers")
    for i, model in enumerate(models[1:], 1):
        other = resolve_layers(model, layers, "layers")
        if other != names:
            raise ValueError(
                f"`layers` resolve to {other} in models[{i}] but to {names} in models[0]; the checkpoints must share "
                "their architecture."
            )
    captures = [GramCapture.for_layers(m, names, reduction, output, dtype) for m in models]
    device = _device(models[0])
    last = len(models) - 1
    target = {"last": last, "first": 0}.get(against)
    rows = [t for t in range(len(models)) if against != "previous" or t > 0]
    metrics = {
        t: MinibatchCKA(
            num_layers=len(names),
            num_reference_layers=len(names),
            precision=dtype,
            layer_names=names,
            reference_layer_names=names,
        ).to(device)
        for t in rows
    }
    batches = dataloader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(dataloader, desc="convergence", unit="batch")
    seen = 0
    unique = list({id(m): m for m in models}.values())
    with eval_mode(*unique), torch.no_grad(), contextlib.ExitStack() as restore:
        for eager in (EagerWhileMeasuring(m) for m in unique):
            eager.enter()
            restore.callback(eager.exit)
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            seen += 1
            x = extract_input(batch, input_key)
            reference = None if target is None else _grams_of(models[target], captures[target], x)
            if target is not None and reference is None:
                continue
            before: Tensor | None = None
            for t, (model, capture) in enumerate(zip(models, captures, strict=True)):
                k = reference if t == target else _grams_of(model, capture, x)
                k = None if k is None else k.to(device)
                other = before if against == "previous" else reference
                if t in metrics and k is not None and other is not None:
                    metrics[t].update_grams(k, other.to(device))
                before = k
    used = max((int(m.num_batches) for m in metrics.values()), default=0)
    if used == 0:
        raise ValueError(
            f"convergence() saw no usable batch out of {seen}: the dataloader was empty, the chosen layers never ran, "
            "or every batch had fewer than 4 examples or non-finite activations."
        )
    matrix = torch.full((len(models), len(names)), float("nan"), dtype=torch.float64)
    for t, metric in metrics.items():
        matrix[t] = torch.diagonal(metric.compute()).cpu()
    rows_named = [f"checkpoint {t}" for t in range(len(models))]
    return CKAResult(matrix, rows_named, list(names), {"against": against, "batches": used})
