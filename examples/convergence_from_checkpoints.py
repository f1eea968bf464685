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

Offline demo: train a tiny ViT for a few epochs on random images, saving a checkpoint after every
epoch, then compute the curves from those checkpoints::

    python examples/convergence_from_checkpoints.py --demo --workdir runs/convergence --epochs 4

Outputs in ``--workdir``: ``convergence.png`` (the curves) and ``convergence.npz``
(``CKAResult.save``: the checkpoints x layers matrix).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_cka import CKAResult
from lightning_cka.analyses.convergence import AGAINST, convergence
from lightning_cka.plotting import plot_series, short_names


# --------------------------------------------------------------------------- demo
class DemoViT(pl.LightningModule):
    """A tiny timm ViT classifier; ``self.model`` is what ``layers="auto"`` finds."""

    def __init__(
        self, img_size: int = 32, depth: int = 3, embed_dim: int = 48, num_classes: int = 4, lr: float = 3e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        import timm

        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=img_size,
            patch_size=4,
            depth=depth,
            embed_dim=embed_dim,
            num_heads=3,
            num_classes=num_classes,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def random_images(n: int, img_size: int, num_classes: int, seed: int) -> TensorDataset:
    """``n`` random images with labels and a little class signal, so that training moves the weights."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, 3, img_size, img_size, generator=g)
    x[:, 0] += y[:, None, None].float()
    return TensorDataset(x, y)


def train_demo(args: argparse.Namespace, ckpt_dir: Path) -> TensorDataset:
    """Train :class:`DemoViT` for ``args.epochs`` epochs, one checkpoint per epoch; returns the val set."""
    pl.seed_everything(args.seed, verbose=False)
    module = DemoViT(img_size=args.img_size, depth=args.depth, lr=args.lr)
    train = random_images(args.train_examples, args.img_size, 4, args.seed)
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        default_root_dir=str(args.workdir),
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=args.batch_size, shuffle=True))
    return random_images(args.val_examples, args.img_size, 4, args.seed + 1)


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
    p.add_argument("--dataset", default="digits", help="'digits', 'cifar10' or an image folder (not with --demo)")
    p.add_argument(
        "--demo", action="store_true", help="train a tiny ViT on random images first and use its checkpoints"
    )
    p.add_argument("--workdir", type=Path, default=Path("runs/convergence"))
    p.add_argument("--layers", default="auto", help="layers of the LightningModule (a preset, name or glob)")
    p.add_argument("--against", default="last", choices=AGAINST)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=None, help="validation batches used (default: all)")
    p.add_argument("--epochs", type=int, default=4, help="--demo: epochs (one checkpoint each)")
    p.add_argument("--depth", type=int, default=3, help="--demo: ViT depth")
    p.add_argument("--lr", type=float, default=3e-3, help="--demo: AdamW learning rate")
    p.add_argument("--train-examples", type=int, default=256, help="--demo: random training images")
    p.add_argument("--val-examples", type=int, default=128, help="--demo: random validation images")
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
        models, loader, args.layers, against=args.against, max_batches=args.max_batches, progress=args.progress
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
    ax.set_ylim(0.0, 1.02)
    png = args.workdir / "convergence.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    npz = result.save(args.workdir / "convergence.npz")

    print(f"CKA of each layer to the same layer in the {args.against} checkpoint ({result.meta['batches']} batches):")
    print("  " + " " * 22 + " ".join(f"{label[-10:]:>10}" for label in labels))
    for row, values in zip(result.rows, result.matrix.tolist(), strict=True):
        print(f"  {row:<22}" + " ".join(f"{v:>10.3f}" for v in values))
    print(f"Curves: {png}\nMatrix: {npz}  (CKAResult.load(path) or numpy.load(path)['matrix'])")
    return result


if __name__ == "__main__":
    main()
