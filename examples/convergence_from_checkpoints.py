"""Layer convergence from a folder of Lightning checkpoints, offline.

Raghu et al. (2017, SVCCA) compared every layer at each checkpoint with the same layer at the end
of training, on one fixed set of examples, and found that networks converge bottom-up: lower
layers reach their final representation first. This script draws the same curves with minibatch
CKA (Kornblith et al. 2019; Nguyen et al. 2021): one line per layer, x = checkpoint, y = CKA of
the layer to the same layer in the last (``--against last``), first or previous checkpoint.

With your own checkpoints (``ModelCheckpoint(save_top_k=-1)`` keeps one per epoch) and the
LightningModule class they were saved from (it must call ``self.save_hyperparameters()`` so that
``load_from_checkpoint`` can rebuild it)::

    python examples/convergence_from_checkpoints.py lightning_logs/version_0/checkpoints \\
        --module my_project.models:LitViT --dataset digits --img-size 32

``--module`` also takes a file, ``path/to/models.py:LitViT``. The validation data comes from
``--dataset`` (scikit-learn's digits, ``cifar10`` or an image folder, see
``lightning_cka.data.load_dataset``) and must match the model's input.

Offline demo: train a tiny ViT for a few epochs on generated stroke glyphs
(``lightning_cka.data.make_strokes``, nothing is downloaded), saving a checkpoint after every
epoch, then compute the curves from those checkpoints (a minute or two on two CPU cores; about
74 % validation accuracy after 5 epochs)::

    python examples/convergence_from_checkpoints.py --demo --workdir runs/convergence --epochs 5

Both modes print each checkpoint's validation accuracy next to its CKA values (when the model's
output is one logit per class).

Outputs in ``--workdir``: ``convergence.png`` (the curves) and ``convergence.npz``
(``CKAResult.save``: the checkpoints x layers matrix).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_cka import CKAResult
from lightning_cka.analyses.convergence import AGAINST, convergence
from lightning_cka.data import GeneratedImages, make_strokes
from lightning_cka.plotting import plot_series, short_names


# --------------------------------------------------------------------------- demo
class DemoViT(pl.LightningModule):
    """A small timm ViT classifier (AdamW, one-cycle schedule); ``self.model`` is what
    ``layers="auto"`` finds."""

    def __init__(
        self,
        img_size: int = 32,
        depth: int = 3,
        embed_dim: int = 64,
        num_classes: int = 10,
        lr: float = 2e-3,
        in_chans: int = 1,
        patch_size: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        import timm

        from lightning_cka.demo import init_sincos_pos_embed

        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            depth=depth,
            embed_dim=embed_dim,
            num_heads=4,
            mlp_ratio=2.0,
            num_classes=num_classes,
        )
        init_sincos_pos_embed(self.model)  # nearby patches start alike: learns much faster from scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        steps = max(2, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=steps, pct_start=0.15
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class PrintEpochs(pl.Callback):
    """One line per training epoch: its mean loss and the seconds so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        shown = "n/a" if loss is None else f"{float(loss):.3f}"
        elapsed = time.perf_counter() - self.start
        print(f"  epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: train loss {shown}  ({elapsed:.0f} s)")


def stroke_images(n: int, img_size: int, seed: int, like: GeneratedImages | None = None) -> GeneratedImages:
    """``n`` generated stroke glyphs (10 classes, 1 channel), standardised like ``like`` when given."""
    images, labels = make_strokes(n, seed=seed, img_size=img_size)
    if like is None:
        return GeneratedImages(images, labels)
    return GeneratedImages(images, labels, mean=like.mean, std=like.std)


def train_demo(args: argparse.Namespace, ckpt_dir: Path) -> GeneratedImages:
    """Train :class:`DemoViT` for ``args.epochs`` epochs, one checkpoint per epoch; returns the val set."""
    pl.seed_everything(args.seed, verbose=False)
    module = DemoViT(img_size=args.img_size, depth=args.depth, lr=args.lr)
    train = stroke_images(args.train_examples, args.img_size, 2 * args.seed)
    stale = sorted(ckpt_dir.glob("*.ckpt"))
    if stale:  # an earlier demo's checkpoints would be mixed into this one's curves
        print(f"Removing {len(stale)} checkpoint(s) of an earlier demo run from {ckpt_dir}")
        for path in stale:
            path.unlink()
    print(
        f"Training a ViT ({args.depth} blocks, width 64, patch 8) on {len(train)} generated stroke glyphs for "
        f"{args.epochs} epochs, one checkpoint per epoch in {ckpt_dir}"
    )
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        default_root_dir=str(args.workdir),
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[checkpoints, PrintEpochs()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    return stroke_images(args.val_examples, args.img_size, 2 * args.seed + 1, like=train)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float | None:
    """Top-1 accuracy when ``model`` returns one logit per class for ``(input, label)`` batches, else ``None``."""
    model.eval()
    hits = total = 0
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            return None
        out = model(batch[0])
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(batch[1]):
            return None
        hits += int((out.argmax(dim=1) == batch[1]).sum())
        total += len(batch[1])
    return hits / total if total else None


# --------------------------------------------------------------------------- loading
def import_class(spec: str) -> type[pl.LightningModule]:
    """``"package.module:Class"`` or ``"path/to/file.py:Class"`` -> the class."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise SystemExit(f"--module must look like 'package.module:Class' or 'file.py:Class', got {spec!r}")
    if where.endswith(".py"):
        loader_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if loader_spec is None or loader_spec.loader is None:
            raise SystemExit(f"cannot import {where}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def sorted_checkpoints(folder: Path) -> list[tuple[Path, int, int]]:
    """The ``.ckpt`` files of ``folder`` as ``(path, epoch, global_step)``, in training order."""
    found = []
    for path in folder.glob("*.ckpt"):
        meta = torch.load(path, map_location="cpu", weights_only=False)
        found.append((path, int(meta.get("epoch", -1)), int(meta.get("global_step", -1))))
    return sorted(found, key=lambda item: (item[2], item[1], item[0].name))


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", type=Path, nargs="?", help="folder of .ckpt files (not with --demo)")
    p.add_argument(
        "--module", help="LightningModule class of the checkpoints: 'package.module:Class' or 'file.py:Class'"
    )
    p.add_argument(
        "--dataset", default="digits", help="'strokes', 'digits', 'cifar10' or an image folder (not with --demo)"
    )
    p.add_argument(
        "--demo", action="store_true", help="train a tiny ViT on generated glyphs first and use its checkpoints"
    )
    p.add_argument("--workdir", type=Path, default=Path("runs/convergence"))
    p.add_argument("--layers", default="auto", help="layers of the LightningModule (a preset, name or glob)")
    p.add_argument("--against", default="last", choices=AGAINST)
    p.add_argument(
        "--reduction",
        default="mean",
        choices=("mean", "flatten", "cls"),
        help="token reduction: 'mean' (default) averages each block's tokens; with the paper's 'flatten' a ViT's "
        "residual stream is dominated by the shared patch and position embeddings and every curve sits near 1",
    )
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=None, help="validation batches used (default: all)")
    p.add_argument("--epochs", type=int, default=5, help="--demo: epochs (one checkpoint each)")
    p.add_argument("--depth", type=int, default=3, help="--demo: ViT depth")
    p.add_argument("--lr", type=float, default=2e-3, help="--demo: AdamW peak learning rate")
    p.add_argument("--train-examples", type=int, default=4096, help="--demo: training images")
    p.add_argument("--val-examples", type=int, default=256, help="--demo: validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> CKAResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.demo:
        if args.ckpt_dir is not None or args.module is not None:
            parser.error("--demo makes its own checkpoints; drop ckpt_dir and --module")
        args.ckpt_dir = args.workdir / "checkpoints"
        val = train_demo(args, args.ckpt_dir)
        cls: type[pl.LightningModule] = DemoViT
    else:
        if args.ckpt_dir is None or args.module is None:
            parser.error("give a checkpoint folder and --module (or --demo)")
        from lightning_cka.data import load_dataset

        cls = import_class(args.module)
        val = load_dataset(args.dataset, args.img_size).val

    checkpoints = sorted_checkpoints(args.ckpt_dir)
    if not checkpoints:
        parser.error(f"no .ckpt files in {args.ckpt_dir}")
    models = [cls.load_from_checkpoint(path, map_location="cpu") for path, _, _ in checkpoints]
    loader = DataLoader(val, batch_size=args.batch_size, shuffle=False)
    result = convergence(
        models,
        loader,
        args.layers,
        against=args.against,
        max_batches=args.max_batches,
        progress=args.progress,
        reduction=args.reduction,
    )
    result.rows = [f"epoch {epoch} (step {step})" for _, epoch, step in checkpoints]

    labels = short_names(result.cols)
    epochs = [epoch for _, epoch, _ in checkpoints]
    series = {label: result.matrix[:, j].tolist() for j, label in enumerate(labels)}
    fig, ax = plot_series(
        series,
        x=epochs,
        title=f"Layer convergence: CKA to the {args.against} checkpoint",
        xlabel="epoch of the checkpoint",
        ylabel=f"CKA to the same layer, {args.against} checkpoint",
    )
    lowest = float(result.matrix.nan_to_num(1.0).min())
    ax.set_ylim(max(0.0, lowest - 0.05), 1.01)  # the range of the curves: late epochs differ by a few hundredths
    png = args.workdir / "convergence.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    npz = result.save(args.workdir / "convergence.npz")

    accuracies = [accuracy(model, loader) for model in models]
    print(f"CKA of each layer to the same layer in the {args.against} checkpoint ({result.meta['batches']} batches):")
    print("  " + " " * 22 + f"{'val acc':>8} " + " ".join(f"{label[-10:]:>10}" for label in labels))
    for row, acc, values in zip(result.rows, accuracies, result.matrix.tolist(), strict=True):
        shown = "n/a" if acc is None else f"{acc:.3f}"
        print(f"  {row:<22}{shown:>8} " + " ".join(f"{v:>10.3f}" for v in values))
    if accuracies[-1] is not None:
        print(f"Final validation accuracy (last checkpoint): {accuracies[-1]:.3f}")
    print(f"Curves: {png}\nMatrix: {npz}  (CKAResult.load(path) or numpy.load(path)['matrix'])")
    return result


if __name__ == "__main__":
    main()
