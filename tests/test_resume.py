"""CKACallback across interruptions: exceptions and KeyboardInterrupt mid-validation, crashed jobs,
checkpoints (end of epoch, mid-epoch, after each of several validations) and resuming from them."""

from __future__ import annotations

import signal
import warnings
from collections import Counter
from pathlib import Path

import helpers as H
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerStatus

from lightning_cka import CKACallback

SUBLAYERS = [f"blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]
ROWS = [f"model.{n}" for n in SUBLAYERS]

# Lightning's notes on the deliberate setups below: a second run writing into the first run's
# checkpoint folder, resuming without the ModelCheckpoint that wrote the checkpoint, or with
# the default one (whose folder differs from the first run's).
reuses_checkpoint_dir = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
resumes_without_its_checkpoint_callback = pytest.mark.filterwarnings(
    "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided"
)
resumes_with_another_checkpoint_dir = pytest.mark.filterwarnings("ignore:The dirpath has changed from")


class InterruptingLit(H.LitClassifier):
    interrupt_at: tuple[int, int] | None = None  # (epoch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if not self.trainer.sanity_checking and (self.current_epoch, batch_idx) == self.interrupt_at:
            raise KeyboardInterrupt
        return super().validation_step(batch, batch_idx, dataloader_idx)


class CrashAt(Callback):
    """Raise at the start of the training batch that sees ``global_step == step`` (a crashed job)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("node died")


# --------------------------------------------------------------------------- exceptions mid-validation
def test_exception_in_validation_removes_hooks(tmp_path):
    module = H.vit_module(fail_val_batch=1)
    cb = CKACallback()
    with pytest.raises(RuntimeError, match="boom"):
        H.trainer(tmp_path, callbacks=[cb]).fit(module, H.train_data(16), H.val_data())
    assert len(module.val_hooks) == 1 and module.val_hooks[0] >= 2  # armed for the batch that ran
    assert H.hook_count(module) == 0
    assert cb.history == []


def test_exception_in_validate_then_validate_again(tmp_path):
    module = H.vit_module(fail_val_batch=2)
    val = H.val_data(32)
    baseline = H.hook_count(module)
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path), version=0)
    with pytest.raises(RuntimeError, match="boom"):
        H.trainer(tmp_path, callbacks=[cb], logger=logger).validate(module, val, verbose=False)
    assert module.val_batch_indices == [0, 1]
    assert module.val_hooks[0] >= baseline + len(ROWS)  # it was armed
    assert H.hook_count(module) == baseline
    assert cb.history == []
    assert "cka/self" not in H.tb_tags(logger.log_dir)
    assert not list(Path(tmp_path).rglob("*.npz"))

    module.fail_val_batch = None
    logger = TensorBoardLogger(str(tmp_path), version=0)
    with pytest.warns(UserWarning, match=r"Convergence \(cka\): a measured validation ended early"):  # the aborted one
        H.trainer(tmp_path, callbacks=[cb], logger=logger).validate(module, val, verbose=False)
    assert len(cb.history) == 1
    # nothing of the aborted loop leaked into the sums
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(module, val, "sublayers").matrix) < H.TOL
    assert H.tb_steps(logger.log_dir, "cka/self") == [0]
    assert H.hook_count(module) == baseline


def test_keyboard_interrupt_in_fit_then_resume(tmp_path):
    torch._dynamo.reset()
    calls: Counter = Counter()
    net = H.tiny_vit(depth=2)
    compiled = torch.compile(net, backend=H.counting_backend("aot_eager", calls))
    compiled_forward = compiled.__dict__["forward"]
    module = InterruptingLit(compiled)
    module.interrupt_at = (1, 1)
    val = H.val_data(24)
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path), version=0)
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, max_epochs=3)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        # Lightning: on_exception, teardown, then sys.exit(1)
        # (pytest.warns does not check a block left by SystemExit: record by hand)
        with pytest.raises(SystemExit) as info, warnings.catch_warnings(record=True) as caught:
            tr.fit(module, H.train_data(16), val)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT from then on
    assert [str(w.message).split(" is compiled")[0] for w in caught] == ["CKACallback: model (torch.compile)"]
    assert info.value.code == 1
    assert tr.state.status == TrainerStatus.INTERRUPTED
    assert module.val_batch_indices == [0, 1, 2, 0]  # epoch 1 stopped inside batch 1
    assert H.hook_count(module) == 0
    assert compiled.__dict__["forward"] is compiled_forward  # compiled again, not left eager
    assert [r["epoch"] for r in cb.history] == [0]  # no partial entry for epoch 1
    assert H.tb_steps(logger.log_dir, "cka/self") == H.tb_steps(logger.log_dir, "val_loss") == [1]
    assert len(list((Path(logger.log_dir) / "cka").glob("self_step*.npz"))) == 1

    module.interrupt_at = None
    before = calls["train"]
    logger = TensorBoardLogger(str(tmp_path), version=0)
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, max_epochs=1)
    ended_early = r"Convergence \(cka\): a measured validation ended early"
    with H.warns("is compiled", ended_early), warnings.catch_warnings():
        # Lightning left the module in eval mode when the interrupt hit its validation loop
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
        tr.fit(module, H.train_data(16), val)
    assert tr.state.status == TrainerStatus.FINISHED
    assert calls["train"] > before  # training still compiled
    assert len(cb.history) == 2
    assert H.max_diff(cb.history[-1]["self"].matrix, H.cmp(net, val, SUBLAYERS).matrix) < H.TOL
    assert H.hook_count(module) == 0


# --------------------------------------------------------------------------- checkpoints and resume
@reuses_checkpoint_dir
def test_resume_restores_history_and_keeps_steps_unique(tmp_path):
    val, train = H.val_data(), H.train_data(16)
    ckpt_dir = tmp_path / "ckpt"
    cb1 = CKACallback()
    first = H.trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[cb1, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        enable_checkpointing=True,
        logger=TensorBoardLogger(str(tmp_path), version=0),
    )
    first.fit(H.vit_module(), train, val)
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
        assert H.max_diff(old["self"].matrix, new["self"].matrix) == 0.0
        assert old["self"].rows == new["self"].rows
    assert H.max_diff(cb2.history[-1]["self"].matrix, H.cmp(module, val, "auto").matrix) < H.TOL
    # read each event file on its own (the accumulator would purge out-of-order steps)
    files = H.event_files(logger.log_dir)
    assert len(files) == 2  # one per run
    per_file = [[e.step for e in H.events(f).Images("cka/self")] for f in files]
    assert per_file == [[1, 3], [5, 7]]  # the steps of Lightning's val scalars, never repeated
    assert H.tb_steps(logger.log_dir, "cka/self") == H.tb_steps(logger.log_dir, "val_loss") == [1, 3, 5, 7]


@reuses_checkpoint_dir
@resumes_without_its_checkpoint_callback
def test_resume_from_mid_epoch_checkpoint(tmp_path):
    val, train = H.val_data(), H.train_data()
    ckpt_dir = tmp_path / "ckpt"
    options = {"max_epochs": 2, "limit_train_batches": 4, "val_check_interval": 0.5, "enable_checkpointing": True}

    cb1 = CKACallback(layers="sublayers")
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_last=True, save_top_k=-1)
    first = H.trainer(
        tmp_path, callbacks=[cb1, saver, CrashAt(3)], logger=TensorBoardLogger(str(tmp_path), version=0), **options
    )
    with pytest.raises(RuntimeError, match="node died"):
        first.fit(H.vit_module(), train, val)
    assert [r["step"] for r in cb1.history] == [2]
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0  # written mid-epoch
    assert [r["step"] for r in ckpt["callbacks"][cb1.state_key]["history"]] == [2]

    cb2, snaps = CKACallback(layers="sublayers"), H.Snapshots()
    module = H.LitClassifier(H.tiny_vit(depth=2, seed=7))
    logger = TensorBoardLogger(str(tmp_path), version=0)
    second = H.trainer(tmp_path, callbacks=[cb2, snaps, ModelCheckpoint(dirpath=ckpt_dir)], logger=logger, **options)
    with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before the epoch ended"):
        second.fit(module, train, val, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert [(r["epoch"], r["step"]) for r in cb2.history] == [(0, 2), (0, 4), (1, 6), (1, 8)]
    assert H.max_diff(cb2.history[0]["self"].matrix, cb1.history[0]["self"].matrix) == 0.0
    for record, state in zip(cb2.history[1:], snaps.states, strict=True):
        assert H.max_diff(record["self"].matrix, H.cmp(H.with_weights(module, state), val, "sublayers").matrix) < H.TOL
    # TensorBoard over both runs: one event file each, steps never repeat or go back
    assert len(H.event_files(logger.log_dir)) == 2
    steps = H.tb_steps(logger.log_dir, "cka/self")
    assert steps == H.tb_steps(logger.log_dir, "val_loss") == [1, 3, 5, 7]
    assert H.strictly_increasing(H.tb_steps(logger.log_dir, "cka/self/adjacent_mean"))


@resumes_with_another_checkpoint_dir
def test_resume_from_validation_checkpoint_with_half_epoch_interval(tmp_path):
    """The default ModelCheckpoint saves after each validation when val_check_interval < 1."""
    val, train = H.val_data(), H.train_data()
    ckpt_dir = tmp_path / "ckpt"
    options = {"limit_train_batches": 4, "val_check_interval": 0.5, "enable_checkpointing": True}
    cb1 = CKACallback(layers="sublayers")
    first = H.trainer(
        tmp_path,
        callbacks=[cb1, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        logger=TensorBoardLogger(str(tmp_path), version=0),
        max_epochs=1,
        **options,
    )
    first.fit(H.vit_module(), train, val)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert [r["step"] for r in ckpt["callbacks"][cb1.state_key]["history"]] == [2, 4]

    cb2 = CKACallback(layers="sublayers")
    module = H.LitClassifier(H.tiny_vit(depth=2, seed=7))
    logger = TensorBoardLogger(str(tmp_path), version=0)
    H.trainer(tmp_path, callbacks=[cb2], logger=logger, max_epochs=2, **options).fit(
        module, train, val, ckpt_path=str(ckpt_dir / "last.ckpt")
    )
    assert [(r["epoch"], r["step"]) for r in cb2.history] == [(0, 2), (0, 4), (1, 6), (1, 8)]
    for old, new in zip(cb1.history, cb2.history[:2], strict=True):
        assert H.max_diff(old["self"].matrix, new["self"].matrix) == 0.0
    assert H.max_diff(cb2.history[-1]["self"].matrix, H.cmp(module, val, "sublayers").matrix) < H.TOL
    steps = H.tb_steps(logger.log_dir, "cka/self")
    assert steps == H.tb_steps(logger.log_dir, "val_loss") == [1, 3, 5, 7] and H.strictly_increasing(steps)


@resumes_without_its_checkpoint_callback
def test_resume_with_layers_spelled_differently_restores_history(tmp_path):
    module = H.vit_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = H.trainer(tmp_path, callbacks=[CKACallback(layers=ROWS), ckpt], max_epochs=1, enable_checkpointing=True)
    first.fit(module, H.train_data(16), H.val_data())
    again = CKACallback(layers=tuple(ROWS))
    tr = H.trainer(tmp_path, callbacks=[again], max_epochs=2)
    tr.fit(module, H.train_data(16), H.val_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r["epoch"] for r in again.history] == [0, 1]

    other = CKACallback(layers="model.blocks.*.mlp")
    tr = H.trainer(tmp_path, callbacks=[other], max_epochs=2)
    with pytest.warns(UserWarning, match="history was not restored"):
        tr.fit(module, H.train_data(16), H.val_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r["epoch"] for r in other.history] == [1]
