"""Command line: ``lightning-cka demo`` and ``lightning-cka animate`` (also ``python -m lightning_cka ...``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

PROG = "lightning-cka"


class _Formatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help text does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.option_strings == []:
            return text
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return text + " (default: off)" if action.default is False else text + " (default: on)"
        if action.default is None:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list | tuple) else action.default
        return f"{text} (default: {default})"


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


def _version() -> str:
    from lightning_cka import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from lightning_cka.data import DATASETS, DEFAULT_DATASET, dataset_defaults
    from lightning_cka.demo import DemoConfig

    cfg = DemoConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Live CKA heatmaps, skip-connection norm ratios and attention distances for Lightning.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,animate}")
    demo = sub.add_parser(
        "demo",
        help="train a ResNet and a ViT on a generated dataset and log everything to TensorBoard",
        description="Train a small timm ResNet, then a small timm ViT with the trained ResNet as CKA reference, "
        "logging CKA heatmaps of the residual stream, skip-connection norm ratios and attention distances to "
        "TensorBoard. Each run gets its own folder OUT/version_N with a summary.png and an animated GIF of the "
        "ViT's heatmaps; nothing is downloaded unless --dataset cifar10 is chosen.",
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--out", type=Path, default=cfg.out, help="parent folder of the run folders version_0, version_1, ..."
    )
    demo.add_argument(
        "--dataset",
        default=cfg.dataset,
        help=f"{' | '.join(repr(d) for d in DATASETS)} or the path to an image folder "
        f"(<path>/<class>/<image>, or <path>/train and <path>/val). {DEFAULT_DATASET!r} is generated from --seed "
        "(nothing downloaded); 'digits' needs scikit-learn (pip install 'lightning-cka[demo]'); 'cifar10' is "
        f"downloaded by torchvision the first time (default: {cfg.dataset})",
    )
    defaults = dataset_defaults(DEFAULT_DATASET)
    demo.add_argument(
        "--train-size",
        type=_positive_int,
        default=None,
        help=f"training images generated for {DEFAULT_DATASET!r} (default: {defaults['train_size']}; "
        f"validation: {defaults['val_size']})",
    )
    demo.add_argument("--data-dir", type=Path, default=cfg.data_dir, help="where cifar10 is stored")
    demo.add_argument(
        "--models", nargs="+", choices=("resnet", "vit"), default=list(cfg.models), help="models to train, in order"
    )
    epochs = ", ".join(f"{k} {v}" for k, v in cfg.epochs.items())
    demo.add_argument("--epochs", type=_positive_int, default=None, help=f"epochs for every model (default: {epochs})")
    demo.add_argument("--batch-size", type=_positive_int, default=cfg.batch_size, help="training batch size")
    demo.add_argument(
        "--img-size",
        type=_positive_int,
        default=None,
        help=f"input resolution, a multiple of the ViT patch size {cfg.patch_size} (default: the dataset's own, "
        f"{defaults['img_size']} for {DEFAULT_DATASET!r}; 32 for the others)",
    )
    demo.add_argument("--accelerator", default=cfg.accelerator, help="passed to lightning.Trainer (cpu, gpu, ...)")
    demo.add_argument("--devices", type=_devices, default=cfg.devices, help="passed to lightning.Trainer")
    demo.add_argument("--strategy", default=cfg.strategy, help="passed to lightning.Trainer (e.g. ddp)")
    demo.add_argument("--seed", type=int, default=cfg.seed, help="seed of the generated data, weights and order")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    animate = sub.add_parser(
        "animate",
        help="turn the saved self-CKA heatmaps of a run into an animated GIF",
        description="Collect the self-CKA matrices a CKACallback saved during training "
        "(RUN_DIR/<prefix>/self_step<step>.npz, also one level further down, e.g. a demo run folder with "
        "resnet/ and vit/) and write them as an animated GIF, one frame per validation.",
        formatter_class=_Formatter,
    )
    animate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run (log) directory")
    animate.add_argument(
        "--out",
        type=Path,
        default=None,
        help="GIF to write (default: <prefix>_self.gif next to each folder of matrices, e.g. "
        "RUN_DIR/cka_self.gif for RUN_DIR/cka/self_step*.npz; one per folder when RUN_DIR holds several)",
    )
    animate.add_argument("--fps", type=float, default=2.0, help="frames per second")
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def check_writable_dir(path: Path) -> str | None:
    """``None`` if ``path`` is (or can be made) a folder we can write into, else why not, in one line."""
    if path.exists() and not path.is_dir():
        return f"--out {path} is a file, not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as err:
        return f"--out {path} is not a writable folder ({err.strerror or err})"
    return None


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lightning_cka.data import DATASETS
    from lightning_cka.demo import DemoConfig, print_report, run_demo

    cfg = DemoConfig()
    if args.dataset not in DATASETS and not Path(args.dataset).is_dir():
        parser.error(f"--dataset {args.dataset!r} is neither one of {', '.join(DATASETS)} nor an existing directory")
    if args.img_size is not None and args.img_size % cfg.patch_size:
        parser.error(f"--img-size must be a multiple of the ViT patch size {cfg.patch_size}, got {args.img_size}")
    problem = check_writable_dir(args.out)
    if problem:
        return _fail("demo", problem)
    cfg.out = args.out
    cfg.dataset = args.dataset
    cfg.data_dir = args.data_dir
    cfg.train_size = args.train_size
    cfg.models = tuple(args.models)
    cfg.batch_size = args.batch_size
    cfg.img_size = args.img_size
    cfg.accelerator = args.accelerator
    cfg.devices = args.devices
    cfg.strategy = args.strategy
    cfg.seed = args.seed
    cfg.progress = not args.no_progress
    if args.epochs is not None:
        cfg.epochs = {name: args.epochs for name in cfg.epochs}
    try:
        run = run_demo(cfg)
    except (RuntimeError, FileNotFoundError, ValueError, ImportError) as err:
        return _fail("demo", str(err))
    print_report(run)
    return 0


def _run_animate(args: argparse.Namespace) -> int:
    from lightning_cka.demo import animate_run, find_self_matrices

    if not args.run_dir.is_dir():
        return _fail("animate", f"{args.run_dir} is not a folder")
    groups = find_self_matrices(args.run_dir)
    if not groups:
        return _fail("animate", f"no self_step*.npz files under {args.run_dir} (or one level below it)")
    if args.out is not None and len(groups) > 1:
        names = ", ".join(str(g) for g in groups)
        return _fail("animate", f"{len(groups)} runs under {args.run_dir} ({names}): give one of them, or no --out")
    if args.fps <= 0:
        return _fail("animate", f"--fps must be positive, got {args.fps}")
    for run_dir in groups:  # folders holding self_step*.npz
        out = args.out if args.out is not None else run_dir.parent / f"{run_dir.name}_self.gif"
        if out.suffix.lower() != ".gif":
            return _fail("animate", f"--out must end in .gif, got {out}")
        if out.is_dir() or (out.parent.exists() and not os.access(out.parent, os.W_OK)):
            return _fail("animate", f"cannot write {out}")
        try:
            path, frames = animate_run(run_dir, out, fps=args.fps)
        except (OSError, ValueError) as err:
            return _fail("animate", str(err))
        print(f"{path} ({frames} frames)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        return _run_demo(args, _subparser(parser, "demo"))
    if args.command == "animate":
        return _run_animate(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
