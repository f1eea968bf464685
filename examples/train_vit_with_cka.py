"""Train a timm ViT on your own images and watch its representations with ``CKACallback``.

Your data is an image folder, one sub-folder per class::

    my_images/
        cat/001.png  cat/002.jpg  ...
        dog/001.png  ...

(or ``my_images/train/<class>/...`` and ``my_images/val/<class>/...`` for a fixed split).

Run::

    python examples/train_vit_with_cka.py my_images --epochs 10
    tensorboard --logdir runs/vit_cka

Every validation epoch TensorBoard gets the ViT's self-CKA heatmap over each block's ``attn`` and
``mlp`` outputs (``cka/self``), the skip-connection norm ratios (``norm_ratio/...``) and the
mean attention distance of every head (``attention_distance/...``). A tiny smoke run::

    python examples/train_vit_with_cka.py my_images --epochs 1 --limit-batches 2 --depth 2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import transforms
from torchvision.datasets import ImageFolder

from lightning_cka import CKACallback


class ViTClassifier(pl.LightningModule):
    """A timm ViT trained with cross-entropy. ``self.model`` is what ``CKACallback`` finds."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
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


def image_folders(root: Path, img_size: int, val_fraction: float, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    """``root/train`` + ``root/val`` when both exist, else one ImageFolder split at random."""
    tf = transforms.Compose(
        [
            transforms.Resize((img_size, img_size)),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = ImageFolder(str(root / "train"), transform=tf)
        return train, ImageFolder(str(root / "val"), transform=tf), train.classes
    full = ImageFolder(str(root), transform=tf)
    n_val = max(4, round(val_fraction * len(full)))  # CKA needs >= 4 examples per batch
    train, val = random_split(full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return train, val, full.classes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="image folder: <data>/<class>/<image> (or <data>/train and <data>/val)")
    p.add_argument("--out", type=Path, default=Path("runs/vit_cka"), help="TensorBoard log directory")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="any timm VisionTransformer name")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--depth", type=int, default=None, help="override the model's number of blocks")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit-batches", type=float, default=None, help="limit train and val batches (smoke tests)")
    p.add_argument("--cka-max-examples", type=int, default=512, help="validation examples used for CKA per epoch")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    train_set, val_set, classes = image_folders(args.data, args.img_size, 0.2, args.seed)
    extra = {} if args.depth is None else {"depth": args.depth}
    vit = timm.create_model(
        args.model,
        pretrained=False,
        img_size=args.img_size,
        patch_size=args.patch_size,
        num_classes=len(classes),
        **extra,
    )
    module = ViTClassifier(vit, lr=args.lr)

    cka = CKACallback(
        layers="sublayers",  # blocks.i.attn and blocks.i.mlp, like the paper's ViT heatmaps
        every_n_epochs=1,
        max_examples=args.cka_max_examples,
    )
    logger = TensorBoardLogger(str(args.out), name="")
    limit = {} if args.limit_batches is None else {"limit_train_batches": args.limit_batches}
    if args.limit_batches is not None:
        limit["limit_val_batches"] = args.limit_batches
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        logger=logger,
        callbacks=[cka],
        enable_checkpointing=False,
        enable_progress_bar=not args.no_progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **limit,
    )
    loader = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    trainer.fit(
        module,
        DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size, **loader),
        DataLoader(val_set, shuffle=False, **loader),
    )

    log_dir = Path(logger.log_dir)
    print(f"Classes: {', '.join(classes)}; {len(train_set)} train / {len(val_set)} val images")
    if cka.history:
        last = cka.history[-1]["self"]
        print(
            f"Last self-CKA ({len(last.rows)} layers, epoch {cka.history[-1]['epoch']}): adjacent-layer mean "
            f"{last.matrix.diagonal(1).nanmean():.3f}"
        )
    print(f"TensorBoard logs: {log_dir}")
    print(f"CKA matrices (.npz): {log_dir / 'cka'}")
    print(f"Open them with:\n  tensorboard --logdir {args.out}")
    return log_dir


if __name__ == "__main__":
    main()
