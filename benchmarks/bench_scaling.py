#!/usr/bin/env python
"""CKA time against the number of layers and the minibatch size, next to c (L n² p + L² n²).

Per minibatch the CKA work is L Gram products of (n, p) matrices (L n² p multiply-adds) plus one
product of the stacked, centred Grams for all layer pairs (L² n²). The layer sweep uses the
benchmark workload's ViT-Tiny at depth 6 / 12 / 24 (L = 12 / 24 / 48 sublayers) with n = 256 on
512 images; the batch-size sweep L = 24 with n = 64 ... 1024 on 1024 images. For each point:
forward and ``compare`` in rotating order ("CKA part" = same-round median of the difference) and
the library's CKA work replayed batch by batch on captured activations, to which one constant c
is fitted (the median of work / units).

    python benchmarks/bench_scaling.py --quick                    # smoke run
    python benchmarks/bench_scaling.py --json-out benchmarks/results/cpu_scaling.json --write-docs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch
from bench_compare import compare, grams_as_captured
from common import Timing, fmt_s, fmt_x, md_table
from torch import Tensor, nn

from lightning_cka.metric import MinibatchCKA

PLOT = common.REPO / "docs" / "img" / "scaling.png"


def point(model: nn.Module, batches: list[Tensor], reps: int, device: torch.device) -> dict[str, Any]:
    """Forward vs compare (rotating order) and the library's CKA work alone, for one configuration."""
    layers = common.sublayer_names(model)
    monitor = common.CpuMonitor()
    fns = {
        "forward": lambda: common.forward_only([model], batches),
        "compare": lambda: compare(model, batches, "float32"),
    }
    timings, _ = common.round_robin(fns, reps, device)
    work = Timing()
    for _ in range(reps):  # activations of one batch held at a time
        total = 0.0
        metric = MinibatchCKA().to(device)
        for b in batches:
            acts = common.capture_outputs(model, layers, b, lambda t: t)
            t, _ = common.timed(lambda a=acts, m=metric: m.update_grams(torch.stack(grams_as_captured(a))), device)
            total += t
        t, _ = common.timed(metric.compute, device)
        work.times.append(total + t)
    p = 65 * 192  # tokens x channels of every sublayer output (img 32, patch 4)
    L, n, nb = len(layers), batches[0].shape[0], len(batches)
    return {
        "L": L,
        "n": n,
        "batches": nb,
        "forward_s": timings["forward"].median,
        "compare_s": timings["compare"].median,
        "cka_part_s": common.same_round_diff(timings["compare"], timings["forward"]),
        "cka_work_s": work.median,
        "model_units": nb * (L * n * n * p + L * L * n * n),
        "others_cores": monitor.others_cores(),
    }


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    quick = args.quick
    reps = 1 if quick else args.repeats
    depths = (2, 4) if quick else (6, 12, 24)
    sizes = (16, 32) if quick else (64, 128, 256, 512, 1024)
    configs = [("layers", d, 32 if quick else 256, 64 if quick else 512) for d in depths]
    configs += [("batch", 2 if quick else 12, n, 64 if quick else 1024) for n in sizes]
    points = []
    for kind, depth, n, images in configs:
        model = common.make_vit_tiny(depth).to(device)
        batches = common.make_batches(images, n, common.IMG_SIZE, device)
        pt = point(model, batches, reps, device)
        pt.update(sweep=kind, depth=depth, images=images)
        points.append(pt)
        print(
            f"# {kind}: L={pt['L']} n={n}: forward {fmt_s(pt['forward_s'])} s, CKA part {fmt_s(pt['cka_part_s'])} s, "
            f"CKA work {fmt_s(pt['cka_work_s'])} s",
            file=sys.stderr,
            flush=True,
        )
    c = common.median([pt["cka_work_s"] / pt["model_units"] for pt in points])
    for pt in points:
        pt["predicted_s"] = c * pt["model_units"]
    return {"machine": common.machine_description(device), "c_seconds_per_unit": c, "points": points}


def report(res: dict[str, Any], command: str, plot: str | None) -> str:
    rows = [
        [
            pt["sweep"],
            str(pt["L"]),
            str(pt["n"]),
            f"{pt['images']} / {pt['batches']}",
            fmt_s(pt["forward_s"]),
            fmt_s(pt["cka_part_s"]),
            fmt_s(pt["cka_work_s"]),
            fmt_s(pt["predicted_s"]),
            fmt_x(pt["cka_work_s"] / pt["predicted_s"]),
            f"{pt['others_cores']:.2f}",
        ]
        for pt in res["points"]
    ]
    head = [
        "sweep",
        "L",
        "n",
        "images / batches",
        "forward (s)",
        "CKA part = compare - forward (s)",
        "CKA work alone (s)",
        "model c(L n²p + L²n²) (s)",
        "work / model",
        "other jobs (cores)",
    ]
    c = res["c_seconds_per_unit"]
    note = (
        f"Fitted c = {c:.3e} s per unit (median of CKA work / units; = {2 / c / 1e9:.0f} GFLOP/s if every unit "
        "were one multiply-add)."
    )
    if plot:
        shown = Path(plot).resolve()
        note += f" Plot: `{shown.relative_to(common.REPO) if shown.is_relative_to(common.REPO) else shown}`."
    return common.header_line(res["machine"], command) + "\n\n" + md_table(head, rows) + "\n\n" + note


def plot_scaling(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "layers", "L", "layers L (n fixed)"), (axes[1], "batch", "n", "minibatch n"))
    for ax, kind, key, label in panels:
        pts = [p for p in points if p["sweep"] == kind]
        if not pts:
            continue
        xs = [p[key] for p in pts]
        per = [p["batches"] if kind == "batch" else 1 for p in pts]
        ax.plot(xs, [p["cka_work_s"] / b for p, b in zip(pts, per, strict=True)], "o-", label="CKA work alone")
        part = [max(p["cka_part_s"], 1e-4) / b for p, b in zip(pts, per, strict=True)]
        ax.plot(xs, part, "s--", label="compare - forward")
        ax.plot(xs, [p["predicted_s"] / b for p, b in zip(pts, per, strict=True)], "k:", label="c(Ln²p + L²n²)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per minibatch" if kind == "batch" else f"seconds ({pts[0]['images']} images)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("CKA time vs number of layers")
    axes[1].set_title("CKA time per minibatch vs minibatch size (L=24)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="two tiny points per sweep: seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per point after a warm-up")
    parser.add_argument("--plot", default=None, help=f"PNG of the sweep (default with --write-docs: {PLOT})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--from-json", default=None, help="report (and with --write-docs, write) a saved --json-out")
    parser.add_argument("--write-docs", action="store_true", help="update the SCALING-<DEVICE> block and the plot")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write_docs and args.quick:
        parser.error("--write-docs is refused with --quick (it would overwrite real numbers)")
    plot = args.plot or (str(PLOT) if args.write_docs else None)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        res = sweep(args)
        res["command"] = common.command_line("bench_scaling.py", argv)
        common.write_json(args.json_out, res)
    if plot:
        plot_scaling(res["points"], Path(plot))
    text = report(res, res.get("command", "?"), plot)
    print(text)
    if args.write_docs:
        common.update_docs("SCALING-" + ("CUDA" if res["machine"].get("gpu") else "CPU"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
