"""Cost of CKACallback on a validation epoch (issues 3 and 6).

Times ``trainer.validate`` on the same model and data with and without the callback, side by
side in one process (min over repeats after a warm-up), and the peak memory of each in a fresh
subprocess. Default workload: REFERENCE.md section 7 (timm ``vit_tiny_patch16_224`` at
img_size=32, patch_size=4; 24 sublayers; 512 random images; batch 256; CPU).

    python benchmarks/bench_callback.py                      # CPU table
    python benchmarks/bench_callback.py --device cuda --gpu-suite --json-out gpu_callback.json

The GPU suite adds ViT-B/16 (224 x 224) and ResNet-50 at batch 256, self heatmap over block
outputs, and ViT-B/16 with ResNet-50 as reference (cross heatmap).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cka import fault_corrected

warnings.filterwarnings("ignore")


def make_model(name: str) -> nn.Module:
    import timm

    if name == "vit_tiny_32":
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
    return timm.create_model(name, num_classes=1000)


def input_size(name: str) -> int:
    return 32 if name == "vit_tiny_32" else 224


class Evaluator(pl.LightningModule):
    """A minimal LightningModule: validation is one forward pass per batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.model(batch[0])


def make_callback(kind: str) -> Any:
    from lightning_cka import CKACallback

    if kind == "none":
        return None
    if kind == "cka":
        return CKACallback(layers="sublayers", norm_ratio=False, attention_distance=False)
    if kind == "all":
        return CKACallback(layers="sublayers")
    if kind == "blocks":
        return CKACallback(layers="auto", norm_ratio=False, attention_distance=False)
    if kind == "reference":
        return CKACallback(
            layers="auto",
            reference=make_model("resnet50"),
            reference_layers="auto",
            norm_ratio=False,
            attention_distance=False,
        )
    if kind == "cka_bf16":
        return CKACallback(layers="sublayers", norm_ratio=False, attention_distance=False, precision="bfloat16")
    raise ValueError(kind)


def validate_seconds(
    model_name: str, kinds: list[str], images: int, batch: int, device: str, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Wall times and minor page faults of trainer.validate per callback kind (one per round
    after a warm-up round), interleaved so that drift hits all kinds alike."""
    torch.manual_seed(0)
    model = make_model(model_name)
    module = Evaluator(model)
    size = input_size(model_name)
    data = TensorDataset(torch.randn(images, 3, size, size))
    loader = DataLoader(data, batch_size=batch)
    accelerator = "gpu" if device == "cuda" else "cpu"
    times: dict[str, list[float]] = {k: [] for k in kinds}
    faults: dict[str, list[int]] = {k: [] for k in kinds}
    callbacks = {k: make_callback(k) for k in kinds}
    for r in range(repeats + 1):
        for kind in kinds:
            cb = callbacks[kind]
            trainer = pl.Trainer(
                accelerator=accelerator,
                devices=1,
                logger=False,
                callbacks=[cb] if cb is not None else [],
                enable_progress_bar=False,
                enable_model_summary=False,
                inference_mode=True,
            )
            if device == "cuda":
                torch.cuda.synchronize()
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            trainer.validate(module, loader, verbose=False)
            if device == "cuda":
                torch.cuda.synchronize()
            if r > 0 or repeats == 0:  # the first round is a warm-up
                times[kind].append(time.perf_counter() - start)
                faults[kind].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return times, faults


def peak_memory(model_name: str, kind: str, images: int, batch: int, device: str) -> float:
    """Peak memory (MiB) of one validate in a fresh process: RSS on CPU, max allocated on CUDA."""
    code = (
        "import sys, resource, torch; sys.path.insert(0, 'benchmarks');"
        "import bench_callback as b;"
        f"b.validate_seconds({model_name!r}, [{kind!r}], {images}, {batch}, {device!r}, 0);"
        "print(torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and "
        f"{device!r} == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_repo_root())
    return float(out.stdout.strip().splitlines()[-1])


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--gpu-suite", action="store_true", help="also ViT-B/16 and ResNet-50 at 224 x 224")
    parser.add_argument("--suite-images", type=int, default=1024, help="images per GPU-suite workload")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")

    rows: list[dict[str, Any]] = []
    workloads = [("vit_tiny_32", ["none", "cka", "all", "cka_bf16"], args.images)]
    if args.gpu_suite:
        workloads += [
            ("vit_base_patch16_224", ["none", "blocks", "reference"], args.suite_images),
            ("resnet50", ["none", "blocks"], args.suite_images),
        ]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# CKACallback validation cost on {device_name}, torch {torch.__version__}, batch {args.batch}\n")
    print(
        "| model | callback | validate min (s) | median (s) | ratio of minima | median same-round ratio "
        "| page-fault-corrected ratio | peak memory (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model_name, kinds, images in workloads:
        times, faults = validate_seconds(model_name, kinds, images, args.batch, args.device, args.repeats)
        corrected = fault_corrected({k: (times[k], faults[k]) for k in kinds})
        for kind in kinds:
            memory = None if args.no_memory else peak_memory(model_name, kind, images, args.batch, args.device)
            row = {
                "model": model_name,
                "callback": kind,
                "seconds": min(times[kind]),
                "median_seconds": statistics.median(times[kind]),
                "ratio": min(times[kind]) / min(times["none"]),
                "median_ratio": statistics.median(t / b for t, b in zip(times[kind], times["none"], strict=True)),
                "times": times[kind],
                "minor_page_faults": faults[kind],
                "fault_corrected_ratio": None if corrected is None else corrected["ratio"].get(kind, 1.0),
                "peak_mib": memory,
                "images": images,
                "device": device_name,
            }
            rows.append(row)
            mem = "-" if memory is None else f"{memory:.0f}"
            cells = [
                f"{model_name} ({images} img)",
                kind,
                f"{row['seconds']:.3f}",
                f"{row['median_seconds']:.3f}",
                f"{row['ratio']:.3f}",
                f"{row['median_ratio']:.3f}",
                "-" if row["fault_corrected_ratio"] is None else f"{row['fault_corrected_ratio']:.3f}",
                mem,
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
