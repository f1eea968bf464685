"""Residual branch vs residual stream: two CKA heatmaps of one ViT, side by side.

A pre-norm transformer block computes ``z' = z + attn(norm1(z))`` and then
``z'' = z' + mlp(norm2(z'))``. ``layers="sublayers"`` measures the *branches* (the outputs of
``attn`` and ``mlp``, the updates that are added); ``layers="stream"`` measures the *stream*
after every add (``z'``, the input of ``norm2``, named ``"blocks.i.norm2:in"``, and ``z''``,
the block output). Raghu et al. 2021 show heatmaps of the stream; since ``||z|| >> ||f(z)||`` in
ViTs, stream states are far more alike than the branch outputs that feed them.

The script trains a small timm ViT briefly on scikit-learn's digits (shipped with scikit-learn,
``pip install ".[demo]"``; no download), then runs :func:`lightning_cka.compare` twice on the 359
validation images and draws both heatmaps into one PNG. The default 300 steps take a few minutes
on one CPU thread, ``--steps 0`` about ten seconds::

    python examples/branch_vs_stream.py                      # writes docs/img/branch_vs_stream.png
    python examples/branch_vs_stream.py --steps 0 --out /tmp/untrained.png   # at initialisation

It prints the training loss and validation accuracy every 50 steps, then the final accuracy and,
for each heatmap, the mean CKA of consecutive layers and of all off-diagonal pairs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_cka import CKAResult, compare
from lightning_cka.data import load_dataset
from lightning_cka.plotting import plot_cka_heatmap, short_names

ROOT = Path(__file__).resolve().parents[1]


def build_vit(depth: int, img_size: int, seed: int) -> torch.nn.Module:
    """The demo's ViT shape: patch 4 (an 8 x 8 grid + CLS at 32 x 32), width 64, 4 heads."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=img_size,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=depth,
        num_heads=4,
        mlp_ratio=2.0,
    )


def train(
    model: torch.nn.Module, loader: DataLoader, steps: int, lr: float, val_loader: DataLoader | None = None
) -> float | None:
    """Plain AdamW steps; returns the last loss (``None`` for ``steps=0``). Prints the mean loss (and the
    validation accuracy, given ``val_loader``) every 50 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loss = None
    step = 0
    start = time.perf_counter()
    losses: list[float] = []
    while step < steps:
        for x, y in loader:
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0 or step == steps:
                acc = "" if val_loader is None else f", val accuracy {accuracy(model, val_loader):.3f}"
                mean = sum(losses) / len(losses)
                print(f"  step {step}/{steps}: train loss {mean:.3f}{acc}  ({time.perf_counter() - start:.0f} s)")
                losses.clear()
            if step == steps:
                break
    return None if loss is None else loss.item()


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return hits / total


def summary(result: CKAResult) -> tuple[float, float]:
    """Mean CKA of consecutive layers, and of all off-diagonal pairs."""
    m = result.matrix
    off = m[~torch.eye(m.shape[0], dtype=torch.bool)]
    return float(torch.diagonal(m, offset=1).nanmean()), float(off.nanmean())


def draw(branch: CKAResult, stream: CKAResult, title: str) -> Figure:
    fig = Figure(figsize=(13.0, 6.0), dpi=100)
    for ax_index, (result, name) in enumerate(
        ((branch, 'branches: layers="sublayers"'), (stream, 'stream: layers="stream"')), start=1
    ):
        ax = fig.add_subplot(1, 2, ax_index)
        labels = short_names(result.rows)
        adjacent, off = summary(result)
        plot_cka_heatmap(
            result.matrix,
            labels,
            labels,
            ax=ax,
            title=f"{name}\nconsecutive {adjacent:.2f}, all pairs {off:.2f}",
            xlabel="layer",
            ylabel="layer",
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "branch_vs_stream.png")
    p.add_argument("--steps", type=int, default=300, help="training steps before measuring (0: at initialisation)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-batches", type=int, default=None, help="validation batches used for CKA (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> tuple[CKAResult, CKAResult]:
    args = build_parser().parse_args(argv)
    if args.steps < 0:
        raise SystemExit("--steps must be >= 0")
    start = time.perf_counter()
    data = load_dataset("digits", args.img_size)  # 1,438 training / 359 validation images
    train_loader = DataLoader(
        data.train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader = DataLoader(data.val, batch_size=120)  # 3 batches: 120, 120, 119
    vit = build_vit(args.depth, args.img_size, args.seed)
    if args.steps:
        print(f"Training a ViT ({args.depth} blocks, width 64) on {len(data.train)} digits for {args.steps} steps")
    loss = train(vit, train_loader, args.steps, args.lr, val_loader)
    acc = accuracy(vit, val_loader)

    common = {"max_batches": args.max_batches, "progress": False}
    branch = compare(vit, val_loader, layers="sublayers", **common)  # blocks.i.attn, blocks.i.mlp
    stream = compare(vit, val_loader, layers="stream", **common)  # blocks.i.norm2:in, blocks.i

    state = f"after {args.steps} training steps" if args.steps else "at initialisation"
    title = f"One timm ViT ({args.depth} blocks, width 64) on digits, {state}: validation accuracy {acc:.1%}"
    fig = draw(branch, stream, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)

    print(f"{state}: last training loss {loss if loss is None else round(loss, 3)}, validation accuracy {acc:.3f}")
    for name, result in (("branches (sublayers)", branch), ("stream", stream)):
        adjacent, off = summary(result)
        print(f"  {name:<21} consecutive layers {adjacent:.3f}   all off-diagonal pairs {off:.3f}")
    print(f"Figure: {args.out}  ({time.perf_counter() - start:.0f} s)")
    return branch, stream


if __name__ == "__main__":
    main()
