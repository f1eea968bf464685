"""Command line: ``lightning-cka demo`` (also ``python -m lightning_cka demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _devices(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-cka", description="Live CKA, norm ratios and attention distances.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a ResNet and a ViT on an embedded dataset and log everything to TensorBoard",
        description="Train a small timm ResNet, then a small timm ViT with the trained ResNet as CKA reference, "
        "logging CKA heatmaps, norm ratios and attention distances to TensorBoard under --out.",
    )
    demo.add_argument("--out", type=Path, default=Path("./runs"), help="log directory (default: ./runs)")
    demo.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (scikit-learn, embedded; default), 'cifar10' (downloaded by torchvision; needs internet "
        "the first time) or the path to an image folder (<path>/<class>/<image>, or <path>/train and <path>/val)",
    )
    demo.add_argument("--data-dir", type=Path, default=Path("./data"), help="where cifar10 is stored (default ./data)")
    demo.add_argument(
        "--models", nargs="+", choices=("resnet", "vit"), default=["resnet", "vit"], help="models to train"
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=None, help="epochs for every model (default: 8 ResNet, 30 ViT)"
    )
    demo.add_argument("--batch-size", type=_positive_int, default=64)
    demo.add_argument("--img-size", type=_positive_int, default=32, help="input resolution (a multiple of 4)")
    demo.add_argument("--accelerator", default="auto", help="passed to lightning.Trainer (cpu, gpu, auto, ...)")
    demo.add_argument("--devices", type=_devices, default="auto", help="passed to lightning.Trainer")
    demo.add_argument("--strategy", default="auto", help="passed to lightning.Trainer (e.g. ddp)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lightning_cka.demo import DemoConfig, run_demo, write_summary

    if args.img_size % 4:
        parser.error(f"--img-size must be a multiple of the ViT patch size 4, got {args.img_size}")
    if args.dataset not in ("digits", "cifar10") and not Path(args.dataset).is_dir():
        parser.error(f"--dataset {args.dataset!r} is neither 'digits', 'cifar10' nor an existing directory")
    cfg = DemoConfig(
        out=args.out,
        dataset=args.dataset,
        data_dir=args.data_dir,
        models=tuple(args.models),
        batch_size=args.batch_size,
        img_size=args.img_size,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.epochs is not None:
        cfg.epochs = {name: args.epochs for name in cfg.epochs}
    try:
        results = run_demo(cfg)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"lightning-cka demo: error: {err}", file=sys.stderr)
        return 2
    summary = write_summary(results, cfg.out / "summary.png")
    print("\nValidation accuracy:")
    for result in results:
        print(f"  {result.name:<7} {result.accuracy:6.1%}  ({result.seconds:.0f} s)  logs: {result.log_dir}")
    print(f"Summary figure: {summary}")
    print(f"Open the logs with:\n  tensorboard --logdir {cfg.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _run_demo(args, parser)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
