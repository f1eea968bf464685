"""benchmarks/bench_demo.py: it runs the demo command in a fresh process, reads the findings back from
the run's own files, tabulates them with a verdict per target and extracts the run's images."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TINY = ["--train-size", "96", "--img-size", "16", "--epochs", "1", "--batch-size", "32", "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def bench_demo():
    pytest.importorskip("timm")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench_demo")


def test_bench_demo_times_a_run_and_reads_it_back(bench_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, figures, saved = tmp_path / "runs", tmp_path / "img", tmp_path / "demo.json"
    result = bench_demo.main(["--out", str(out), "--json", str(saved), "--figures", str(figures), "--", *TINY])
    row = result["runs"][0]
    assert row["run_dir"] == str(out / "version_0")
    assert row["demo_args"] == TINY and row["config"]["train_size"] == 96
    assert row["seconds"] > 0
    assert set(row["uniformity"]) == {"resnet", "vit"} and set(row["accuracy"]) == {"resnet", "vit"}
    u = row["uniformity"]
    assert row["uniformity_vit_minus_resnet"] == pytest.approx(u["vit"] - u["resnet"])
    assert row["min_accuracy"] == min(row["accuracy"].values())
    assert json.loads(saved.read_text())["runs"][0]["seconds"] == row["seconds"]
    names = {Path(p).name for p in row["figures"]}
    assert {"demo_vit_cka_self_first.png", "demo_vit_cka_self_last.png", "demo_summary.png"} <= names
    assert all(Path(p).stat().st_size > 1000 for p in row["figures"])
    table = capsys.readouterr().out
    assert "| " + " ".join(TINY) + " |" in table
    assert "PASS" in table and sum(line.startswith("|---") for line in table.splitlines()) == 1


def test_findings_table_gives_each_target_its_verdict(bench_demo):
    row = {
        "demo_args": [],
        "seconds": 250.0,
        "uniformity": {"vit": 0.6, "resnet": 0.5},
        "uniformity_vit_minus_resnet": 0.1,
        "norm_ratio_median": {"vit": 6.0, "resnet": 1.0},
        "norm_ratio_vit_over_resnet": 6.0,
        "local_global_ratio": 0.85,
        "accuracy": {"resnet": 0.99, "vit": 0.95},
        "min_accuracy": 0.95,
    }
    line = bench_demo.findings_table([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "(defaults)"
    assert cells[1].endswith("PASS") and cells[2].endswith("PASS") and cells[4].endswith("PASS")
    assert cells[3] == "0.85 FAIL" and cells[5] == "250 FAIL"


def test_update_markdown_replaces_only_its_block(bench_demo, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- DEMO:RUN:BEGIN -->\nold\n<!-- DEMO:RUN:END -->\noutro\n")
    bench_demo.update_markdown(doc, "RUN", "new table")
    assert doc.read_text() == "intro\n<!-- DEMO:RUN:BEGIN -->\nnew table\n<!-- DEMO:RUN:END -->\noutro\n"
    bench_demo.update_markdown(doc, "SWEEP", "sweep")
    assert doc.read_text().endswith("<!-- DEMO:SWEEP:BEGIN -->\nsweep\n<!-- DEMO:SWEEP:END -->\n")
