#!/usr/bin/env python
"""Soak test of CKACallback: many validation epochs in one process, watching memory and file handles.

A tiny timm ViT (img 32, patch 4, depth 2, embed_dim 48, 3 heads) trains one batch per
epoch (``limit_train_batches=1``) and is validated on a small set every epoch with a
CKACallback (sublayers, plus norm ratios and attention distances) logging heatmaps, scalars
and ``.npz`` files to a TensorBoardLogger in a temporary directory. Every ``--every``
epochs it prints the resident memory (psutil if installed, else ``VmRSS`` of
``/proc/self/status``), the number of open file descriptors (``/proc/self/fd``), live
matplotlib figures and hooks on the model, then the growth from the first sample to the last.

Examples::

    python benchmarks/soak.py                 # 200 epochs (about 2 minutes on 2 CPU cores)
    python benchmarks/soak.py --epochs 40     # quicker
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cka import CKACallback

IMG, CLASSES = 32, 4


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
        return float("nan")
    return psutil.Process().memory_info().rss / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def hook_count(root: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=IMG,
            patch_size=4,
            depth=2,
            embed_dim=48,
            num_heads=3,
            num_classes=CLASSES,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Monitor(Callback):
    """Sample memory and handles after every ``every``-th validation (after CKACallback has logged)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: list[tuple[int, float, int, int, int, int, float]] = []
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch == 1 or epoch % self.every == 0:
            import gc

            import matplotlib.pyplot as plt

            gc.collect()
            cka = next(cb for cb in trainer.callbacks if isinstance(cb, CKACallback))
            row = (
                epoch,
                rss_mib(),
                open_fds(),
                len(plt.get_fignums()),
                hook_count(pl_module),
                len(cka.history),
                time.perf_counter() - self.start,
            )
            self.rows.append(row)
            print(
                f"{row[0]:>6} {row[1]:>10.1f} {row[2]:>9} {row[3]:>8} {row[4]:>6} {row[5]:>8} {row[6]:>8.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200, help="validation epochs (one training batch each)")
    parser.add_argument("--every", type=int, default=20, help="print a sample every this many epochs")
    parser.add_argument("--val-size", type=int, default=32, help="validation examples (batches of 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(args.val_size + 16, 3, IMG, IMG)
    y = torch.randint(0, CLASSES, (len(x),))
    train = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16)
    val = DataLoader(TensorDataset(x[16:], y[16:]), batch_size=16)

    with tempfile.TemporaryDirectory() as root:
        monitor = Monitor(args.every)
        cka = CKACallback(layers="sublayers")
        logger = TensorBoardLogger(root)
        trainer = pl.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            devices=1,
            max_epochs=args.epochs,
            limit_train_batches=1,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=1,
            logger=logger,
            callbacks=[cka, monitor],
        )
        print(f"{args.epochs} validation epochs, {args.val_size} validation images, torch threads {args.threads}")
        print(f"{'epoch':>6} {'RSS MiB':>10} {'open fds':>9} {'figures':>8} {'hooks':>6} {'history':>8} {'time s':>8}")
        trainer.fit(Lit(), train, val)
        last = monitor.rows[-1]
        # first sample vs last; then from the second sample on (after allocator / matplotlib warm-up)
        for first in dict.fromkeys(monitor.rows[:2]):
            if first is last:
                continue
            span = last[0] - first[0]
            print(
                f"growth epoch {first[0]} -> {last[0]}: RSS {last[1] - first[1]:+.1f} MiB "
                f"({(last[1] - first[1]) * 1024 / span:+.1f} KiB/epoch), open fds {last[2] - first[2]:+d}, "
                f"figures {last[3] - first[3]:+d}, hooks {last[4] - first[4]:+d}"
            )
        size = sum(p.stat().st_size for p in Path(logger.log_dir).rglob("*") if p.is_file())
        print(f"log dir: {size / 2**20:.1f} MiB, {len(list(Path(logger.log_dir).rglob('*.npz')))} .npz files")


if __name__ == "__main__":
    main()
