"""A LightningCLI app whose YAML config adds ``CKACallback`` to the Trainer.

Run from the repository root::

    python examples/lightning_cli/main.py fit --config examples/lightning_cli/config.yaml
    tensorboard --logdir lightning_logs

Any option can be overridden on the command line, for example
``--trainer.max_epochs=3`` or ``--trainer.callbacks.init_args.every_n_epochs=2`` (see
``main.py fit --help``). The model is a small timm ViT, the data scikit-learn's digits (embedded,
no download), so the app runs anywhere.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from timm.models.vision_transformer import VisionTransformer
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_cka.data import load_digits_dataset


class DigitsViT(pl.LightningModule):
    """A small timm ViT (patch 4) on 1-channel digit images; ``CKACallback`` finds it in ``self.model``."""

    def __init__(
        self,
        img_size: int = 32,
        embed_dim: int = 64,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        lr: float = 2e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = VisionTransformer(
            img_size=img_size,
            patch_size=4,
            in_chans=1,
            num_classes=10,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1,797 digits, upsampled to ``img_size`` (``lightning_cka.data.load_digits_dataset``)."""

    def __init__(self, img_size: int = 32, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.data = None

    def setup(self, stage: str) -> None:
        if self.data is None:
            self.data = load_digits_dataset(self.img_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.data.train, batch_size=self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data.val, batch_size=128, num_workers=self.num_workers)


def main() -> None:
    LightningCLI(DigitsViT, DigitsDataModule)


if __name__ == "__main__":
    main()
