"""End-to-end tests of CKACallback: real Trainer runs, real TensorBoard event files, compare() as oracle."""

from __future__ import annotations

import copy
import gc
import io
import itertools
import warnings
from pathlib import Path
from types import SimpleNamespace

import helpers as H
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset, Subset

from lightning_cka import CKACallback, compare

TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from H.one_thread()


def events(path: Path | str) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def event_files(log_dir: Path | str) -> list[Path]:
    return sorted(Path(log_dir).glob("events.out.tfevents.*"))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def cmp(module, data, layers, **kwargs):
    return compare(module, data, layers=layers, progress=False, **kwargs)


# --------------------------------------------------------------------------- one shared ViT run
EPOCHS = 3
TRAIN_BATCHES = 2


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """ViT (depth 3) with sublayers vs a timm ResNet reference, 3 epochs, TensorBoard."""
    root = tmp_path_factory.mktemp("vit_run")
    module = H.LitClassifier(H.tiny_vit(depth=3))
    ref = H.timm_resnet("resnet10t", seed=1)
    val = H.loader(H.image_dataset(16, seed=1))
    baseline = H.hook_count(module)
    ref_baseline = H.hook_count(ref)
    initial = cmp(module, val, "sublayers")
    cb = CKACallback(layers="sublayers", reference=ref)
    logger = TensorBoardLogger(str(root))
    tr = H.trainer(root, max_epochs=EPOCHS, limit_train_batches=TRAIN_BATCHES, callbacks=[cb], logger=logger)
    tr.fit(module, H.loader(H.image_dataset(32), shuffle=True), val)
    return SimpleNamespace(
        module=module,
        ref=ref,
        val=val,
        cb=cb,
        trainer=tr,
        log_dir=Path(logger.log_dir),
        baseline=baseline,
        ref_baseline=ref_baseline,
        initial=initial,
    )


def test_fit_names_and_history(vit_run):
    cb = vit_run.cb
    assert cb.rows == [f"model.blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp")]
    assert cb.cols == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert [r["epoch"] for r in cb.history] == list(range(EPOCHS))
    assert [r["step"] for r in cb.history] == vit_run.module.val_global_steps
    assert vit_run.module.val_global_steps == [TRAIN_BATCHES * (e + 1) for e in range(EPOCHS)]
    for record in cb.history:
        assert record["self"].matrix.shape == (6, 6)
        assert record["reference"].matrix.shape == (6, 4)
        assert record["reference"].rows == cb.rows and record["reference"].cols == cb.cols


def test_tensorboard_images(vit_run):
    files = event_files(vit_run.log_dir)
    assert len(files) == 1
    acc = events(vit_run.log_dir)
    assert {"cka/self", "cka/reference"} <= set(acc.Tags()["images"])
    from PIL import Image

    for tag in ("cka/self", "cka/reference"):
        images = acc.Images(tag)
        steps = [e.step for e in images]
        assert len(images) == EPOCHS
        assert steps == [e.step for e in acc.Scalars("val_loss")]  # the step of Lightning's val scalars
        assert all(a < b for a, b in itertools.pairwise(steps))
        for e in images:
            assert 100 <= e.width <= 3000 and 100 <= e.height <= 3000
            decoded = Image.open(io.BytesIO(e.encoded_image_string))
            assert decoded.size == (e.width, e.height)
            pixels = np.asarray(decoded.convert("RGB"))
            assert pixels.std() > 5  # a drawn heatmap, not a blank canvas


def test_tensorboard_scalars(vit_run):
    acc = events(vit_run.log_dir)
    scalars = set(acc.Tags()["scalars"])
    cb = vit_run.cb
    expected = {"cka/self/adjacent_mean", "cka/reference/best_match_mean"} | {
        f"cka/self/to_last/{row}" for row in cb.rows
    }
    assert expected <= scalars
    steps = [e.step for e in acc.Scalars("val_loss")]
    assert len(steps) == EPOCHS
    for tag in expected:
        assert [e.step for e in acc.Scalars(tag)] == steps, tag
    for event, record in zip(acc.Scalars("cka/self/adjacent_mean"), cb.history, strict=True):
        m = record["self"].matrix
        assert event.value == pytest.approx(float(torch.diagonal(m, 1).mean()), abs=1e-6)
    for i, row in enumerate(cb.rows):
        for event, record in zip(acc.Scalars(f"cka/self/to_last/{row}"), cb.history, strict=True):
            assert event.value == pytest.approx(float(record["self"].matrix[i, -1]), abs=1e-6)
    last_row = acc.Scalars(f"cka/self/to_last/{cb.rows[-1]}")
    assert all(e.value == pytest.approx(1.0, abs=1e-6) for e in last_row)
    for event, record in zip(acc.Scalars("cka/reference/best_match_mean"), cb.history, strict=True):
        m = record["reference"].matrix
        assert event.value == pytest.approx(float(m.amax(dim=1).mean()), abs=1e-6)


def test_npz_files(vit_run):
    cka_dir = vit_run.log_dir / "cka"
    cb = vit_run.cb
    for name, cols in (("self", cb.rows), ("reference", cb.cols)):
        files = sorted(cka_dir.glob(f"{name}_step*.npz"))
        assert len(files) == EPOCHS
        for path, record in zip(files, cb.history, strict=True):
            assert f"{record['step']:08d}" in path.name
            data = np.load(path)
            assert data["matrix"].shape == (len(cb.rows), len(cols))
            assert list(data["rows"]) == cb.rows
            assert list(data["cols"]) == cols
            np.testing.assert_allclose(data["matrix"], record[name].matrix.numpy(), atol=1e-12)


def test_final_self_matrix_equals_compare(vit_run):
    cb = vit_run.cb
    expected = cmp(vit_run.module, vit_run.val, cb.rows)
    got = cb.history[-1]["self"]
    assert got.rows == expected.rows
    assert max_diff(got.matrix, expected.matrix) < TOL
    # non-trivial: training moved the weights and the callback saw the final ones
    assert max_diff(got.matrix, vit_run.initial.matrix) > 1e-4
    assert torch.isfinite(got.matrix).all()


def test_final_reference_matrix_equals_compare(vit_run):
    cb = vit_run.cb
    expected = cmp(vit_run.module, vit_run.val, cb.rows, other=vit_run.ref, other_layers=cb.cols)
    got = cb.history[-1]["reference"]
    assert (got.rows, got.cols) == (expected.rows, expected.cols)
    assert max_diff(got.matrix, expected.matrix) < TOL
    assert float(got.matrix.std()) > 1e-4  # not a constant matrix


def test_hooks_armed_only_during_validation(vit_run, tmp_path):
    module, cb = vit_run.module, vit_run.cb
    base = vit_run.baseline
    assert H.hook_count(module) == base
    assert H.hook_count(vit_run.ref) == vit_run.ref_baseline
    assert module.training_steps == EPOCHS * TRAIN_BATCHES
    assert module.train_hooks == [base] * (EPOCHS * TRAIN_BATCHES)
    # every validation step sees the same set of hooks, at least one per chosen layer
    assert len(module.val_hooks) == EPOCHS * 2
    assert len(set(module.val_hooks)) == 1
    assert module.val_hooks[0] >= base + len(cb.rows)
    # trainer.validate afterwards: arms, computes the same matrix (same weights, same data), disarms
    cb2 = CKACallback(layers="sublayers", reference=vit_run.ref)
    H.trainer(tmp_path, callbacks=[cb2]).validate(module, vit_run.val, verbose=False)
    assert H.hook_count(module) == base
    assert H.hook_count(vit_run.ref) == vit_run.ref_baseline
    assert len(cb2.history) == 1
    assert max_diff(cb2.history[0]["self"].matrix, cb.history[-1]["self"].matrix) < 1e-12
    assert max_diff(cb2.history[0]["reference"].matrix, cb.history[-1]["reference"].matrix) < 1e-12


# --------------------------------------------------------------------------- nested model, other archs
def test_nested_torchvision_resnet(tmp_path):
    module = H.LitClassifier(H.tv_resnet18(), nested=True)
    val = H.loader(H.image_dataset(16, seed=1))
    cb = CKACallback()
    H.trainer(tmp_path, callbacks=[cb]).fit(module, H.loader(H.image_dataset(16)), val)
    assert cb.rows == [f"net.backbone.layer{s}.{j}" for s in range(1, 5) for j in range(2)]
    assert len(cb.history) == 2
    expected = cmp(module, val, "auto")
    assert expected.rows == cb.rows
    assert max_diff(cb.history[-1]["self"].matrix, expected.matrix) < TOL


def test_dict_batches_with_input_key_and_reference(tmp_path):
    class DictData(Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            x, y = self.base[i]
            return {"image": x, "label": y}

    class DictLit(H.LitClassifier):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return super().validation_step((batch["image"], batch["label"]), batch_idx, dataloader_idx)

    module = DictLit(H.timm_resnet("resnet10t"))
    ref = H.tiny_vit(depth=2, seed=3)
    val = H.loader(DictData(H.image_dataset(16, seed=1)))
    cb = CKACallback(reference=ref, input_key="image")
    H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    expected = cmp(module, val, "auto", other=ref, other_layers="auto", input_key="image")
    assert cb.history[0]["reference"].cols == ["blocks.0", "blocks.1"]
    assert max_diff(cb.history[0]["reference"].matrix, expected.matrix) < TOL


# --------------------------------------------------------------------------- configuration errors at setup
def _fit_expecting(tmp_path, module, callbacks, exc, match):
    with pytest.raises(exc, match=match) as info:
        H.trainer(tmp_path, callbacks=callbacks).fit(
            module, H.loader(H.image_dataset(16)), H.loader(H.image_dataset(8, seed=1))
        )
    assert module.training_steps == 0
    assert module.val_hooks == []
    assert H.hook_count(module) == 0
    return str(info.value)


def test_unknown_layer_name_lists_closest(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    msg = _fit_expecting(tmp_path, module, [CKACallback(layers=["model.blocks.0", "model.blokcs.1"])], ValueError, "")
    assert "model.blokcs.1" in msg
    assert "'model.blocks.1'" in msg  # the closest existing name is suggested


def test_glob_matching_nothing(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    msg = _fit_expecting(tmp_path, module, [CKACallback(layers="model.stages.*")], ValueError, "matches no module")
    assert "model.stages.*" in msg


def test_auto_on_unrecognised_model_says_how(tmp_path):
    module = H.LitClassifier(H.tiny_mlp())
    msg = _fit_expecting(tmp_path, module, [CKACallback()], ValueError, "auto")
    assert "named_modules" in msg and "layers=" in msg


def test_cls_reduction_on_resnet(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    _fit_expecting(tmp_path, module, [CKACallback(reduction="cls")], ValueError, "cls")


def test_cls_reduction_on_resnet_reference(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    ref = H.timm_resnet("resnet10t")
    _fit_expecting(tmp_path, module, [CKACallback(reduction="cls", reference=ref)], ValueError, "reference_layers")


def test_duplicate_log_prefix(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    cbs = [CKACallback(), CKACallback(layers="sublayers")]
    # The prefix is the callback's checkpoint key, so Lightning itself refuses the pair before setup.
    _fit_expecting(tmp_path, module, cbs, RuntimeError, "state_key. must be unique")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_epochs": 0},
        {"every_n_epochs": -1},
        {"max_batches": 0},
        {"max_examples": 0},
        {"reduction": "max"},
        {"reference": "resnet18"},
        {"reference": torch.zeros(3)},
        {"precision": "float16"},
    ],
)
def test_bad_init_arguments(kwargs):
    with pytest.raises((ValueError, TypeError)):
        CKACallback(**kwargs)


def test_two_callbacks_with_different_prefixes(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    val = H.loader(H.image_dataset(16, seed=1))
    a = CKACallback(layers="sublayers")
    b = CKACallback(layers="model.blocks.*.mlp", log_prefix="cka_mlp/")
    logger = TensorBoardLogger(str(tmp_path))
    H.trainer(tmp_path, callbacks=[a, b], logger=logger).fit(module, H.loader(H.image_dataset(16)), val)
    assert a.state_key != b.state_key
    assert len(a.history) == len(b.history) == 2
    assert b.rows == [f"model.blocks.{i}.mlp" for i in range(3)]
    assert a.history[-1]["self"].rows != b.history[-1]["self"].rows
    # same weights and data: b's matrix is the mlp sub-block of a's
    idx = [a.rows.index(r) for r in b.rows]
    for ra, rb in zip(a.history, b.history, strict=True):
        assert max_diff(ra["self"].matrix[idx][:, idx], rb["self"].matrix) < 1e-9
    acc = events(logger.log_dir)
    assert {"cka/self", "cka_mlp/self"} <= set(acc.Tags()["images"])
    assert len(acc.Images("cka/self")) == len(acc.Images("cka_mlp/self")) == 2
    assert "cka_mlp/self/to_last/model.blocks.2.mlp" in acc.Tags()["scalars"]
    assert "cka/self/to_last/model.blocks.2.mlp" in acc.Tags()["scalars"]
    assert len(list((Path(logger.log_dir) / "cka").glob("self_*.npz"))) == 2
    assert len(list((Path(logger.log_dir) / "cka_mlp").glob("self_*.npz"))) == 2


# --------------------------------------------------------------------------- when it runs, what it uses
class Snapshots(Callback):
    """Keep a copy of the weights at every (non-sanity) validation."""

    def __init__(self):
        self.states = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states.append(copy.deepcopy(pl_module.state_dict()))


def test_sanity_check_not_counted(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    val = H.loader(H.image_dataset(16, seed=1))
    cb, snaps = CKACallback(layers="sublayers"), Snapshots()
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb, snaps], num_sanity_val_steps=2, logger=logger)
    tr.fit(module, H.loader(H.image_dataset(16)), val)
    assert len(cb.history) == 2
    assert [r["epoch"] for r in cb.history] == [0, 1]
    assert [e.step for e in events(logger.log_dir).Images("cka/self")] == [1, 3]
    # epoch 0's matrix holds only epoch 0's data: sanity batches (initial weights) did not leak in
    probe = copy.deepcopy(module)
    probe.load_state_dict(snaps.states[0])
    assert max_diff(cb.history[0]["self"].matrix, cmp(probe, val, cb.rows).matrix) < TOL


def test_every_n_epochs(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(every_n_epochs=2)
    tr = H.trainer(tmp_path, callbacks=[cb], max_epochs=4, limit_train_batches=1)
    tr.fit(module, H.loader(H.image_dataset(8)), H.loader(H.image_dataset(8, seed=1)))
    assert len(module.val_global_steps) == 4
    assert [r["epoch"] for r in cb.history] == [0, 2]
    assert [r["step"] for r in cb.history] == [1, 3]
    # epochs that are skipped arm no hooks at all
    assert [h > 0 for h in module.val_hooks] == [True, False, True, False]


@pytest.mark.parametrize("cap", [{"max_batches": 2}, {"max_examples": 10}, {"max_examples": 16}])
def test_caps_equal_compare_max_batches(tmp_path, cap):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    val = H.loader(H.image_dataset(32, seed=1))  # 4 batches of 8
    cb = CKACallback(**cap)
    H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    expected = cmp(module, val, "auto", max_batches=2)  # 10 and 16 examples both mean two whole batches
    assert max_diff(cb.history[0]["self"].matrix, expected.matrix) < TOL
    assert max_diff(cb.history[0]["self"].matrix, cmp(module, val, "auto").matrix) > 1e-6
    assert H.hook_count(module) == 0
    # hooks are present only while the batches that count run
    assert [h > 0 for h in module.val_hooks] == [True, True, False, False]


def test_cap_does_not_warn_about_missing_layers(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(max_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H.trainer(tmp_path, callbacks=[cb]).validate(module, H.loader(H.image_dataset(24, seed=1)), verbose=False)
    assert len(cb.history) == 1
    assert not [w for w in caught if "produced no output" in str(w.message)]


def test_single_layer(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    val = H.loader(H.image_dataset(16, seed=1))
    cb = CKACallback(layers="model.blocks.1")
    H.trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(module, H.loader(H.image_dataset(8)), val)
    assert cb.history[-1]["self"].matrix.shape == (1, 1)
    assert cb.history[-1]["self"].matrix[0, 0] == pytest.approx(1.0)


def test_validate_alone_logs(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    val = H.loader(H.image_dataset(16, seed=1))
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path))
    H.trainer(tmp_path, callbacks=[cb], logger=logger).validate(module, val, verbose=False)
    assert len(cb.history) == 1 and cb.history[0]["step"] == 0
    images = events(logger.log_dir).Images("cka/self")
    assert [e.step for e in images] == [0]
    assert max_diff(cb.history[0]["self"].matrix, cmp(module, val, "sublayers").matrix) < TOL
    assert len(list((Path(logger.log_dir) / "cka").glob("self_step*.npz"))) == 1


def test_second_val_dataloader(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    dl0 = H.loader(H.image_dataset(16, seed=1))
    dl1 = H.loader(H.image_dataset(24, seed=2))
    cb = CKACallback(dataloader_idx=1)
    H.trainer(tmp_path, callbacks=[cb]).validate(module, [dl0, dl1], verbose=False)
    assert max_diff(cb.history[0]["self"].matrix, cmp(module, dl1, "auto").matrix) < TOL
    assert max_diff(cb.history[0]["self"].matrix, cmp(module, dl0, "auto").matrix) > 1e-6
    assert [h > 0 for h in module.val_hooks] == [False] * 2 + [True] * 3  # dl0 runs unhooked


def test_no_validation_data(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback()
    H.trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(module, H.loader(H.image_dataset(16)))
    assert module.training_steps == 2
    assert cb.history == []
    assert H.hook_count(module) == 0


def test_two_validations_per_epoch(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback()
    tr = H.trainer(tmp_path, callbacks=[cb], max_epochs=1, limit_train_batches=4, val_check_interval=2)
    tr.fit(module, H.loader(H.image_dataset(32)), H.loader(H.image_dataset(16, seed=1)))
    assert [(r["epoch"], r["step"]) for r in cb.history] == [(0, 2), (0, 4)]


def test_test_loop_is_not_hooked(tmp_path):
    class WithTest(H.LitClassifier):
        def test_step(self, batch, batch_idx):
            self.val_hooks.append(H.hook_count(self))

    module = WithTest(H.tiny_vit(depth=2))
    cb = CKACallback()
    H.trainer(tmp_path, callbacks=[cb]).test(module, H.loader(H.image_dataset(16)), verbose=False)
    assert module.val_hooks == [0, 0]
    assert cb.history == []


def test_history_tensors_are_ordinary_tensors(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(reference=H.timm_resnet("resnet10t"))
    H.trainer(tmp_path, callbacks=[cb]).validate(module, H.loader(H.image_dataset(16, seed=1)), verbose=False)
    for name in ("self", "reference"):
        matrix = cb.history[-1][name].matrix
        assert not matrix.is_inference(), name
        matrix.fill_diagonal_(0.0)  # e.g. masking the diagonal before plotting


def test_reference_that_is_the_model_itself(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    val = H.loader(H.image_dataset(32, seed=1))
    cb = CKACallback(reference=module.model)
    H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    expected = cmp(module, val, "auto")
    assert max_diff(cb.history[0]["self"].matrix, expected.matrix) < TOL
    # CKA of a model against itself is its self-CKA matrix
    assert max_diff(cb.history[0]["reference"].matrix, expected.matrix) < TOL


# --------------------------------------------------------------------------- loggers
def test_no_logger(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(layers="sublayers")
    tr = H.trainer(tmp_path, callbacks=[cb], logger=False)
    tr.fit(module, H.loader(H.image_dataset(16)), H.loader(H.image_dataset(16, seed=1)))
    assert tr.loggers == []
    assert len(cb.history) == 2
    assert all(torch.isfinite(r["self"].matrix).all() for r in cb.history)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_csv_logger_writes_png_figures(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(reference=H.timm_resnet("resnet10t"))
    logger = CSVLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger)
    tr.fit(module, H.loader(H.image_dataset(16)), H.loader(H.image_dataset(16, seed=1)))
    from PIL import Image

    figures = Path(logger.log_dir) / "figures"
    self_pngs = sorted(figures.glob("cka_self_step*.png"))
    ref_pngs = sorted(figures.glob("cka_reference_step*.png"))
    assert [p.name for p in self_pngs] == ["cka_self_step00000001.png", "cka_self_step00000003.png"]
    assert len(ref_pngs) == 2
    with Image.open(self_pngs[0]) as img:
        assert img.width > 100 and img.height > 100
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "cka/self/adjacent_mean" in metrics
    assert len(list((Path(logger.log_dir) / "cka").glob("*.npz"))) == 4


# --------------------------------------------------------------------------- resume
def test_resume_restores_history_and_keeps_steps_unique(tmp_path):
    val = H.loader(H.image_dataset(16, seed=1))
    train = H.loader(H.image_dataset(16))
    ckpt_dir = tmp_path / "ckpt"
    cb1 = CKACallback()
    first = H.trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[cb1, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        enable_checkpointing=True,
        logger=TensorBoardLogger(str(tmp_path), version=0),
    )
    first.fit(H.LitClassifier(H.tiny_vit(depth=2)), train, val)
    assert len(cb1.history) == 2
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert ckpt["callbacks"][cb1.state_key].keys() == {"history", "layers", "validations", "analyses"}

    cb2 = CKACallback()
    assert cb2.state_key == cb1.state_key
    module = H.LitClassifier(H.tiny_vit(depth=2, seed=7))
    logger = TensorBoardLogger(str(tmp_path), version=0)
    second = H.trainer(
        tmp_path,
        max_epochs=4,
        callbacks=[cb2, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        enable_checkpointing=True,
        logger=logger,
    )
    second.fit(module, train, val, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert [r["epoch"] for r in cb2.history] == [0, 1, 2, 3]
    assert [r["step"] for r in cb2.history] == [2, 4, 6, 8]
    for old, new in zip(cb1.history, cb2.history[:2], strict=True):
        assert max_diff(old["self"].matrix, new["self"].matrix) == 0.0
        assert old["self"].rows == new["self"].rows
    assert max_diff(cb2.history[-1]["self"].matrix, cmp(module, val, "auto").matrix) < TOL
    # read each event file on its own (the accumulator would purge out-of-order steps)
    files = event_files(logger.log_dir)
    assert len(files) >= 2
    steps = [e.step for f in files for e in events(f).Images("cka/self")]
    assert sorted(steps) == [1, 3, 5, 7]  # the steps of Lightning's val scalars
    assert len(steps) == len(set(steps))


# --------------------------------------------------------------------------- small batches
def test_small_tail_batch_warns_and_is_skipped(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    data = H.image_dataset(18, seed=1)
    cb = CKACallback()
    with pytest.warns(UserWarning, match="at least 4"):
        H.trainer(tmp_path, callbacks=[cb]).validate(module, H.loader(data), verbose=False)
    assert len(cb.history) == 1
    full_batches_only = cmp(module, H.loader(Subset(data, range(16))), "auto")
    assert max_diff(cb.history[0]["self"].matrix, full_batches_only.matrix) < TOL
    assert torch.isfinite(cb.history[0]["self"].matrix).all()


def test_only_tiny_batches_gives_no_entry(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    cb = CKACallback()
    with pytest.warns(UserWarning, match="at least 4"):
        H.trainer(tmp_path, callbacks=[cb]).validate(module, H.loader(H.image_dataset(3)), verbose=False)
    assert [key for record in cb.history for key in record if key in ("self", "reference")] == []
    assert H.hook_count(module) == 0


# --------------------------------------------------------------------------- failures mid-validation
def test_exception_in_validation_removes_hooks(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2), fail_val_batch=1)
    cb = CKACallback()
    with pytest.raises(RuntimeError, match="boom"):
        H.trainer(tmp_path, callbacks=[cb]).fit(
            module, H.loader(H.image_dataset(16)), H.loader(H.image_dataset(16, seed=1))
        )
    assert len(module.val_hooks) == 1 and module.val_hooks[0] >= 2  # armed for the batch that ran
    assert H.hook_count(module) == 0
    assert cb.history == []


def test_failing_reference_warns_and_is_skipped(tmp_path):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = H.timm_resnet("resnet10t")

        def forward(self, x):
            raise RuntimeError("reference exploded")

    module = H.LitClassifier(H.tiny_vit(depth=2))
    ref = Broken()
    cb = CKACallback(reference=ref, reference_layers="auto")
    val = H.loader(H.image_dataset(16, seed=1))
    with pytest.warns(UserWarning, match="reference.*failed"):
        H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    assert max_diff(cb.history[0]["self"].matrix, cmp(module, val, "auto").matrix) < TOL
    assert "reference" not in cb.history[0]  # no batch had a reference result
    assert H.hook_count(module, ref) == 0


# --------------------------------------------------------------------------- memory over many epochs
class Probe(Callback):
    """Count hooks, gc objects and live matplotlib Figures at chosen validation epochs."""

    def __init__(self, at):
        self.at = set(at)
        self.objects = {}
        self.figures = {}
        self.hooks = []

    def on_validation_epoch_end(self, trainer, pl_module):
        from matplotlib.figure import Figure

        self.hooks.append(H.hook_count(pl_module))
        if trainer.current_epoch in self.at:
            gc.collect()
            objs = gc.get_objects()
            self.objects[trainer.current_epoch] = len(objs)
            self.figures[trainer.current_epoch] = sum(isinstance(o, Figure) for o in objs)
            del objs


@pytest.mark.slow
def test_memory_flat_over_many_epochs(tmp_path):
    import matplotlib.pyplot as plt

    epochs = 50
    module = H.LitClassifier(H.tiny_mlp())
    cb = CKACallback(layers=["model.1", "model.2", "model.3"])
    probe = Probe(at=(9, epochs - 1))
    tr = H.trainer(
        tmp_path,
        callbacks=[cb, probe],
        max_epochs=epochs,
        limit_train_batches=1,
        logger=TensorBoardLogger(str(tmp_path)),
        log_every_n_steps=1,
    )
    tr.fit(module, H.loader(H.image_dataset(8)), H.loader(H.image_dataset(8, seed=1)))
    assert len(cb.history) == epochs
    assert module.val_hooks == [3] * epochs  # armed each validation, never stacked
    assert probe.hooks == [0] * epochs  # and removed by the end of each
    assert H.hook_count(module) == 0
    assert plt.get_fignums() == []
    assert probe.figures[epochs - 1] - probe.figures[9] <= 1
    # one heatmap figure alone is thousands of gc objects; history/logging add a few per epoch
    growth = probe.objects[epochs - 1] - probe.objects[9]
    assert growth < 50 * (epochs - 10), growth
    assert len(event_files(Path(tr.logger.log_dir))) == 1
    assert len(events(tr.logger.log_dir).Images("cka/self")) == epochs
