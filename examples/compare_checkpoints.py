"""Compare two checkpoints of a ViT offline with ``lightning_cka.compare()``.

Which layers changed between two checkpoints (early vs late in training, two seeds, before vs
after fine-tuning)? ``compare(model_a, loader, reference=model_b)`` runs both models on the same
batches and returns the layer x layer CKA matrix between them; its diagonal is "how similar is
layer i of A to layer i of B".

Without checkpoints of your own the script makes two in ``--workdir``: it trains a small ViT
(timm's ``vit_tiny_patch16_224`` cut down to patch 8, width 64 and 6 blocks) on generated stroke
glyphs (``lightning_cka.data``, nothing is downloaded) for ``--epochs`` epochs, printing the
validation accuracy after each, and saves the weights after epoch ``--epoch-a`` (checkpoint A)
and at the end (checkpoint B). About a minute on two otherwise idle CPU cores; the ViT reaches
about 95 % validation accuracy::

    python examples/compare_checkpoints.py                       # writes runs/compare_checkpoints/
    python examples/compare_checkpoints.py --epoch-a 0           # A: the untrained network

The heatmap then shows bottom-up convergence (Raghu et al. 2017): after two of six epochs the
first blocks already match their final selves (CKA about 0.98 on the diagonal) while the last
ones are still changing (about 0.75).

With your own checkpoints (plain ``state_dict`` files or Lightning ``.ckpt`` files whose
LightningModule holds the timm model as ``self.model``) name the timm model and input size they
were trained with (``--embed-dim``, ``--num-heads``, ``--depth`` and ``--mlp-ratio`` when they
differ from the model's own), and data of the right shape::

    python examples/compare_checkpoints.py --ckpt-a early.pt --ckpt-b late.pt \\
        --dataset my_images --model vit_small_patch16_224 --img-size 224 --patch-size 16

``--reduction mean`` (the default here) averages each block's tokens before CKA. With
``--reduction flatten`` (the paper's; every token x channel is a feature) the residual stream is
dominated by what every block shares (the patch and position embeddings), so all pairs of blocks
score 0.8-1.0 and the heatmap shows little.

Outputs in ``--workdir``: ``cka_a_vs_b.png`` (heatmap) and ``cka_a_vs_b.npz`` (``CKAResult.save``),
plus the two self-made checkpoints.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_cka import CKAResult, compare
from lightning_cka.data import load_dataset
from lightning_cka.demo import init_sincos_pos_embed

DEFAULT_MODEL = "vit_tiny_patch16_224"
#: sizes used with the default ``--model`` unless given: smaller than vit_tiny's 12 blocks of width 192
SMALL_SIZES = {"embed_dim": 64, "num_heads": 4, "depth": 6, "mlp_ratio": 2.0}


def build_vit(args: argparse.Namespace, in_chans: int, num_classes: int) -> torch.nn.Module:
    sizes = {k: getattr(args, k) for k in SMALL_SIZES}
    if args.model == DEFAULT_MODEL:
        sizes = {k: SMALL_SIZES[k] if v is None else v for k, v in sizes.items()}
    return timm.create_model(
        args.model,
        pretrained=False,
        img_size=args.img_size,
        patch_size=args.patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        **{k: v for k, v in sizes.items() if v is not None},
    )


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load a plain ``state_dict`` or a Lightning checkpoint (keys ``model.*`` under ``state_dict``)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    prefix = "model."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return hits / max(total, 1)


def make_checkpoints(args: argparse.Namespace, data, val_loader: DataLoader, workdir: Path) -> tuple[Path, Path]:
    """Train a ViT for ``args.epochs`` epochs (AdamW, one-cycle schedule); save its weights after
    epoch ``args.epoch_a`` and at the end."""
    torch.manual_seed(args.seed)
    model = build_vit(args, data.in_chans, data.num_classes)
    # 2-D sine-cosine start for the learned position embedding: nearby patches start alike, which
    # a small ViT trained from scratch needs to learn fast (97 % instead of 83 % after 6 epochs).
    init_sincos_pos_embed(model)
    loader = DataLoader(
        data.train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=len(data.train) > args.batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=max(2, args.epochs * len(loader)), pct_start=0.15
    )
    path_a, path_b = workdir / f"vit_epoch{args.epoch_a}.pt", workdir / f"vit_epoch{args.epochs}.pt"
    print(
        f"Training a ViT ({len(model.blocks)} blocks, width {model.embed_dim}, patch {args.patch_size}) on "
        f"{len(data.train)} {data.name} images for {args.epochs} epochs "
        f"({len(loader)} steps each); chance accuracy {1 / data.num_classes:.2f}"
    )
    start = time.perf_counter()
    if args.epoch_a == 0:
        torch.save(model.state_dict(), path_a)
    for epoch in range(1, args.epochs + 1):
        model.train()
        total_loss = 0.0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        acc = accuracy(model, val_loader)
        saved = ""
        if epoch == args.epoch_a:
            torch.save(model.state_dict(), path_a)
            saved = f"  -> checkpoint A ({path_a.name})"
        print(
            f"  epoch {epoch}/{args.epochs}: train loss {total_loss / max(len(loader), 1):.3f}, "
            f"val accuracy {acc:.3f}  ({time.perf_counter() - start:.0f} s){saved}",
            flush=True,
        )
    torch.save(model.state_dict(), path_b)
    print(f"  -> checkpoint B ({path_b.name})")
    return path_a, path_b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-a", type=Path, help="first checkpoint (made in --workdir when omitted)")
    p.add_argument("--ckpt-b", type=Path, help="second checkpoint (made in --workdir when omitted)")
    p.add_argument("--workdir", type=Path, default=Path("runs/compare_checkpoints"))
    p.add_argument(
        "--dataset",
        default="strokes",
        help="'strokes' (generated), 'digits' or an image folder (<path>/<class>/<image>)",
    )
    p.add_argument("--train-size", type=int, default=5000, help="training images of a generated dataset")
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm ViT the checkpoints belong to")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    for name, value in SMALL_SIZES.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(value), help=f"default: {value} for the default --model, else the model's own")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of the self-made checkpoint B")
    p.add_argument("--epoch-a", type=int, default=2, help="epoch of the self-made checkpoint A (0: at init)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers", default="auto", help="layers to compare (default: the output of every block)")
    p.add_argument("--reduction", default="mean", choices=("mean", "flatten", "cls"), help="token reduction")
    p.add_argument("--max-batches", type=int, default=None, help="validation batches used for CKA (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> CKAResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.ckpt_a is None) != (args.ckpt_b is None):
        parser.error("give both --ckpt-a and --ckpt-b, or neither")
    if args.epochs < 1 or not 0 <= args.epoch_a < args.epochs:
        parser.error("need --epochs >= 1 and 0 <= --epoch-a < --epochs")
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_size = args.train_size if args.dataset == "strokes" else None
    data = load_dataset(args.dataset, args.img_size, seed=args.seed, train_size=train_size)
    val_loader = DataLoader(data.val, batch_size=256, shuffle=False)

    if args.ckpt_a is None:
        args.ckpt_a, args.ckpt_b = make_checkpoints(args, data, val_loader, args.workdir)
    model_a = load_weights(build_vit(args, data.in_chans, data.num_classes), args.ckpt_a)
    model_b = load_weights(build_vit(args, data.in_chans, data.num_classes), args.ckpt_b)
    acc_a, acc_b = accuracy(model_a, val_loader), accuracy(model_b, val_loader)
    print(f"Validation accuracy: A ({args.ckpt_a.name}) {acc_a:.3f}, B ({args.ckpt_b.name}) {acc_b:.3f}")

    result = compare(
        model_a,
        val_loader,
        layers=args.layers,  # "auto": the output of every transformer block
        reference=model_b,
        max_batches=args.max_batches,
        progress=not args.no_progress,
        reduction=args.reduction,
    )

    fig, _ = result.plot(
        title=f"CKA between two checkpoints (reduction {args.reduction!r})",
        ylabel=f"A: {args.ckpt_a.name} (val acc {acc_a:.2f})",
        xlabel=f"B: {args.ckpt_b.name} (val acc {acc_b:.2f})",
    )
    png = args.workdir / "cka_a_vs_b.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    npz = result.save(args.workdir / "cka_a_vs_b.npz")

    matrix = result.matrix.double()
    diagonal = matrix.diagonal()
    print(f"CKA over {result.meta['batches']} batches; layer i of A vs layer i of B:")
    for name, value in zip(result.rows, diagonal.tolist(), strict=True):
        print(f"  {name:<12} {value:.3f}")
    print(
        f"Matrix values {float(matrix.nan_to_num(1.0).min()):.2f}-{float(matrix.nan_to_num(0.0).max()):.2f}; "
        f"diagonal from {diagonal[0]:.2f} ({result.rows[0]}) to {diagonal[-1]:.2f} ({result.rows[-1]})"
    )
    with np.load(npz) as saved:  # the file needs nothing but numpy to read
        assert saved["matrix"].shape == (len(result.rows), len(result.cols))
    print(f"Heatmap: {png}\nMatrix:  {npz}  (CKAResult.load(path) or numpy.load(path)['matrix'])")
    print(f"Done in {time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
