"""When CKACallback measures and on what: the validation schedule (sanity checks, every_n_epochs,
val_check_interval, check_val_every_n_epoch), batch caps, limit_val_batches, several validation
dataloaders, gradient accumulation, mixed precision, and the loops it stays out of."""

from __future__ import annotations

import warnings
from pathlib import Path

import helpers as H
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_cka import CKACallback

ROWS = [f"model.blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]


# --------------------------------------------------------------------------- validation schedule
def test_sanity_check_not_counted(tmp_path):
    module = H.vit_module()
    val = H.val_data()
    cb, snaps = CKACallback(layers="sublayers"), H.Snapshots()
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb, snaps], num_sanity_val_steps=2, logger=logger)
    tr.fit(module, H.train_data(16), val)
    assert len(cb.history) == 2
    assert [r["epoch"] for r in cb.history] == [0, 1]
    assert [e.step for e in H.events(logger.log_dir).Images("cka/self")] == [1, 3]
    # epoch 0's matrix holds only epoch 0's data: sanity batches (initial weights) did not leak in
    probe = H.with_weights(module, snaps.states[0])
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(probe, val, cb.rows).matrix) < H.TOL


def test_every_n_epochs(tmp_path):
    module = H.vit_module()
    cb = CKACallback(every_n_epochs=2)
    tr = H.trainer(tmp_path, callbacks=[cb], max_epochs=4, limit_train_batches=1)
    tr.fit(module, H.loader(H.image_dataset(8)), H.val_data(8))
    assert len(module.val_global_steps) == 4
    assert [r["epoch"] for r in cb.history] == [0, 2]
    assert [r["step"] for r in cb.history] == [1, 3]
    # epochs that are skipped arm no hooks at all
    assert [h > 0 for h in module.val_hooks] == [True, False, True, False]


def test_every_n_epochs_follows_the_validation_schedule(tmp_path):
    module = H.vit_module()
    cb = CKACallback(layers="sublayers", every_n_epochs=2)
    tr = H.trainer(tmp_path, callbacks=[cb], max_epochs=8, check_val_every_n_epoch=2)
    tr.fit(module, H.train_data(16), H.val_data())
    assert module.val_epochs == [1, 3, 5, 7]
    assert [r["epoch"] for r in cb.history] == [1, 5]  # every 2nd validation


def test_two_validations_per_epoch(tmp_path):
    module = H.vit_module()
    cb = CKACallback()
    tr = H.trainer(tmp_path, callbacks=[cb], max_epochs=1, limit_train_batches=4, val_check_interval=2)
    tr.fit(module, H.train_data(), H.val_data())
    assert [(r["epoch"], r["step"]) for r in cb.history] == [(0, 2), (0, 4)]


def test_val_check_interval_half_epoch(tmp_path):
    module = H.vit_module()
    val = H.val_data()
    cb, snaps = CKACallback(layers="sublayers"), H.Snapshots()
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(
        tmp_path, callbacks=[cb, snaps], logger=logger, max_epochs=2, limit_train_batches=4, val_check_interval=0.5
    )
    tr.fit(module, H.train_data(), val)
    assert [r["epoch"] for r in cb.history] == [0, 0, 1, 1]  # two entries per epoch
    steps = [r["step"] for r in cb.history]
    assert steps == [2, 4, 6, 8] and H.strictly_increasing(steps)
    # CKA data lands on the step of Lightning's validation scalars
    assert H.tb_steps(logger.log_dir, "cka/self") == H.tb_steps(logger.log_dir, "val_loss") == [s - 1 for s in steps]
    assert H.tb_steps(logger.log_dir, "cka/self/adjacent_mean") == H.tb_steps(logger.log_dir, "val_loss")
    assert len(list((Path(logger.log_dir) / "cka").glob("self_step*.npz"))) == 4
    for record, state in zip(cb.history, snaps.states, strict=True):
        expected = H.cmp(H.with_weights(module, state), val, "sublayers")
        assert H.max_diff(record["self"].matrix, expected.matrix) < H.TOL


def test_gradient_accumulation(tmp_path):
    module = H.vit_module()
    val = H.val_data()
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, accumulate_grad_batches=2, limit_train_batches=4)
    tr.fit(module, H.train_data(), val)
    assert module.training_steps == 8
    assert [(r["epoch"], r["step"]) for r in cb.history] == [(0, 2), (1, 4)]  # optimizer steps, not batches
    assert H.tb_steps(logger.log_dir, "cka/self") == H.tb_steps(logger.log_dir, "val_loss") == [1, 3]
    assert H.max_diff(cb.history[-1]["self"].matrix, H.cmp(module, val, "sublayers").matrix) < H.TOL
    assert module.train_hooks == [0] * 8


# --------------------------------------------------------------------------- what is measured
@pytest.mark.parametrize("cap", [{"max_batches": 2}, {"max_examples": 10}, {"max_examples": 16}])
def test_caps_equal_compare_max_batches(tmp_path, cap):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    val = H.val_data(32)  # 4 batches of 8
    cb = CKACallback(**cap)
    H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    expected = H.cmp(module, val, "auto", max_batches=2)  # 10 and 16 examples both mean two whole batches
    assert H.max_diff(cb.history[0]["self"].matrix, expected.matrix) < H.TOL
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(module, val, "auto").matrix) > 1e-6
    assert H.hook_count(module) == 0
    # hooks are present only while the batches that count run
    assert [h > 0 for h in module.val_hooks] == [True, True, False, False]


def test_cap_does_not_warn_about_missing_layers(tmp_path):
    module = H.vit_module()
    cb = CKACallback(max_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H.trainer(tmp_path, callbacks=[cb]).validate(module, H.val_data(24), verbose=False)
    assert len(cb.history) == 1
    assert not [w for w in caught if "produced no output" in str(w.message)]


@pytest.mark.parametrize("limit", [0.5, 2])
def test_limit_val_batches(tmp_path, limit):
    module = H.vit_module()
    val = H.val_data(32)  # 4 batches of 8
    cb = CKACallback(layers="sublayers")
    tr = H.trainer(tmp_path, callbacks=[cb], limit_val_batches=limit, max_epochs=1)
    tr.fit(module, H.train_data(16), val)
    assert module.val_batch_indices == [0, 1]
    assert len(cb.history) == 1
    expected = H.cmp(module, val, "sublayers", max_batches=2)
    assert H.max_diff(cb.history[0]["self"].matrix, expected.matrix) < H.TOL
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(module, val, "sublayers").matrix) > 1e-6


def test_limit_val_batches_zero(tmp_path):
    module = H.vit_module()
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, limit_val_batches=0)
    tr.fit(module, H.train_data(16), H.val_data())
    assert module.training_steps == 4
    assert module.val_batch_indices == []
    assert cb.history == []
    tags = H.tb_tags(logger.log_dir)
    assert not [t for t in tags if t.startswith(("cka", "norm_ratio", "attention_distance"))], tags
    assert not list(Path(tmp_path).rglob("*.npz"))
    assert H.hook_count(module) == 0


def test_no_validation_data(tmp_path):
    module = H.vit_module()
    cb = CKACallback()
    with pytest.warns(UserWarning, match="no `val_dataloader`. Skipping val loop"):
        H.trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(module, H.train_data(16))
    assert module.training_steps == 2
    assert cb.history == []
    assert H.hook_count(module) == 0


def test_test_loop_is_not_hooked(tmp_path):
    class WithTest(H.LitClassifier):
        def test_step(self, batch, batch_idx):
            self.val_hooks.append(H.hook_count(self))

    module = WithTest(H.tiny_vit(depth=2))
    cb = CKACallback()
    H.trainer(tmp_path, callbacks=[cb]).test(module, H.train_data(16), verbose=False)
    assert module.val_hooks == [0, 0]
    assert cb.history == []


# --------------------------------------------------------------------------- several dataloaders
def test_second_val_dataloader(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    dl0, dl1 = H.val_data(16, seed=1), H.val_data(24, seed=2)
    cb = CKACallback(dataloader_idx=1)
    H.trainer(tmp_path, callbacks=[cb]).validate(module, [dl0, dl1], verbose=False)
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(module, dl1, "auto").matrix) < H.TOL
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(module, dl0, "auto").matrix) > 1e-6
    assert [h > 0 for h in module.val_hooks] == [False] * 2 + [True] * 3  # dl0 runs unhooked


def test_several_val_dataloaders(tmp_path):
    module = H.vit_module()
    dl0, dl1 = H.val_data(16, seed=1), H.val_data(24, seed=2)
    first = CKACallback(layers="sublayers")  # dataloader_idx=0 by default
    second = CKACallback(layers="sublayers", dataloader_idx=1, log_prefix="cka_dl1")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[first, second], logger=logger, max_epochs=1)
    tr.fit(module, H.train_data(16), [dl0, dl1])
    assert len(first.history) == len(second.history) == 1
    on0, on1 = H.cmp(module, dl0, "sublayers").matrix, H.cmp(module, dl1, "sublayers").matrix
    assert H.max_diff(on0, on1) > 1e-6
    assert H.max_diff(first.history[0]["self"].matrix, on0) < H.TOL
    assert H.max_diff(second.history[0]["self"].matrix, on1) < H.TOL
    assert H.tb_steps(logger.log_dir, "cka/self") == H.tb_steps(logger.log_dir, "cka_dl1/self") == [1]
    assert H.hook_count(module) == 0


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_matches_float32(tmp_path, precision):
    module = H.vit_module()
    val = H.val_data()
    # a short fit under mixed precision, then validate the same weights at 32-true and mixed
    fit_cb = CKACallback(layers="sublayers")
    tr = _mixed_precision_trainer(tmp_path, precision, callbacks=[fit_cb], max_epochs=1)
    # on CPU Lightning replaces 16-mixed by bf16-mixed (with a warning); it cannot be run here
    assert tr.precision == "bf16-mixed"
    tr.fit(module, H.train_data(16), val)
    assert len(fit_cb.history) == 1

    results = {}
    for p in ("32-true", precision):
        cb = CKACallback(layers="sublayers")
        _mixed_precision_trainer(tmp_path, p, callbacks=[cb]).validate(module, val, verbose=False)
        assert len(cb.history) == 1
        results[p] = cb.history[0]
    full, mixed = results["32-true"]["self"].matrix, results[precision]["self"].matrix
    assert H.max_diff(full, H.cmp(module, val, "sublayers").matrix) < H.TOL
    assert H.max_diff(mixed, full) < 1e-3
    assert H.max_diff(mixed, full) > 0  # autocast really was on: bf16 activations differ a little
    assert H.max_diff(fit_cb.history[0]["self"].matrix, mixed) < 1e-12  # same weights, same precision
    assert torch.isfinite(mixed).all()
    # the other signals survive autocast too
    for key in ("norm_ratio",):
        a, b = results["32-true"][key], results[precision][key]
        assert a.keys() == b.keys() and a
        for series in a:
            assert b[series] == pytest.approx(a[series], rel=2e-2), series
    for layer, heads in results["32-true"]["attention_distance"].items():
        assert results[precision]["attention_distance"][layer] == pytest.approx(heads, rel=1e-2)
    assert H.hook_count(module) == 0


def _mixed_precision_trainer(tmp_path, precision, **kwargs):
    """A Trainer at ``precision``; "16-mixed" on CPU must warn that Lightning falls back to bf16."""
    if precision != "16-mixed":
        return H.trainer(tmp_path, precision=precision, **kwargs)
    with pytest.warns(UserWarning, match="bf16"):
        return H.trainer(tmp_path, precision=precision, **kwargs)
