"""The demo end to end on a tiny configuration, its data and the command line (demo, animate)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from lightning_cka import cli
from lightning_cka.data import GeneratedImages, load_dataset, make_strokes


def tiny_config(out: Path, **overrides):
    from lightning_cka.demo import DemoConfig

    cfg = DemoConfig(
        out=out,
        train_size=128,
        img_size=16,
        epochs={"resnet": 1, "vit": 2},
        batch_size=32,
        accelerator="cpu",
        devices=1,
        progress=False,
        vit_dim=16,
        vit_depth=2,
        vit_heads=2,
        resnet_width=8,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from lightning_cka.demo import run_demo

    torch.set_num_threads(1)
    return run_demo(tiny_config(tmp_path_factory.mktemp("runs")))


# --------------------------------------------------------------------------- data


def test_strokes_are_deterministic():
    a, ya = make_strokes(64, seed=3)
    b, yb = make_strokes(64, seed=3)
    c, _ = make_strokes(64, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (64, 1, 32, 32)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    assert set(ya.tolist()) <= set(range(10))


def test_strokes_draw_the_glyph_of_their_class():
    x, y = make_strokes(400, seed=0, jitter=0.0, distractors=0, noise=0.0)
    ink = x.float() / 255 * 2 - 0.5  # back to ink units: paper 0, stroke 1
    assert float(ink.amin()) == pytest.approx(0.0, abs=0.01) and float(ink.amax()) == pytest.approx(1.0, abs=0.01)
    # a "1" (two right-hand segments) has less ink than an "8"-like X or a "0", and sits right of centre
    amount = ink.sum(dim=(1, 2, 3))
    ones, zeros = amount[y == 1].mean(), amount[y == 0].mean()
    assert ones < 0.6 * zeros
    cols = ink[y == 1].sum(dim=(0, 1, 2))
    assert float((cols[16:]).sum()) > 3 * float(cols[:16].sum())


def test_generated_images_standardised_and_batched_like_items():
    images, labels = make_strokes(200, seed=0)
    ds = GeneratedImages(images, labels)
    batch = ds.__getitems__([3, 5])
    assert torch.equal(batch[0][0], ds[3][0]) and int(batch[1][1]) == int(labels[5])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    other = GeneratedImages(images[:10], labels[:10], mean=ds.mean, std=ds.std)
    assert torch.equal(other[0][0], ds[0][0])


def test_load_dataset_sizes_and_errors():
    spec = load_dataset("strokes", img_size=16, train_size=20, seed=1)
    assert (len(spec.train), spec.img_size, spec.num_classes, spec.in_chans) == (20, 16, 10, 1)
    assert tuple(spec.train[0][0].shape) == (1, 16, 16)
    with pytest.raises(ValueError, match="generated datasets only"):
        load_dataset("digits", train_size=10)
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("no-such-dataset")


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"lightning-cka\[demo\]"):
        load_dataset("digits")


def test_data_module_does_not_import_sklearn():
    import subprocess

    code = "import sys, lightning_cka.data, lightning_cka.demo, lightning_cka.cli; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- demo end to end


def test_demo_end_to_end(demo_run):
    from lightning_cka.demo import read_scalars

    run = demo_run
    assert run.run_dir.name == "version_0"
    assert [r.name for r in run.results] == ["resnet", "vit"]
    vit_dir = run.run_dir / "vit"
    selfs = sorted((vit_dir / "cka").glob("self_step*.npz"))
    assert len(selfs) == 2  # one per epoch
    from lightning_cka import CKAResult

    rows = CKAResult.load(selfs[-1]).rows
    assert rows == ["model.blocks.0.norm2:in", "model.blocks.0", "model.blocks.1.norm2:in", "model.blocks.1"]
    assert sorted((vit_dir / "cka").glob("reference_step*.npz"))
    resnet_rows = CKAResult.load(sorted((run.run_dir / "resnet" / "cka").glob("self_step*.npz"))[-1]).rows
    assert len(resnet_rows) == 8  # two blocks per stage
    scalars = read_scalars(vit_dir)
    assert any(t.startswith("norm_ratio/") for t in scalars)
    assert any(t.startswith("attention_distance/") for t in scalars)
    assert (run.run_dir / "summary.png").stat().st_size > 10_000
    assert run.gif == vit_dir / "cka_self.gif" and run.gif.stat().st_size > 1000
    saved = json.loads((run.run_dir / "paper_checks.json").read_text())
    assert set(saved["uniformity"]) == {"resnet", "vit"}
    assert set(saved["targets"]) == {"vit_more_uniform", "norm_ratio_2x", "local_below_0.8_global", "accuracy_90"}
    assert 0 < saved["local_global_ratio"] < 2
    assert saved["seconds"]["total"] > 0
    # probes on both models, localization on the ViT, convergence from the second epoch on
    assert set(saved["probe"]) == {"resnet", "vit"}
    assert set(saved["probe"]["vit"]) == {"cls", "mean"} and set(saved["probe"]["resnet"]) == {"mean"}
    assert all(0.0 <= v["last_layer"] <= 1.0 for pools in saved["probe"].values() for v in pools.values())
    assert set(saved["localization"]) == {"blocks.1/diagonal", "blocks.1/hit_rate"}
    assert set(saved["convergence_first"]["vit"]) == {"blocks.0.norm2:in", "blocks.0", "blocks.1.norm2:in", "blocks.1"}
    assert any(t.startswith("localization/") for t in scalars) and not any(
        t.startswith("localization/") for t in read_scalars(run.run_dir / "resnet")
    )


def test_demo_runs_never_overwrite(tmp_path):
    from lightning_cka.demo import new_run_dir

    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_x").mkdir()
    assert new_run_dir(tmp_path).name == "version_4"
    assert new_run_dir(tmp_path).name == "version_5"


def test_paper_checks_read_back_from_files(demo_run):
    from lightning_cka.demo import paper_checks

    again = paper_checks(demo_run.run_dir)
    for key in ("uniformity", "norm_ratio_median", "attention_distance", "accuracy"):
        assert again[key] == demo_run.checks[key]


def test_uniformity_measure():
    from lightning_cka.demo import uniformity

    m = torch.eye(6)
    m[0, 5] = m[5, 0] = 0.6
    assert uniformity(m) == pytest.approx((0.6 + 0 + 0 + 0) / 4)  # lowest 2 x highest 2


# --------------------------------------------------------------------------- command line


def test_animate_cli(demo_run, tmp_path, capsys):
    out = tmp_path / "anim.gif"
    assert cli.main(["animate", str(demo_run.run_dir / "vit"), "--out", str(out), "--fps", "4"]) == 0
    assert "(2 frames)" in capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 2


def test_animate_cli_whole_run_and_errors(demo_run, tmp_path, capsys):
    assert cli.main(["animate", str(demo_run.run_dir)]) == 0  # one GIF per model
    printed = capsys.readouterr().out
    assert "resnet" in printed and "vit" in printed
    assert (demo_run.run_dir / "resnet" / "cka_self.gif").exists()
    assert cli.main(["animate", str(demo_run.run_dir), "--out", str(tmp_path / "x.gif")]) == 2
    assert cli.main(["animate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "give one of them" in err and "no self_step" in err


def test_version(capsys):
    from lightning_cka import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-cka {__version__}"


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("options:") :]  # past the usage line
    parser = cli._subparser(cli.build_parser(), "demo")
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            start = text.index(action.option_strings[-1])
            assert "default" in text[start : start + 400], action.option_strings


def test_mistyped_demo_flag_shows_demo_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--epcohs", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lightning-cka demo") and "--epcohs" in err


def _can_mkdir(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_bad_out_fails_in_one_line_before_training(tmp_path, capsys, monkeypatch, kind):
    import lightning_cka.demo as demo

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(demo, "run_demo", no_training)
    if kind == "file":
        out = tmp_path / "a_file"
        out.write_text("x")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
        out = parent / "runs"
        if os.access(parent, os.W_OK):  # root ignores permissions: /sys refuses new folders to everyone
            out = Path("/sys/lightning_cka_runs")
            if not Path("/sys").is_dir() or (os.access("/sys", os.W_OK) and _can_mkdir(out)):
                pytest.skip("no read-only folder available")
    assert cli.main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lightning-cka demo: error: --out")
