"""Train a timm ViT on your own images and watch its representations with ``CKACallback``.

Your data is an image folder, one sub-folder per class::

    my_images/
        cat/001.png  cat/002.jpg  ...
        dog/001.png  ...

(or ``my_images/train/<class>/...`` and ``my_images/val/<class>/...`` for a fixed split).

Run::

    python examples/train_vit_with_cka.py my_images --epochs 30
    tensorboard --logdir runs/vit_cka

Without a folder the script trains on 5,000 generated stroke glyphs (``lightning_cka.data``,
nothing is downloaded): about a minute on two CPU cores, to about 97 % validation accuracy::

    python examples/train_vit_with_cka.py

The ViT is trained from scratch (by default a small one: timm's ``vit_tiny_patch16_224`` with
patch 8, width 64 and 6 blocks; another ``--model`` keeps its own width and depth). That needs
thousands of images, or many epochs over hundreds: on a few dozen images it stays at chance
accuracy, and the script says so at the end, because the CKA heatmaps of a network that learned
nothing show its initialisation, not what it learned.

Every validation epoch TensorBoard gets the ViT's self-CKA heatmap over each block's ``attn`` and
``mlp`` outputs (``cka/self``), the skip-connection norm ratios (``norm_ratio/...``) and the
mean attention distance of every head (``attention_distance/...``). A tiny smoke run::

    python examples/train_vit_with_cka.py my_images --epochs 1 --limit-batches 2 --depth 2
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, random_split

from lightning_cka import CKACallback
from lightning_cka.demo import init_sincos_pos_embed

DEFAULT_MODEL = "vit_tiny_patch16_224"
#: sizes used with the default ``--model`` unless given (patch 8 at 32 x 32: 16 tokens and the class token)
SMALL_SIZES = {"embed_dim": 64, "num_heads": 4, "depth": 6, "mlp_ratio": 2.0}


class ViTClassifier(pl.LightningModule):
    """A timm ViT trained with cross-entropy (AdamW, one-cycle schedule). ``self.model`` is what
    ``CKACallback`` finds."""

    def __init__(self, model: torch.nn.Module, lr: float = 2e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self._hits = self._seen = 0
        #: validation accuracy of every epoch, in order, and the number of images of the last
        self.val_accuracy: list[float] = []
        self.val_images = 0

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
        hits = logits.argmax(1) == y
        self._hits += int(hits.sum())
        self._seen += len(y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", hits.float().mean(), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self._seen and not self.trainer.sanity_checking:
            self.val_accuracy.append(self._hits / self._seen)
            self.val_images = self._seen
        self._hits = self._seen = 0

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        steps = max(2, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class PrintProgress(pl.Callback):
    """One line per epoch: mean training loss, validation accuracy, seconds so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        acc = pl_module.val_accuracy[-1] if pl_module.val_accuracy else float("nan")
        loss = sum(self.losses) / max(len(self.losses), 1)
        self.losses.clear()
        print(
            f"  epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: train loss {loss:.3f}, "
            f"val accuracy {acc:.3f}  ({time.perf_counter() - self.start:.0f} s)",
            flush=True,
        )


def image_folders(root: Path, img_size: int, val_fraction: float, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    """``root/train`` + ``root/val`` when both exist, else one ImageFolder split at random."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

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


def generated(train_size: int, img_size: int, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    """The generated ``"strokes"`` glyphs of ``lightning_cka.data`` (1 channel, 10 classes)."""
    from lightning_cka.data import CLASS_NAMES, load_dataset

    data = load_dataset("strokes", img_size, seed=seed, train_size=train_size)
    return data.train, data.val, list(CLASS_NAMES)


def chance_warning(acc: float, classes: int, train_images: int, epochs: int, val_images: int) -> str | None:
    """A warning when ``acc`` is not clearly above chance (``1 / classes``): within ``min(chance, 0.1)``
    of it, or within two standard errors of a guess on ``val_images`` images. Else ``None``."""
    chance = 1.0 / classes
    noise = 2 * math.sqrt(chance * (1 - chance) / max(val_images, 1))
    if acc >= chance + max(min(chance, 0.1), noise):
        return None
    return (
        f"WARNING: validation accuracy {acc:.3f} is near chance ({chance:.3f} for {classes} classes, on "
        f"{val_images} validation images): the ViT learned (almost) nothing, and its CKA heatmaps show its "
        f"random initialisation. A ViT trained from scratch needs thousands of images or many epochs; this "
        f"run had {train_images} training images and {epochs} epoch(s). Add images, raise --epochs, or run "
        f"without a folder (generated data) to see a trained network."
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "data",
        type=Path,
        nargs="?",
        help="image folder: <data>/<class>/<image> (or <data>/train and <data>/val); default: generated glyphs",
    )
    p.add_argument("--train-size", type=int, default=5000, help="training images when no folder is given")
    p.add_argument("--out", type=Path, default=Path("runs/vit_cka"), help="TensorBoard log directory")
    p.add_argument("--model", default=DEFAULT_MODEL, help="any timm VisionTransformer name")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--embed-dim", type=int, help="width (default: 64 for the default --model, else the model's own)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: 4 for the default --model, else its own)")
    p.add_argument("--depth", type=int, help="number of blocks (default: 6 for the default --model, else its own)")
    p.add_argument("--mlp-ratio", type=float, help="MLP ratio (default: 2 for the default --model, else its own)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--limit-batches", type=float, default=None, help="limit train and val batches (smoke tests)")
    p.add_argument("--cka-max-examples", type=int, default=512, help="validation examples used for CKA per epoch")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    if args.data is None:
        train_set, val_set, classes = generated(args.train_size, args.img_size, args.seed)
        source, in_chans = f"{len(train_set)} generated stroke glyphs", 1
    else:
        train_set, val_set, classes = image_folders(args.data, args.img_size, 0.2, args.seed)
        source, in_chans = f"{len(train_set)} images from {args.data}", 3
    sizes = {k: getattr(args, k) for k in SMALL_SIZES}
    if args.model == DEFAULT_MODEL:  # a smaller ViT than vit_tiny's 12 blocks of width 192, for CPUs
        sizes = {k: SMALL_SIZES[k] if v is None else v for k, v in sizes.items()}
    vit = timm.create_model(
        args.model,
        pretrained=False,
        img_size=args.img_size,
        patch_size=args.patch_size,
        in_chans=in_chans,
        num_classes=len(classes),
        **{k: v for k, v in sizes.items() if v is not None},
    )
    # 2-D sin-cos start for the learned position embedding: nearby patches start alike, which lets
    # a small ViT trained from scratch learn much faster.
    if getattr(vit, "pos_embed", None) is not None:
        init_sincos_pos_embed(vit)
    module = ViTClassifier(vit, lr=args.lr)
    print(
        f"Training {args.model} ({len(vit.blocks)} blocks, width {vit.embed_dim}, patch {args.patch_size}) on "
        f"{source} ({len(classes)} classes, {len(val_set)} validation images) for {args.epochs} epoch(s)"
    )
    if len(train_set) < 100 * len(classes):
        print(
            f"Note: {len(train_set)} training images for {len(classes)} classes are few for a ViT trained from "
            "scratch; expect low accuracy unless the classes are very easy to tell apart."
        )

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
        callbacks=[cka, PrintProgress()],
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
    shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
    print(f"Classes: {shown}; {len(train_set)} train / {len(val_set)} val images")
    acc = module.val_accuracy[-1] if module.val_accuracy else float("nan")
    print(f"Final validation accuracy: {acc:.3f} (chance {1 / len(classes):.3f})")
    if cka.history:
        last = cka.history[-1]["self"]
        print(
            f"Last self-CKA ({len(last.rows)} layers, epoch {cka.history[-1]['epoch']}): adjacent-layer mean "
            f"{last.matrix.diagonal(1).nanmean():.3f}"
        )
    print(f"TensorBoard logs: {log_dir}")
    print(f"CKA matrices (.npz): {log_dir / 'cka'}")
    print(f"Open them with:\n  tensorboard --logdir {args.out}")
    warning = None
    if module.val_accuracy:
        warning = chance_warning(acc, len(classes), len(train_set), args.epochs, module.val_images)
    if warning:
        print(warning)
    print(f"Done in {time.perf_counter() - start:.0f} s")
    return log_dir


if __name__ == "__main__":
    main()
