"""The main job: train a small ResNet, then a small ViT with the ResNet as CKA reference."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_cka.callback import CKACallback
from lightning_cka.data import DatasetSpec, load_dataset

__all__ = ["Classifier", "DemoConfig", "build_model", "run_demo"]

MODELS = ("resnet", "vit")


def build_model(kind: str, in_chans: int, num_classes: int, img_size: int) -> nn.Module:
    """A small timm ResNet (BasicBlock, one block per stage) or ViT (patch 4, 6 blocks)."""
    if kind == "resnet":
        from timm.models.resnet import BasicBlock, ResNet

        return ResNet(
            block=BasicBlock,
            layers=(1, 1, 1, 1),
            channels=(32, 64, 128, 256),
            stem_width=32,
            in_chans=in_chans,
            num_classes=num_classes,
            zero_init_last=False,  # timm's default zeroes each block's last BN: f(z) = 0, ratio infinite at start
        )
    if kind == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=img_size,
            patch_size=4,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=64,
            depth=6,
            num_heads=4,
            mlp_ratio=2.0,
        )
    raise ValueError(f"Unknown model {kind!r}; choose from {MODELS}.")


class Classifier(pl.LightningModule):
    """Image classifier around any ``nn.Module`` (held as ``self.model``), trained with AdamW + cosine."""

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
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=int(steps), pct_start=0.15
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclass
class DemoConfig:
    """Options of ``lightning-cka demo`` (see ``lightning-cka demo --help``)."""

    out: Path = Path("./runs")
    dataset: str = "digits"
    data_dir: Path = Path("./data")
    models: tuple[str, ...] = MODELS
    epochs: dict[str, int] = field(default_factory=lambda: {"resnet": 8, "vit": 30})
    batch_size: int = 64
    img_size: int = 32
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    seed: int = 0
    progress: bool = True
    num_workers: int = 0


@dataclass
class DemoResult:
    """What one model's run produced."""

    name: str
    accuracy: float
    log_dir: Path
    callback: CKACallback
    seconds: float
    model: nn.Module


def _loaders(data: DatasetSpec, cfg: DemoConfig) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers)
    val = DataLoader(data.val, batch_size=128, shuffle=False, num_workers=cfg.num_workers)
    return train, val


def _train(
    name: str, data: DatasetSpec, cfg: DemoConfig, reference: nn.Module | None, reference_name: str | None
) -> DemoResult:
    pl.seed_everything(cfg.seed, verbose=False)
    model = build_model(name, data.in_chans, data.num_classes, data.img_size)
    module = Classifier(model, lr=2e-3)
    callback = CKACallback(
        layers="sublayers" if name == "vit" else "auto",
        reference=reference,
        reference_layers="auto",
    )
    logger = TensorBoardLogger(str(cfg.out), name=name, version=reference_name and f"vs_{reference_name}")
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
        log_every_n_steps=10,
    )
    train_loader, val_loader = _loaders(data, cfg)
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    seconds = time.perf_counter() - start
    accuracy = float(trainer.callback_metrics.get("val/acc", torch.tensor(float("nan"))))
    return DemoResult(name, accuracy, Path(logger.log_dir), callback, seconds, model)


def run_demo(cfg: DemoConfig) -> list[DemoResult]:
    """Train the chosen models in order; the ViT uses the trained ResNet (if any) as reference."""
    data = load_dataset(cfg.dataset, cfg.img_size, cfg.data_dir)
    results: list[DemoResult] = []
    reference: nn.Module | None = None
    for name in cfg.models:
        ref = reference if name == "vit" else None
        result = _train(name, data, cfg, ref, "resnet" if ref is not None else None)
        results.append(result)
        if name == "resnet":
            reference = result.model
    return results


def _latest(result: DemoResult) -> dict[str, Any]:
    """The last validation record of a run's callback (empty if it never measured)."""
    return result.callback.history[-1] if result.callback.history else {}


def write_summary(results: list[DemoResult], path: Path) -> Path:
    """One-page PNG: self-CKA of each model, ViT x ResNet CKA, norm ratios and attention distances
    from the last validation epoch, for people who do not open TensorBoard."""
    from matplotlib.figure import Figure

    from lightning_cka.attention import plot_attention_distances
    from lightning_cka.norm_ratio import plot_norm_ratios
    from lightning_cka.plotting import plot_cka_heatmap

    fig = Figure(figsize=(18, 11), dpi=100)
    axes = fig.subplots(2, 3).ravel()
    panels = 0
    for result in results:
        record = _latest(result)
        for key, label in (("self", f"{result.name} self-CKA"), ("reference", f"{result.name} x reference CKA")):
            if key in record and panels < 3:
                cka = record[key]
                plot_cka_heatmap(
                    cka.matrix, cka.rows, cka.cols, ax=axes[panels], title=f"{label} ({result.accuracy:.1%} acc)"
                )
                panels += 1

    # Prefix series with the model's name so both models' lines are told apart.
    ratios = {f"{r.name}.{k}": v for r in results for k, v in _latest(r).get("norm_ratio", {}).items()}
    if ratios:
        plot_norm_ratios(ratios, title="Skip-connection norm ratio ||z|| / ||f(z)||", ax=axes[3])
    distances = {
        f"{r.name}.{k}": torch.tensor(v) for r in results for k, v in _latest(r).get("attention_distance", {}).items()
    }
    if distances:
        plot_attention_distances(distances, title="Mean attention distance per head (pixels)", ax=axes[4])
    for ax in axes:
        if not ax.has_data() and not ax.images:
            ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
