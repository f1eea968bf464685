"""Smoke tests of examples/ (at a tiny size) and of the mkdocs site."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def image_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        tags.update(acc.Tags()["images"])
    return tags


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of 16 random 24 x 24 RGB PNGs each (nothing to learn)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_train_vit_with_cka_on_a_folder_warns_at_chance(image_folder, tmp_path, capsys):
    example = load_example("train_vit_with_cka")
    out = tmp_path / "runs"
    log_dir = example.main(
        [
            str(image_folder),
            "--out", str(out),
            "--epochs", "1",
            "--limit-batches", "2",
            "--batch-size", "6",
            "--img-size", "16",
            "--patch-size", "4",
            "--depth", "2",
            "--no-progress",
            "--accelerator", "cpu",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "TensorBoard logs:" in printed and str(log_dir) in printed
    assert "epoch 1/1: train loss" in printed
    accuracy = float(re.search(r"Final validation accuracy: ([0-9.]+) \(chance 0.500\)", printed).group(1))
    assert 0.0 <= accuracy <= 1.0
    # random pixels: nothing to learn, and the script says why its heatmaps show an untrained network
    assert "near chance" in printed and "26 training images and 1 epoch(s)" in printed
    tags = image_tags(log_dir)
    assert {"cka/self", "norm_ratio/curves", "attention_distance/heads"} <= tags
    npz = sorted((log_dir / "cka").glob("self_step*.npz"))
    assert npz
    with np.load(npz[-1]) as saved:
        assert list(saved["rows"]) == [
            "model.blocks.0.attn",
            "model.blocks.0.mlp",
            "model.blocks.1.attn",
            "model.blocks.1.mlp",
        ]


def test_train_vit_with_cka_defaults_to_generated_data(tmp_path, capsys):
    example = load_example("train_vit_with_cka")
    log_dir = example.main(
        [
            "--out", str(tmp_path / "runs"),
            "--train-size", "128",
            "--epochs", "2",
            "--batch-size", "32",
            "--depth", "2",
            "--cka-max-examples", "64",
            "--no-progress",
            "--accelerator", "cpu",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "128 generated stroke glyphs" in printed
    assert "epoch 1/2: train loss" in printed and "epoch 2/2: train loss" in printed
    assert re.search(r"Final validation accuracy: [0-9.]+ \(chance 0.100\)", printed)
    assert len(sorted((log_dir / "cka").glob("self_step*.npz"))) == 2  # one per validation epoch
    assert "cka/self" in image_tags(log_dir)


def test_train_vit_chance_warning():
    example = load_example("train_vit_with_cka")
    assert example.chance_warning(0.12, 10, 50, 3, 1024) is not None
    assert example.chance_warning(0.55, 2, 30, 1, 1000) is not None
    assert example.chance_warning(0.75, 2, 30, 1, 8) is not None  # 6 of 8 right happens by chance
    assert example.chance_warning(0.75, 2, 3000, 1, 1000) is None
    assert example.chance_warning(0.95, 10, 5000, 6, 1024) is None
    assert example.chance_warning(0.05, 100, 5000, 6, 10000) is None  # five times chance


def test_compare_checkpoints_makes_its_own(tmp_path, capsys):
    from lightning_cka import CKAResult

    example = load_example("compare_checkpoints")
    workdir = tmp_path / "cmp"
    small = ["--depth", "2", "--img-size", "16", "--patch-size", "4", "--batch-size", "32", "--max-batches", "2"]
    result = example.main(
        ["--workdir", str(workdir), "--train-size", "96", "--epochs", "2", "--epoch-a", "1", "--no-progress", *small]
    )
    printed = capsys.readouterr().out
    assert "epoch 1/2: train loss" in printed and "-> checkpoint A (vit_epoch1.pt)" in printed
    assert "epoch 2/2: train loss" in printed and "-> checkpoint B (vit_epoch2.pt)" in printed
    assert re.search(r"Validation accuracy: A \(vit_epoch1.pt\) [0-9.]+, B \(vit_epoch2.pt\) [0-9.]+", printed)
    assert result.rows == result.cols == ["blocks.0", "blocks.1"]
    assert (workdir / "cka_a_vs_b.png").stat().st_size > 1000
    loaded = CKAResult.load(workdir / "cka_a_vs_b.npz")
    assert loaded.rows == result.rows
    diagonal = loaded.matrix.diagonal()
    assert ((diagonal > 0.5) & (diagonal <= 1.0 + 1e-6)).all()  # one epoch of 3 steps apart: still similar
    for name, value in zip(result.rows, diagonal.tolist(), strict=True):
        assert f"{name:<12} {value:.3f}" in printed
    assert "Matrix values " in printed

    # the same comparison from the saved checkpoints given explicitly
    again = example.main(
        [
            "--ckpt-a", str(workdir / "vit_epoch1.pt"),
            "--ckpt-b", str(workdir / "vit_epoch2.pt"),
            "--workdir", str(tmp_path / "cmp2"),
            "--train-size", "96",
            "--no-progress",
            *small,
        ]
    )  # fmt: skip
    assert "epoch 1/" not in capsys.readouterr().out  # nothing trained
    assert np.allclose(again.matrix.numpy(), result.matrix.numpy(), atol=1e-6)


def test_lightning_cli_config(tmp_path):
    cmd = [
        sys.executable,
        str(EXAMPLES / "lightning_cli" / "main.py"),
        "fit",
        "--config", str(EXAMPLES / "lightning_cli" / "config.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--data.train_size=256",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"epoch 1/1: val accuracy [0-9.]+ \(512 images\)", proc.stdout), proc.stdout
    assert re.search(r"Final validation accuracy: [0-9.]+", proc.stdout), proc.stdout
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {tmp_path}"
    assert "cka/self" in image_tags(tmp_path)
    saved = next(tmp_path.rglob("config.yaml")).read_text()
    assert "lightning_cka" in saved and "sublayers" in saved and "strokes" in saved


def test_branch_vs_stream_at_initialisation(tmp_path, capsys):
    example = load_example("branch_vs_stream")
    out = tmp_path / "bvs.png"
    branch, stream = example.main(["--steps", "0", "--depth", "2", "--max-batches", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "at initialisation" in printed and "validation accuracy" in printed
    assert out.stat().st_size > 1000
    assert branch.rows == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert len(stream.rows) == 4


def test_tensorboard_screenshot_urls():
    """The URLs of examples/tensorboard_screenshots.py (the browser itself is not run here)."""
    example = load_example("tensorboard_screenshots")
    shots = {shot.name: shot for shot in example.SHOTS}
    assert set(shots) == {"scalars_cka_to_last", "images_cka_self", "custom_scalars", "text_captions"}
    base = "http://127.0.0.1:6006/"
    url = example.shot_url(base, shots["images_cka_self"], "vit")
    assert url == base + "?runFilter=vit#images&tagFilter=%5Ecka%2Fself%24&regexInput=vit"
    url = example.shot_url(base, shots["scalars_cka_to_last"], None)
    assert url == base + "?tagFilter=cka%2Fself%2Fto_last%2F&smoothing=0#timeseries"
    settings = json.loads(example.LOCAL_STORAGE["_tb_global_settings"])
    assert settings["ignoreOutliers"] is False and settings["scalarSmoothing"] == 0


def test_docs_build(tmp_path):
    """``mkdocs build --strict`` (broken links, missing anchors or images fail). docs/benchmarks.md is
    written by the benchmarks job; until it exists a placeholder stands in for it."""
    pytest.importorskip("mkdocs")
    site = tmp_path / "project"
    shutil.copytree(ROOT / "docs", site / "docs")
    shutil.copy(ROOT / "mkdocs.yml", site / "mkdocs.yml")
    if not (site / "docs" / "benchmarks.md").exists():
        (site / "docs" / "benchmarks.md").write_text("# Benchmarks\n\nNot written yet.\n")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")]
    proc = subprocess.run(cmd, cwd=site, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in ("index", "concepts", "user-guide", "api", "benchmarks", "paper-figures"):
        target = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert target.exists(), page


def test_gpu_levers_benchmark_smoke_run_on_cpu(tmp_path):
    """benchmarks/gpu_levers.py is meant for a machine with a GPU; its --small mode must run anywhere and
    report errors that match the precision of each variant."""
    import json

    spec = importlib.util.spec_from_file_location("gpu_levers", ROOT / "benchmarks" / "gpu_levers.py")
    assert spec is not None and spec.loader is not None
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    out = tmp_path / "levers.json"
    assert levers.main(["--device", "cpu", "--small", "--repeats", "1", "--json-out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(levers.VARIANTS)
    for name in ("fp32 (library default)", "tf32", "fp32 symmetric", "tf32 symmetric"):
        assert rows[name]["max_err"] < 1e-5  # TF32 is a no-op on CPU
    assert 1e-6 < rows["bf16 (precision='bfloat16')"]["max_err"] < 1e-2
    assert all(r["seconds"] > 0 for r in rows.values())
