"""Tiny models, datasets and a LightningModule factory shared by the CKACallback tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 4
IMG = 32


# --------------------------------------------------------------------------- models
def tiny_vit(depth: int = 2, embed_dim: int = 48, num_heads: int = 3, seed: int = 0) -> nn.Module:
    """timm ``vit_tiny_patch16_224`` shrunk to 32x32 inputs, 4x4 patches (65 tokens)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=IMG,
        patch_size=4,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_classes=NUM_CLASSES,
    )


def timm_vit_tiny(**kwargs: object) -> nn.Module:
    """timm ``vit_tiny_patch16_224`` (192 dims, 3 heads) at 32x32 inputs, 4x4 patches, depth 2,
    10 classes, eval mode; ``kwargs`` override any of these."""
    import timm

    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=4, depth=2, num_classes=10)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


class Wrapper(nn.Module):
    """Mimics a LightningModule holding the network as ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def timm_resnet(name: str = "resnet10t", seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)


def tv_resnet18(seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def tiny_mlp(seed: int = 0) -> nn.Module:
    """An architecture no preset recognises."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


class Nest(nn.Module):
    """``self.backbone`` holder, so a LightningModule can keep its model at ``net.backbone``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


# --------------------------------------------------------------------------- threads
def one_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore (tiny models on a busy 2-core box are much faster so)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- hooks
def hook_count(*modules: nn.Module) -> int:
    """Forward and forward-pre hooks registered anywhere in ``modules``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for root in modules for m in root.modules())


# --------------------------------------------------------------------------- LightningModule
class LitClassifier(pl.LightningModule):
    """A classifier around ``model`` (at ``self.model``, or ``self.net.backbone`` when ``nested``).

    Records what the tests look at: how many training steps ran, the hook count seen inside
    each training/validation step, and ``trainer.global_step`` at each (non-sanity) validation.
    """

    def __init__(self, model: nn.Module, nested: bool = False, lr: float = 0.05, fail_val_batch: int | None = None):
        super().__init__()
        if nested:
            self.net = Nest(model)
        else:
            self.model = model
        self.nested = nested
        self.lr = lr
        self.fail_val_batch = fail_val_batch
        self.training_steps = 0
        self.train_hooks: list[int] = []
        self.val_hooks: list[int] = []
        self.val_global_steps: list[int] = []
        self.val_epochs: list[int] = []
        self.val_batch_indices: list[int] = []

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone if self.nested else self.model

    @property
    def prefix(self) -> str:
        return "net.backbone" if self.nested else "model"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        self.train_hooks.append(hook_count(self))
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.fail_val_batch is not None and batch_idx == self.fail_val_batch:
            raise RuntimeError("boom in validation_step")
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.val_hooks.append(hook_count(self))
            self.val_batch_indices.append(batch_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_global_steps.append(self.trainer.global_step)
            self.val_epochs.append(self.trainer.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


# --------------------------------------------------------------------------- data
def image_dataset(n: int, seed: int = 0) -> TensorDataset:
    """``n`` random 3x32x32 images with labels (a little class signal so training moves weights)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, IMG, IMG, generator=g)
    x[:, 0] += y[:, None, None].float()
    return TensorDataset(x, y)


def loader(dataset: Any, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def trainer(root: Path | str, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer; ``kwargs`` override the defaults."""
    defaults: dict[str, Any] = {
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "limit_train_batches": 2,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
