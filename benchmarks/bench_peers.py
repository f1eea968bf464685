#!/usr/bin/env python
"""lightning_cka next to other PyTorch CKA libraries on the benchmark workload.

Each library runs in its own subprocess (a time limit cannot hang the run; a crash cannot take it
down), on the same model weights (same seed, checked by a parameter checksum) and the same
pre-made minibatches, doing the same 24 x 24 self-comparison through its documented API.
lightning_cka runs through the same harness first, so the ratios compare like with like. Errors
are max abs differences from the float64 reference of ``tests/reference.py``.

Peers come from the optional extra ``peers`` (``pip install -c constraints.txt torch-cka
cka-pytorch ckatorch``); a peer that is not installed, fails or runs past its time limit is
reported as ``n/a (reason)``.

    python benchmarks/bench_peers.py --quick                      # smoke run
    python benchmarks/bench_peers.py --json-out benchmarks/results/cpu_peers.json --write-docs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import torch
from common import Timing, fmt_e, fmt_s, fmt_x, md_table
from torch import Tensor, nn

import lightning_cka

SELF = "lightning-cka"
PEERS = ("cka-pytorch", "torch-cka", "ckatorch")
NOTES = {
    SELF: "`compare(..., 'sublayers')` fp32, through the same subprocess harness",
    "cka-pytorch": "runs 2 model copies; fp32 Grams, no centring; eps=1e-4 inside sqrt",
    "torch-cka": "runs 2 model copies; Python double loop, 3 host syncs per HSIC",
    "ckatorch": "runs 2 model copies; token x token Grams per example; only the last batch counts",
}


class _BatchList(torch.utils.data.Dataset):
    """Pre-made minibatches served by a ``DataLoader(batch_size=None)``, as ``(x,)`` or ``(x, y)``."""

    def __init__(self, batches: Sequence[Tensor], with_label: bool) -> None:
        self.batches = list(batches)
        self.with_label = with_label

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        x = self.batches[i]
        return (x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)) if self.with_label else (x,)


def _loader(batches: Sequence[Tensor], with_label: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_BatchList(batches, with_label), batch_size=None, shuffle=False)


def runner(name: str, model: nn.Module, layers: list[str], device: torch.device) -> Callable[[Sequence], Tensor]:
    """A closure running one library's self-comparison of ``layers`` on a list of batches.

    The peers take two models and run both on every batch; they get two deep copies of ``model``
    (torch-cka and ckatorch never remove their hooks: every run gets fresh copies). Each run builds
    the peer object anew (hook registration is part of its cost).
    """
    copies = (copy.deepcopy(model).eval(), copy.deepcopy(model).eval())
    if name == SELF:

        def run(batches: Sequence[Tensor]) -> Tensor:
            return lightning_cka.compare(copies[0], batches, layers="sublayers", progress=False).matrix

    elif name == "cka-pytorch":
        from cka_pytorch import CKACalculator

        def run(batches: Sequence[Tensor]) -> Tensor:
            calc = CKACalculator(*copies, model1_layers=list(layers), model2_layers=list(layers), verbose=False)
            try:  # defaults kept except num_epochs (default: 10 passes over the data)
                return calc.calculate_cka_matrix(_loader(batches, True), num_epochs=1)
            finally:
                calc.hook_manager1.clear_all()
                calc.hook_manager2.clear_all()

    elif name == "torch-cka":
        from torch_cka import CKA

        def run(batches: Sequence[Tensor]) -> Tensor:
            m1, m2 = (copy.deepcopy(m) for m in copies)
            cka = CKA(m1, m2, model1_layers=list(layers), model2_layers=list(layers), device=str(device))
            cka.compare(_loader(batches, False))
            return cka.export()["CKA"]

    elif name == "ckatorch":
        from ckatorch import CKA

        def run(batches: Sequence[Tensor]) -> Tensor:
            m1, m2 = (copy.deepcopy(m) for m in copies)
            return CKA(m1, m2, layers=list(layers), device=device)(_loader(batches, False), epochs=1)  # default 10

    else:
        raise ValueError(name)

    def quiet(batches: Sequence[Tensor]) -> Tensor:
        # the peers print progress bars and warnings; no_grad for all (torch-cka lacks it)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            return run(batches)

    return quiet


def checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def worker(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """One library on the workload in this (fresh) process."""
    device = torch.device(args.device)
    model = common.make_vit_tiny().to(device)
    batches = common.make_batches(args.images, args.batch_size, common.IMG_SIZE, device)
    run = runner(name, model, common.sublayer_names(model), device)
    run([b[:16] for b in batches[:1]])  # warm-up on a small input
    times: list[float] = []
    out = None
    for _ in range(args.peer_repeats):
        t, out = common.timed(lambda: run(batches), device)
        times.append(t)
        if t > args.slow_peer_s:
            break  # one run of a slow peer: the noise is small next to its time
    matrix = torch.as_tensor(out).detach().double().cpu().tolist()
    return {"times_s": times, "matrix": matrix, "checksum": checksum(model)}


def run_one(name: str, args: argparse.Namespace, ref: Tensor, model_sum: float) -> dict[str, Any]:
    version = common.package_version("lightning_cka" if name == SELF else name)
    if version is None:
        return {"version": None, "error": f"not installed; pip install -c constraints.txt {name}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--worker", name]
    cmd += ["--images", str(args.images), "--batch-size", str(args.batch_size)]
    cmd += ["--peer-repeats", str(args.peer_repeats), "--slow-peer-s", str(args.slow_peer_s)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    monitor = common.CpuMonitor()
    res = common.run_json(cmd, timeout=args.peer_timeout)
    others = monitor.others_cores()
    if "error" in res:
        return {"version": version, "error": res["error"], "others_cores": others}
    timing = Timing(res["times_s"])
    note = NOTES[name] + (f"; {len(timing.times)} timed run" if len(timing.times) < args.peer_repeats else "")
    if abs(res["checksum"] - model_sum) > 1e-6 * max(1.0, abs(model_sum)):
        note += "; WARNING: the subprocess built different weights"
    return {
        "version": version,
        "median_s": timing.median,
        "min_s": timing.min,
        "times_s": timing.times,
        "max_err": common.max_err(torch.tensor(res["matrix"], dtype=torch.float64), ref),
        "note": note,
        "others_cores": others,
    }


def report(res: dict[str, Any], command: str) -> str:
    own = res["libraries"].get(SELF, {}).get("median_s", float("nan"))
    rows = []
    for name, r in res["libraries"].items():
        label = f"{name} {r.get('version') or ''}".strip()
        if "error" in r:
            rows.append([label, f"n/a ({r['error']})", "", "", "", ""])
            continue
        rows.append(
            [
                label,
                fmt_s(r["median_s"]),
                fmt_x(r["median_s"] / own),
                fmt_e(r["max_err"]),
                f"{r['others_cores']:.1f}",
                r["note"],
            ]
        )
    head = ["library", "median (s)", "time / lightning_cka", "max abs err vs float64", "other jobs (cores)", "notes"]
    return common.header_line(res["machine"], command) + "\n\n" + md_table(head, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="32 images, batch 16, 1 run each")
    parser.add_argument("--images", type=int, default=None, help="default 512")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), help="peers to run (default: all three)")
    parser.add_argument("--peer-repeats", type=int, default=None, help="timed runs per library (default 3)")
    parser.add_argument("--peer-timeout", type=float, default=None, help="seconds per library (default 240)")
    parser.add_argument("--slow-peer-s", type=float, default=10.0, help="time a library this slow only once")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (also in the subprocesses)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--write-docs", action="store_true", help="update the PEERS-<DEVICE> block of the docs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.images = args.images or (32 if args.quick else common.IMAGES)
    args.batch_size = args.batch_size or (16 if args.quick else common.BATCH_SIZE)
    args.peer_repeats = args.peer_repeats or (1 if args.quick else 3)
    args.peer_timeout = args.peer_timeout or (180.0 if args.quick else 240.0)
    if args.write_docs and args.quick:
        parser.error("--write-docs is refused with --quick (it would overwrite real numbers)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return 0
    device = torch.device(args.device)
    model = common.make_vit_tiny().to(device)
    batches = common.make_batches(args.images, args.batch_size, common.IMG_SIZE, device)
    ref = common.reference_cka(model, common.sublayer_names(model), batches)
    monitor = common.CpuMonitor()
    res: dict[str, Any] = {"machine": common.machine_description(device), "libraries": {}}
    for name in (SELF, *args.peers):
        res["libraries"][name] = run_one(name, args, ref, checksum(model))
        shown = {k: v for k, v in res["libraries"][name].items() if k not in ("times_s",)}
        print(f"# {name}: {shown}", file=sys.stderr, flush=True)
    res["machine"]["others_cores"] = monitor.others_cores()
    common.write_json(args.json_out, res)
    text = report(res, common.command_line("bench_peers.py", argv))
    print(text)
    if args.write_docs:
        common.update_docs("PEERS-" + device.type.upper(), text)
    return 0 if "error" not in res["libraries"][SELF] else 1


if __name__ == "__main__":
    sys.exit(main())
