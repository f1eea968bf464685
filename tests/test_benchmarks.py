"""Smoke runs of the benchmark scripts' small modes (seconds each): they run, their JSON has the
expected shape, and the accuracy numbers they report are those of a correct CKA."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture
def bench():
    """Import a script from benchmarks/ (they import the shared ``common`` module by name). One torch
    thread here and ``--threads 1`` for the scripts' subprocesses (robust on a busy machine); the
    thread count is restored afterwards."""
    import torch

    pytest.importorskip("timm")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield importlib.import_module
    torch.set_num_threads(threads)


def test_reference_is_the_tests_reference_and_matches_compare(bench):
    common = bench("common")
    assert Path(common.load_reference().__file__).resolve() == ROOT / "tests" / "reference.py"
    import lightning_cka

    model = common.make_vit_tiny(depth=1)
    names = common.sublayer_names(model)
    batches = common.make_batches(24, 12, common.IMG_SIZE)
    ref = common.reference_cka(model, names, batches)
    got = lightning_cka.compare(model, batches, layers=names, progress=False).matrix
    assert ref.shape == (2, 2)
    assert common.max_err(got, ref) < 1e-6


def test_round_robin_rotates_and_ratios_are_same_round(bench):
    common = bench("common")
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    timings, _ = common.round_robin(fns, repeats=3, warmup=0)
    assert order == list("abcbcacab")
    assert all(len(t.times) == 3 and len(t.minor_faults) == 3 for t in timings.values())
    a = common.Timing([1.0, 4.0, 2.0])
    b = common.Timing([1.0, 2.0, 4.0])
    assert common.same_round_ratio(a, b) == 1.0  # median of 1, 2, 0.5 (not min(a) / min(b))
    assert common.same_round_diff(a, b) == 0.0


def test_bench_compare_quick(bench, tmp_path):
    out = tmp_path / "compare.json"
    assert bench("bench_compare").main(["--quick", "--threads", "1", "--no-memory", "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["max_err"]["fp32"] < 1e-5
    assert res["max_err"]["bf16"] < 1e-2
    assert {"forward", "compare fp32", "CKA work bf16", "Gram products fp32"} <= set(res["timings"])


def test_bench_peers_quick_skips_missing_peers(bench, tmp_path, capsys):
    out = tmp_path / "peers.json"
    assert (
        bench("bench_peers").main(
            ["--quick", "--threads", "1", "--peers", "ckatorch", "--peer-timeout", "600", "--json-out", str(out)]
        )
        == 0
    )
    libs = json.loads(out.read_text())["libraries"]
    assert libs["lightning-cka"]["max_err"] < 1e-5
    peer = libs["ckatorch"]
    assert "median_s" in peer or peer["error"]  # measured where installed, else skipped with a reason
    assert "| lightning-cka" in capsys.readouterr().out


def test_bench_scaling_quick(bench, tmp_path):
    out, plot = tmp_path / "scaling.json", tmp_path / "scaling.png"
    assert bench("bench_scaling").main(["--quick", "--threads", "1", "--json-out", str(out), "--plot", str(plot)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["sweep"] for p in points] == ["layers", "layers", "batch", "batch"]
    assert all(p["cka_work_s"] > 0 and p["predicted_s"] > 0 for p in points)
    assert plot.stat().st_size > 0


def test_bench_analyses_small(bench, tmp_path, capsys):
    analyses = bench("bench_analyses")
    out = tmp_path / "analyses.json"
    argv = [
        "--small",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--configs",
        "none",
        "cka",
        "gram_floor",
        "default",
        "all",
        "--json-out",
        str(out),
    ]
    assert analyses.main(argv) == 0
    res = json.loads(out.read_text())
    summary = next(iter(res["summary"]["default"].values()))
    assert {"none", "cka", "gram_floor", "default", "all"} <= set(summary)
    assert summary["none"]["ratio"] == 1.0
    timing = next(iter(res["timing"]["default"]["workloads"].values()))
    assert "self" in timing["history_keys"]["cka"]
    assert {"self", "norm_ratio", "attention_distance"} <= set(timing["history_keys"]["default"])
    assert timing["kept_mb"]["default"]["convergence"] > 0  # past Grams kept between validations
    text = capsys.readouterr().out
    assert "| analysis | what it computes | cost model |" in text
    assert "| floor: Gram products alone |" in text
    assert "| memory | goal | value | verdict |" in text
    for name, reason in res["skipped"].items():
        assert name in analyses.PLUGINS and reason


def test_bench_analyses_memory_worker(bench):
    analyses = bench("bench_analyses")
    args = analyses.parse_args(["--small", "--worker", "memory:cka"])
    res = analyses.memory_worker(args, "cka")
    assert res["peak_rss_mb"] >= res["setup_rss_mb"] > 0


def test_bench_probe_fit_quick(bench, tmp_path, capsys):
    out = tmp_path / "probe_fit.json"
    assert bench("bench_probe_fit").main(["--quick", "--threads", "1", "2", "--json-out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [c["threads"] for c in cases] == [1, 2]
    assert all({"current", "floor"} <= set(c["timings"]) for c in cases)
    assert "| 200 | 2 | `current` |" in capsys.readouterr().out


def test_bench_large_models_small_on_cpu(bench, tmp_path):
    out = tmp_path / "large.json"
    assert (
        bench("bench_large_models").main(["--device", "cpu", "--small", "--threads", "1", "--json-out", str(out)]) == 0
    )
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 3
    for case in cases.values():
        assert case["max_err"]["fp32"] < 1e-5
    assert list(tmp_path.glob("heatmap_*.png"))


def test_gpu_all_script_names_existing_scripts():
    script = (BENCH / "gpu_all.sh").read_text()
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_all.sh")]).returncode == 0
    named = re.findall(r"benchmarks/(\w+\.py)", script)
    assert named and all((BENCH / name).exists() for name in named)


def test_fault_corrected_recovers_a_known_slope(bench):
    common = bench("common")
    faults = [[100_000, 400_000, 900_000], [200_000, 500_000, 800_000]]
    times = [[2.0 + 1e-6 * f for f in faults[0]], [2.5 + 1e-6 * f for f in faults[1]]]
    fit = common.fault_corrected({"a": (times[0], faults[0]), "b": (times[1], faults[1])})
    assert fit is not None
    assert fit["seconds"]["a"] == pytest.approx(2.0) and fit["seconds"]["b"] == pytest.approx(2.5)
    assert fit["seconds_per_million_faults"] == pytest.approx(1.0)


def test_bench_analyses_gpu_mode_is_the_large_models(bench):
    """The GPU mode cannot run without a GPU; its configuration can be checked anywhere."""
    analyses = bench("bench_analyses")
    args = analyses.parse_args(["--device", "cuda"])
    assert [w["name"] for w in analyses.workloads(args)] == ["vit_base_patch16_224", "resnet50"]
    assert (args.batch_size, args.allocators, args.memory) == (256, ["default"], False)


def test_bench_analyses_profile_names_added_operators(bench):
    analyses = bench("bench_analyses")
    text = analyses.profile(analyses.parse_args(["--small"]), "cka", rows=5)
    assert "| operator | none (ms) | cka (ms) | added (ms) | calls |" in text
    assert text.count("\n| `") == 5


def test_bench_analyses_method_times(bench):
    analyses = bench("bench_analyses")
    table = analyses.method_table(analyses.parse_args(["--small"]), ["convergence"])
    assert "| convergence | `convergence` |" in table and "| convergence | `self` |" in table
