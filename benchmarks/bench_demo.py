#!/usr/bin/env python
"""Time ``lightning-cka demo`` end to end and read its outcome back from the run's own files.

Runs the demo as a user would (``python -m lightning_cka.cli demo --no-progress ...`` in a fresh
process: imports, data generation, both trainings, summary and GIF), times the whole command,
then measures the paper's findings from what the run wrote (the last saved self-CKA ``.npz`` of
each model and the TensorBoard scalars, via :func:`lightning_cka.demo.paper_checks`; nothing the
demo printed is used). Arguments after ``--`` go to the demo, e.g. ``-- --seed 1 --epochs 6``.

``--write-docs`` puts the table into ``docs/benchmarks.md`` (the demo's time) and
``docs/paper-figures.md`` (the findings); ``--table results/demo_*.json`` builds the table of
several saved runs (how the numbers move with data size, epochs and seed) without training.

Example (the numbers in the docs)::

    python benchmarks/bench_demo.py --json benchmarks/results/demo_cpu.json --write-docs --figures docs/img
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import common

PAPER_FIGURES = common.REPO / "docs" / "paper-figures.md"
#: Targets: (check key, label, operator, limit).
TARGETS = (
    ("uniformity_vit_minus_resnet", "ViT more uniform than ResNet (difference of uniformity)", ">=", 1e-12),
    ("norm_ratio_vit_over_resnet", "median norm ratio, ViT / ResNet", ">=", 2.0),
    ("local_global_ratio", "attention distance, most local early block / last block", "<=", 0.8),
    ("min_accuracy", "lowest validation accuracy of the two models", ">=", 0.9),
    ("seconds", "whole demo, wall seconds", "<=", 240.0),
)


def run_demo(out: Path, demo_args: Sequence[str]) -> tuple[float, Path]:
    """Run the demo in a fresh process; return (wall seconds, the run folder it made)."""
    before = set(out.glob("version_*"))
    cmd = [sys.executable, "-m", "lightning_cka.cli", "demo", "--no-progress", "--out", str(out), *demo_args]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    made = sorted(set(out.glob("version_*")) - before)
    if len(made) != 1:
        raise RuntimeError(f"expected one new run folder under {out}, found {made}")
    return seconds, made[0]


def read_back(run_dir: Path, seconds: float, demo_args: Sequence[str]) -> dict[str, Any]:
    """The findings of one run, measured from its files."""
    from lightning_cka.demo import paper_checks

    checks = paper_checks(run_dir)
    u = checks.get("uniformity", {})
    acc = checks.get("accuracy", {})
    row: dict[str, Any] = {
        "demo_args": list(demo_args),
        "run_dir": str(run_dir),
        "seconds": seconds,
        "uniformity": u,
        "uniformity_vit_minus_resnet": u["vit"] - u["resnet"] if {"vit", "resnet"} <= u.keys() else float("nan"),
        "norm_ratio_median": checks.get("norm_ratio_median", {}),
        "norm_ratio_vit_over_resnet": checks.get("norm_ratio_vit_over_resnet", float("nan")),
        "attention_distance": checks.get("attention_distance", {}),
        "local_global_ratio": checks.get("local_global_ratio", float("nan")),
        "accuracy": acc,
        "min_accuracy": min(acc.values()) if acc else float("nan"),
        "probe": checks.get("probe", {}),
        "localization": checks.get("localization", {}),
    }
    config = run_dir / "paper_checks.json"
    if config.exists():
        row["config"] = json.loads(config.read_text()).get("config", {})
    return row


def save_figures(run_dir: Path, folder: Path) -> list[Path]:
    """Every TensorBoard image of the run, at its first and last step, as
    ``folder/demo_<model>_<tag>_{first,last}.png`` (``/`` in tags becomes ``_``), each model's
    GIFs as ``folder/demo_<model>_<name>.gif`` and the run's ``summary.png`` as
    ``folder/demo_summary.png``."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for model_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        for events in sorted(model_dir.glob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events), size_guidance={"images": 0})
            acc.Reload()
            for tag in acc.Tags().get("images", []):
                images = acc.Images(tag)
                for when, image in (("first", images[0]), ("last", images[-1])):
                    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"demo_{model_dir.name}_{tag}_{when}.png")
                    path = folder / name
                    path.write_bytes(image.encoded_image_string)
                    written.append(path)
        for gif in sorted(model_dir.glob("*.gif")):
            written.append(Path(shutil.copy(gif, folder / f"demo_{model_dir.name}_{gif.name}")))
    if (run_dir / "summary.png").exists():
        written.append(Path(shutil.copy(run_dir / "summary.png", folder / "demo_summary.png")))
    return written


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and value == value else "n/a"


def findings_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per run: its settings and every target's measure (PASS/FAIL)."""
    head = ["demo arguments", "uniformity ViT / ResNet", "norm ratio ViT / ResNet", "attention early / last"]
    head += ["accuracy ResNet / ViT", "seconds"]
    lines = []
    for r in rows:
        u, n, a = r["uniformity"], r["norm_ratio_median"], r["accuracy"]
        verdicts = {key: common.verdict(float(r[key]), op, limit) for key, _, op, limit in TARGETS}
        lines.append(
            [
                " ".join(r["demo_args"]) or "(defaults)",
                f"{_fmt(u.get('vit'))} / {_fmt(u.get('resnet'))} {verdicts['uniformity_vit_minus_resnet']}",
                f"{_fmt(n.get('vit'))} / {_fmt(n.get('resnet'))} = {_fmt(r['norm_ratio_vit_over_resnet'], 1)}x "
                f"{verdicts['norm_ratio_vit_over_resnet']}",
                f"{_fmt(r['local_global_ratio'])} {verdicts['local_global_ratio']}",
                f"{_fmt(a.get('resnet'), 3)} / {_fmt(a.get('vit'), 3)} {verdicts['min_accuracy']}",
                f"{r['seconds']:.0f} {verdicts['seconds']}",
            ]
        )
    return common.md_table(head, lines)


def update_markdown(path: Path, key: str, body: str) -> None:
    """Replace the ``<!-- DEMO:key:... -->`` block of a markdown file (see :func:`common.update_docs`)."""
    common.update_docs(key, body, docs=path, prefix="DEMO")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, demo_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="parent of the run folders (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="save the result here")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only tabulate these saved results")
    parser.add_argument("--write-docs", action="store_true", help="write the tables into the docs")
    parser.add_argument("--figures", type=Path, default=None, help="save the run's images here (e.g. docs/img)")
    args = parser.parse_args(argv)

    info = common.machine_description()
    if args.table:
        rows = [json.loads(p.read_text())["runs"][0] for p in args.table]
        table = findings_table(rows)
        print(table)
        if args.write_docs:
            update_markdown(PAPER_FIGURES, "SWEEP", table)
        return {"runs": rows}

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        seconds, run_dir = run_demo(out, demo_args)
        row = read_back(run_dir, seconds, demo_args)
        if args.figures:
            row["figures"] = [str(p) for p in save_figures(run_dir, args.figures)]
    result = {"machine": info, "runs": [row]}
    common.write_json(args.json, result)
    table = findings_table([row])
    command = common.command_line("bench_demo.py", argv + (["--", *demo_args] if demo_args else []))
    header = common.header_line(info, command)
    print(header + "\n\n" + table)
    if args.write_docs:
        update_markdown(PAPER_FIGURES, "RUN", header + "\n\n" + table)
        common.update_docs("DEMO", header + "\n\n" + table)
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
