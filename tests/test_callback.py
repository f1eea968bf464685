"""End-to-end tests of CKACallback: real Trainer runs, real TensorBoard event files, compare() as oracle.

The topics have their own files: validation schedules (``test_schedules.py``), loggers
(``test_loggers.py``), setup errors (``test_setup_errors.py``), interruptions and resume
(``test_resume.py``), unusable batches (``test_unusable_batches.py``), torch.compile
(``test_compile.py``), two callbacks (``test_two_callbacks.py``), DDP (``test_callback_ddp.py``).
"""

from __future__ import annotations

import gc
import io
from pathlib import Path
from types import SimpleNamespace

import helpers as H
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import Dataset

from lightning_cka import CKACallback

# --------------------------------------------------------------------------- one shared ViT run
EPOCHS = 3
TRAIN_BATCHES = 2


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """ViT (depth 3) with sublayers vs a timm ResNet reference, 3 epochs, TensorBoard."""
    root = tmp_path_factory.mktemp("vit_run")
    module = H.LitClassifier(H.tiny_vit(depth=3))
    ref = H.timm_resnet("resnet10t", seed=1)
    val = H.val_data()
    baseline = H.hook_count(module)
    ref_baseline = H.hook_count(ref)
    initial = H.cmp(module, val, "sublayers")
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
    files = H.event_files(vit_run.log_dir)
    assert len(files) == 1
    acc = H.events(vit_run.log_dir)
    assert {"cka/self", "cka/reference"} <= set(acc.Tags()["images"])
    from PIL import Image

    for tag in ("cka/self", "cka/reference"):
        images = acc.Images(tag)
        steps = [e.step for e in images]
        assert len(images) == EPOCHS
        assert steps == [e.step for e in acc.Scalars("val_loss")]  # the step of Lightning's val scalars
        assert H.strictly_increasing(steps)
        for e in images:
            assert 100 <= e.width <= 3000 and 100 <= e.height <= 3000
            decoded = Image.open(io.BytesIO(e.encoded_image_string))
            assert decoded.size == (e.width, e.height)
            pixels = np.asarray(decoded.convert("RGB"))
            assert pixels.std() > 5  # a drawn heatmap, not a blank canvas


def test_tensorboard_scalars(vit_run):
    acc = H.events(vit_run.log_dir)
    scalars = set(acc.Tags()["scalars"])
    cb = vit_run.cb
    expected = {"cka/self/adjacent_mean", "cka/reference/best_match_mean"} | {
        f"cka/self/to_last/{row.removeprefix('model.')}" for row in cb.rows
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
        tag = f"cka/self/to_last/{row.removeprefix('model.')}"
        for event, record in zip(acc.Scalars(tag), cb.history, strict=True):
            assert event.value == pytest.approx(float(record["self"].matrix[i, -1]), abs=1e-6)
    last_row = acc.Scalars(f"cka/self/to_last/{cb.rows[-1].removeprefix('model.')}")
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
    expected = H.cmp(vit_run.module, vit_run.val, cb.rows)
    got = cb.history[-1]["self"]
    assert got.rows == expected.rows
    assert H.max_diff(got.matrix, expected.matrix) < H.TOL
    # non-trivial: training moved the weights and the callback saw the final ones
    assert H.max_diff(got.matrix, vit_run.initial.matrix) > 1e-4
    assert torch.isfinite(got.matrix).all()


def test_final_reference_matrix_equals_compare(vit_run):
    cb = vit_run.cb
    expected = H.cmp(vit_run.module, vit_run.val, cb.rows, other=vit_run.ref, other_layers=cb.cols)
    got = cb.history[-1]["reference"]
    assert (got.rows, got.cols) == (expected.rows, expected.cols)
    assert H.max_diff(got.matrix, expected.matrix) < H.TOL
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
    assert H.max_diff(cb2.history[0]["self"].matrix, cb.history[-1]["self"].matrix) < 1e-12
    assert H.max_diff(cb2.history[0]["reference"].matrix, cb.history[-1]["reference"].matrix) < 1e-12


# --------------------------------------------------------------------------- nested model, other archs, batches
def test_nested_torchvision_resnet(tmp_path):
    module = H.LitClassifier(H.tv_resnet18(), nested=True)
    val = H.val_data()
    cb = CKACallback()
    H.trainer(tmp_path, callbacks=[cb]).fit(module, H.train_data(16), val)
    assert cb.rows == [f"net.backbone.layer{s}.{j}" for s in range(1, 5) for j in range(2)]
    assert len(cb.history) == 2
    expected = H.cmp(module, val, "auto")
    assert expected.rows == cb.rows
    assert H.max_diff(cb.history[-1]["self"].matrix, expected.matrix) < H.TOL


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
    expected = H.cmp(module, val, "auto", other=ref, other_layers="auto", input_key="image")
    assert cb.history[0]["reference"].cols == ["blocks.0", "blocks.1"]
    assert H.max_diff(cb.history[0]["reference"].matrix, expected.matrix) < H.TOL


def test_single_layer(tmp_path):
    module = H.vit_module()
    cb = CKACallback(layers="model.blocks.1")
    H.trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(module, H.loader(H.image_dataset(8)), H.val_data())
    assert cb.history[-1]["self"].matrix.shape == (1, 1)
    assert cb.history[-1]["self"].matrix[0, 0] == pytest.approx(1.0)


def test_history_tensors_are_ordinary_tensors(tmp_path):
    module = H.vit_module()
    cb = CKACallback(reference=H.timm_resnet("resnet10t"))
    H.trainer(tmp_path, callbacks=[cb]).validate(module, H.val_data(), verbose=False)
    for name in ("self", "reference"):
        matrix = cb.history[-1][name].matrix
        assert not matrix.is_inference(), name
        matrix.fill_diagonal_(0.0)  # e.g. masking the diagonal before plotting
        assert torch.count_nonzero(torch.diagonal(matrix)) == 0, name


# --------------------------------------------------------------------------- the reference model
def test_reference_that_is_the_model_itself(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    val = H.val_data(32)
    cb = CKACallback(reference=module.model)
    H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    expected = H.cmp(module, val, "auto")
    assert H.max_diff(cb.history[0]["self"].matrix, expected.matrix) < H.TOL
    # CKA of a model against itself is its self-CKA matrix
    assert H.max_diff(cb.history[0]["reference"].matrix, expected.matrix) < H.TOL


def test_failing_reference_warns_and_is_skipped(tmp_path):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = H.timm_resnet("resnet10t")

        def forward(self, x):
            raise RuntimeError("reference exploded")

    module = H.vit_module()
    ref = Broken()
    cb = CKACallback(reference=ref, reference_layers="auto")
    val = H.val_data()
    with pytest.warns(UserWarning, match="reference.*failed"):
        H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(module, val, "auto").matrix) < H.TOL
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
            # type(o), not isinstance(o, ...): reading __class__ of every live object trips deprecation shims
            self.figures[trainer.current_epoch] = sum(issubclass(type(o), Figure) for o in objs)
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
    )
    tr.fit(module, H.loader(H.image_dataset(8)), H.val_data(8))
    assert len(cb.history) == epochs
    assert module.val_hooks == [3] * epochs  # armed each validation, never stacked
    assert probe.hooks == [0] * epochs  # and removed by the end of each
    assert H.hook_count(module) == 0
    assert plt.get_fignums() == []
    assert probe.figures[epochs - 1] - probe.figures[9] <= 1
    # one heatmap figure alone is thousands of gc objects; history/logging add a few per epoch
    growth = probe.objects[epochs - 1] - probe.objects[9]
    assert growth < 50 * (epochs - 10), growth
    assert len(H.event_files(Path(tr.logger.log_dir))) == 1
    assert len(H.events(tr.logger.log_dir).Images("cka/self")) == epochs
