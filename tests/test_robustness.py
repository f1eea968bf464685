"""CKACallback under real training setups: torch.compile, mixed precision, loop options, faults, resume, NaNs.

Every case runs a real Trainer on a tiny timm ViT on CPU and checks values against
``lightning_cka.compare()`` on the same weights and data, TensorBoard event files, hook
counts and history lengths.
"""

from __future__ import annotations

import copy
import itertools
import math
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
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch.utils.data import Subset

from lightning_cka import CKACallback, MinibatchCKA, compare

TOL = 1e-5
SUBLAYERS = [f"blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]
ROWS = [f"model.{n}" for n in SUBLAYERS]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from H.one_thread()


# --------------------------------------------------------------------------- helpers
def cmp(model, data, layers, **kwargs):
    return compare(model, data, layers=layers, progress=False, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def event_files(log_dir: Path | str) -> list[Path]:
    """Event files in the order they were created: ``events.out.tfevents.<time>.<host>.<pid>.<counter>``."""
    files = Path(log_dir).glob("events.out.tfevents.*")
    return sorted(files, key=lambda p: (int(p.name.split(".")[3]), int(p.name.split(".")[-1])))


def tb_steps(log_dir: Path | str, tag: str) -> list[int]:
    """Steps of every raw event with ``tag``, file by file in write order (no de-duplication or purging)."""
    return [
        event.step
        for path in event_files(log_dir)
        for event in EventFileLoader(str(path)).Load()
        if any(value.tag == tag for value in event.summary.value)
    ]


def tb_tags(log_dir: Path | str) -> Counter:
    """How many events carry each tag, over all event files of a run."""
    return Counter(
        value.tag
        for path in event_files(log_dir)
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    )


def strictly_increasing(steps: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(steps))


def vit_module(**kwargs) -> H.LitClassifier:
    return H.LitClassifier(H.tiny_vit(depth=2, embed_dim=48, num_heads=3), **kwargs)


def val_data(n: int = 16, seed: int = 1):
    return H.loader(H.image_dataset(n, seed=seed))


def train_data(n: int = 32):
    return H.loader(H.image_dataset(n))


class Snapshots(Callback):
    """Copies of the weights and ``global_step`` at every (non-sanity) validation."""

    def __init__(self):
        self.states: list[dict] = []
        self.steps: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states.append(copy.deepcopy(pl_module.state_dict()))
            self.steps.append(trainer.global_step)


def with_weights(module: H.LitClassifier, state: dict) -> H.LitClassifier:
    probe = copy.deepcopy(module)
    probe.load_state_dict(state)
    return probe


# --------------------------------------------------------------------------- torch.compile
CALLS: Counter = Counter()


def counting_backend(inner: str):
    """A dynamo backend that compiles with ``inner`` and counts calls of the compiled graphs (train / eval)."""
    compile_with = torch._dynamo.lookup_backend(inner)

    def backend(gm, example_inputs):
        compiled = compile_with(gm, example_inputs)

        def run(*args):
            CALLS["train" if torch.is_grad_enabled() else "eval"] += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # keep dynamo's calling convention
        return run

    return backend


class PlainLit(H.LitClassifier):
    """Steps without Python side effects, so ``torch.compile(lit_module)`` compiles them without recompiling."""

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])


class CompileProbe(Callback):
    """Dynamo counters at the end of every training epoch, the compiled callables at fit start, hook counts.

    Put it after the CKACallback: its ``on_validation_batch_start`` then sees the hooks of that batch.
    """

    def __init__(self, get_compiled):
        self.get_compiled = get_compiled
        self.graphs: list[int] = []
        self.recompiles: list[int] = []
        self.at_start = None
        self.val_hooks: list[int] = []
        self.train_batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_batches += 1

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val_hooks.append(H.hook_count(pl_module))

    def on_fit_start(self, trainer, pl_module):
        self.at_start = self.get_compiled(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])
        self.recompiles.append(sum(counters["recompiles"].values()))


def _compiled_setup(how: str, backend):
    net = H.tiny_vit(depth=2)
    if how == "attribute":  # self.model = torch.compile(net)
        compiled = torch.compile(net, backend=backend)
        module = PlainLit(compiled)

        def get(pl_module):
            return compiled.__dict__["forward"]

        return net, module, module, get, "model (torch.compile)"
    if how == "in_place":  # net.compile()
        net.compile(backend=backend)
        module = PlainLit(net)

        def get(pl_module):
            return net.__dict__["_compiled_call_impl"]

        return net, module, module, get, "model (.compile())"
    # trainer.fit(torch.compile(lit_module))
    module = PlainLit(net)

    def get(pl_module):
        return (pl_module.__dict__["forward"], pl_module.__dict__["validation_step"])

    return net, module, torch.compile(module, backend=backend), get, "compiled LightningModule"


@pytest.mark.parametrize(
    ("how", "inner"),
    [("attribute", "inductor"), ("attribute", "aot_eager"), ("in_place", "aot_eager"), ("lightning", "aot_eager")],
)
def test_torch_compile(tmp_path, how, inner):
    torch._dynamo.reset()
    CALLS.clear()
    net, module, fit_arg, get_compiled, label = _compiled_setup(how, counting_backend(inner))
    probe = CompileProbe(get_compiled)
    snaps = Snapshots()
    val = val_data()
    # every other epoch is measured: the unmeasured validations run the compiled (eval) graph
    cb = CKACallback(layers="sublayers", every_n_epochs=2)
    tr = H.trainer(tmp_path, callbacks=[cb, probe, snaps], max_epochs=4, limit_train_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(fit_arg, train_data(16), val)
    compile_warnings = [str(w.message) for w in caught if "compiled" in str(w.message)]
    assert len(compile_warnings) == 1, compile_warnings
    assert label in compile_warnings[0]

    # every chosen layer was captured on the measured epochs, equal to compare() on the plain net
    assert cb.rows == ROWS
    assert [r["epoch"] for r in cb.history] == [0, 2]
    assert [h >= len(ROWS) for h in probe.val_hooks] == [True, True, False, False, True, True, False, False]
    for record, state, step in zip(cb.history, snaps.states[::2], snaps.steps[::2], strict=True):
        assert record["step"] == step
        plain = copy.deepcopy(net)
        plain.load_state_dict({k.removeprefix("model.").removeprefix("_orig_mod."): v for k, v in state.items()})
        expected = cmp(plain, val, SUBLAYERS)
        assert torch.isfinite(record["self"].matrix).all()
        assert max_diff(record["self"].matrix, expected.matrix) < TOL
    assert max_diff(cb.history[0]["self"].matrix, cb.history[1]["self"].matrix) > 1e-6  # training moved weights

    # no recompilation on later epochs; training (and unmeasured validation) still ran compiled
    assert probe.graphs[1] == probe.graphs[3], probe.graphs
    assert probe.recompiles[1] == probe.recompiles[3] == 0, probe.recompiles
    assert probe.train_batches == 8
    assert CALLS["train"] == 8  # one compiled graph call per training step
    assert CALLS["eval"] == 4  # unmeasured epochs 1 and 3 (2 batches each) ran compiled; measured ones eagerly
    # after fit the compiled callables are back in place, and no hook is left
    assert probe.at_start is not None
    after = get_compiled(module)
    if isinstance(after, tuple):
        assert all(a is b for a, b in zip(after, probe.at_start, strict=True))
    else:
        assert after is probe.at_start
    assert H.hook_count(module) == 0
    # and a training-mode forward pass after fit goes through the cached compiled graph again
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    module.train()
    module.training_step(next(iter(train_data(16))), 0)
    assert CALLS["train"] == 9
    assert counters["stats"]["unique_graphs"] == graphs


def test_two_callbacks_on_compiled_model_keep_training_compiled(tmp_path):
    torch._dynamo.reset()
    CALLS.clear()
    net = H.tiny_vit(depth=2)
    compiled = torch.compile(net, backend=counting_backend("aot_eager"))
    compiled_forward = compiled.__dict__["forward"]
    module = PlainLit(compiled)
    val = val_data()
    a = CKACallback(layers="sublayers")
    b = CKACallback(layers="model.blocks.*.mlp", log_prefix="cka_mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H.trainer(tmp_path, callbacks=[a, b], max_epochs=2, limit_train_batches=2).fit(module, train_data(16), val)
    # both measured every layer on the plain net's weights
    assert len(a.history) == len(b.history) == 2
    assert max_diff(a.history[-1]["self"].matrix, cmp(net, val, SUBLAYERS).matrix) < TOL
    assert H.hook_count(module) == 0
    # ... and training stayed compiled after the first validation
    assert compiled.__dict__["forward"] is compiled_forward
    assert CALLS["train"] == 4


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_matches_float32(tmp_path, precision):
    module = vit_module()
    val = val_data()
    # a short fit under mixed precision, then validate the same weights at 32-true and mixed
    fit_cb = CKACallback(layers="sublayers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning: "AMP with fp16 is not supported on CPU"
        tr = H.trainer(tmp_path, callbacks=[fit_cb], precision=precision, max_epochs=1)
    # on CPU Lightning replaces 16-mixed by bf16-mixed (with a warning); it cannot be run here
    assert tr.precision == "bf16-mixed"
    tr.fit(module, train_data(16), val)
    assert len(fit_cb.history) == 1

    results = {}
    for p in ("32-true", precision):
        cb = CKACallback(layers="sublayers")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            H.trainer(tmp_path, callbacks=[cb], precision=p).validate(module, val, verbose=False)
        assert len(cb.history) == 1
        results[p] = cb.history[0]
    full, mixed = results["32-true"]["self"].matrix, results[precision]["self"].matrix
    assert max_diff(full, cmp(module, val, "sublayers").matrix) < TOL
    assert max_diff(mixed, full) < 1e-3
    assert max_diff(mixed, full) > 0  # autocast really was on: bf16 activations differ a little
    assert max_diff(fit_cb.history[0]["self"].matrix, mixed) < 1e-12  # same weights, same precision
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


# --------------------------------------------------------------------------- loop options
def test_gradient_accumulation(tmp_path):
    module = vit_module()
    val = val_data()
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, accumulate_grad_batches=2, limit_train_batches=4)
    tr.fit(module, train_data(), val)
    assert module.training_steps == 8
    assert [(r["epoch"], r["step"]) for r in cb.history] == [(0, 2), (1, 4)]  # optimizer steps, not batches
    assert tb_steps(logger.log_dir, "cka/self") == tb_steps(logger.log_dir, "val_loss") == [1, 3]
    assert max_diff(cb.history[-1]["self"].matrix, cmp(module, val, "sublayers").matrix) < TOL
    assert module.train_hooks == [0] * 8


@pytest.mark.parametrize("limit", [0.5, 2])
def test_limit_val_batches(tmp_path, limit):
    module = vit_module()
    val = val_data(32)  # 4 batches of 8
    cb = CKACallback(layers="sublayers")
    tr = H.trainer(tmp_path, callbacks=[cb], limit_val_batches=limit, max_epochs=1)
    tr.fit(module, train_data(16), val)
    assert module.val_batch_indices == [0, 1]
    assert len(cb.history) == 1
    expected = cmp(module, val, "sublayers", max_batches=2)
    assert max_diff(cb.history[0]["self"].matrix, expected.matrix) < TOL
    assert max_diff(cb.history[0]["self"].matrix, cmp(module, val, "sublayers").matrix) > 1e-6


def test_val_check_interval_half_epoch(tmp_path):
    module = vit_module()
    val = val_data()
    cb, snaps = CKACallback(layers="sublayers"), Snapshots()
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(
        tmp_path, callbacks=[cb, snaps], logger=logger, max_epochs=2, limit_train_batches=4, val_check_interval=0.5
    )
    tr.fit(module, train_data(), val)
    assert [r["epoch"] for r in cb.history] == [0, 0, 1, 1]  # two entries per epoch
    steps = [r["step"] for r in cb.history]
    assert steps == [2, 4, 6, 8] and strictly_increasing(steps)
    # CKA data lands on the step of Lightning's validation scalars
    assert tb_steps(logger.log_dir, "cka/self") == tb_steps(logger.log_dir, "val_loss") == [s - 1 for s in steps]
    assert tb_steps(logger.log_dir, "cka/self/adjacent_mean") == tb_steps(logger.log_dir, "val_loss")
    assert len(list((Path(logger.log_dir) / "cka").glob("self_step*.npz"))) == 4
    for record, state in zip(cb.history, snaps.states, strict=True):
        expected = cmp(with_weights(module, state), val, "sublayers")
        assert max_diff(record["self"].matrix, expected.matrix) < TOL


def test_several_val_dataloaders(tmp_path):
    module = vit_module()
    dl0, dl1 = val_data(16, seed=1), val_data(24, seed=2)
    first = CKACallback(layers="sublayers")  # dataloader_idx=0 by default
    second = CKACallback(layers="sublayers", dataloader_idx=1, log_prefix="cka_dl1")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[first, second], logger=logger, max_epochs=1)
    tr.fit(module, train_data(16), [dl0, dl1])
    assert len(first.history) == len(second.history) == 1
    on0, on1 = cmp(module, dl0, "sublayers").matrix, cmp(module, dl1, "sublayers").matrix
    assert max_diff(on0, on1) > 1e-6
    assert max_diff(first.history[0]["self"].matrix, on0) < TOL
    assert max_diff(second.history[0]["self"].matrix, on1) < TOL
    assert tb_steps(logger.log_dir, "cka/self") == tb_steps(logger.log_dir, "cka_dl1/self") == [1]
    assert H.hook_count(module) == 0


def test_limit_val_batches_zero(tmp_path):
    module = vit_module()
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, limit_val_batches=0)
    tr.fit(module, train_data(16), val_data())
    assert module.training_steps == 4
    assert module.val_batch_indices == []
    assert cb.history == []
    tags = tb_tags(logger.log_dir)
    assert not [t for t in tags if t.startswith(("cka", "norm_ratio", "attention_distance"))], tags
    assert not list(Path(tmp_path).rglob("*.npz"))
    assert H.hook_count(module) == 0


# --------------------------------------------------------------------------- two callbacks
def test_two_callbacks_keep_separate_state_and_tags(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    ref = H.tiny_vit(depth=2, seed=5)
    val = val_data()
    a = CKACallback(layers="sublayers")
    b = CKACallback(layers="model.blocks.*.mlp", log_prefix="cka_mlp", reference=ref, reference_layers="auto")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[a, b], logger=logger, max_epochs=2)
    tr.fit(module, train_data(16), val)
    assert a.history is not b.history
    assert len(a.history) == len(b.history) == 2
    assert a.rows == [f"model.blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp")]
    assert b.rows == [f"model.blocks.{i}.mlp" for i in range(3)]
    assert "reference" not in a.history[-1] and b.history[-1]["reference"].matrix.shape == (3, 2)
    # signals measured by the first callback only
    assert "norm_ratio" in a.history[-1] and "attention_distance" in a.history[-1]
    assert "norm_ratio" not in b.history[-1] and "attention_distance" not in b.history[-1]
    assert max_diff(a.history[-1]["self"].matrix, cmp(module, val, a.rows).matrix) < TOL
    assert max_diff(b.history[-1]["self"].matrix, cmp(module, val, b.rows).matrix) < TOL
    expected_ref = cmp(module, val, b.rows, other=ref, other_layers="auto")
    assert max_diff(b.history[-1]["reference"].matrix, expected_ref.matrix) < TOL

    tags = tb_tags(logger.log_dir)
    assert tags["cka/self"] == tags["cka_mlp/self"] == tags["cka_mlp/reference"] == 2
    assert "cka/reference" not in tags
    assert tags["cka/self/to_last/model.blocks.2.mlp"] == tags["cka_mlp/self/to_last/model.blocks.2.mlp"] == 2
    norm = [t for t in tags if t.startswith("norm_ratio/")]
    dist = [t for t in tags if t.startswith("attention_distance/")]
    assert "norm_ratio/model.blocks.0/attn/cls" in norm and "attention_distance/model.blocks.0.attn" in dist
    assert all(tags[t] == 2 for t in norm + dist), {t: tags[t] for t in norm + dist}  # once per validation
    # checkpoint state is separate too
    state = tr._checkpoint_connector.dump_checkpoint()["callbacks"]
    assert len(state[a.state_key]["history"]) == len(state[b.state_key]["history"]) == 2
    assert state[a.state_key]["history"][0]["cka"].keys() == {"self"}
    assert state[b.state_key]["history"][0]["cka"].keys() == {"self", "reference"}


# --------------------------------------------------------------------------- faults
def test_exception_in_validate_then_validate_again(tmp_path):
    module = vit_module(fail_val_batch=2)
    val = val_data(32)
    baseline = H.hook_count(module)
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path), version=0)
    with pytest.raises(RuntimeError, match="boom"):
        H.trainer(tmp_path, callbacks=[cb], logger=logger).validate(module, val, verbose=False)
    assert module.val_batch_indices == [0, 1]
    assert module.val_hooks[0] >= baseline + len(ROWS)  # it was armed
    assert H.hook_count(module) == baseline
    assert cb.history == []
    assert "cka/self" not in tb_tags(logger.log_dir)
    assert not list(Path(tmp_path).rglob("*.npz"))

    module.fail_val_batch = None
    logger = TensorBoardLogger(str(tmp_path), version=0)
    H.trainer(tmp_path, callbacks=[cb], logger=logger).validate(module, val, verbose=False)
    assert len(cb.history) == 1
    # nothing of the aborted loop leaked into the sums
    assert max_diff(cb.history[0]["self"].matrix, cmp(module, val, "sublayers").matrix) < TOL
    assert tb_steps(logger.log_dir, "cka/self") == [0]
    assert H.hook_count(module) == baseline


class InterruptingLit(H.LitClassifier):
    interrupt_at: tuple[int, int] | None = None  # (epoch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if not self.trainer.sanity_checking and (self.current_epoch, batch_idx) == self.interrupt_at:
            raise KeyboardInterrupt
        return super().validation_step(batch, batch_idx, dataloader_idx)


def test_keyboard_interrupt_in_fit_then_resume(tmp_path):
    torch._dynamo.reset()
    CALLS.clear()
    net = H.tiny_vit(depth=2)
    compiled = torch.compile(net, backend=counting_backend("aot_eager"))
    compiled_forward = compiled.__dict__["forward"]
    module = InterruptingLit(compiled)
    module.interrupt_at = (1, 1)
    val = val_data(24)
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path), version=0)
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, max_epochs=3)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        # Lightning: on_exception, teardown, then sys.exit(1)
        with pytest.raises(SystemExit) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.fit(module, train_data(16), val)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT from then on
    assert info.value.code == 1
    assert tr.state.status == TrainerStatus.INTERRUPTED
    assert module.val_batch_indices == [0, 1, 2, 0]  # epoch 1 stopped inside batch 1
    assert H.hook_count(module) == 0
    assert compiled.__dict__["forward"] is compiled_forward  # compiled again, not left eager
    assert [r["epoch"] for r in cb.history] == [0]  # no partial entry for epoch 1
    assert tb_steps(logger.log_dir, "cka/self") == tb_steps(logger.log_dir, "val_loss") == [1]
    assert len(list((Path(logger.log_dir) / "cka").glob("self_step*.npz"))) == 1

    module.interrupt_at = None
    calls = CALLS["train"]
    logger = TensorBoardLogger(str(tmp_path), version=0)
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger, max_epochs=1)
    tr.fit(module, train_data(16), val)
    assert tr.state.status == TrainerStatus.FINISHED
    assert CALLS["train"] > calls  # training still compiled
    assert len(cb.history) == 2
    assert max_diff(cb.history[-1]["self"].matrix, cmp(net, val, SUBLAYERS).matrix) < TOL
    assert H.hook_count(module) == 0


class CrashAt(Callback):
    """Raise at the start of the training batch that sees ``global_step == step`` (a crashed job)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("node died")


def test_resume_from_mid_epoch_checkpoint(tmp_path):
    val, train = val_data(), train_data()
    ckpt_dir = tmp_path / "ckpt"
    options = {"max_epochs": 2, "limit_train_batches": 4, "val_check_interval": 0.5, "enable_checkpointing": True}

    cb1 = CKACallback(layers="sublayers")
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_last=True, save_top_k=-1)
    first = H.trainer(
        tmp_path, callbacks=[cb1, saver, CrashAt(3)], logger=TensorBoardLogger(str(tmp_path), version=0), **options
    )
    with pytest.raises(RuntimeError, match="node died"):
        first.fit(vit_module(), train, val)
    assert [r["step"] for r in cb1.history] == [2]
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0  # written mid-epoch
    assert [r["step"] for r in ckpt["callbacks"][cb1.state_key]["history"]] == [2]

    cb2, snaps = CKACallback(layers="sublayers"), Snapshots()
    module = H.LitClassifier(H.tiny_vit(depth=2, seed=7))
    logger = TensorBoardLogger(str(tmp_path), version=0)
    second = H.trainer(tmp_path, callbacks=[cb2, snaps, ModelCheckpoint(dirpath=ckpt_dir)], logger=logger, **options)
    second.fit(module, train, val, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert [(r["epoch"], r["step"]) for r in cb2.history] == [(0, 2), (0, 4), (1, 6), (1, 8)]
    assert max_diff(cb2.history[0]["self"].matrix, cb1.history[0]["self"].matrix) == 0.0
    for record, state in zip(cb2.history[1:], snaps.states, strict=True):
        assert max_diff(record["self"].matrix, cmp(with_weights(module, state), val, "sublayers").matrix) < TOL
    # TensorBoard over both runs: one event file each, steps never repeat or go back
    assert len(event_files(logger.log_dir)) == 2
    steps = tb_steps(logger.log_dir, "cka/self")
    assert steps == tb_steps(logger.log_dir, "val_loss") == [1, 3, 5, 7]
    assert strictly_increasing(tb_steps(logger.log_dir, "cka/self/adjacent_mean"))


def test_resume_from_validation_checkpoint_with_half_epoch_interval(tmp_path):
    """The default ModelCheckpoint saves after each validation when val_check_interval < 1."""
    val, train = val_data(), train_data()
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
    first.fit(vit_module(), train, val)
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
        assert max_diff(old["self"].matrix, new["self"].matrix) == 0.0
    assert max_diff(cb2.history[-1]["self"].matrix, cmp(module, val, "sublayers").matrix) < TOL
    steps = tb_steps(logger.log_dir, "cka/self")
    assert steps == tb_steps(logger.log_dir, "val_loss") == [1, 3, 5, 7] and strictly_increasing(steps)


# --------------------------------------------------------------------------- non-finite activations
class Poison(Callback):
    """Overwrite ``layer``'s output with NaN on the given validation batches (a forward hook of the test)."""

    def __init__(self, layer: str, batches: set[int]):
        self.layer = layer
        self.batches = batches
        self.batch_idx: int | None = None
        self.poisoned: list[int] = []

    def setup(self, trainer, pl_module, stage):
        pl_module.get_submodule(self.layer).register_forward_hook(self._hook)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batch_idx = batch_idx

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batch_idx = None

    def _hook(self, module, args, output):
        if self.batch_idx in self.batches:
            self.poisoned.append(self.batch_idx)
            return torch.full_like(output, float("nan"))
        return None


def test_nan_batches_are_skipped(tmp_path):
    module = vit_module()
    data = H.image_dataset(40, seed=1)  # 5 batches of 8
    val = H.loader(data)
    layer = "model.blocks.1.attn"
    poison = Poison(layer, {1, 3})
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path))
    with pytest.warns(UserWarning, match="non-finite") as record:
        H.trainer(tmp_path, callbacks=[poison, cb], logger=logger).validate(module, val, verbose=False)
    assert poison.poisoned == [1, 3]
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert any(repr(layer) in m and "2x" in m for m in messages), messages
    assert not any(repr("model.blocks.0.attn") in m for m in messages)  # upstream layers were fine
    assert len(cb.history) == 1
    got = cb.history[0]["self"].matrix
    assert torch.isfinite(got).all()
    assert all(math.isfinite(v) for v in cb.history[0]["norm_ratio"].values())

    # Non-finite values are skipped per layer: pairs of upstream layers (before the poisoned one)
    # use all 5 batches, every pair touching a poisoned layer only the good batches (0, 2, 4).
    upstream = [ROWS.index("model.blocks.0.attn"), ROWS.index("model.blocks.0.mlp")]
    everything = cmp(module, val, "sublayers").matrix
    good = [i for b in (0, 2, 4) for i in range(8 * b, 8 * b + 8)]
    good_only = cmp(module, H.loader(Subset(data, good)), "sublayers").matrix
    expected = good_only.clone()
    for i in upstream:
        for j in upstream:
            expected[i, j] = everything[i, j]
    assert max_diff(got, expected) < TOL
    # oracle 2: MinibatchCKA over activations captured by hand on the good batches, downstream pairs
    metric, acts, handles = MinibatchCKA(), {}, []
    for name in ROWS:
        handles.append(module.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: acts.__setitem__(n, o)))
    module.eval()
    with torch.no_grad():
        for index, (x, _) in enumerate(val):
            module(x)
            if index in (0, 2, 4):
                metric.update([acts[n] for n in ROWS])
    for handle in handles:
        handle.remove()
    downstream = [i for i in range(len(ROWS)) if i not in upstream]
    assert max_diff(got[downstream], metric.compute()[downstream]) < TOL
    assert max_diff(got, cmp(module, val, "sublayers").matrix) > 1e-6  # the poisoned batches made a difference
    assert tb_steps(logger.log_dir, "cka/self") == [0]
    assert H.hook_count(module) == 1  # only the test's own poison hook is left
