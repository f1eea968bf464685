#!/usr/bin/env python
"""``compare()`` on ViT-B/16 and ResNet-50 at 224 x 224, minibatches of 256 (for a machine with a GPU).

Randomly initialised timm ``vit_base_patch16_224`` and ``resnet50`` on 512 random images; for the
ViT-B/16 self heatmap, the ResNet-50 self heatmap and the ViT x ResNet cross heatmap over block
outputs (``layers="auto"``): forward alone, forward + CKA in float32 and bfloat16 (rotating
order, same-round medians), max error against the float64 reference of ``tests/reference.py``
(Grams formed in float64 on the device), and ``torch.cuda.max_memory_allocated``. A heatmap PNG
per case goes next to ``--json-out``.

    python benchmarks/bench_large_models.py --device cuda --json-out $OUT/gpu_large.json
    python benchmarks/bench_large_models.py --device cpu --small   # smoke run: ViT-Ti/16 and ResNet-18, 64 px
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch
from common import Timing, fmt_e, fmt_s, fmt_x, md_table

import lightning_cka


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    device = torch.device(args.device)
    size, images, bs = (64, 8, 4) if args.small else (224, args.images, args.batch_size)
    (vit_arch, vit_name), (cnn_arch, cnn_name) = (
        (("vit_tiny_patch16_224", "ViT-Ti/16"), ("resnet18", "ResNet-18"))
        if args.small
        else (("vit_base_patch16_224", "ViT-B/16"), ("resnet50", "ResNet-50"))
    )
    torch.manual_seed(common.SEED)
    vit = timm.create_model(vit_arch, pretrained=False, img_size=size).eval().to(device)
    torch.manual_seed(common.SEED)
    resnet = timm.create_model(cnn_arch, pretrained=False).eval().to(device)
    batches = common.make_batches(images, bs, size, device)
    cases = {
        f"{vit_name} self (blocks)": ([vit], {"model": vit}),
        f"{cnn_name} self (blocks)": ([resnet], {"model": resnet}),
        f"{vit_name} x {cnn_name} (blocks)": ([vit, resnet], {"model": vit, "reference": resnet}),
    }
    res: dict[str, Any] = {
        "machine": common.machine_description(device),
        "images": images,
        "batch_size": bs,
        "img_size": size,
        "cases": {},
    }
    out_dir = Path(args.json_out).parent if args.json_out else None
    for label, (models, kw) in cases.items():
        try:
            res["cases"][label] = case(models, kw, batches, device, 1 if args.small else args.repeats)
            if out_dir is not None:
                save_heatmap(res["cases"][label].pop("_result"), label, out_dir)
            res["cases"][label].pop("_result", None)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:150]
            res["cases"][label] = {"error": msg, "traceback": traceback.format_exc(limit=4)}
        print(f"# {label}: {res['cases'][label].get('error', 'done')}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def case(models: list, kw: dict[str, Any], batches: list, device: torch.device, repeats: int) -> dict[str, Any]:
    def run(precision: str) -> lightning_cka.CKAResult:
        return lightning_cka.compare(dataloader=batches, layers="auto", progress=False, precision=precision, **kw)

    fns = {
        "forward": lambda: common.forward_only(models, batches),
        "fp32": lambda: run("float32"),
        "bf16": lambda: run("bfloat16"),
    }
    timings, outs = common.round_robin(fns, repeats, device)
    peak = {}
    for key in ("forward", "fp32"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        common.timed(fns[key], device)
        peak[key] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    res32 = outs["fp32"]
    cross = kw.get("reference")
    ref = common.reference_cka(kw["model"], res32.rows, batches, cross, res32.cols if cross is not None else None)
    return {
        "shape": list(res32.matrix.shape),
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "max_err": {"fp32": common.max_err(res32.matrix, ref), "bf16": common.max_err(outs["bf16"].matrix, ref)},
        "cuda_peak_mb": peak,
        "_result": res32,
    }


def save_heatmap(result: lightning_cka.CKAResult, label: str, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, _ = result.plot(title=label)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()
        fig.savefig(out_dir / f"heatmap_{slug}.png", dpi=90)
        plt.close(fig)
    except Exception as exc:  # a figure is a bonus, never a failure
        print(f"# heatmap {label}: {exc}", file=sys.stderr)


def report(res: dict[str, Any], command: str) -> str:
    rows = []
    for label, c in res["cases"].items():
        if "error" in c:
            rows.append([label, f"n/a ({c['error']})", "", "", "", ""])
            continue
        t = {k: Timing(v["times_s"], v["minor_page_faults"]) for k, v in c["timings"].items()}
        rows.append(
            [
                f"{label} {tuple(c['shape'])}",
                fmt_s(t["forward"].median),
                f"{fmt_s(t['fp32'].median)} ({fmt_x(common.same_round_ratio(t['fp32'], t['forward']))}x)",
                f"{fmt_s(t['bf16'].median)} ({fmt_x(common.same_round_ratio(t['bf16'], t['forward']))}x)",
                f"{fmt_e(c['max_err']['fp32'])} / {fmt_e(c['max_err']['bf16'])}",
                f"{c['cuda_peak_mb']['forward']:.0f} / {c['cuda_peak_mb']['fp32']:.0f}",
            ]
        )
    head = [
        f"case ({res['images']} images, batch {res['batch_size']}, {res['img_size']}x{res['img_size']})",
        "forward (s)",
        "forward+CKA fp32 (s)",
        "forward+CKA bf16 (s)",
        "max err fp32 / bf16",
        "CUDA peak MB fwd / fp32",
    ]
    return common.header_line(res["machine"], command) + "\n\n" + md_table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="ViT-Ti/16 and ResNet-18 at 64 x 64, 8 images, batch 4")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--from-json", default=None, help="report (and with --write-docs, write) a saved --json-out")
    parser.add_argument("--write-docs", action="store_true", help="update the LARGE-MODELS block of the docs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("CUDA is not available on this machine.", file=sys.stderr)
            return 2
        res = measure(args)
        res["command"] = common.command_line("bench_large_models.py", argv)
        common.write_json(args.json_out, res)
    text = report(res, res.get("command", "?"))
    print(text)
    if args.write_docs and not args.small:
        common.update_docs("LARGE-MODELS-" + ("CUDA" if res["machine"].get("gpu") else "CPU"), text)
    return 0 if all("error" not in c for c in res["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
