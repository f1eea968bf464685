"""``CKACallback``: minibatch CKA heatmaps and the paper's other signals, computed live during validation."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_cka.analyses import (
    Analysis,
    AnalysisSkipped,
    AttentionDistanceAnalysis,
    Convergence,
    LinearProbe,
    Localization,
    MeasuredBatch,
    NormRatioAnalysis,
    ReferenceCKA,
    Report,
    SelfCKA,
    SetupContext,
)
from lightning_cka.capture import REDUCTIONS, GramCapture, HookSet, OutputSelector, Reduction, extract_input
from lightning_cka.compare import CKAResult, to_model_input
from lightning_cka.compiled import EagerWhileMeasuring
from lightning_cka.functional import Precision
from lightning_cka.layers import LayerSpec, backbone_of, resolve_layers
from lightning_cka.loggers import log_custom_scalar_layout, log_figure, log_scalars, log_text, run_dir, unique_path
from lightning_cka.metric import resolve_precision
from lightning_cka.plotting import common_prefix, short_names

__all__ = ["CKACallback"]


class CKACallback(Callback):
    """Log minibatch CKA between layers, and the paper's other signals, every validation epoch.

    The callback owns one loop over pluggable analyses (:mod:`lightning_cka.analyses`). Hooks
    are armed at the start of each measured validation batch (in ``fit`` and ``validate``)
    and removed when it ends, on an exception and in ``teardown``; training steps do no extra
    work. Each hook on a chosen layer turns its output into an ``(n, n)`` Gram matrix on the
    spot and torchmetrics metrics keep running sums, so memory is ``O(L n^2)`` whatever the
    number of batches. Metrics' ``compute()`` is a collective and runs on every rank; only
    global rank zero logs.

    Logged per measured validation, at the step of Lightning's own validation scalars, with
    ``prefix = log_prefix``. Layer names in tags, axis labels and legends drop the attribute
    that holds the network (``model.blocks.0`` is shown as ``blocks.0``); files and ``history``
    keep full names.

    - images ``{prefix}/self`` (and ``{prefix}/reference`` with a reference model): heatmaps on
      a fixed 0..1 scale, layer names on the axes, the epoch in the title;
    - scalars ``{prefix}/self/adjacent_mean`` (mean CKA of consecutive layers) and
      ``{prefix}/self/to_last/<layer>`` (each layer's CKA to the last one); with a reference,
      ``{prefix}/reference/best_match_mean`` (mean over rows of the best-matching column);
    - ``.npz`` files ``<run dir>/{prefix}/<name>_step<step>.npz`` with ``matrix``, ``rows``,
      ``cols`` (``numpy.load(path)["matrix"]``, or :meth:`CKAResult.load`); a name already taken
      (a second ``validate`` at the same step) gets a ``-v1``, ``-v2``, ... suffix;
    - :attr:`history`: one record per measured validation, also without a logger.

    On recognised architectures it also logs the paper's two other signals (one switch each;
    only the first CKACallback of a Trainer that asks for one runs it):

    - skip-connection norm ratios ``norm_ratio/<block>/<unit>/<tokens>`` (e.g.
      ``norm_ratio/blocks.0/attn/cls``), a figure ``norm_ratio/curves`` and a TensorBoard
      custom-scalars layout grouping them;
    - mean attention distances of timm ViTs, ``attention_distance/<layer>`` (mean over heads, in
      pixels) and a per-head scatter figure ``attention_distance/heads``.

    The callback never stops or changes the user's training: a failure inside its own work (a
    reference model that fails, a file that cannot be written, a non-finite value) is warned
    about once per cause and that analysis is skipped for that batch or validation. Under DDP an
    analysis whose ``compute()`` fails on some processes only is skipped on every process, and
    the others never wait for it in a collective: each collective an analysis makes through
    ``sum_over_ranks`` / ``all_gather`` of its :class:`~lightning_cka.analyses.SetupContext` is
    preceded by a one-number all-reduce of "did a process fail", and every process meets once
    more after ``compute()``. (Collectives an analysis makes by other means are safe only before
    anything that can fail.)

    Args:
        layers: layers of the LightningModule: ``"auto"`` (residual blocks of a timm ViT, timm or
            torchvision ResNet found anywhere among its attributes), ``"sublayers"`` (each ViT
            block's ``attn`` and ``mlp``), names relative to the LightningModule
            (``"model.blocks.0.attn"``), glob patterns (``"model.blocks.*.mlp"``), module types,
            or a list of those.
        reference: a fixed ``nn.Module`` run on the same validation inputs (e.g. a trained ResNet
            while training a ViT), in eval mode and without gradients for the measured batches
            only (each module's mode is restored afterwards, so it may share modules with the
            model). It is never trained by the callback and not saved in checkpoints.
        reference_layers: layers of ``reference`` (same rules; names relative to it).
        every_n_epochs: measure every ``n``-th validation of ``fit`` (the first one included;
            ``validate`` always measures). Counting validations rather than epochs keeps this
            in step with ``Trainer(check_val_every_n_epoch=...)``.
        max_batches: use at most this many batches per validation.
        max_examples: stop after the batch that brings the examples used per validation to this many
            (whole batches are used).
        reduction: ``"flatten"`` (the paper's default), ``"mean"`` over tokens/positions, or
            ``"cls"`` (the class token of ViTs).
        output: element of tuple/dict module outputs to use (index or key).
        input_key: where the model input sits in a batch (tuple index or dict key); used to run
            the reference model.
        precision: Gram product dtype, ``"float32"``, ``"bfloat16"`` or ``"float64"``.
        dataloader_idx: which validation dataloader to measure when there are several.
        log_prefix: tag prefix; give each CKACallback in one Trainer its own.
        save_matrices: write the ``.npz`` files.
        norm_ratio: measure skip-connection norm ratios of the LightningModule's timm ViT / ResNet
            or torchvision ResNet blocks.
        attention_distance: measure mean attention distances of its timm ViTs.
        attention_max_examples: examples per batch used for attention distances (recomputing
            attention costs about one extra attention pass per layer); ``None`` for all.
        convergence: log how far each of ``layers`` moved since the previous and the first measured
            validation (CKA of the layer with itself then, on the same first examples; see
            :class:`~lightning_cka.analyses.Convergence`).
        convergence_max_examples: examples (whole batches, from the start of the validation set)
            used for convergence; their Gram matrices are kept between validations.
        probes: fit closed-form linear probes on every one of ``layers`` and log their
            cross-validated accuracy (see :class:`~lightning_cka.analyses.LinearProbe`).
        label_key: where the integer class labels sit in a batch (tuple index or dict key).
        probe_max_examples: examples kept per layer for the probes.
        probe_folds: folds of the probes' cross-validation.
        localization: log spatial localization maps of the model's ViT (CKA of each output token
            with every input patch; see :class:`~lightning_cka.analyses.Localization`).
        localization_layers: layers whose tokens are mapped; the last block when ``None``.
        analyses: further :class:`~lightning_cka.analyses.Analysis` instances to run in the same
            loop (each fills ``history`` records under its ``key``); one with the key of a built-in
            analysis (e.g. ``Convergence(max_examples=256)``) replaces it.
        strict: raise the callback's own failures instead of warning and skipping (for tests and
            debugging).

    Raises:
        ValueError: an option out of range (at construction), or layers that do not resolve, two
            callbacks with one ``log_prefix``, ``reduction="cls"`` on layers without a class token
            (at setup, before any step).
        TypeError: ``reference`` that is not an ``nn.Module``, or an ``analyses`` entry that is
            not an :class:`~lightning_cka.analyses.Analysis`.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> callback = CKACallback(layers="sublayers", every_n_epochs=2, max_examples=1024)
        >>> trainer = Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        layers: LayerSpec = "auto",
        reference: nn.Module | None = None,
        reference_layers: LayerSpec = "auto",
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        max_examples: int | None = None,
        reduction: Reduction = "flatten",
        output: OutputSelector = 0,
        input_key: str | int = 0,
        precision: Precision | torch.dtype = "float32",
        dataloader_idx: int = 0,
        log_prefix: str = "cka",
        save_matrices: bool = True,
        norm_ratio: bool = True,
        attention_distance: bool = True,
        attention_max_examples: int | None = 32,
        convergence: bool = True,
        convergence_max_examples: int = 1024,
        probes: bool = False,
        label_key: int | str = 1,
        probe_max_examples: int = 4096,
        probe_folds: int = 5,
        localization: bool = False,
        localization_layers: Sequence[str] | None = None,
        analyses: Sequence[Analysis] = (),
        strict: bool = False,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        for name, value in (("every_n_epochs", every_n_epochs), ("dataloader_idx", dataloader_idx + 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                shown = value if name != "dataloader_idx" else dataloader_idx
                raise ValueError(f"{name} must be {'>= 1' if name == 'every_n_epochs' else '>= 0'}, got {shown!r}.")
        for name, cap in (("max_batches", max_batches), ("max_examples", max_examples)):
            if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
                raise ValueError(f"{name} must be a positive int or None, got {cap!r}.")
        if reference is not None and not isinstance(reference, nn.Module):
            raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}.")
        if not isinstance(log_prefix, str) or not log_prefix.strip("/"):
            raise ValueError(f"log_prefix must be a non-empty string, got {log_prefix!r}.")
        for extra in analyses:
            if not isinstance(extra, Analysis):
                raise TypeError(f"analyses entries must be Analysis instances, got {type(extra).__name__}.")
        self.layers = layers
        self.reference = reference
        self.reference_layers = reference_layers
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.max_examples = max_examples
        self.reduction = reduction
        self.output = output
        self.input_key = input_key
        self.precision = resolve_precision(precision)
        self.dataloader_idx = dataloader_idx
        self.log_prefix = log_prefix.rstrip("/")
        self.save_matrices = save_matrices
        self.norm_ratio = norm_ratio
        self.attention_distance = attention_distance
        self.attention_max_examples = attention_max_examples
        self.strict = strict
        #: Every measured validation, oldest first: ``{"epoch", "step", "self", "reference"?, ...}``,
        #: one entry per analysis key.
        self.history: list[dict[str, Any]] = []
        self.rows: list[str] = []
        self.cols: list[str] = []
        # Every analysis this callback may run, in logging order; `_active_analyses` are those set up.
        self._analyses: list[Analysis] = [SelfCKA(self.log_prefix), ReferenceCKA(self.log_prefix)]
        if norm_ratio:
            self._analyses.append(NormRatioAnalysis())
        if attention_distance:
            self._analyses.append(AttentionDistanceAnalysis(attention_max_examples))
        if convergence:
            self._analyses.append(Convergence(convergence_max_examples, log_prefix=self.log_prefix))
        if probes:
            self._analyses.append(LinearProbe(label_key, probe_max_examples, probe_folds))
        if localization:
            self._analyses.append(Localization(localization_layers))
        keys = [a.key for a in analyses]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"Two analyses fill the same history key(s) {duplicated}; give each its own key.")
        # An instance passed in `analyses` replaces the one a switch would have built.
        self._analyses = [a for a in self._analyses if a.key not in keys] + list(analyses)
        self._active_analyses: list[Analysis] = []
        self._hooks = HookSet()
        self._capture: GramCapture | None = None
        self._reference_capture: GramCapture | None = None
        self._eager: list[EagerWhileMeasuring] = []
        self._measuring = False
        self._batches = 0
        self._examples = 0
        self._validations = 0  # non-sanity validations of `fit` seen, for every_n_epochs
        self._warned: set[tuple[str, ...]] = set()
        self._pending_state: dict[str, Any] | None = None
        self._captioned: set[str] = set()
        self._ranks = _Ranks(None)

    # ----------------------------------------------------------------- identity
    @property
    @override
    def state_key(self) -> str:
        # The prefix is unique per Trainer (checked in setup); layers are compared on load.
        return self._generate_state_key(log_prefix=self.log_prefix)

    # -------------------------------------------------------------- setup/teardown
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve layers and set up analyses; every configuration error surfaces here, before any step."""
        siblings = [cb for cb in trainer.callbacks if isinstance(cb, CKACallback)]  # type: ignore[attr-defined]
        for other in siblings:
            if other is not self and other.log_prefix == self.log_prefix:
                raise ValueError(
                    f"Two CKACallbacks log under the same prefix {self.log_prefix!r}; "
                    "give each its own, e.g. CKACallback(..., log_prefix='cka_mlp')."
                )
        self._ranks = _Ranks(trainer)
        self.rows, self._capture = self._capture_layers(pl_module, self.layers, "layers")
        self.cols = []
        if self.reference is not None:
            self.cols, self._reference_capture = self._capture_layers(
                self.reference, self.reference_layers, "reference_layers"
            )
        context = SetupContext(
            module=pl_module,
            layers=list(self.rows),
            reference=self.reference,
            reference_layers=list(self.cols),
            reduction=self.reduction,
            precision=self.precision,
            short_names=short_names(self.rows),
            reference_short_names=short_names(self.cols),
            sum_over_ranks=self._checked(lambda t: trainer.strategy.reduce(t, reduce_op="sum")),
            all_gather=self._checked(lambda t: trainer.strategy.all_gather(t).reshape(trainer.world_size, *t.shape)),
            world_size=trainer.world_size,
            input_key=self.input_key,
        )
        self._active_analyses = []
        for analysis in self._analyses:
            if analysis.model_wide and self._claimed_elsewhere(siblings, analysis.key):
                continue
            if analysis.setup(context):
                self._active_analyses.append(analysis)
        self._setup_compiled(pl_module)
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _claimed_elsewhere(self, siblings: list[CKACallback], key: str) -> bool:
        """Model-wide signals run on the first CKACallback of the Trainer that asks for them."""
        for callback in siblings:
            if any(a.key == key for a in callback._analyses):
                return callback is not self
        return False

    def _capture_layers(self, root: nn.Module, spec: LayerSpec, what: str) -> tuple[list[str], GramCapture]:
        names = resolve_layers(root, spec, what)
        if self.reduction == "cls":
            self._check_cls(root, names, what)
        return names, GramCapture.for_layers(root, names, self.reduction, self.output, self.precision)

    @staticmethod
    def _check_cls(root: nn.Module, names: list[str], what: str) -> None:
        for name in names:
            backbone = backbone_of(root, name)
            if backbone is None or not backbone.has_class_token:
                raise ValueError(
                    f"reduction='cls' needs ViT layers with a class token, but {what} entry {name!r} is not in one; "
                    "use reduction='mean' or 'flatten'."
                )

    def _setup_compiled(self, pl_module: pl.LightningModule) -> None:
        models = [pl_module] if self.reference is None else [pl_module, self.reference]
        self._eager = [e for e in map(EagerWhileMeasuring, models) if e]
        names = [n for e in self._eager for n in e.names]
        if names:
            rank_zero_warn(
                f"CKACallback: {', '.join(names)} is compiled. Hooks are invisible to compiled graphs, so during "
                "the validation batches that CKACallback measures these run eagerly (training and other validation "
                "batches stay compiled, without recompiling). Use every_n_epochs / max_batches to limit the cost."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_measuring()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_measuring()

    # ------------------------------------------------------------ validation loop
    def _should_measure(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        self._validations += 1
        return (self._validations - 1) % self.every_n_epochs == 0

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_measuring()
        if not self._active_analyses or not self._should_measure(trainer):
            return
        device = pl_module.device
        if self.reference is not None:
            self.reference.to(device)
        for analysis in self._active_analyses:
            self._guard(analysis, "reset", analysis.reset, device)
        self._batches = self._examples = 0
        self._measuring = True

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Hooks are present exactly while batches that count are running."""
        self._hooks.remove()
        if self._measuring and dataloader_idx == self.dataloader_idx and not self._capped():
            self._arm()
        else:
            for eager in self._eager:  # batches that are not measured run compiled again
                eager.exit()

    def _arm(self) -> None:
        for eager in self._eager:
            eager.enter()
        assert self._capture is not None
        self._capture.attach(self._hooks)
        for analysis in self._active_analyses:
            self._guard(analysis, "attach", analysis.attach, self._hooks)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._hooks or self._capture is None:
            return
        self._hooks.remove()  # the reference run below must not fire the model's hooks
        measured = MeasuredBatch(
            batch, self._capture.collect(), lambda: self._run_reference(batch), self.input_key, self._batches
        )
        for analysis in self._active_analyses:
            self._guard(analysis, "update", analysis.update, measured)
            analysis.clear()
        if measured.grams is not None:
            self._batches += 1
            self._examples += measured.num_examples

    def _capped(self) -> bool:
        return (self.max_batches is not None and self._batches >= self.max_batches) or (
            self.max_examples is not None and self._examples >= self.max_examples
        )

    def _run_reference(self, batch: Any) -> Tensor | None:
        """Run the reference on the batch's input in eval mode without gradients, restoring every
        module's mode afterwards; its layers' Grams, or ``None`` when it produced none."""
        assert self.reference is not None and self._reference_capture is not None
        self._reference_capture.clear()
        x = extract_input(batch, self.input_key)
        with HookSet() as hooks, _eval_mode(self.reference), torch.no_grad():
            self._reference_capture.attach(hooks)
            try:
                self.reference(to_model_input(x, self.reference))
            except Exception:
                self._reference_capture.clear()
                raise
        return self._reference_capture.collect()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._measuring:
            return
        self._stop_measuring()
        record: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        # compute() is a collective under DDP: every rank calls it, whatever it saw itself.
        for analysis in self._active_analyses:
            value = self._compute(analysis)
            if value is not None:
                if isinstance(value, CKAResult):
                    value.meta.update(epoch=record["epoch"], step=record["step"])
                record[analysis.key] = value
        if len(record) == 2:
            return  # nothing usable on any rank (e.g. every batch had < 4 examples)
        self.history.append(record)
        if trainer.is_global_zero and trainer.loggers:
            self._log(trainer, record)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_measuring()

    def _stop_measuring(self) -> None:
        self._hooks.remove()
        for eager in self._eager:
            eager.exit()
        self._measuring = False
        for capture in (self._capture, self._reference_capture):
            if capture is not None:
                capture.clear()
        for analysis in self._active_analyses:
            analysis.clear()

    # ------------------------------------------------------------ failure policy
    def _checked(self, collective: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``collective`` preceded, inside :meth:`_compute` under DDP, by the agreement of
        :meth:`_Ranks.failed`: a process whose analysis failed meets the others there, and they raise
        :class:`_PeerFailed` instead of waiting in a collective it will never join."""

        def checked(t: Tensor) -> Tensor:
            ranks = self._ranks
            if ranks.computing:
                if ranks.peer_failed is not None:  # already known: no more communication in this compute()
                    raise _PeerFailed(ranks.peer_failed)
                failed = ranks.failed(False)
                if failed:
                    ranks.peer_failed = failed
                    raise _PeerFailed(failed)
            return collective(t)

        return checked

    def _compute(self, analysis: Analysis) -> Any:
        """``analysis.compute()`` on every rank; ``None`` on every rank when it failed on any."""
        ranks = self._ranks
        if ranks.world_size == 1:
            return self._guard(analysis, "compute", analysis.compute)
        ranks.computing, ranks.peer_failed = True, None
        error: Exception | None = None
        value = None
        try:
            value = analysis.compute()
        except _PeerFailed:
            pass
        except Exception as err:
            error = err
        finally:
            ranks.computing = False
        # Every process meets here once, unless a collective check already told it who failed
        # (then the processes that failed met it there).
        failed = ranks.peer_failed if ranks.peer_failed is not None else ranks.failed(error is not None)
        if not failed:
            return value
        others = [r for r in failed if r != ranks.rank]
        if self.strict:
            if error is not None:
                raise error
            raise RuntimeError(
                f"CKACallback ({self.log_prefix}): the {analysis.key!r} analysis failed in compute on process(es) "
                f"{others} (strict=True); stopping this process too."
            )
        what = f"the {analysis.key!r} analysis"
        if error is not None and len(failed) == ranks.world_size:
            self._warn_once(what, "compute", error)  # failed everywhere (as a rule, alike): rank zero says it
        elif error is not None:
            self._warn_once(what, "compute", error, rank=ranks.rank)  # only this process knows the cause
        if others and len(failed) < ranks.world_size:
            self._warn_once(what, "compute", _OnOtherRanks(others))
        return None

    def _guard(self, analysis: Analysis, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one piece of an analysis; warn (once per cause) and return ``None`` when it fails."""
        try:
            return fn(*args)
        except Exception as err:
            if self.strict:
                raise
            self._warn_once(f"the {analysis.key!r} analysis", stage, err)
            return None

    def _warn_once(self, what: str, stage: str, err: Exception, rank: int | None = None) -> None:
        """Warn on global rank zero, or on process ``rank`` (a failure only that process knows)."""
        if isinstance(err, _OnOtherRanks):
            where, cause = f" on process(es) {err.ranks}", "their own warnings give the cause"
        else:
            where, cause = "" if rank is None else f" on process {rank}", f"{type(err).__name__}: {err}"
        if (what, where, cause) in self._warned:
            return
        self._warned.add((what, where, cause))
        skipped = "this batch" if stage in ("update", "attach") else "this validation"
        if where:
            skipped += " on every process"
        advice = "" if isinstance(err, AnalysisSkipped) else " Pass CKACallback(strict=True) to get the traceback."
        message = (
            f"CKACallback ({self.log_prefix}): {what} failed in {stage}{where} ({cause}); it is skipped for {skipped} "
            f"and training goes on. Further failures of this kind are not reported.{advice}"
        )
        if rank is None:
            rank_zero_warn(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)

    # ------------------------------------------------------------------- logging
    def _log(self, trainer: pl.Trainer, record: Mapping[str, Any]) -> None:
        """Rank zero: every figure, scalar, caption and matrix file of one validation."""
        step = _logging_step(trainer)
        scalars: dict[str, float] = {}
        for analysis in self._active_analyses:
            if analysis.key not in record:
                continue
            report = self._guard(analysis, "report", analysis.report, record[analysis.key], record["epoch"], step)
            if report is None:
                continue
            report = self._shorten(report)
            scalars.update(report.scalars)
            self._write(trainer, analysis, report, record["step"], step)
        self._guard_sink("scalars", log_scalars, trainer, scalars, step)

    def _shorten(self, report: Report) -> Report:
        """Tags without the LightningModule attribute that holds the network (``model.`` in
        ``norm_ratio/model.blocks.0/attn/cls``), like the axis labels; files keep full names."""
        prefix = common_prefix(self.rows)
        if not prefix:
            return report

        def tag(name: str) -> str:
            return "/".join(part.removeprefix(prefix) for part in name.split("/"))

        def charts(layout: dict[str, list[str]]) -> dict[str, list[str]]:
            return {chart: [tag(regex) for regex in regexes] for chart, regexes in layout.items()}

        return Report(
            scalars={tag(k): v for k, v in report.scalars.items()},
            figures={tag(k): v for k, v in report.figures.items()},
            matrices=report.matrices,
            captions={tag(k): v for k, v in report.captions.items()},
            layouts={category: charts(layout) for category, layout in report.layouts.items()},
        )

    def _write(self, trainer: pl.Trainer, analysis: Analysis, report: Report, record_step: int, step: int) -> None:
        for tag, fig in report.figures.items():
            self._guard_sink(f"figure {tag}", log_figure, trainer, tag, fig, step)
        for tag, caption in report.captions.items():
            if tag not in self._captioned:  # with the first appearance of each image only
                self._captioned.add(tag)
                self._guard_sink(f"caption {tag}", log_text, trainer, tag, caption, step)
        if report.layouts:
            self._guard_sink("custom scalars layout", log_custom_scalar_layout, trainer, report.layouts)
        if self.save_matrices:
            for stem, result in report.matrices.items():
                self._guard_sink(f"file {stem}", self._save_matrix, trainer, stem, result, record_step)

    def _save_matrix(self, trainer: pl.Trainer, stem: str, result: CKAResult, step: int) -> Path:
        return result.save(unique_path(run_dir(trainer) / self.log_prefix / f"{stem}_step{step:08d}.npz"))

    def _guard_sink(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:
            if self.strict:
                raise
            self._warn_once(f"writing the {what}", "logging", err)

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        history = []
        for record in self.history:
            entry = {k: v for k, v in record.items() if not isinstance(v, CKAResult)}
            entry["cka"] = {
                k: {"matrix": v.matrix.clone(), "rows": list(v.rows), "cols": list(v.cols)}
                for k, v in record.items()
                if isinstance(v, CKAResult)
            }
            history.append(entry)
        return {
            "history": history,
            "layers": list(self.rows),
            "validations": self._validations,
            "analyses": {a.key: a.state_dict() for a in self._active_analyses},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after `setup`; when called earlier, wait for the layers.
        if self.rows:
            self._restore(state_dict)
        else:
            self._pending_state = state_dict

    def _restore(self, state_dict: Mapping[str, Any]) -> None:
        self._pending_state = None
        saved_layers = state_dict.get("layers")
        if saved_layers is not None and list(saved_layers) != self.rows:
            rank_zero_warn(
                f"CKACallback ({self.log_prefix}): the checkpoint's history was measured on layers "
                f"{list(saved_layers)} but this callback measures {self.rows}; the history was not restored."
            )
            return
        self.history = []
        for entry in copy.deepcopy(state_dict.get("history", [])):
            record = {k: v for k, v in entry.items() if k != "cka"}
            meta = {"epoch": record.get("epoch"), "step": record.get("step")}
            for name, saved in entry.get("cka", {}).items():
                record[name] = CKAResult(saved["matrix"], saved["rows"], saved["cols"], dict(meta))
            self.history.append(record)
        self._validations = int(state_dict.get("validations", len(self.history) * self.every_n_epochs))
        saved = state_dict.get("analyses", {})
        for analysis in self._active_analyses:
            if analysis.key in saved:
                self._guard(analysis, "load_state_dict", analysis.load_state_dict, saved[analysis.key])


class _PeerFailed(Exception):
    """Raised inside an analysis's ``compute()`` at a collective when that analysis failed on other processes."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"failed on process(es) {ranks}")
        self.ranks = ranks


class _OnOtherRanks(Exception):
    """Stands for the failures of other processes in a warning."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"process(es) {ranks}")
        self.ranks = ranks


class _Ranks:
    """The processes of a Trainer and the agreement on which of them failed in an analysis's ``compute()``.

    Holds closures over the Trainer rather than the Trainer itself (a copy of the callback does not copy it).
    """

    def __init__(self, trainer: pl.Trainer | None) -> None:
        self.world_size = 1 if trainer is None else int(trainer.world_size)
        self.rank = 0 if trainer is None else int(trainer.global_rank)
        self.computing = False
        self.peer_failed: list[int] | None = None
        self._sum: Callable[[Tensor], Tensor] = lambda t: t
        self._device: Callable[[], torch.device] = lambda: torch.device("cpu")
        if trainer is not None:
            strategy = trainer.strategy
            self._sum = lambda t: strategy.reduce(t, reduce_op="sum")
            self._device = lambda: strategy.root_device

    def failed(self, this_one: bool) -> list[int]:
        """The processes that failed (a collective: one all-reduce of ``world_size`` numbers)."""
        flags = torch.zeros(self.world_size, dtype=torch.float32, device=self._device())
        flags[self.rank] = float(this_one)
        return [r for r, v in enumerate(self._sum(flags).tolist()) if v > 0]


def _logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs ``self.log`` values of this validation at, so CKA data lines up
    with ``val/*`` curves. Lightning keeps it in a private counter (no public accessor)."""
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:  # pragma: no cover - a Lightning without the counter
        return trainer.global_step


@contextlib.contextmanager
def _eval_mode(root: nn.Module) -> Iterator[None]:
    """Eval mode for every module under ``root`` while inside; each module's own ``training``
    flag is restored afterwards (also for modules shared with the model being trained)."""
    flags = [(m, m.training) for m in root.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag
