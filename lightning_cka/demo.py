"""The ``lightning-cka demo`` job: train a small ResNet, then a small ViT with the ResNet as CKA
reference, and check the outcome against Raghu et al. 2021 from the run's own files.

Heavy imports (Lightning, timm, matplotlib) happen inside functions, so ``lightning-cka --help``
stays fast.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_cka.data import DEFAULT_DATASET

if TYPE_CHECKING:
    from torch import nn

    from lightning_cka.callback import CKACallback
    from lightning_cka.compare import CKAResult
    from lightning_cka.data import DatasetSpec

__all__ = [  # noqa: F822 - Classifier is built on first access (module __getattr__)
    "Classifier",
    "DemoConfig",
    "DemoRun",
    "animate_run",
    "build_model",
    "find_self_matrices",
    "new_run_dir",
    "paper_checks",
    "print_report",
    "run_demo",
    "write_summary",
]

MODELS = ("resnet", "vit")
DISPLAY = {"resnet": "ResNet", "vit": "ViT"}
#: Environment variable through which processes started by a DDP launcher find the run folder.
RUN_DIR_ENV = "LIGHTNING_CKA_DEMO_RUN_DIR"


@dataclass
class DemoConfig:
    """Options of ``lightning-cka demo`` (see ``lightning-cka demo --help``).

    The defaults are the recipe measured in docs/paper-figures.md: about 4 minutes for both
    models on two CPU cores.
    """

    out: Path = Path("./runs")
    dataset: str = DEFAULT_DATASET
    #: training images of a generated dataset (``None``: the dataset's default)
    train_size: int | None = None
    data_dir: Path = Path("./data")
    models: tuple[str, ...] = MODELS
    epochs: dict[str, int] = field(default_factory=lambda: {"resnet": 2, "vit": 4})
    batch_size: int = 64
    #: input resolution (``None``: the dataset's own)
    img_size: int | None = None
    patch_size: int = 4
    lr: dict[str, float] = field(default_factory=lambda: {"resnet": 2e-3, "vit": 2e-3})
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    seed: int = 0
    progress: bool = True
    num_workers: int = 0
    #: ViT size: width, depth, heads, MLP ratio
    vit_dim: int = 64
    vit_depth: int = 6
    vit_heads: int = 2
    vit_mlp_ratio: float = 2.0
    #: start the learned position embedding from 2-D sin-cos values of this temperature (0: timm's random init)
    vit_sincos_temperature: float = 10.0
    #: ResNet: BasicBlocks per stage and the width of the first stage
    resnet_layers: tuple[int, ...] = (2, 2, 2, 2)
    resnet_width: int = 16
    #: LayerScale init of the ViT's residual branches (``None``: no LayerScale, timm's default)
    vit_init_values: float | None = None
    #: validation examples used for attention distances per batch
    attention_max_examples: int | None = 32
    #: per-layer linear probes (both models) and the ViT's spatial localization map
    probes: bool = True
    localization: bool = True
    #: write the ViT's animated GIF
    gif: bool = True


def build_model(
    kind: str,
    in_chans: int,
    num_classes: int,
    img_size: int,
    cfg: DemoConfig | None = None,
) -> nn.Module:
    """A small timm ResNet (``BasicBlock``, ``cfg.resnet_layers`` blocks per stage) or a plain timm
    ``VisionTransformer`` (class token, learned position embedding, ``cfg.patch_size`` patches)."""
    cfg = cfg or DemoConfig()
    if kind == "resnet":
        from timm.models.resnet import BasicBlock, ResNet

        w = cfg.resnet_width
        return ResNet(
            block=BasicBlock,
            layers=tuple(cfg.resnet_layers),
            channels=(w, 2 * w, 4 * w, 8 * w),
            stem_width=w,
            in_chans=in_chans,
            num_classes=num_classes,
            zero_init_last=False,  # timm's default zeroes each block's last BN: f(z) = 0, ratio infinite at start
        )
    if kind == "vit":
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(
            img_size=img_size,
            patch_size=cfg.patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=cfg.vit_dim,
            depth=cfg.vit_depth,
            num_heads=cfg.vit_heads,
            mlp_ratio=cfg.vit_mlp_ratio,
            init_values=cfg.vit_init_values,
        )
        if cfg.vit_sincos_temperature:
            init_sincos_pos_embed(vit, cfg.vit_sincos_temperature)
        return vit
    raise ValueError(f"Unknown model {kind!r}; choose from {MODELS}.")


def init_sincos_pos_embed(vit: nn.Module, temperature: float = 10.0) -> None:
    """Start a timm ViT's learned position embedding from 2-D sine-cosine values (as in MAE and
    MoCo v3; the class token's slot gets zeros). It stays a trained parameter: only its starting
    point changes, from timm's small random values (std 0.02) to one where nearby patches have
    similar embeddings, which lets attention heads become local within a few epochs."""
    import torch
    from timm.layers import build_sincos2d_pos_embed

    grid = [int(g) for g in vit.patch_embed.grid_size]  # type: ignore[union-attr]
    table = build_sincos2d_pos_embed(grid, int(vit.embed_dim), temperature=temperature)  # type: ignore[arg-type]
    prefix = int(getattr(vit, "num_prefix_tokens", 0))
    with torch.no_grad():
        pos = vit.pos_embed  # type: ignore[union-attr]
        pos.zero_()
        pos[0, pos.shape[1] - table.shape[0] :] = table.to(pos.dtype)
        if pos.shape[1] - table.shape[0] not in (0, prefix):
            raise ValueError("unexpected position-embedding layout")


def _classifier_class() -> type:
    import lightning.pytorch as pl
    import torch
    from torch.nn import functional as F

    class Classifier(pl.LightningModule):
        """Image classifier around any ``nn.Module`` (held as ``self.model``): AdamW (no weight decay
        on biases, norms, position embedding and class token) with a one-cycle schedule."""

        def __init__(self, model: nn.Module, lr: float = 2e-3, weight_decay: float = 0.05) -> None:
            super().__init__()
            self.model = model
            self.lr = lr
            self.weight_decay = weight_decay

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y, label_smoothing=0.05)
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
            self.log("val/acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self) -> Any:
            decay, no_decay = [], []
            for name, p in self.named_parameters():
                (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
            groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            optimizer = torch.optim.AdamW(groups, lr=self.lr)
            steps = self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.lr, total_steps=max(2, int(steps)), pct_start=0.15
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return Classifier


def __getattr__(name: str) -> Any:
    # Classifier subclasses LightningModule; build it on first use so importing this module is cheap.
    if name == "Classifier":
        cls = _classifier_class()
        globals()["Classifier"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DemoResult:
    """What one model's training produced."""

    name: str
    accuracy: float
    log_dir: Path
    callback: CKACallback
    seconds: float
    model: nn.Module


@dataclass
class DemoRun:
    """One ``lightning-cka demo`` run: its folder, each model's result and the paper checks."""

    run_dir: Path
    config: DemoConfig
    dataset: str
    results: list[DemoResult]
    seconds: float
    checks: dict[str, Any] = field(default_factory=dict)
    summary: Path | None = None
    gif: Path | None = None
    num_classes: int = 10


def new_run_dir(out: Path) -> Path:
    """A new folder ``out/version_N`` (N one more than the largest existing; never reused)."""
    out.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(p.name[8:]) for p in out.glob("version_*") if p.name[8:].isdigit()]
        path = out / f"version_{max(taken, default=-1) + 1}"
        try:
            path.mkdir()
        except FileExistsError:  # another run took it meanwhile
            continue
        return path


def _loaders(data: DatasetSpec, cfg: DemoConfig) -> tuple[Any, Any]:
    from torch.utils.data import DataLoader

    train = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers)
    val = DataLoader(data.val, batch_size=128, shuffle=False, num_workers=cfg.num_workers)
    return train, val


def _train(name: str, data: DatasetSpec, cfg: DemoConfig, run_dir: Path, reference: nn.Module | None) -> DemoResult:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_cka.callback import CKACallback

    pl.seed_everything(cfg.seed, verbose=False)
    model = build_model(name, data.in_chans, data.num_classes, data.img_size, cfg)
    module = __getattr__("Classifier")(model, lr=cfg.lr.get(name, 2e-3))
    callback = CKACallback(
        layers="stream",  # ViT: the residual stream after each add; ResNet: its block outputs
        reference=reference,
        reference_layers="stream",
        attention_max_examples=cfg.attention_max_examples,
        probes=cfg.probes,
        localization=cfg.localization and name == "vit",
    )
    logger = TensorBoardLogger(str(run_dir), name=name, version="", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs[name],
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=25,
    )
    train_loader, val_loader = _loaders(data, cfg)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning's own deprecation notice from inside its internals, not actionable by a demo user
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        trainer.fit(module, train_loader, val_loader)
    seconds = time.perf_counter() - start
    accuracy = float(trainer.callback_metrics.get("val/acc", torch.tensor(float("nan"))))
    return DemoResult(name, accuracy, run_dir / name, callback, seconds, model)


def run_demo(cfg: DemoConfig) -> DemoRun:
    """Train the chosen models in order (the ViT uses the trained ResNet, if any, as reference) in a
    new folder ``cfg.out/version_N``; then write ``summary.png``, the ViT's ``cka_self.gif`` and
    ``paper_checks.json`` there."""
    import lightning.pytorch as pl

    from lightning_cka.data import load_dataset

    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown:
        raise ValueError(f"Unknown model(s) {unknown}; choose from {MODELS}.")
    start = time.perf_counter()
    inherited = os.environ.get(RUN_DIR_ENV)  # set for processes a DDP launcher starts
    run_dir = Path(inherited) if inherited else new_run_dir(Path(cfg.out))
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        data = load_dataset(cfg.dataset, cfg.img_size, cfg.data_dir, seed=cfg.seed, train_size=cfg.train_size)
        if data.img_size % cfg.patch_size:
            raise ValueError(f"image size {data.img_size} is not a multiple of the ViT patch size {cfg.patch_size}")
        results: list[DemoResult] = []
        reference: nn.Module | None = None
        for name in cfg.models:
            result = _train(name, data, cfg, run_dir, reference if name == "vit" else None)
            results.append(result)
            if name == "resnet":
                reference = result.model
    finally:
        if not inherited:
            os.environ.pop(RUN_DIR_ENV, None)
    run = DemoRun(run_dir, cfg, data.name, results, time.perf_counter() - start, num_classes=data.num_classes)
    if pl.utilities.rank_zero_only.rank != 0:
        return run
    run.checks = paper_checks(run_dir)
    run.checks["seconds"] = {r.name: round(r.seconds, 1) for r in results}
    run.checks["seconds"]["total"] = round(time.perf_counter() - start, 1)
    vit = next((r for r in results if r.name == "vit"), None)
    if cfg.gif and vit is not None:
        groups = find_self_matrices(vit.log_dir)
        if groups:
            run.gif, _ = animate_run(groups[0], vit.log_dir / "cka_self.gif", title="ViT")
    run.summary = write_summary(run, run_dir / "summary.png")
    run.checks["seconds"]["total"] = round(time.perf_counter() - start, 1)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    (run_dir / "paper_checks.json").write_text(json.dumps({"config": config, **run.checks}, indent=2) + "\n")
    return run


# --------------------------------------------------------------------------- reading a run back


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under ``log_dir``: ``{tag: [(step, value), ...]}`` sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


def _last(scalars: Mapping[str, list[tuple[int, float]]], prefix: str) -> dict[str, float]:
    return {tag[len(prefix) :]: values[-1][1] for tag, values in scalars.items() if tag.startswith(prefix) and values}


def uniformity(matrix: Any) -> float:
    """Mean CKA between the lowest third and the highest third of a self-CKA matrix's layers
    (high: lower and higher layers represent alike, the paper's "uniform" ViT)."""
    import torch

    m = torch.as_tensor(matrix, dtype=torch.float64)
    third = max(1, m.shape[0] // 3)
    return float(m[:third, -third:].nanmean())


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _self_files(log_dir: Path) -> list[Path]:
    groups = find_self_matrices(log_dir)
    return sorted(groups[0].glob("self_step*.npz")) if groups else []


def paper_checks(run_dir: Path) -> dict[str, Any]:
    """The paper's findings, measured from a demo run's own files (the last saved self-CKA matrix
    of each model, and its TensorBoard scalars):

    - ``uniformity``: :func:`uniformity` of each model's last self-CKA heatmap; the paper's ViT
      is more uniform than its ResNet;
    - ``norm_ratio_median``: median of each model's last ``norm_ratio/*`` scalars; the paper's
      ViT ratios are far larger (here: at least twice the ResNet's);
    - ``attention_distance``: last ``attention_distance/<block>`` of each ViT block (mean over
      heads, pixels) and ``local_global_ratio`` = the lowest among the first half of the blocks
      over the last block's (the paper: local heads low, global heads high; here: at most 0.8);
    - ``accuracy``: last ``val/acc`` of each model;
    - reported without a target: ``probe`` (each model's last ``probe/<layer>/<pool>`` accuracy
      at its first and last layer, per pool), ``localization`` (the ViT's last
      ``localization/<layer>/diagonal`` and ``hit_rate``) and ``convergence_first`` (each model's
      last ``convergence/first/<layer>``: CKA of the layer now to itself at the first epoch).
    """
    from lightning_cka.compare import CKAResult
    from lightning_cka.plotting import short_names

    run_dir = Path(run_dir)
    checks: dict[str, Any] = {"run_dir": str(run_dir)}
    uniform: dict[str, float] = {}
    ratios: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    distances: dict[str, float] = {}
    for name in MODELS:
        log_dir = run_dir / name
        if not log_dir.is_dir():
            continue
        files = _self_files(log_dir)
        order: list[str] = []  # the self layers in model order, as tags name them
        if files:
            last_self = CKAResult.load(files[-1])
            uniform[name] = uniformity(last_self.matrix)
            order = short_names(list(last_self.rows))
        scalars = read_scalars(log_dir)
        norm = _last(scalars, "norm_ratio/")
        if norm:
            ratios[name] = _median(list(norm.values()))
        if "val/acc" in scalars:
            accuracy[name] = scalars["val/acc"][-1][1]
        if name == "vit":
            distances = _last(scalars, "attention_distance/")
            local = _last(scalars, "localization/")
            if local:
                checks.setdefault("localization", {}).update(local)
        probes = _last(scalars, "probe/")
        if probes:
            by_pool: dict[str, list[tuple[str, float]]] = {}
            for tag, value in probes.items():
                layer, pool = tag.rsplit("/", 1)
                by_pool.setdefault(pool, []).append((layer, value))
            for values in by_pool.values():
                values.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
            checks.setdefault("probe", {})[name] = {
                pool: {"first_layer": values[0][1], "last_layer": values[-1][1]} for pool, values in by_pool.items()
            }
        first = {tag.rsplit("/", 1)[-1]: v for tag, v in _last(scalars, "cka/convergence/first/").items()}
        if first:
            checks.setdefault("convergence_first", {})[name] = first
    checks["uniformity"] = uniform
    checks["norm_ratio_median"] = ratios
    checks["accuracy"] = accuracy
    checks["attention_distance"] = distances
    targets: dict[str, bool] = {}
    if {"resnet", "vit"} <= uniform.keys():
        targets["vit_more_uniform"] = uniform["vit"] > uniform["resnet"]
    if {"resnet", "vit"} <= ratios.keys():
        checks["norm_ratio_vit_over_resnet"] = ratios["vit"] / ratios["resnet"]
        targets["norm_ratio_2x"] = checks["norm_ratio_vit_over_resnet"] >= 2.0
    if len(distances) >= 2:
        values = list(distances.values())  # block order: scalars were logged in block order
        values = [distances[k] for k in sorted(distances, key=_block_index)]
        checks["local_global_ratio"] = min(values[: max(1, len(values) // 2)]) / values[-1]
        targets["local_below_0.8_global"] = checks["local_global_ratio"] <= 0.8
    if accuracy:
        targets["accuracy_90"] = all(a >= 0.9 for a in accuracy.values())
    checks["targets"] = targets
    return checks


def _block_index(name: str) -> tuple[int, str]:
    import re

    match = re.search(r"blocks\.(\d+)", name)
    return (int(match.group(1)) if match else -1, name)


def _probe_lines(checks: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, pools in checks.get("probe", {}).items():
        parts = [f"{pool} {v['first_layer']:.2f} -> {v['last_layer']:.2f}" for pool, v in sorted(pools.items())]
        lines.append(f"  {DISPLAY.get(name, name):<7}" + ", ".join(parts))
    return lines


def _localization_line(checks: Mapping[str, Any]) -> str | None:
    local = checks.get("localization", {})
    diagonal = [v for k, v in local.items() if k.endswith("/diagonal")]
    hits = [v for k, v in local.items() if k.endswith("/hit_rate")]
    if not diagonal or not hits:
        return None
    return f"ViT localization: diagonal {diagonal[0]:.2f}, hit rate {hits[0]:.0%}"


def print_report(run: DemoRun) -> None:
    """What ``lightning-cka demo`` prints at the end."""
    print(f"\nRun folder: {run.run_dir}  (dataset {run.dataset}, seed {run.config.seed})")
    for result in run.results:
        print(f"  {DISPLAY[result.name]:<7} {result.accuracy:6.1%} val accuracy  ({result.seconds:.0f} s)")
    c = run.checks
    if c.get("uniformity"):
        parts = ", ".join(f"{DISPLAY[k]} {v:.2f}" for k, v in c["uniformity"].items())
        print(f"  uniformity (CKA lowest third x highest third of layers): {parts}")
    if c.get("norm_ratio_median"):
        parts = ", ".join(f"{DISPLAY[k]} {v:.2f}" for k, v in c["norm_ratio_median"].items())
        print(f"  median skip-connection norm ratio: {parts}")
    if "local_global_ratio" in c:
        print(f"  attention distance, most local early block / last block: {c['local_global_ratio']:.2f}")
    if c.get("probe"):
        print("  linear probe accuracy, first -> last layer:")
        print("\n".join("  " + line for line in _probe_lines(c)))
    if _localization_line(c):
        print(f"  {_localization_line(c)}")
    for target, ok in c.get("targets", {}).items():
        print(f"  [{'x' if ok else ' '}] {target}")
    if run.summary:
        print(f"Summary figure: {run.summary}")
    if run.gif:
        print(f"ViT heatmaps over training: {run.gif}")
    print(f"Open the logs with:\n  tensorboard --logdir {run.run_dir}")


# --------------------------------------------------------------------------- figures


def find_self_matrices(root: Path) -> list[Path]:
    """Folders holding ``self_step*.npz`` files: ``root`` itself, ``root/<prefix>`` or
    ``root/<run>/<prefix>`` (e.g. a demo run folder with ``resnet/cka`` and ``vit/cka``)."""
    root = Path(root)
    patterns = ("self_step*.npz", "*/self_step*.npz", "*/*/self_step*.npz")
    found = {p.parent for pattern in patterns for p in root.glob(pattern)}
    return sorted(found)


def _step(path: Path) -> tuple[int, str]:
    digits = path.stem.split("_step", 1)[-1].split("-")[0]
    return (int(digits) if digits.isdigit() else -1, path.name)


def animate_run(folder: Path, out: Path, fps: float = 2.0, title: str | None = None) -> tuple[Path, int]:
    """Write the ``self_step*.npz`` matrices of ``folder`` (in step order) as an animated GIF with
    matplotlib's Pillow writer; returns ``(path, frames)``."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.figure import Figure

    from lightning_cka.compare import CKAResult
    from lightning_cka.plotting import plot_cka_heatmap

    files = sorted(Path(folder).glob("self_step*.npz"), key=_step)
    if not files:
        raise ValueError(f"no self_step*.npz files in {folder}")
    results = [CKAResult.load(f) for f in files]
    shapes = {tuple(r.matrix.shape) for r in results}
    if len(shapes) > 1:
        raise ValueError(f"the matrices in {folder} have different shapes {sorted(shapes)}; cannot animate them")
    name = title or DISPLAY.get(Path(folder).parent.name, Path(folder).parent.name)

    def label(r: CKAResult, path: Path) -> str:
        epoch, step = r.meta.get("epoch"), r.meta.get("step", _step(path)[0])
        when = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
        return f"{name} self-CKA, {when}"

    fig = Figure(figsize=(6.5, 5.5), dpi=90)
    ax = fig.add_subplot()
    plot_cka_heatmap(results[0].matrix, results[0].rows, results[0].cols, ax=ax, title=label(results[0], files[0]))
    image = ax.images[0]

    def update(i: int) -> Any:
        image.set_data(results[i].matrix.numpy())
        ax.set_title(label(results[i], files[i]), fontsize=11)
        return (image,)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    animation = FuncAnimation(fig, update, frames=len(results), blit=False)
    animation.save(str(out), writer=PillowWriter(fps=fps))
    return out, len(results)


def _pick(history: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` records with a self heatmap, evenly spread from the first to the last."""
    records = [r for r in history if "self" in r]
    if len(records) <= count:
        return records
    idx = sorted({round(i * (len(records) - 1) / (count - 1)) for i in range(count)})
    return [records[i] for i in idx]


def _short(name: str) -> str:
    return name[6:] if name.startswith("model.") else name


def write_summary(run: DemoRun, path: Path, columns: int = 4) -> Path:
    """One-page PNG naming the run, panels filled row by row (a model that was not run leaves its
    panels out): the ViT's self-CKA heatmaps at up to ``columns`` epochs and the ResNet's at its
    first and last (how they changed over training), the ViT x ResNet heatmap, the ViT's layer
    convergence, norm ratios, attention distances per head, linear-probe accuracy per layer and
    the ViT's localization map; the paper checks as text underneath."""
    import math

    from matplotlib.figure import Figure

    results = {r.name: r for r in run.results}
    panels: list[Any] = []  # callables drawing into one axes
    for name, count in (("vit", columns), ("resnet", 2)):
        result = results.get(name)
        if result is not None:
            for record in _pick(result.callback.history, count):
                panels.append(lambda ax, r=result, rec=record: _draw_self(ax, r, rec))
    vit = results.get("vit")
    last_vit = vit.callback.history[-1] if vit and vit.callback.history else {}
    if "reference" in last_vit:
        panels.append(lambda ax: _draw_reference(ax, last_vit))
    if vit is not None and any("convergence" in r for r in vit.callback.history):
        panels.append(lambda ax: _draw_convergence(ax, vit))
    if any(r.callback.history and r.callback.history[-1].get("norm_ratio") for r in results.values()):
        panels.append(lambda ax: _draw_norm_ratios(ax, results))
    if last_vit.get("attention_distance"):
        panels.append(lambda ax: _draw_attention(ax, vit, last_vit["attention_distance"]))
    if any(r.callback.history and r.callback.history[-1].get("probe") for r in results.values()):
        panels.append(lambda ax: _draw_probes(ax, results, run.num_classes))
    if last_vit.get("localization"):
        panels.append(lambda ax: _draw_localization(ax, last_vit["localization"]))

    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(5.2 * columns, 4.6 * rows + 2.6), dpi=80)
    grid = fig.add_gridspec(rows + 1, columns, height_ratios=[4.6] * rows + [2.2])
    for index, draw in enumerate(panels):
        draw(fig.add_subplot(grid[index // columns, index % columns]))
    text = fig.add_subplot(grid[rows, :])
    text.set_axis_off()
    lines = _checks_text(run).split("\n")
    half = (len(lines) + 1) // 2
    for x, part in ((0.0, lines[:half]), (0.5, lines[half:])):
        block = "\n".join(part)
        text.text(x, 1.0, block, va="top", ha="left", family="monospace", fontsize=10, transform=text.transAxes)
    fig.suptitle(f"lightning-cka demo: {run.run_dir}  (dataset {run.dataset}, seed {run.config.seed})", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _draw_self(ax: Any, result: DemoResult, record: dict[str, Any]) -> None:
    from lightning_cka.plotting import plot_cka_heatmap

    cka: CKAResult = record["self"]
    title = f"{DISPLAY[result.name]} self-CKA, epoch {record['epoch']}"
    if record is result.callback.history[-1] or record["epoch"] == result.callback.history[-1].get("epoch"):
        title += f" ({result.accuracy:.1%} acc)"
    names = [_short(n) for n in cka.rows]
    plot_cka_heatmap(cka.matrix, names, names, ax=ax, title=title)


def _draw_reference(ax: Any, record: dict[str, Any]) -> None:
    from lightning_cka.plotting import plot_cka_heatmap

    cka = record["reference"]
    plot_cka_heatmap(
        cka.matrix,
        [_short(n) for n in cka.rows],
        [_short(n) for n in cka.cols],
        ax=ax,
        title=f"ViT x ResNet CKA, epoch {record['epoch']}",
        xlabel="ResNet layer",
        ylabel="ViT layer",
    )


def _draw_convergence(ax: Any, result: DemoResult) -> None:
    """Layers x epochs, colour = CKA of each layer to itself at the previous validation."""
    import math

    from lightning_cka.plotting import plot_cka_heatmap

    records = [r for r in result.callback.history if "convergence" in r]
    layers = list(records[-1]["convergence"]["previous"])
    matrix = [[float(r["convergence"]["previous"].get(layer, math.nan)) for r in records] for layer in layers]
    plot_cka_heatmap(
        matrix,
        [_short(n) for n in layers],
        [str(r["epoch"]) for r in records],
        ax=ax,
        title=f"{DISPLAY[result.name]} layer CKA to the previous epoch",
        xlabel="epoch",
        ylabel="layer",
    )


def _draw_norm_ratios(ax: Any, results: Mapping[str, DemoResult]) -> None:
    from lightning_cka.plotting import plot_series

    series: dict[str, list[float]] = {}
    for result in results.values():
        record = result.callback.history[-1] if result.callback.history else {}
        for key, value in record.get("norm_ratio", {}).items():
            _, unit, group = key.rsplit("/", 2)
            label = DISPLAY[result.name] if result.name == "resnet" else f"{DISPLAY[result.name]} {unit} {group}"
            series.setdefault(label, []).append(float(value))
    plot_series(series, ax=ax, title="Skip-connection norm ratio ||z|| / ||f(z)||", ylabel="ratio", logy=True)
    ax.legend(fontsize=7)


def _draw_attention(ax: Any, vit: DemoResult | None, distances: Mapping[str, Any]) -> None:
    import torch

    from lightning_cka.plotting import plot_series

    names = sorted(distances, key=_block_index)
    heads = [[float(v) for v in torch.as_tensor(distances[n]).flatten()] for n in names]
    hlines, ylim = None, None
    try:
        from lightning_cka.attention import uniform_attention_distance

        grid = vit.model.patch_embed.grid_size  # type: ignore[union-attr]
        patch = vit.model.patch_embed.patch_size  # type: ignore[union-attr]
        uniform, largest = uniform_attention_distance(tuple(grid), tuple(patch))
        hlines, ylim = {"uniform attention": uniform}, (0.0, largest * 1.02)
    except (AttributeError, ImportError, TypeError):
        pass
    plot_series(
        {"ViT head": heads},
        ax=ax,
        scatter=True,
        hlines=hlines,
        ylim=ylim,
        title="Mean attention distance per head (pixels)",
        ylabel="pixels",
    )
    ax.plot(range(len(heads)), [sum(h) / len(h) for h in heads], color="k", label="ViT block mean")
    ax.legend(fontsize=7)


def _draw_probes(ax: Any, results: Mapping[str, DemoResult], classes: int) -> None:
    """Held-out probe accuracy against relative depth (0: first measured layer, 1: last)."""
    for result in results.values():
        record = result.callback.history[-1] if result.callback.history else {}
        accuracy = record.get("probe")
        if not accuracy:
            continue
        layers = list(accuracy)
        depth = [i / max(1, len(layers) - 1) for i in range(len(layers))]
        for pool in ("cls", "mean"):
            values = [accuracy[layer].get(pool, float("nan")) for layer in layers]
            if any(v == v for v in values):
                ax.plot(depth, values, marker="o", markersize=3, label=f"{DISPLAY[result.name]} {pool}")
    ax.axhline(1.0 / classes, color="0.35", linestyle="--", linewidth=1.2, label=f"chance (1/{classes})")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("relative depth (first to last measured layer)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Linear probe per layer (5-fold CV)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _draw_localization(ax: Any, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """The localization rows of nine query positions (corners, edge midpoints, centre), each
    laid out on the patch grid, tiled 3 x 3 in one image; the query's own cell outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    from lightning_cka.analyses.localization import default_queries

    layer, entry = next(iter(entries.items()))
    matrix = np.asarray(entry["matrix"], dtype=float)
    h, w = (int(g) for g in entry["grid"])
    queries = default_queries((h, w))
    tile = np.full((3 * (h + 1) - 1, 3 * (w + 1) - 1), np.nan)
    for k, (r, c) in enumerate(queries):
        i, j = divmod(k, 3)
        tile[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = matrix[r * w + c].reshape(h, w)
    image = ax.imshow(np.ma.masked_invalid(tile), vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
    for k, (r, c) in enumerate(queries):
        i, j = divmod(k, 3)
        ax.add_patch(Rectangle((j * (w + 1) + c - 0.5, i * (h + 1) + r - 0.5), 1, 1, fill=False, color="cyan", lw=1.2))
    ax.figure.colorbar(image, ax=ax, label="CKA")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"ViT localization, {_short(layer)} x input patches\n"
        f"diagonal {entry['diagonal']:.2f}, hit rate {entry['hit_rate']:.0%} (cyan: the query token)",
        fontsize=10,
    )


def _checks_text(run: DemoRun) -> str:
    c = run.checks
    lines = ["Raghu et al. 2021, measured here:", ""]
    u = c.get("uniformity", {})
    if u:
        lines.append("uniformity (low x high third):")
        lines += [f"  {DISPLAY[k]:<7}{v:.2f}" for k, v in u.items()]
    r = c.get("norm_ratio_median", {})
    if r:
        lines.append("median norm ratio:")
        lines += [f"  {DISPLAY[k]:<7}{v:.2f}" for k, v in r.items()]
    if "local_global_ratio" in c:
        lines.append(f"attention distance early/last: {c['local_global_ratio']:.2f}")
    if c.get("probe"):
        lines.append("probe accuracy, first -> last layer:")
        lines += _probe_lines(c)
    if _localization_line(c):
        lines.append(str(_localization_line(c)))
    a = c.get("accuracy", {})
    if a:
        lines.append("accuracy: " + ", ".join(f"{DISPLAY[k]} {v:.1%}" for k, v in a.items()))
    s = c.get("seconds", {})
    if s:
        lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
    lines.append("")
    lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in c.get("targets", {}).items()]
    return "\n".join(lines)
