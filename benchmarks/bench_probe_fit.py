#!/usr/bin/env python
"""Time of the linear-probe fit alone, before and after a change, next to its floor.

Times ``lightning_cka.analyses.probe._fit_probes`` (what ``LinearProbe.compute()`` runs at the end
of a validation) on seeded random features shaped like the benchmark workload's: 48 feature sets
(24 sublayers x 2 pools, CLS and token mean) of 192 features, 10 classes, 5 folds, the default
6 ridge strengths, for ``--examples`` examples (512: the workload's validation; 4,096: the
analysis's default ``max_examples``), with each ``--threads`` setting. Entries:

- ``current``: the installed ``lightning_cka``;
- ``--against REV`` (e.g. ``HEAD``): ``lightning_cka/analyses/probe.py`` of that git revision,
  loaded from ``git show`` (same features, same folds; the accuracies are compared);
- ``floor``: only what no closed-form k-fold ridge with exact leave-one-out can skip, per fold and
  set: one eigendecomposition of the ``d x d`` training covariance and one projection of the
  ``n`` training examples onto it (``(n, d) @ (d, d)``), run as the current code runs them (one
  intra-op thread, the sets split over ``torch.get_num_threads()`` worker threads).

Timing as every benchmark here: a warm-up, then ``--repeats`` rounds in rotating order;
same-round median ratios; CPU time and other processes' load per run.

    python benchmarks/bench_probe_fit.py --against HEAD --json-out benchmarks/results/cpu_probe_fit.json
    python benchmarks/bench_probe_fit.py --quick                  # seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import common
import torch
from common import fmt_s, fmt_x, md_table

SETS, WIDTH, CLASSES, FOLDS = 48, 192, 10, 5


def load_revision(rev: str) -> ModuleType:
    """``lightning_cka/analyses/probe.py`` of git revision ``rev`` as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(common.REPO), "show", f"{rev}:lightning_cka/analyses/probe.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"probe_{rev.replace('/', '_')}.py"
    path.write_text(source)
    name = f"_probe_at_{abs(hash(rev))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_data(examples: int, sets: int = SETS, width: int = WIDTH) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(common.SEED)
    labels = torch.randint(0, CLASSES, (examples,), generator=gen)
    centres = torch.randn(CLASSES, width, generator=gen)
    features = [0.3 * centres[labels] + torch.randn(examples, width, generator=gen) for _ in range(sets)]
    return features, labels


def floor_fn(features: Sequence[torch.Tensor], labels: torch.Tensor) -> Callable[[], None]:
    """One eigendecomposition and one projection per fold and set (see the module docstring): a lower
    bound, without the covariances themselves or the leave-one-out errors."""
    from lightning_cka.analyses.probe import _fold_ids, _one_intra_op_thread

    folds = _fold_ids(labels, FOLDS, common.SEED)
    x = torch.stack(list(features))
    trains = [x[:, folds != f] for f in range(FOLDS)]
    covs = [t.mT @ t for t in trains]
    workers = torch.get_num_threads()

    def part(i: int) -> None:
        for t, c in zip(trains, covs, strict=True):
            sel = slice(i * len(features) // workers, (i + 1) * len(features) // workers)
            _, v = torch.linalg.eigh(c[sel])
            t[sel] @ v

    def run() -> None:
        with _one_intra_op_thread(), ThreadPoolExecutor(workers) as pool:
            list(pool.map(part, range(workers)))

    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_cka.analyses import probe

    modules = {"current": probe}
    if args.against:
        modules[args.against] = load_revision(args.against)
    result: dict[str, Any] = {"machine": common.machine_description(), "cases": []}
    monitor = common.CpuMonitor()
    start_threads = torch.get_num_threads()
    for examples in args.examples:
        features, labels = make_data(examples, args.sets)
        for threads in args.threads:
            torch.set_num_threads(threads)
            fns: dict[str, Callable[[], Any]] = {
                name: (lambda m=m, x=features, y=labels: m._fit_probes(x, y, CLASSES, FOLDS))
                for name, m in modules.items()
            }
            fns["floor"] = floor_fn(features, labels)
            print(f"# {examples} examples, {threads} thread(s)", file=sys.stderr, flush=True)
            timings, outs = common.round_robin(fns, args.repeats, progress=True)
            case: dict[str, Any] = {
                "examples": examples,
                "threads": threads,
                "timings": {k: t.as_dict() for k, t in timings.items()},
            }
            if args.against:
                a, b = outs["current"], outs[args.against]
                case["same_accuracy"] = bool(torch.equal(a.accuracy, b.accuracy))
                case["same_strengths"] = bool(torch.equal(a.alphas, b.alphas))
                case["ratio"] = common.same_round_ratio(timings["current"], timings[args.against])
                case["ratio_cpu"] = common.same_round_ratio(timings["current"], timings[args.against], cpu=True)
            case["floor_ratio"] = common.same_round_ratio(timings["current"], timings["floor"])
            result["cases"].append(case)
    torch.set_num_threads(start_threads)
    result["machine"]["others_cores"] = monitor.others_cores()
    return result


def report(result: dict[str, Any], against: str | None, command: str) -> str:
    rows = []
    for case in result["cases"]:
        for name, t in case["timings"].items():
            timing = common.Timing.from_dict(t)
            note = ""
            if name == "current" and against:
                same = "identical" if case["same_accuracy"] and case["same_strengths"] else "DIFFERENT"
                note = f"{fmt_x(case['ratio'], 3)}x of `{against}` (CPU time {fmt_x(case['ratio_cpu'], 3)}x); {same}"
                note += f" accuracies and strengths; {fmt_x(case['floor_ratio'], 2)}x the floor"
            rows.append(
                [
                    f"{case['examples']:,}",
                    str(case["threads"]),
                    f"`{name}`",
                    fmt_s(timing.median),
                    fmt_s(common.median(timing.cpu_times)),
                    fmt_x(common.median(timing.others_cores)),
                    note,
                ]
            )
    head = ["examples", "torch threads", "fit", "median (s)", "CPU time (s)", "other jobs (cores)", "same-round"]
    return common.header_line(result["machine"], command) + "\n\n" + md_table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--sets", type=int, default=SETS, help="feature sets (layers x pools)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", default=None, metavar="REV", help="also time probe.py of this git revision")
    parser.add_argument("--quick", action="store_true", help="200 examples, 6 sets, 1 round: a smoke run")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.sets, args.repeats = [200], 6, 1
    result = measure(args)
    result["command"] = common.command_line("bench_probe_fit.py", argv)
    common.write_json(args.json_out, result)
    print(report(result, args.against, result["command"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
