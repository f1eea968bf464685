"""Layer convergence over training: the live ``Convergence`` analysis and the offline ``convergence()``,
with ``compare()`` between snapshots of the model as the oracle."""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import helpers as H
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_cka import CKACallback, compare
from lightning_cka.analyses.base import MeasuredBatch, SetupContext
from lightning_cka.analyses.convergence import Convergence, _pack, _unpack, convergence
from lightning_cka.functional import grams, hsic1

TOL = 1e-5
EPOCHS = 3
MAX_EXAMPLES = 16  # 2 of the 3 validation batches of 8
LAYERS = ["model.blocks.0", "model.blocks.1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from H.one_thread()


class Snapshots(Callback):
    """The LightningModule's weights at each non-sanity validation."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.states.append(copy.deepcopy(pl_module.state_dict()))


def model_at(state: dict[str, torch.Tensor]) -> H.LitClassifier:
    module = H.LitClassifier(H.tiny_vit(depth=2))
    module.load_state_dict(state)
    return module


def diagonal_vs(module: nn.Module, other: nn.Module, val, max_batches: int | None = 2) -> list[float]:
    """compare()'s diagonal: each layer of ``module`` against the same layer of ``other``."""
    result = compare(
        module, val, LAYERS, reference=other, reference_layers=LAYERS, max_batches=max_batches, progress=False
    )
    return torch.diagonal(result.matrix).tolist()


def events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# --------------------------------------------------------------------------- one shared training run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("convergence")
    val = H.loader(H.image_dataset(24, seed=1))  # 3 batches of 8
    analysis = Convergence(max_examples=MAX_EXAMPLES)
    cb = CKACallback(layers=LAYERS, analyses=[analysis], norm_ratio=False, attention_distance=False)
    snaps = Snapshots()
    logger = TensorBoardLogger(str(root), version=0)
    ckpt_dir = root / "ckpt"
    tr = H.trainer(
        root,
        max_epochs=EPOCHS,
        callbacks=[cb, snaps, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        enable_checkpointing=True,
        logger=logger,
    )
    tr.fit(H.LitClassifier(H.tiny_vit(depth=2)), H.loader(H.image_dataset(16), shuffle=True), val)
    return SimpleNamespace(
        root=root, val=val, cb=cb, analysis=analysis, snaps=snaps, log_dir=Path(logger.log_dir), ckpt=ckpt_dir
    )


def test_values_equal_compare_between_snapshots(run):
    history, states = run.cb.history, run.snaps.states
    assert len(history) == len(states) == EPOCHS
    assert "convergence" not in history[0]  # nothing to compare with at the first validation
    models = [model_at(s) for s in states]
    moved = False
    for t in range(1, EPOCHS):
        value = history[t]["convergence"]
        assert list(value) == ["previous", "first"] and list(value["previous"]) == LAYERS
        previous = diagonal_vs(models[t], models[t - 1], run.val)
        first = diagonal_vs(models[t], models[0], run.val)
        assert [value["previous"][name] for name in LAYERS] == pytest.approx(previous, abs=TOL)
        assert [value["first"][name] for name in LAYERS] == pytest.approx(first, abs=TOL)
        moved |= min(first) < 1 - 1e-4
    assert moved  # training changed the layers: the test is not trivially 1 == 1
    # the kept examples are the first 16: using all 24 gives other numbers
    assert diagonal_vs(models[2], models[0], run.val, None) != pytest.approx(first, abs=1e-7)
    assert [e["epoch"] for e in run.analysis.curve] == [1, 2]


def test_tensorboard_scalars_image_and_caption(run):
    acc = events(run.log_dir)
    for against in ("previous", "first"):
        for i, name in enumerate(LAYERS):
            got = [e.value for e in acc.Scalars(f"cka/convergence/{against}/{name.removeprefix('model.')}")]
            expected = [r["convergence"][against][name] for r in run.cb.history[1:]]
            assert got == pytest.approx(expected, abs=1e-6), (against, i)
    images = acc.Images("cka/convergence")
    assert len(images) == EPOCHS - 1
    assert [e.step for e in images] == [e.step for e in acc.Scalars("val_loss")][1:]
    assert all(e.width > 100 and e.height > 100 for e in images)
    captions = acc.Tensors("cka/convergence/text_summary")
    assert len(captions) == 1  # with the image's first appearance only
    assert "staircase" in captions[0].tensor_proto.string_val[0].decode()


def test_memory_measured_and_formula(run):
    # two references (first and previous) of 2 batches of 8 examples, 2 layers, float32 triangles
    assert run.analysis.kept_memory() == Convergence.kept_bytes(2, MAX_EXAMPLES, 8) == 2 * 2 * (2 * 36 * 4 + 32)
    big = Convergence.kept_bytes(num_layers=12, max_examples=1024, batch_size=256)
    assert big == 2 * 4 * (12 * 256 * 257 // 2 * 4 + 32) == 12_632_320
    assert big < 13e6
    assert Convergence.kept_bytes(12, 1000, 256) == big  # whole batches: 1000 examples still keep 4 batches


def test_resume_continues_both_curves(run, tmp_path):
    ckpt = torch.load(run.ckpt / "last.ckpt", weights_only=False)
    saved = ckpt["callbacks"][run.cb.state_key]["analyses"]["convergence"]
    assert saved["kept"] is not None and saved["kept"]["previous"] is not None  # first != previous by now
    assert len(saved["curve"]) == EPOCHS - 1
    analysis = Convergence(max_examples=MAX_EXAMPLES)
    cb = CKACallback(layers=LAYERS, analyses=[analysis], norm_ratio=False, attention_distance=False)
    snaps = Snapshots()
    tr = H.trainer(tmp_path, max_epochs=EPOCHS + 1, callbacks=[cb, snaps])
    module = H.LitClassifier(H.tiny_vit(depth=2, seed=5))
    tr.fit(module, H.loader(H.image_dataset(16), shuffle=True), run.val, ckpt_path=str(run.ckpt / "last.ckpt"))
    assert [r["epoch"] for r in cb.history] == list(range(EPOCHS + 1))
    value = cb.history[-1]["convergence"]
    now = model_at(snaps.states[-1])
    previous = diagonal_vs(now, model_at(run.snaps.states[-1]), run.val)
    first = diagonal_vs(now, model_at(run.snaps.states[0]), run.val)
    assert [value["previous"][n] for n in LAYERS] == pytest.approx(previous, abs=TOL)
    assert [value["first"][n] for n in LAYERS] == pytest.approx(first, abs=TOL)
    assert [e["epoch"] for e in analysis.curve] == [1, 2, 3]


def test_shuffled_validation_loader_warns_and_reports_nothing(tmp_path):
    cb = CKACallback(layers=LAYERS, analyses=[Convergence()], norm_ratio=False, attention_distance=False)
    val = H.loader(H.image_dataset(16, seed=1), shuffle=True)
    with pytest.warns(UserWarning, match="inputs differ from the kept ones.*shuffled validation loader"):
        H.trainer(tmp_path, max_epochs=3, limit_train_batches=1, callbacks=[cb]).fit(
            H.LitClassifier(H.tiny_vit(depth=2)), H.loader(H.image_dataset(8)), val
        )
    assert len(cb.history) == 3
    assert all("convergence" not in r for r in cb.history)


# --------------------------------------------------------------------------- the protocol, without Lightning
class Driver:
    """Runs an analysis the way CKACallback does, on fake 2-layer activations of given inputs."""

    def __init__(self, analysis: Convergence | None = None, **context) -> None:
        self.analysis = analysis or Convergence(max_examples=16)
        assert self.analysis.setup(SetupContext(module=nn.Identity(), layers=["a", "b"], **context))

    def validate(self, x: torch.Tensor, scale: float = 1.0, batch_size: int = 8):
        self.analysis.reset(torch.device("cpu"))
        for i, batch in enumerate(x.split(batch_size)):
            k = grams([batch.tanh(), (scale * batch).sin()])
            self.analysis.update(MeasuredBatch((batch,), k, lambda: None, index=i))
        return self.analysis.compute()


@pytest.fixture
def x(gen) -> torch.Tensor:
    return torch.randn(24, 6, generator=gen)


def test_protocol_values_and_references(x):
    d = Driver()
    assert d.validate(x) is None
    one = d.validate(x, scale=2.0)
    assert one["previous"] == one["first"]  # at the second validation both references are the first
    assert one["previous"]["a"] == pytest.approx(1.0, abs=1e-9) and one["previous"]["b"] < 0.99
    two = d.validate(x, scale=2.0)
    assert two["previous"]["b"] == pytest.approx(1.0, abs=1e-9)
    assert two["first"]["b"] == pytest.approx(one["first"]["b"], abs=1e-9)
    # the numbers are the metric's minibatch CKA over the kept batches (the first 16 examples)
    ks = [grams([b.sin()]) for b in x[:16].split(8)]
    ls = [grams([(2.0 * b).sin()]) for b in x[:16].split(8)]
    sums = [sum(hsic1(k[0], l[0]) for k, l in zip(ks, ls, strict=True))]
    sums += [sum(hsic1(k[0], k[0]) for k in ks), sum(hsic1(l[0], l[0]) for l in ls)]
    expected = float(sums[0] / math.sqrt(sums[1] * sums[2]))
    assert one["first"]["b"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x: x[torch.tensor([1, 0, *range(2, 24)])], "inputs differ"),  # two examples swapped
        (lambda x: x + 1e-3, "inputs differ"),
        (lambda x: x[:8], "fewer validation batches"),
        (lambda x: x[:, :5], "another shape"),  # another input size
    ],
)
def test_changed_inputs_warn_and_restart(x, change, match):
    d = Driver()
    assert d.validate(x) is None
    assert d.validate(x) is not None
    changed = change(x)
    with pytest.warns(UserWarning, match=match):
        assert d.validate(changed) is None
    again = d.validate(changed, scale=2.0)  # the changed validation became the new first reference
    assert again is not None and again["previous"] == again["first"]


def test_more_batches_warn(x):
    d = Driver(Convergence(max_examples=100))
    assert d.validate(x[:16]) is None
    with pytest.warns(UserWarning, match="more validation batches"):
        assert d.validate(x) is None


def test_ranks_agree(x):
    """Every rank sums its flags: a mismatch on another rank stops this one too."""
    other_rank = torch.zeros(6, dtype=torch.float64)  # [has reference, inputs, fewer, more, shape, failed]
    d = Driver(world_size=2, sum_over_ranks=lambda t: t + other_rank)
    assert d.validate(x) is None
    other_rank[0] = 1.0  # the other rank has its reference and saw its own examples unchanged
    assert d.validate(x) is not None
    other_rank[1] = 1.0
    with pytest.warns(UserWarning, match="inputs differ"):
        assert d.validate(x) is None
    other_rank[:] = 0.0  # the other rank lost its reference
    with pytest.warns(UserWarning, match="some processes have no kept reference"):
        assert d.validate(x) is None


def test_state_dict_round_trip_and_size_limit(x):
    d = Driver()
    d.validate(x)
    d.validate(x, scale=2.0)
    state = copy.deepcopy(d.analysis.state_dict())
    restored = Driver()
    restored.analysis.load_state_dict(state)
    assert restored.analysis.curve == d.analysis.curve
    assert restored.validate(x, scale=3.0) == d.validate(x, scale=3.0)

    small = Driver(Convergence(max_examples=16, keep_in_checkpoint_mb=1e-4))  # 100 bytes: too small
    small.validate(x)
    small.validate(x, scale=2.0)
    state = small.analysis.state_dict()
    assert state["kept"] is None and len(state["curve"]) == 1
    fresh = Driver()
    with pytest.warns(UserWarning, match="new first reference"):
        fresh.analysis.load_state_dict(state)
    assert fresh.analysis.curve == small.analysis.curve
    assert fresh.validate(x, scale=3.0) is None
    assert fresh.validate(x, scale=3.0) is not None


def test_interrupted_validation_restarts(x):
    d = Driver()
    d.validate(x)
    d.analysis.reset(torch.device("cpu"))  # a validation that never reaches compute()
    d.analysis.update(MeasuredBatch((x[:8],), grams([x[:8], x[:8]]), lambda: None))
    with pytest.warns(UserWarning, match="ended early"):
        assert d.validate(x) is None
    assert d.validate(x) is not None


def test_pack_unpack_is_exact(gen):
    k = grams([torch.randn(9, 5, generator=gen), torch.randn(9, 3, generator=gen)])
    packed = _pack(k)
    assert packed.shape == (2, 45)
    assert torch.equal(_unpack(packed, 9), k)


@pytest.mark.parametrize(
    "kwargs", [{"max_examples": 0}, {"max_examples": 1.5}, {"keep_in_checkpoint_mb": -1}, {"log_prefix": "/"}]
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        Convergence(**kwargs)


# --------------------------------------------------------------------------- offline
@pytest.mark.parametrize("against", ["last", "first", "previous"])
def test_offline_convergence_equals_compare(run, against):
    models = [model_at(s) for s in run.snaps.states]
    result = convergence(models, run.val, LAYERS, against=against)
    assert result.rows == [f"checkpoint {t}" for t in range(EPOCHS)] and result.cols == LAYERS
    assert result.matrix.shape == (EPOCHS, len(LAYERS)) and result.meta["against"] == against
    for t in range(EPOCHS):
        s = {"last": EPOCHS - 1, "first": 0, "previous": t - 1}[against]
        if s < 0:
            assert torch.isnan(result.matrix[t]).all()
            continue
        assert result.matrix[t].tolist() == pytest.approx(diagonal_vs(models[t], models[s], run.val, None), abs=1e-6)


def test_offline_errors(run):
    model = H.tiny_vit(depth=2)
    with pytest.raises(ValueError, match="empty"):
        convergence([], run.val, "auto")
    with pytest.raises(ValueError, match="against"):
        convergence([model], run.val, "auto", against="final")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least two"):
        convergence([model], run.val, "auto", against="previous")
    with pytest.raises(ValueError, match="architecture"):
        convergence([model, H.tiny_vit(depth=3)], run.val, "auto")
    with pytest.raises(TypeError, match="models\\[1\\]"):
        convergence([model, "ckpt"], run.val, "auto")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="sequence"):
        convergence(model, run.val, "auto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no usable batch"):
        convergence([model], [], "auto")


# --------------------------------------------------------------------------- example
def test_example_demo(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "convergence_from_checkpoints.py"
    spec = importlib.util.spec_from_file_location("example_convergence", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--demo", "--workdir", str(tmp_path), "--epochs", "2", "--depth", "1", "--batch-size", "16"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main([*argv, "--train-examples", "32", "--val-examples", "16"])
    assert result.matrix.shape == (2, 1)
    assert result.matrix[-1, 0] == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    assert (tmp_path / "convergence.npz").exists()
    assert "epoch 1" in capsys.readouterr().out
