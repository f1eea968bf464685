"""Compare two checkpoints of a ViT offline with ``lightning_cka.compare()``.

Which layers changed between two checkpoints (early vs late in training, two seeds, before vs
after fine-tuning)? ``compare(model_a, loader, reference=model_b)`` runs both models on the same
batches and returns the layer x layer CKA matrix between them; its diagonal is "how similar is
layer i of A to layer i of B".

With your own checkpoints (plain ``state_dict`` files or Lightning ``.ckpt`` files whose
LightningModule holds the timm model as ``self.model``)::

    python examples/compare_checkpoints.py --ckpt-a early.pt --ckpt-b late.pt --depth 6

Without them the script makes two itself in ``--workdir``: it trains a small ViT on
scikit-learn's digits and saves the weights after ``--steps-a`` and after ``--steps`` steps::

    python examples/compare_checkpoints.py --workdir runs/compare --steps 300 --steps-a 30

Outputs in ``--workdir``: ``cka_a_vs_b.png`` (heatmap) and ``cka_a_vs_b.npz`` (``CKAResult.save``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_cka import CKAResult, compare
from lightning_cka.data import load_dataset


def build_vit(args: argparse.Namespace, in_chans: int, num_classes: int) -> torch.nn.Module:
    return timm.create_model(
        args.model,
        pretrained=False,
        img_size=args.img_size,
        patch_size=args.patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        depth=args.depth,
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


def make_checkpoints(args: argparse.Namespace, data, workdir: Path) -> tuple[Path, Path]:
    """Train a ViT for ``args.steps`` steps; save its weights after ``args.steps_a`` and at the end."""
    torch.manual_seed(args.seed)
    model = build_vit(args, data.in_chans, data.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    path_a, path_b = workdir / f"vit_step{args.steps_a}.pt", workdir / f"vit_step{args.steps}.pt"
    step = 0
    if args.steps_a == 0:
        torch.save(model.state_dict(), path_a)
    while step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.steps_a:
                torch.save(model.state_dict(), path_a)
            if step == args.steps:
                break
    torch.save(model.state_dict(), path_b)
    print(f"Trained {args.steps} steps (last loss {loss.item():.3f}); checkpoints: {path_a.name}, {path_b.name}")
    return path_a, path_b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-a", type=Path, help="first checkpoint (made in --workdir when omitted)")
    p.add_argument("--ckpt-b", type=Path, help="second checkpoint (made in --workdir when omitted)")
    p.add_argument("--workdir", type=Path, default=Path("runs/compare_checkpoints"))
    p.add_argument("--dataset", default="digits", help="'digits' or an image folder (<path>/<class>/<image>)")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT the checkpoints belong to")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--steps", type=int, default=200, help="training steps of the self-made checkpoint B")
    p.add_argument("--steps-a", type=int, default=20, help="step of the self-made checkpoint A (0: at init)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-batches", type=int, default=None, help="validation batches used for CKA (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> CKAResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.ckpt_a is None) != (args.ckpt_b is None):
        parser.error("give both --ckpt-a and --ckpt-b, or neither")
    if args.steps < 1 or not 0 <= args.steps_a <= args.steps:
        parser.error("need --steps >= 1 and 0 <= --steps-a <= --steps")
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.dataset, args.img_size)

    if args.ckpt_a is None:
        args.ckpt_a, args.ckpt_b = make_checkpoints(args, data, args.workdir)
    model_a = load_weights(build_vit(args, data.in_chans, data.num_classes), args.ckpt_a)
    model_b = load_weights(build_vit(args, data.in_chans, data.num_classes), args.ckpt_b)

    val_loader = DataLoader(data.val, batch_size=args.batch_size, shuffle=False)
    result = compare(
        model_a,
        val_loader,
        layers="auto",  # the output of every transformer block
        reference=model_b,
        max_batches=args.max_batches,
        progress=not args.no_progress,
    )

    fig, _ = result.plot(title=f"CKA: {args.ckpt_a.name} (rows) vs {args.ckpt_b.name} (columns)")
    png = args.workdir / "cka_a_vs_b.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    npz = result.save(args.workdir / "cka_a_vs_b.npz")

    print(f"CKA over {result.meta['batches']} batches; layer i of A vs layer i of B:")
    for name, value in zip(result.rows, result.matrix.diagonal().tolist(), strict=True):
        print(f"  {name:<12} {value:.3f}")
    with np.load(npz) as saved:  # the file needs nothing but numpy to read
        assert saved["matrix"].shape == (len(result.rows), len(result.cols))
    print(f"Heatmap: {png}\nMatrix:  {npz}  (CKAResult.load(path) or numpy.load(path)['matrix'])")
    return result


if __name__ == "__main__":
    main()
