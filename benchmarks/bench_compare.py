#!/usr/bin/env python
"""Speed, accuracy and memory of ``lightning_cka.compare`` against a plain forward pass.

On the benchmark workload (see ``common.py``), side by side in one process with rotating order:

- a plain forward pass and ``compare(model, batches, "sublayers")`` in float32 and bfloat16;
- the library's CKA work alone (``gram`` + ``MinibatchCKA.update_grams`` + ``compute``) replayed
  on the captured activations, and the 48 bare Gram products ``X @ X.T`` it is built on;
- the max abs error of each CKA matrix from the float64 reference of ``tests/reference.py``;
- the peak RSS of a fresh process running the forward or ``compare`` (``--memory``).

A few guards, each against a named regression, get a PASS/FAIL verdict; the rest are measurements.

    python benchmarks/bench_compare.py --quick                         # smoke run, seconds
    python benchmarks/bench_compare.py --json-out benchmarks/results/cpu_compare.json --write-docs
    python benchmarks/bench_compare.py --device cuda --json-out $OUT/gpu_compare.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch
from common import Timing, fmt_e, fmt_s, fmt_x, md_table
from torch import Tensor

import lightning_cka
from lightning_cka.functional import gram, gram_workspace
from lightning_cka.metric import MinibatchCKA

#: name -> (op, limit, what it guards against); CPU timing guards are not applied on a GPU
GUARDS: dict[str, tuple[str, float, str]] = {
    "CKA work fp32 / Gram products fp32": (
        "<=",
        1.05,
        "a regression of the symmetric CPU product (10/16 of the multiply-adds; a full product with "
        "its centring comes out at about 1.15)",
    ),
    "CKA work bf16 / Gram products fp32": (
        "<=",
        0.5,
        "a regression of the CPU bf16 path (bf16 product, centring in cache-sized pieces; 2.3 before them)",
    ),
    "max err fp32": ("<=", 1e-5, "loss of accuracy in the float32 Grams (they are formed from centred features)"),
    "max err bf16": ("<=", 1e-4, "loss of accuracy in the bf16 Grams"),
}


def compare(model: torch.nn.Module, batches: Sequence[Tensor], precision: str) -> lightning_cka.CKAResult:
    return lightning_cka.compare(model, batches, layers="sublayers", progress=False, precision=precision)


def grams_as_captured(acts: Sequence[Tensor], precision: torch.dtype | None = None) -> list[Tensor]:
    """``gram`` of each activation as GramCapture forms them: on CPU with one scratch buffer per batch."""
    ws = gram_workspace(max(acts, key=Tensor.numel), precision) if acts[0].device.type == "cpu" else None
    return [gram(a, precision, ws) for a in acts]


def replay_cka(acts_per_batch: Sequence[Sequence[Tensor]], precision: torch.dtype | None) -> Tensor:
    """The library's CKA work alone (Grams + HSIC sums + compute) on already captured activations."""
    metric = MinibatchCKA(precision=precision).to(acts_per_batch[0][0].device)
    for acts in acts_per_batch:
        metric.update_grams(torch.stack(grams_as_captured(acts, precision)))
    return metric.compute()


def time_cka_work(
    model: torch.nn.Module, layers: list[str], batches: list[Tensor], repeats: int, device: torch.device
) -> tuple[dict[str, Timing], int]:
    """The 48 bare Gram products and the library's CKA work replayed on captured activations (the
    activations, ~0.9 GB here, are freed on return)."""
    acts = [common.capture_outputs(model, layers, b, lambda t: t) for b in batches]
    flat = [a.reshape(a.shape[0], -1) for bs in acts for a in bs]
    centred = [f - f.mean(0, keepdim=True) for f in flat]
    centred16 = [c.bfloat16() for c in centred]

    def products(xs: list[Tensor]) -> None:
        for c in xs:
            c @ c.T

    work = {
        "Gram products fp32": lambda: products(centred),
        "Gram products bf16": lambda: products(centred16),
        "CKA work fp32": lambda: replay_cka(acts, None),
        "CKA work bf16": lambda: replay_cka(acts, torch.bfloat16),
    }
    timings, _ = common.round_robin(work, repeats, device)
    return timings, centred[0].shape[1]


def memory_worker(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Peak RSS of one forward or ``compare`` run in this (fresh) process."""
    device = torch.device(args.device)
    model = common.make_vit_tiny().to(device)
    batches = common.make_batches(args.images, args.batch_size, common.IMG_SIZE, device)
    common.sync(device)
    setup = common.status_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if mode == "forward":
        common.forward_only([model], batches)
    else:
        compare(model, batches, "bfloat16" if mode == "compare-bf16" else "float32")
    common.sync(device)
    res = {"setup_rss_mb": setup, "peak_rss_mb": common.peak_rss_mb()}
    if device.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return res


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device]
    cmd += ["--images", str(args.images), "--batch-size", str(args.batch_size)]
    return {
        mode: common.run_json([*cmd, "--memory-worker", mode], timeout=600)
        for mode in ("forward", "compare-fp32", "compare-bf16")
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model = common.make_vit_tiny().to(device)
    layers = common.sublayer_names(model)
    batches = common.make_batches(args.images, args.batch_size, common.IMG_SIZE, device)
    res: dict[str, Any] = {"machine": common.machine_description(device), "layers": len(layers)}
    monitor = common.CpuMonitor()
    print(f"# {len(layers)} sublayers, {args.images} images, batch {args.batch_size}, {device}", file=sys.stderr)

    fns = {
        "forward": lambda: common.forward_only([model], batches),
        "compare fp32": lambda: compare(model, batches, "float32").matrix,
        "compare bf16": lambda: compare(model, batches, "bfloat16").matrix,
    }
    main_t, outs = common.round_robin(fns, args.repeats, device)

    work_t, p = time_cka_work(model, layers, batches, max(args.repeats, 3), device)

    ref_t, ref = common.timed(lambda: common.reference_cka(model, layers, batches), device)
    res["machine"]["others_cores"] = monitor.others_cores()
    timings = {**main_t, **work_t}
    res.update(
        timings={k: v.as_dict() for k, v in timings.items()},
        gram_products=len(layers) * len(batches),
        gram_shape=[args.batch_size, p],
        gram_flops=2 * args.batch_size**2 * p * len(layers) * len(batches),
        reference_s=ref_t,
        max_err={"fp32": common.max_err(outs["compare fp32"], ref), "bf16": common.max_err(outs["compare bf16"], ref)},
    )
    corrected = common.fault_corrected({k: (main_t[k].times, main_t[k].minor_faults) for k in fns})
    if corrected is not None:
        res["fault_corrected"] = corrected
    if args.memory:
        res["memory"] = run_memory(args)
    return res


def derived(res: dict[str, Any]) -> dict[str, float]:
    t = {k: Timing(v["times_s"], v["minor_page_faults"]) for k, v in res["timings"].items()}
    return {
        "compare/forward fp32": common.same_round_ratio(t["compare fp32"], t["forward"]),
        "compare/forward bf16": common.same_round_ratio(t["compare bf16"], t["forward"]),
        "CKA part fp32 (s)": common.same_round_diff(t["compare fp32"], t["forward"]),
        "CKA part bf16 (s)": common.same_round_diff(t["compare bf16"], t["forward"]),
        "CKA work fp32 / Gram products fp32": common.same_round_ratio(t["CKA work fp32"], t["Gram products fp32"]),
        "CKA work bf16 / Gram products fp32": common.same_round_ratio(t["CKA work bf16"], t["Gram products fp32"]),
        "max err fp32": res["max_err"]["fp32"],
        "max err bf16": res["max_err"]["bf16"],
    }


def report(res: dict[str, Any], command: str) -> str:
    t = {k: Timing(v["times_s"], v["minor_page_faults"]) for k, v in res["timings"].items()}
    n, p = res["gram_shape"]
    errs = {"compare fp32": res["max_err"]["fp32"], "compare bf16": res["max_err"]["bf16"]}
    notes = {
        "forward": "1 model, no hooks",
        "CKA work fp32": "`gram` + `MinibatchCKA.update_grams` + `compute` on captured activations, no forward",
        "CKA work bf16": "the same with bf16 products",
    }
    rows = []
    for name, timing in t.items():
        note = notes.get(name, "")
        if name.startswith("Gram products"):
            note = f"{res['gram_products']} x ({n}, {p}) centred, {res['gram_flops'] / timing.median / 1e9:.0f} GFLOP/s"
        rows.append(
            [
                name,
                fmt_s(timing.median),
                fmt_s(timing.min),
                fmt_x(timing.spread),
                fmt_e(errs.get(name)),
                "; ".join(x for x in (note, timing.faults) if x),
            ]
        )
    rows.append(["float64 reference (`tests/reference.py`)", fmt_s(res["reference_s"]), "-", "-", "0", "1 run"])
    parts = [
        common.header_line(res["machine"], command),
        md_table(["measurement", "median (s)", "min (s)", "max/min", "max abs err vs float64", "notes"], rows),
    ]
    d = derived(res)
    cpu = res["machine"].get("gpu") is None
    grows = []
    for name, value in d.items():
        shown = f"{value:.1e}" if name.startswith("max err") else fmt_x(value, 3)
        if name in GUARDS and (cpu or name.startswith("max err")):
            op, limit, guards = GUARDS[name]
            grows.append([name, shown, f"{op} {limit:g}: {common.verdict(value, op, limit)}", guards])
        else:
            grows.append([name, shown, "-", "measurement"])
    parts.append(md_table(["same-round median", "value", "guard", "guards against"], grows))
    fc = res.get("fault_corrected")
    if fc is not None:
        s = fc["seconds"]
        parts.append(
            "Page-fault-corrected (every run's time regressed on its minor page faults): forward "
            f"{fmt_s(s['forward'])} s, compare fp32 {fmt_s(s['compare fp32'])} s "
            f"({fmt_x(fc['ratio']['compare fp32'], 3)}x), bf16 {fmt_s(s['compare bf16'])} s "
            f"({fmt_x(fc['ratio']['compare bf16'], 3)}x); {fc['seconds_per_million_faults']:.2f} s per million "
            f"faults, residual std {fmt_s(fc['residual_std_s'])} s."
        )
    if res.get("memory"):
        parts.append(memory_table(res["memory"]))
    return "\n\n".join(parts)


def memory_table(mem: dict[str, Any]) -> str:
    rows = []
    base = mem.get("forward", {})
    for mode, r in mem.items():
        if "error" in r:
            rows.append([mode, f"n/a ({r['error']})", "", "", ""])
            continue
        extra = (
            "-" if mode == "forward" or "peak_rss_mb" not in base else f"{r['peak_rss_mb'] - base['peak_rss_mb']:+.0f}"
        )
        cuda = f"{r['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in r else "-"
        rows.append([mode, f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['setup_rss_mb']:.0f}", extra, cuda])
    head = ["fresh process", "peak RSS (MB)", "peak - RSS after setup (MB)", "peak vs forward (MB)", "CUDA peak (MB)"]
    return md_table(head, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="32 images, batch 16, 2 repeats, no memory: seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds after a warm-up (default 7)")
    parser.add_argument("--images", type=int, default=None, help="default 512")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256")
    parser.add_argument("--memory", dest="memory", action="store_true", default=None)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--write-docs", action="store_true", help="update the COMPARE-<DEVICE> block of the docs")
    parser.add_argument("--from-json", default=None, help="report (and with --write-docs, write) a saved --json-out")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.images = args.images or (32 if args.quick else common.IMAGES)
    args.batch_size = args.batch_size or (16 if args.quick else common.BATCH_SIZE)
    if args.memory is None:
        args.memory = not args.quick
    if args.write_docs and args.quick:
        parser.error("--write-docs is refused with --quick (it would overwrite real numbers)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import json

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args, args.memory_worker)))
        return 0
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("CUDA is not available on this machine.", file=sys.stderr)
            return 2
        res = measure(args)
        res["command"] = common.command_line("bench_compare.py", argv)
        common.write_json(args.json_out, res)
    text = report(res, res.get("command", "?"))
    print(text)
    if args.write_docs:
        common.update_docs("COMPARE-" + ("CUDA" if res["machine"].get("gpu") else "CPU"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
