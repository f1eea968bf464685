"""``MinibatchCKA``: a torchmetrics metric holding the running HSIC sums of minibatch CKA."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_cka.functional import (
    _SMALL_ADVICE,
    MIN_EXAMPLES,
    Precision,
    _check_grams,
    _check_layers,
    _minibatch_cka_compute,
    _minibatch_cka_update,
    _zero_state,
    resolve_precision,
)
from lightning_cka.functional import grams as stack_grams

__all__ = ["MinibatchCKA"]


def _check_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected argument `{name}` to be a positive int or None, got {value!r}.")
    return value


def _check_names(names: Iterable[str] | None, name: str) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValueError(f"Expected argument `{name}` to be a sequence of layer names (str), got {names!r}.")
    listed = list(names)
    if not listed or not all(isinstance(n, str) for n in listed):
        raise ValueError(f"Expected argument `{name}` to be a non-empty sequence of str, got {listed!r}.")
    return listed


class MinibatchCKA(Metric):
    """Minibatch linear CKA between layers, accumulated over minibatches and processes.

    Per minibatch of ``n >= 4`` examples the unbiased HSIC_1 (Song et al. 2012) of every pair of
    layers is added to float64 running sums; the result is minibatch CKA
    ``S_xy / sqrt(S_xx S_yy)`` (Nguyen, Raghu and Kornblith 2021; linear CKA of Kornblith et al.
    2019). States (all summed across processes under DDP): ``sum_xy`` ``(L, M)``, ``sum_xx``
    ``(L,)``, ``sum_yy`` ``(M,)``, the per-pair self sums ``sum_xx_pair``/``sum_yy_pair``
    ``(L, M)``, per-layer counters of skipped minibatches and ``num_batches``. Activations are
    never stored. The functional twin is :func:`lightning_cka.functional.minibatch_cka`.

    Skipped data, reported by warnings:

    - a minibatch with fewer than 4 examples is skipped whole (warned once, counted in
      :attr:`num_skipped_small` on this process);
    - a layer with non-finite activations (NaN/Inf) in a minibatch is left out of that minibatch
      for its own row and column only; the warning at :meth:`compute` names the layer and how
      often. Entry ``(i, j)`` is exact minibatch CKA over the minibatches in which layers ``i`` and
      ``j`` were both finite; a layer that was never finite gets a NaN row and column;
    - a layer whose activations are finite but whose Gram overflows (float32 Grams of activations
      around 1e19 and larger) is skipped the same way, and the warning advises
      ``precision="float64"``.

    Args:
        num_layers: ``L``, the number of row layers. Fixed by the first update when ``None``;
            pass it when some process may see no data (DDP) so all states have one shape.
        num_reference_layers: ``M``, the number of column layers (a reference model's, or any
            second set) for cross-similarity; ``None`` for self-similarity or to fix it at the
            first update.
        precision: dtype of the Gram matrix products: ``"float32"`` (default; activations in
            bf16/fp16 are upcast), ``"bfloat16"`` (faster on hardware with bf16 matmuls,
            ~1e-4 error) or ``"float64"`` (reference work); or the dtype itself. ``None`` uses
            the activation dtype, at least float32. Sums are float64 regardless.
        layer_names: optional row names, used by :meth:`plot` and in warnings; they fix ``L``.
        reference_layer_names: optional column names; they fix ``M`` (cross-similarity).
        num_other_layers: deprecated name of ``num_reference_layers``.
        other_layer_names: deprecated name of ``reference_layer_names``.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ...).

    Raises:
        ValueError: for a ``num_layers``/``num_other_layers`` that is not a positive int, layer
            names that are not a non-empty sequence of str or disagree with the layer counts,
            ``num_other_layers`` without ``num_layers``, or an unknown ``precision``.

    Example:
        >>> import torch
        >>> from lightning_cka import MinibatchCKA
        >>> metric = MinibatchCKA()
        >>> for x in torch.randn(3, 32, 10):  # three minibatches of 32 examples
        ...     metric.update([x, 2 * x + 1, torch.randn(32, 5)])
        >>> cka = metric.compute()
        >>> cka.shape, cka.dtype
        (torch.Size([3, 3]), torch.float64)
        >>> round(float(cka[0, 1]), 6)
        1.0
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    sum_xy: Tensor
    sum_xx: Tensor
    sum_yy: Tensor
    sum_xx_pair: Tensor
    sum_yy_pair: Tensor
    nonfinite_x: Tensor
    nonfinite_y: Tensor
    overflow_x: Tensor
    overflow_y: Tensor
    num_batches: Tensor

    def __init__(
        self,
        num_layers: int | None = None,
        num_reference_layers: int | None = None,
        precision: Precision | torch.dtype | None = "float32",
        layer_names: Sequence[str] | None = None,
        reference_layer_names: Sequence[str] | None = None,
        *,
        num_other_layers: int | None = None,
        other_layer_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        num_other_layers = _renamed("num_other_layers", num_other_layers, "num_reference_layers", num_reference_layers)
        other_layer_names = _renamed(
            "other_layer_names", other_layer_names, "reference_layer_names", reference_layer_names
        )
        num_layers = _check_count(num_layers, "num_layers")
        num_other_layers = _check_count(num_other_layers, "num_other_layers")
        names = _check_names(layer_names, "layer_names")
        other_names = _check_names(other_layer_names, "other_layer_names")
        for count, given, what in ((num_layers, names, "layer"), (num_other_layers, other_names, "other_layer")):
            if count is not None and given is not None and count != len(given):
                raise ValueError(
                    f"Expected `{what}_names` to hold `num_{what}s`={count} names, got {len(given)}: {given!r}."
                )
        num_layers = len(names) if num_layers is None and names is not None else num_layers
        num_other_layers = (
            len(other_names) if num_other_layers is None and other_names is not None else num_other_layers
        )
        if num_other_layers is not None and num_layers is None:
            raise ValueError(
                f"Expected `num_layers` or `layer_names` with `num_other_layers`={num_other_layers} "
                "(or `other_layer_names`), got neither."
            )
        dtype = resolve_precision(precision)
        super().__init__(**kwargs)
        self.precision = dtype
        self.layer_names = names
        self.other_layer_names = other_names
        rows = num_layers or 0
        cols = num_other_layers if num_other_layers is not None else rows
        for name, default in _zero_state(rows, cols).items():
            self.add_state(name, default, dist_reduce_fx="sum")
        #: Minibatches skipped on this process because they had fewer than 4 examples.
        self.num_skipped_small = 0
        self._cross: bool | None = None if num_layers is None else num_other_layers is not None

    @property
    def reference_layer_names(self) -> list[str] | None:
        """Column names (``None`` when not given)."""
        return self.other_layer_names

    # ------------------------------------------------------------------ update
    def update(
        self,
        xs: Sequence[Tensor] | None = None,
        ys: Sequence[Tensor] | None = None,
        *,
        grams: Tensor | None = None,
        other_grams: Tensor | None = None,
    ) -> None:
        """Add one minibatch, given its activations or its Gram matrices.

        Args:
            xs: L activations of the same n examples, each ``(n, ...)``.
            ys: M activations of the same n examples (e.g. another model), or ``None`` for
                the L x L self-similarity.
            grams: instead of ``xs``, the ``(L, n, n)`` Gram matrices of the row layers (see
                :func:`~lightning_cka.functional.grams`); used as given, whatever ``precision``.
            other_grams: instead of ``ys``, the ``(M, n, n)`` Gram matrices of the column layers.

        Raises:
            TypeError: if neither activations nor Grams are given, or they are not (sequences
                of) floating point tensors.
            ValueError: if both activations and Grams are given, the layers hold different numbers
                of examples, a Gram stack is not ``(L, n, n)``, or the layer counts (or self/cross
                mode) differ from earlier updates.
            RuntimeError: if the inputs are on another device than the metric.

        Example:
            >>> import torch
            >>> from lightning_cka import MinibatchCKA
            >>> from lightning_cka.functional import grams
            >>> x, y = torch.randn(16, 8), torch.randn(16, 4)
            >>> a, b = MinibatchCKA(), MinibatchCKA()
            >>> a.update([x, y])
            >>> b.update(grams=grams([x, y]))
            >>> torch.allclose(a.compute(), b.compute())
            True
        """
        if grams is not None or other_grams is not None:
            if xs is not None or ys is not None:
                raise ValueError("Pass either activations (xs, ys) or Gram matrices (grams=, other_grams=), not both.")
            if grams is None:
                raise ValueError("`other_grams` needs `grams` (the row layers' Gram matrices) too.")
            n = _check_grams(grams, other_grams, ("grams", "other_grams"))
            self._check_device(grams.device, "Gram matrices")
            self._fix_shape(grams.shape[0], None if other_grams is None else other_grams.shape[0])
            if n < MIN_EXAMPLES:
                self._skip_small(n)
                return
            self._accumulate(grams, other_grams)
            return
        if xs is None:
            raise TypeError("update() needs the activations `xs` (or precomputed Gram matrices as `grams=`).")
        n = _check_layers(xs, "xs")
        if ys is not None and _check_layers(ys, "ys") != n:
            raise ValueError(f"xs and ys must hold the same examples; got n={n} and n={ys[0].shape[0]}.")
        for x in (*xs, *(ys or ())):
            self._check_device(x.device, "Activations")
        self._fix_shape(len(xs), None if ys is None else len(ys))
        if n < MIN_EXAMPLES:
            self._skip_small(n)
            return
        k = stack_grams(xs, self.precision)
        self._accumulate(k, None if ys is None else stack_grams(ys, self.precision))

    def update_grams(self, k: Tensor, l: Tensor | None = None) -> None:
        """Add one minibatch given its Gram matrices (what the capture hooks produce).

        Same as ``update(grams=k, other_grams=l)``.

        Args:
            k: ``(L, n, n)`` Gram matrices of the row layers (see :func:`~lightning_cka.functional.gram`).
            l: ``(M, n, n)`` Gram matrices of the column layers, or ``None`` for self-similarity.

        Raises:
            TypeError: if ``k`` or ``l`` is not a floating point tensor.
            ValueError: if a stack is not ``(L, n, n)``, ``k`` and ``l`` have different ``n``, or
                the layer counts differ from earlier updates.
            RuntimeError: if the Grams are on another device than the metric.

        Example:
            >>> import torch
            >>> from lightning_cka import MinibatchCKA
            >>> from lightning_cka.functional import grams
            >>> x = torch.randn(16, 8)
            >>> metric = MinibatchCKA()
            >>> metric.update_grams(grams([x, 3 * x]), grams([torch.randn(16, 2)]))
            >>> metric.compute().shape
            torch.Size([2, 1])
        """
        _check_grams(k, l, ("k", "l"))  # so that errors name this method's arguments
        self.update(grams=k, other_grams=l)

    def _accumulate(self, k: Tensor, l: Tensor | None) -> None:
        for name, term in _minibatch_cka_update(k, l).items():
            setattr(self, name, getattr(self, name) + term)

    # ----------------------------------------------------------------- compute
    def compute(self) -> Tensor:
        """Return the ``(L, M)`` float64 minibatch CKA matrix (NaN where undefined).

        Warns about layers skipped for non-finite values or Gram overflow, layers whose self-HSIC
        is not positive, and (returning an all-NaN matrix) when no minibatch was usable.

        Example:
            >>> import torch
            >>> from lightning_cka import MinibatchCKA
            >>> metric = MinibatchCKA(num_layers=2)
            >>> metric.compute()  # nothing usable yet: all NaN, with a warning
            tensor([[nan, nan],
                    [nan, nan]], dtype=torch.float64)
            >>> x = torch.randn(8, 4)
            >>> metric.update([x, x @ torch.randn(4, 4)])
            >>> round(float(metric.compute()[0, 0]), 6)
            1.0
        """
        return _minibatch_cka_compute(self.metric_state, self._is_cross(), self.layer_names, self.other_layer_names)

    # ------------------------------------------------------------------ plot
    def plot(self, val: Tensor | None = None, ax: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        """Draw the CKA matrix as a labelled heatmap; returns ``(fig, ax)``.

        Args:
            val: a matrix from :meth:`compute`; computed when ``None``.
            ax: matplotlib axes to draw into.
            kwargs: passed to :func:`lightning_cka.plotting.plot_cka_heatmap` (``title``, ...).

        Example:
            >>> import torch
            >>> from lightning_cka import MinibatchCKA
            >>> metric = MinibatchCKA(layer_names=["a", "b"])
            >>> metric.update([torch.randn(8, 3), torch.randn(8, 5)])
            >>> fig, ax = metric.plot()
            >>> [t.get_text() for t in ax.get_yticklabels()]
            ['a', 'b']
        """
        from lightning_cka.plotting import plot_cka_heatmap

        matrix = self.compute() if val is None else val
        cols = self.other_layer_names if self._is_cross() else self.layer_names
        return plot_cka_heatmap(matrix, rows=self.layer_names, cols=cols, ax=ax, **kwargs)

    # ------------------------------------------------------------- merge / reset
    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add the sums of another :class:`MinibatchCKA` (or of its ``metric_state`` dict) to these.

        A metric whose layer count is not fixed yet takes the incoming shape.

        Raises:
            ValueError: if the layer counts, self/cross mode or layer names of the two differ.

        Example:
            >>> import torch
            >>> from lightning_cka import MinibatchCKA
            >>> batches = [[x, x.sin()] for x in torch.randn(2, 16, 6)]
            >>> a, b, both = MinibatchCKA(), MinibatchCKA(), MinibatchCKA()
            >>> a.update(batches[0])
            >>> b.update(batches[1])
            >>> for xs in batches:
            ...     both.update(xs)
            >>> merged = MinibatchCKA()
            >>> merged.merge_state(a)
            >>> merged.merge_state(b)
            >>> torch.allclose(merged.compute(), both.compute())
            True
        """
        if isinstance(incoming_state, MinibatchCKA):
            if None not in (self._cross, incoming_state._cross) and self._cross != incoming_state._cross:
                raise ValueError("Cannot merge a self-similarity MinibatchCKA with a cross-similarity one.")
            for ours, theirs, what in (
                (self.layer_names, incoming_state.layer_names, "layer_names"),
                (self.other_layer_names, incoming_state.other_layer_names, "other_layer_names"),
            ):
                if ours is not None and theirs is not None and ours != theirs:
                    raise ValueError(f"Cannot merge metrics with different {what}: {ours!r} and {theirs!r}.")
        super().merge_state(incoming_state)
        if isinstance(incoming_state, MinibatchCKA):
            self._cross = incoming_state._cross if self._cross is None else self._cross
            self.layer_names = self.layer_names or incoming_state.layer_names
            self.other_layer_names = self.other_layer_names or incoming_state.other_layer_names
        # Private, unavoidable: torchmetrics' merge_state keeps a cached compute() result, which
        # would then be stale, and leaves the update count alone, so that compute() on a metric
        # filled only by merging warns that it was "called before update". No public method sets
        # either without touching the states.
        self._computed = None
        self._update_count += incoming_state.update_count if isinstance(incoming_state, Metric) else 1

    def reset(self) -> None:
        """Clear the sums and counters; the layer counts stay fixed.

        Example:
            >>> import torch
            >>> from lightning_cka import MinibatchCKA
            >>> metric = MinibatchCKA()
            >>> metric.update([torch.randn(8, 2), torch.randn(8, 3)])
            >>> metric.reset()
            >>> metric.sum_xy
            tensor([[0., 0.],
                    [0., 0.]], dtype=torch.float64)
        """
        shape = tuple(self.sum_xy.shape)
        super().reset()
        self.num_skipped_small = 0
        if self.sum_xy.shape != shape:
            self._allocate(*shape)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Add the minibatch (as :meth:`update`) and return the CKA matrix of this minibatch alone.

        Example:
            >>> import torch
            >>> from lightning_cka import MinibatchCKA
            >>> metric = MinibatchCKA()
            >>> x = torch.randn(8, 4)
            >>> metric([x, 2 * x]).shape
            torch.Size([2, 2])
        """
        # Metric.forward resets the states around the batch; keep the small-minibatch counter,
        # which is not a state (it is per process and never synced).
        skipped = self.num_skipped_small
        value = super().forward(*args, **kwargs)
        self.num_skipped_small += skipped
        return value

    # ------------------------------------------------------ torchmetrics plumbing
    def _wrap_compute(self, compute: Callable) -> Callable:
        # Private, unavoidable: torchmetrics' compute wrapper squeezes every one-element result to
        # a 0-d tensor and offers no public switch; a 1 x 1 CKA matrix must stay (1, 1).
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_matrix_shape(*args: Any, **kwargs: Any) -> Any:
            value = wrapped(*args, **kwargs)
            return value.reshape(1, 1) if isinstance(value, Tensor) and value.ndim == 0 else value

        return keep_matrix_shape

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # Private, unavoidable: both merge_state() and forward() (which merges the batch state into
        # the global one) add states here, and the lazily shaped states of a metric without
        # `num_layers` are still empty before its first update, on either side. Empty takes the
        # other side's shape; different non-empty shapes are an error, not a broadcast.
        reduced = {}
        for name, local in self.metric_state.items():
            if name not in incoming_state:
                raise ValueError(
                    f"Expected the state {name!r} in the incoming state, got keys {sorted(incoming_state)}."
                )
            incoming = torch.as_tensor(incoming_state[name]).to(device=local.device, dtype=local.dtype)
            if incoming.shape == local.shape:
                reduced[name] = local + incoming
            elif incoming.numel() == 0:
                reduced[name] = local
            elif local.numel() == 0:
                reduced[name] = incoming.clone()
            else:
                raise ValueError(
                    f"Cannot merge MinibatchCKA states of different layer counts: {name} is {tuple(local.shape)} "
                    f"here and {tuple(incoming.shape)} in the incoming state."
                )
        for name, value in reduced.items():
            setattr(self, name, value)

    # ---------------------------------------------------------------- helpers
    def _is_cross(self) -> bool:
        if self._cross is not None:
            return self._cross
        return self.sum_xy.shape[0] != self.sum_xy.shape[1]  # a loaded or merged state

    def _check_device(self, device: torch.device, what: str) -> None:
        if device != self.sum_xy.device:
            raise RuntimeError(
                f"{what} are on {device} but the metric is on {self.sum_xy.device}; "
                f"move the metric first: MinibatchCKA(...).to({str(device)!r})."
            )

    def _fix_shape(self, rows: int, cols: int | None) -> None:
        cross = cols is not None
        if self._cross is not None and cross != self._cross:
            kind = "with ys (cross-similarity)" if self._cross else "without ys (self-similarity)"
            raise ValueError(f"This MinibatchCKA was first updated {kind}; keep calling update the same way.")
        got = (rows, cols if cols is not None else rows)
        if self.sum_xx.numel() == 0:  # neither preset, nor updated, loaded or merged before
            self._allocate(*got)
        expected = tuple(self.sum_xy.shape)
        if expected != got:
            raise ValueError(
                f"MinibatchCKA was set up for {expected[0]} x {expected[1]} layers but got {got[0]} x {got[1]}; "
                "pass the same layers to every update, or call reset() to start over."
            )
        self._cross = cross

    def _skip_small(self, n: int) -> None:
        if self.num_skipped_small == 0:
            rank_zero_warn(
                f"Skipping a minibatch of {n} examples: {_SMALL_ADVICE}. Further small minibatches are skipped "
                "silently and counted in `num_skipped_small`.",
                UserWarning,
            )
        self.num_skipped_small += 1

    def _allocate(self, rows: int, cols: int) -> None:
        """Give the layer states their shape, on the metric's device; ``num_batches`` is kept."""
        for name, value in _zero_state(rows, cols, self.sum_xy.device).items():
            if name != "num_batches":
                setattr(self, name, value)


def _renamed(old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """The value of a renamed argument, accepting its old name for one release (with a warning)."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"Pass `{new}` only; `{old}` is its deprecated name.")
    warnings.warn(f"`{old}` is deprecated; use `{new}` (same meaning).", DeprecationWarning, stacklevel=3)
    return old_value
