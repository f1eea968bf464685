"""``CKACallback``: minibatch CKA heatmaps of chosen layers, computed live during validation."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_cka.attention import AttentionDistanceCapture, plot_attention_distances
from lightning_cka.capture import REDUCTIONS, GramCapture, HookSet, OutputSelector, extract_input
from lightning_cka.compare import CKAResult, to_model_input
from lightning_cka.compiled import EagerWhileMeasuring
from lightning_cka.layers import LayerSpec, backbone_of, find_backbones, module_map, resolve_layers
from lightning_cka.loggers import log_custom_scalar_layout, log_figure, log_scalars, run_dir
from lightning_cka.metric import MinibatchCKA, resolve_precision
from lightning_cka.norm_ratio import NormRatioCapture, find_residual_units, plot_norm_ratios
from lightning_cka.plotting import plot_cka_heatmap

__all__ = ["CKACallback"]


def _plain(t: Tensor) -> Tensor:
    """A CPU copy that is an ordinary tensor even when made under Lightning's inference mode."""
    with torch.inference_mode(False):
        return t.detach().cpu().clone()


class CKACallback(Callback):
    """Log minibatch CKA between layers every validation epoch.

    Hooks are armed at the start of each validation loop (in ``fit`` and ``validate``) and
    removed when it ends, on an exception and in ``teardown``; training steps do no extra
    work. Each hook turns its layer's output into an ``(n, n)`` Gram matrix on the spot,
    and a :class:`~lightning_cka.MinibatchCKA` metric keeps the running sums, so memory is
    ``O(L n^2)`` whatever the number of batches. The metric's ``compute()`` is a collective
    and runs on every rank; only global rank zero logs.

    Logged per validation (step = ``trainer.global_step``), with ``prefix = log_prefix``:

    - images ``{prefix}/self`` (and ``{prefix}/reference`` with a reference model): heatmaps on
      a fixed 0..1 scale, layer names on the axes, the epoch in the title;
    - scalars ``{prefix}/self/adjacent_mean`` (mean CKA of consecutive layers) and
      ``{prefix}/self/to_last/<layer>`` (each layer's CKA to the last one); with a reference,
      ``{prefix}/reference/best_match_mean`` (mean over rows of the best-matching column);
    - ``.npz`` files ``<run dir>/{prefix}/<name>_step<step>.npz`` with ``matrix``, ``rows``,
      ``cols`` (``numpy.load(path)["matrix"]``, or :meth:`CKAResult.load`);
    - :attr:`history`: every computed :class:`~lightning_cka.CKAResult`, also without a logger.

    On recognised architectures it also logs the paper's two other signals (one switch each):

    - skip-connection norm ratios ``norm_ratio/<block>/<unit>/<tokens>`` (e.g.
      ``norm_ratio/model.blocks.0/attn/cls``, ``norm_ratio/model.layer2.0/residual/all``), a
      figure ``norm_ratio/curves`` and a TensorBoard custom-scalars layout grouping them;
    - mean attention distances of timm ViTs, ``attention_distance/<layer>`` (mean over heads, in
      pixels) and a per-head scatter figure ``attention_distance/heads``.

    Args:
        layers: layers of the LightningModule: ``"auto"`` (residual blocks of a timm ViT, timm or
            torchvision ResNet found anywhere among its attributes), ``"sublayers"`` (each ViT
            block's ``attn`` and ``mlp``), names relative to the LightningModule
            (``"model.blocks.0.attn"``), glob patterns (``"model.blocks.*.mlp"``), module types,
            or a list of those.
        reference: a fixed ``nn.Module`` run on the same validation inputs (e.g. a trained ResNet
            while training a ViT). It is never trained and not saved in checkpoints.
        reference_layers: layers of ``reference`` (same rules; names relative to it).
        every_n_epochs: run on validation epochs where ``current_epoch % every_n_epochs == 0``.
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
            or torchvision ResNet blocks (only the first CKACallback of a Trainer does).
        attention_distance: measure mean attention distances of its timm ViTs (likewise).
        attention_max_examples: examples per batch used for attention distances (recomputing
            attention costs about one extra attention pass per layer); ``None`` for all.
    """

    def __init__(
        self,
        layers: LayerSpec = "auto",
        reference: nn.Module | None = None,
        reference_layers: LayerSpec = "auto",
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        max_examples: int | None = None,
        reduction: str = "flatten",
        output: OutputSelector = 0,
        input_key: str | int = 0,
        precision: str | torch.dtype = "float32",
        dataloader_idx: int = 0,
        log_prefix: str = "cka",
        save_matrices: bool = True,
        norm_ratio: bool = True,
        attention_distance: bool = True,
        attention_max_examples: int | None = 32,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        for name, cap in (("max_batches", max_batches), ("max_examples", max_examples)):
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be a positive int or None, got {cap}.")
        if reference is not None and not isinstance(reference, nn.Module):
            raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}.")
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
        #: Every computed result, oldest first: ``{"epoch", "step", "self", "reference"?}``.
        self.history: list[dict[str, Any]] = []
        self.rows: list[str] = []
        self.cols: list[str] = []
        self._hooks = HookSet()
        self._capture: GramCapture | None = None
        self._reference_capture: GramCapture | None = None
        self._self_metric: MinibatchCKA | None = None
        self._reference_metric: MinibatchCKA | None = None
        self._norm_capture: NormRatioCapture | None = None
        self._attention_capture: AttentionDistanceCapture | None = None
        self._layout_logged = False
        self._eager: list[EagerWhileMeasuring] = []
        self._active = False
        self._batches = 0
        self._examples = 0

    # ----------------------------------------------------------------- identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=repr(self.layers), log_prefix=self.log_prefix)

    # -------------------------------------------------------------- setup/teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve layers and build metrics; every configuration error surfaces here, before any step."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is not self and isinstance(other, CKACallback) and other.log_prefix == self.log_prefix:
                raise ValueError(
                    f"Two CKACallbacks log under the same prefix {self.log_prefix!r}; "
                    "give each its own, e.g. CKACallback(..., log_prefix='cka_mlp')."
                )
        self._layout_logged = False
        self.rows, self._capture = self._capture_layers(pl_module, self.layers, "layers")
        self._self_metric = MinibatchCKA(num_layers=len(self.rows), precision=self.precision, layer_names=self.rows)
        if self.reference is not None:
            self.cols, self._reference_capture = self._capture_layers(
                self.reference, self.reference_layers, "reference_layers"
            )
            self._reference_metric = MinibatchCKA(
                num_layers=len(self.rows),
                num_other_layers=len(self.cols),
                precision=self.precision,
                layer_names=self.rows,
                other_layer_names=self.cols,
            )
            self.reference.eval().requires_grad_(False)
        self._setup_signals(trainer, pl_module)
        self._setup_compiled(pl_module)

    def _capture_layers(self, root: nn.Module, spec: LayerSpec, what: str) -> tuple[list[str], GramCapture]:
        names = resolve_layers(root, spec, what)
        if self.reduction == "cls":
            self._check_cls(root, names, what)
        modules = module_map(root)
        return names, GramCapture({n: modules[n] for n in names}, self.reduction, self.output, self.precision)

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

    def _setup_signals(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Norm ratios and attention distances, on the first CKACallback that asks for them."""
        siblings = [cb for cb in trainer.callbacks if isinstance(cb, CKACallback)]  # type: ignore[attr-defined]
        self._norm_capture = self._attention_capture = None
        if self.norm_ratio and next(cb for cb in siblings if cb.norm_ratio) is self:
            units = find_residual_units(pl_module)
            if units:
                self._norm_capture = NormRatioCapture(pl_module, units)
        wants_attention = self.attention_distance and next(cb for cb in siblings if cb.attention_distance) is self
        if wants_attention and any(b.kind == "vit" for b in find_backbones(pl_module)):
            self._attention_capture = AttentionDistanceCapture(pl_module, self.attention_max_examples)

    @staticmethod
    def _check_cls(root: nn.Module, names: list[str], what: str) -> None:
        for name in names:
            backbone = backbone_of(root, name)
            if backbone is None or backbone.kind != "vit" or getattr(backbone.module, "cls_token", None) is None:
                raise ValueError(
                    f"reduction='cls' needs ViT layers with a class token, but {what} entry {name!r} is not in one; "
                    "use reduction='mean' or 'flatten'."
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._disarm()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._disarm()

    # ------------------------------------------------------------ validation loop
    def _should_run(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._disarm()
        if not self._should_run(trainer) or self._self_metric is None:
            return
        device = pl_module.device
        self._self_metric.to(device).reset()
        if self.reference is not None and self._reference_metric is not None:
            self.reference.to(device).eval()
            self._reference_metric.to(device).reset()
        for extra in (self._norm_capture, self._attention_capture):
            if extra is not None:
                extra.metric.to(device)
                extra.reset()
        self._batches = self._examples = 0
        self._active = True

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Hooks are present exactly while batches that count are running."""
        wanted = self._active and dataloader_idx == self.dataloader_idx and not self._capped()
        if wanted and not self._hooks:
            self._arm()
        elif not wanted and self._hooks:
            self._disarm(keep_active=True)

    def _arm(self) -> None:
        for eager in self._eager:
            eager.enter()
        captures = (self._capture, self._reference_capture, self._norm_capture, self._attention_capture)
        for capture in captures:
            if capture is not None:
                capture.attach(self._hooks)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._hooks or self._capture is None or self._self_metric is None:
            return
        grams = self._capture.collect()
        if grams is None:
            return
        self._self_metric.update_grams(grams)
        if self.reference is not None and self._reference_metric is not None:
            reference_grams = self._run_reference(batch)
            if reference_grams is not None:
                self._reference_metric.update_grams(grams, reference_grams.to(grams.device))
        self._batches += 1
        self._examples += grams.shape[-1]

    def _capped(self) -> bool:
        return (self.max_batches is not None and self._batches >= self.max_batches) or (
            self.max_examples is not None and self._examples >= self.max_examples
        )

    def _run_reference(self, batch: Any) -> Tensor | None:
        assert self.reference is not None and self._reference_capture is not None
        self._reference_capture.clear()  # in case the reference shares modules with the model
        try:
            x = extract_input(batch, self.input_key)
            with torch.no_grad():
                self.reference(to_model_input(x, self.reference))
        except Exception as err:  # a bad reference must not stop the user's run
            self._reference_capture.clear()
            rank_zero_warn(f"CKACallback: the reference model failed on a validation batch ({err!r}); batch skipped.")
            return None
        finally:
            if self._capture is not None:
                self._capture.clear()  # shared modules fired the model's hooks again
        return self._reference_capture.collect()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or self._self_metric is None:
            return
        self._hooks.remove()
        self._active = False
        # compute() is a collective under DDP: every rank calls it, whatever it saw itself.
        used = trainer.strategy.reduce(self._self_metric.num_batches.clone(), reduce_op="sum")
        if int(used) == 0:
            return  # nothing usable on any rank (e.g. every batch had < 4 examples)
        record: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        record["self"] = CKAResult(_plain(self._self_metric.compute()), self.rows, self.rows, dict(record))
        if self._reference_metric is not None:
            record["reference"] = CKAResult(
                _plain(self._reference_metric.compute()), self.rows, self.cols, dict(record)
            )
        if self._norm_capture is not None:
            record["norm_ratio"] = self._norm_capture.compute()
        if self._attention_capture is not None:
            record["attention_distance"] = {k: v.tolist() for k, v in self._attention_capture.compute().items()}
        self.history.append(record)
        if trainer.is_global_zero and trainer.loggers:
            self._log(trainer, record)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._disarm()

    def _disarm(self, keep_active: bool = False) -> None:
        self._hooks.remove()
        for eager in self._eager:
            eager.exit()
        self._active = self._active and keep_active
        if self._capture is not None:
            self._capture.clear()
        if self._reference_capture is not None:
            self._reference_capture.clear()

    # ------------------------------------------------------------------- logging
    def _log(self, trainer: pl.Trainer, record: Mapping[str, Any]) -> None:
        """Rank zero: every figure, scalar and matrix file of one validation."""
        scalars: dict[str, float] = {}
        for name in ("self", "reference"):
            if name in record:
                scalars.update(self._log_cka(trainer, name, record[name], record["epoch"], record["step"]))
        if record.get("norm_ratio"):
            scalars.update(self._log_norm_ratios(trainer, record["norm_ratio"], record["epoch"], record["step"]))
        if record.get("attention_distance"):
            scalars.update(self._log_attention(trainer, record["attention_distance"], record["epoch"], record["step"]))
        log_scalars(trainer, scalars, record["step"])

    def _log_cka(self, trainer: pl.Trainer, name: str, result: CKAResult, epoch: int, step: int) -> dict[str, float]:
        title = f"{'Self' if name == 'self' else 'Model x reference'} CKA, epoch {epoch} (step {step})"
        xlabel = "reference layer" if name == "reference" else "layer"
        fig, _ = plot_cka_heatmap(result.matrix, result.rows, result.cols, title=title, xlabel=xlabel, ylabel="layer")
        log_figure(trainer, f"{self.log_prefix}/{name}", fig, step)
        if self.save_matrices:
            result.save(run_dir(trainer) / self.log_prefix / f"{name}_step{step:08d}.npz")
        return self._summary(name, result)

    def _log_norm_ratios(
        self, trainer: pl.Trainer, ratios: Mapping[str, float], epoch: int, step: int
    ) -> dict[str, float]:
        fig, _ = plot_norm_ratios(dict(ratios), title=f"Skip-connection norm ratio, epoch {epoch} (step {step})")
        log_figure(trainer, "norm_ratio/curves", fig, step)
        if not self._layout_logged:
            log_custom_scalar_layout(trainer, {"norm_ratio": self._norm_layout(ratios)})
            self._layout_logged = True
        return {f"norm_ratio/{series}": value for series, value in ratios.items()}

    def _log_attention(
        self, trainer: pl.Trainer, distances: Mapping[str, list[float]], epoch: int, step: int
    ) -> dict[str, float]:
        title = f"Mean attention distance per head, epoch {epoch} (step {step})"
        fig, _ = plot_attention_distances({k: torch.tensor(v) for k, v in distances.items()}, title=title)
        log_figure(trainer, "attention_distance/heads", fig, step)
        return {f"attention_distance/{layer}": sum(h) / len(h) for layer, h in distances.items()}

    @staticmethod
    def _norm_layout(ratios: Mapping[str, float]) -> dict[str, list[str]]:
        """One chart per (unit, token group), each holding that series of every block."""
        charts: dict[str, list[str]] = {}
        for series in ratios:
            _, unit, group = series.rsplit("/", 2)
            charts.setdefault(f"{unit}/{group}", [f"norm_ratio/.*/{unit}/{group}$"])
        return charts

    def _summary(self, name: str, result: CKAResult) -> dict[str, float]:
        m = result.matrix
        prefix = f"{self.log_prefix}/{name}"
        if name == "self":
            out = {f"{prefix}/to_last/{row}": float(m[i, -1]) for i, row in enumerate(result.rows)}
            if m.shape[0] > 1:
                out[f"{prefix}/adjacent_mean"] = float(torch.diagonal(m, offset=1).nanmean())
            return out
        return {f"{prefix}/best_match_mean": float(torch.nan_to_num(m, nan=-1.0).amax(dim=1).mean())}

    # ------------------------------------------------------------------ checkpoint
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
        return {"history": history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = []
        for entry in copy.deepcopy(state_dict.get("history", [])):
            record = {k: v for k, v in entry.items() if k != "cka"}
            meta = {"epoch": record.get("epoch"), "step": record.get("step")}
            for name, saved in entry.get("cka", {}).items():
                record[name] = CKAResult(saved["matrix"], saved["rows"], saved["cols"], dict(meta))
            self.history.append(record)
