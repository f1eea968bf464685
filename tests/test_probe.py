"""Linear probes per layer (Raghu et al. 2021): held-out accuracy, closed form, live and offline."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import helpers as H
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.linear_model import Ridge, RidgeCV
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset

from lightning_cka import CKACallback
from lightning_cka.analyses.base import AnalysisSkipped, MeasuredBatch, SetupContext
from lightning_cka.analyses.probe import (
    RIDGE_GRID,
    LinearProbe,
    ProbeResult,
    _extract_labels,
    _FeatureStore,
    _fit_probes,
    _fold_ids,
    linear_probe,
)
from lightning_cka.capture import HookSet


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from H.one_thread()


def blobs(n: int, p: int, k: int, seed: int = 0, spread: float = 0.7, offset: float = 0.0):
    """``n`` examples of ``k`` Gaussian classes in ``p`` dims (float32), labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centers = torch.randn(k, p, generator=g)
    return centers[y] * spread + torch.randn(n, p, generator=g) + offset, y


# --------------------------------------------------------------------------- options and labels
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_key": 1.5}, "label_key"),
        ({"label_key": True}, "label_key"),
        ({"folds": 1}, "folds must be an int >= 2, got 1"),
        ({"folds": 3.0}, "folds"),
        ({"max_examples": 4}, r"max_examples must be an int >= folds \(5\), got 4"),
        ({"probe_dim": 0}, "probe_dim must be a positive int, got 0"),
        ({"ridge_grid": ()}, "ridge_grid"),
        ({"ridge_grid": (1.0, 0.0)}, r"ridge_grid .* got \(1.0, 0.0\)"),
        ({"ridge_grid": (1.0, float("nan"))}, "ridge_grid"),
        ({"ridge_grid": "1.0"}, "ridge_grid"),
        ({"seed": -1}, "seed must be a non-negative int, got -1"),
    ],
)
def test_options_are_validated_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearProbe(**kwargs)
    with pytest.raises(ValueError, match=match):
        linear_probe(nn.Identity(), [], ["0"], **kwargs)


def test_extract_labels():
    x, y = torch.zeros(3, 2), torch.tensor([0, 2, 1])
    assert torch.equal(_extract_labels((x, y), 1), y)
    assert torch.equal(_extract_labels({"image": x, "label": y}, "label"), y)
    assert torch.equal(_extract_labels([x, [0, 2, 1]], 1), y)
    for batch, key, match in [
        (x, 1, "single|Tensor"),
        ((x,), 1, "1 element"),
        ({"image": x}, "label", "without key 'label'"),
        ((x, y.float()), 1, "float32"),
        ((x, torch.eye(3)[y].long()), 1, r"shape \(3, 3\)"),
        ((x, y.bool()), 1, "bool"),
    ]:
        with pytest.raises(AnalysisSkipped, match=match):
            _extract_labels(batch, key)


# --------------------------------------------------------------------------- folds and the closed form
def test_folds_are_stratified_balanced_and_seeded():
    y = torch.tensor([0] * 23 + [1] * 11 + [2] * 6)
    ids = _fold_ids(y, 5, seed=3)
    assert torch.equal(ids, _fold_ids(y, 5, seed=3))
    assert not torch.equal(ids, _fold_ids(y, 5, seed=4))
    assert torch.bincount(ids, minlength=5).tolist() == [8] * 5
    for c in range(3):
        per_fold = torch.bincount(ids[y == c], minlength=5)
        assert int(per_fold.max() - per_fold.min()) <= 1


def test_noise_features_score_chance_not_the_in_sample_accuracy():
    """240 examples of 64 pure-noise features, 4 classes: scored on the examples it was fitted
    on a probe looks like ~0.65; held out it is at chance, 0.25."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(240, 64, generator=g), torch.randint(0, 4, (240,), generator=g)
    onehot = np.eye(4)[y.numpy()]
    in_sample = (Ridge(alpha=1e-3).fit(x.numpy(), onehot).predict(x.numpy()).argmax(1) == y.numpy()).mean()
    assert 0.55 < in_sample < 0.75
    net = nn.Sequential(nn.Identity())
    result = linear_probe(net, [(x[i : i + 40], y[i : i + 40]) for i in range(0, 240, 40)], ["0"])
    assert result.num_examples == 240 and result.num_classes == 4
    assert 0.1 < result.accuracy["0"]["mean"] < 0.4


@pytest.mark.parametrize(
    ("n", "p", "k", "offset"),
    [
        (300, 20, 3, 0.0),
        (300, 20, 3, 100.0),  # a large common offset: centring must be exact enough
        (60, 100, 4, 0.0),  # more dims than training examples
        (400, 8, 12, 3.0),  # more classes than dims (the other LOO formula)
    ],
)
def test_matches_scikit_learn_ridge(n, p, k, offset):
    """Same folds: the chosen strength is RidgeCV's (exact leave-one-out on the training fold),
    and the held-out accuracy is that of sklearn's Ridge on one-hot targets with a bias."""
    x, y = blobs(n, p, k, seed=1, offset=offset)
    sets = [x, x[:, : p // 2]]
    fit = _fit_probes(sets, y, k, folds=5, seed=2)
    assert fit.alphas.shape == (2, 5)
    onehot = np.eye(k)[y.numpy()]
    for s, features in enumerate(sets):
        data = features.double().numpy()
        correct = 0
        for f in range(5):
            test = (fit.folds == f).numpy()
            train = ~test
            centred = data[train] - data[train].mean(0)
            scale = np.sqrt((centred**2).mean())
            alpha = float(fit.alphas[s, f])
            assert RidgeCV(alphas=RIDGE_GRID).fit(data[train] / scale, onehot[train]).alpha_ == alpha
            ridge = Ridge(alpha=alpha, fit_intercept=True).fit(data[train] / scale, onehot[train])
            correct += (ridge.predict(data[test] / scale).argmax(1) == y.numpy()[test]).sum()
        assert abs(float(fit.accuracy[s]) - correct / n) < 1e-6


def test_fit_is_deterministic_and_batches_widths():
    x, y = blobs(200, 16, 4, seed=5)
    alone = [_fit_probes([f], y, 4).accuracy[0] for f in (x, x[:, :7], x * 3 + 1)]
    together = _fit_probes([x, x[:, :7], x * 3 + 1], y, 4).accuracy
    assert together.tolist() == [float(a) for a in alone]
    assert together[0] == together[2]  # invariant to an affine rescaling of the features


def test_non_finite_features_give_nan_for_that_set_only():
    x, y = blobs(100, 6, 3, seed=7)
    broken = x.clone()
    broken[3, 2] = float("nan")
    fit = _fit_probes([x, broken, x[:, :4]], y, 3)
    assert np.isnan(float(fit.accuracy[1]))
    assert fit.accuracy[0] == _fit_probes([x], y, 3).accuracy[0] and not np.isnan(float(fit.accuracy[2]))


# --------------------------------------------------------------------------- features
def test_vit_pools_are_class_token_and_patch_mean():
    vit = H.tiny_vit(depth=2).eval()
    x = torch.randn(6, 3, H.IMG, H.IMG)
    store = _FeatureStore(vit, ["blocks.0", "blocks.1.mlp", "norm:in"], 100, 512, 0, 0)
    seen: dict[str, torch.Tensor] = {}
    with HookSet() as hooks, torch.no_grad():
        store.attach(hooks)
        hooks.forward(vit.blocks[0], lambda m, a, out: seen.setdefault("blocks.0", out.clone()))
        vit(x)
        store.commit(torch.arange(6) % 4)
    assert store.pools() == [("cls", "mean")] * 3
    features = store.features(0)
    assert features is not None and features.shape == (6, 2, 48)
    tokens = seen["blocks.0"]
    assert torch.allclose(features[:, 0], tokens[:, 0])
    assert torch.allclose(features[:, 1], tokens[:, vit.num_prefix_tokens :].mean(1), atol=1e-6)


def test_vit_without_class_token_and_cnn_pool_mean_only():
    import timm

    torch.manual_seed(0)
    gap = timm.create_model(
        "vit_tiny_patch16_224", img_size=H.IMG, patch_size=8, depth=1, class_token=False, global_pool="avg"
    ).eval()
    resnet = H.timm_resnet().eval()
    for model, layers in ((gap, ["blocks.0"]), (resnet, ["layer1.0", "layer4.0"])):
        store = _FeatureStore(model, layers, 100, 512, 0, 0)
        with HookSet() as hooks, torch.no_grad():
            store.attach(hooks)
            model(torch.randn(5, 3, H.IMG, H.IMG))
            store.commit(torch.arange(5) % 2)
        assert store.pools() == [("mean",)] * len(layers)


def test_pooling_happens_in_the_hook_before_in_place_ops():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 64, 2))
    x = torch.randn(5, 3, 8, 8)
    store = _FeatureStore(net, ["0", "3:in", "3"], 100, 512, 0, 0)
    with HookSet() as hooks, torch.no_grad():
        store.attach(hooks)
        net(x)
        store.commit(torch.zeros(5, dtype=torch.long))
        conv = net[0](x)
    f0, f1, f3 = (store.features(i) for i in range(3))
    assert f0 is not None and f1 is not None and f3 is not None
    assert torch.allclose(f0[:, 0], conv.mean(dim=(2, 3)), atol=1e-6)  # before the in-place ReLU
    assert torch.allclose(f1[:, 0], conv.relu().flatten(1), atol=1e-6)  # 2-D input: the vector itself
    assert f3.shape == (5, 1, 2)


def test_half_precision_activations_give_float32_features():
    net = nn.Sequential(nn.Conv2d(3, 4, 1)).to(torch.bfloat16)
    x = torch.randn(5, 3, 8, 8, dtype=torch.bfloat16)
    store = _FeatureStore(net, ["0"], 100, 512, 0, 0)
    with HookSet() as hooks, torch.no_grad():
        store.attach(hooks)
        out = net(x)
        store.commit(torch.zeros(5, dtype=torch.long))
    features = store.features(0)
    assert features is not None and features.dtype == torch.float32
    assert torch.allclose(features[:, 0], out.float().mean(dim=(2, 3)), atol=1e-5)


def test_wide_layers_are_projected_with_a_fixed_seeded_projection():
    net = nn.Sequential(nn.Linear(4, 300), nn.ReLU())
    x = torch.randn(7, 4)

    def features(seed: int) -> torch.Tensor:
        store = _FeatureStore(net, ["0"], 100, 32, seed, 0)
        with HookSet() as hooks, torch.no_grad():
            store.attach(hooks)
            net(x)
            store.commit(torch.zeros(7, dtype=torch.long))
        out = store.features(0)
        assert out is not None
        return out

    a, b, c = features(0), features(0), features(1)
    assert a.shape == (7, 1, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        full = net[0](x)
    # a Johnson-Lindenstrauss projection roughly keeps distances
    ratio = torch.pdist(a[:, 0]) / torch.pdist(full)
    assert 0.5 < float(ratio.median()) < 1.5


def test_max_examples_truncates_the_last_batch():
    x, y = blobs(30, 5, 3)
    net = nn.Sequential(nn.Identity())
    result = linear_probe(net, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 30, 8)], ["0"], max_examples=20)
    assert result.num_examples == 20
    assert (
        linear_probe(net, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 30, 8)], ["0"], max_batches=2).num_examples
        == 16
    )


# --------------------------------------------------------------------------- offline API
def label_images(n: int, seed: int = 0) -> TensorDataset:
    """4-channel images whose channel ``y`` is shifted by 2: its global average carries the label."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 4, 8, 8, generator=g)
    x[torch.arange(n), y] += 2.0
    return TensorDataset(x, y)


def test_a_layer_that_carries_the_label_is_decoded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Identity(), nn.Conv2d(4, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 64, 4))
    result = linear_probe(net, H.loader(label_images(200), batch_size=32), ["0", "1", "3"])
    assert list(result.accuracy) == ["0", "1", "3"]
    assert result.accuracy["0"]["mean"] >= 0.95
    assert result.num_classes == 4 and result.num_examples == 200 and result.folds == 5
    assert set(result.ridge["0"]) == {"mean"} and len(result.ridge["0"]["mean"]) == 5
    assert all(0.0 <= acc["mean"] <= 1.0 for acc in result.accuracy.values())


def test_class_indices_that_no_example_has_are_counted_for_chance_but_never_predicted():
    x, y = blobs(120, 6, 2, seed=8, spread=3.0)
    result = linear_probe(nn.Sequential(nn.Identity()), [(x, y * 5)], ["0"])
    assert result.num_classes == 6 and result.chance == pytest.approx(1 / 6)
    assert (
        result.accuracy["0"]["mean"]
        == linear_probe(nn.Sequential(nn.Identity()), [(x, y)], ["0"]).accuracy["0"]["mean"]
    )


def test_offline_vit_dict_batches_save_load_plot(tmp_path):
    vit = H.tiny_vit(depth=2)
    x, y = H.image_dataset(40, seed=2).tensors
    batches = [{"image": x[i : i + 10], "label": y[i : i + 10]} for i in range(0, 40, 10)]
    training = vit.training
    result = linear_probe(vit, batches, "auto", label_key="label", input_key="image", probe_dim=16)
    assert vit.training == training
    assert H.hook_count(vit) == 0
    assert list(result.accuracy) == ["blocks.0", "blocks.1"]
    assert all(set(pools) == {"cls", "mean"} for pools in result.accuracy.values())
    loaded = ProbeResult.load(result.save(tmp_path / "probe"))
    assert loaded == result and (tmp_path / "probe.json").exists()
    _, ax = result.plot(title="probe")
    assert [line.get_label() for line in ax.get_lines()] == ["cls", "mean", "chance (1/4)"]
    assert ax.get_lines()[-1].get_linestyle() == "--"
    assert ax.get_lines()[-1].get_ydata()[0] == pytest.approx(0.25)


def test_offline_errors_are_value_errors():
    x, y = blobs(20, 3, 2)
    net = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match="no labels"):
        linear_probe(net, [x], ["0"])
    with pytest.raises(ValueError, match="at least 5"):
        linear_probe(net, [(x[:3], y[:3])], ["0"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(net, [(x, torch.zeros(20, dtype=torch.long))], ["0"])
    with pytest.raises(ValueError, match=">= 0"):
        linear_probe(net, [(x, y - 1)], ["0"])
    with pytest.raises(ValueError, match="no batch"):
        linear_probe(net, [], ["0"])


# --------------------------------------------------------------------------- DDP: ranks as threads
class Ranks:
    """``world`` threads standing in for processes: ``all_gather`` and ``sum_over_ranks`` exchange
    tensors between them, so each rank's :meth:`LinearProbe.compute` runs its collectives."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[Any] = [None] * world
        self.local = threading.local()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        shapes = {s.shape for s in self.slots}
        assert len(shapes) == 1, f"all_gather needs equal shapes, got {shapes}"
        out = torch.stack(self.slots)
        self.barrier.wait()
        return out

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_gather(t).sum(0)

    def run(self, fns: list[Any]) -> list[Any]:
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = fns[rank]()
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def measured(probe: LinearProbe, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    probe.reset(torch.device("cpu"))
    for index, batch in enumerate(batches):
        with HookSet() as hooks, torch.no_grad():
            probe.attach(hooks)
            model(batch[0])
        probe.update(MeasuredBatch(batch, None, lambda: None, index=index))
        probe.clear()


def probe_for(model: nn.Module, layers: list[str], ranks: Ranks | None = None, **kwargs: Any) -> LinearProbe:
    probe = LinearProbe(**kwargs)
    context = SetupContext(module=model, layers=layers, short_names=layers)
    if ranks is not None:
        context.all_gather = ranks.all_gather
        context.sum_over_ranks = ranks.sum_over_ranks
        context.world_size = ranks.world
    assert probe.setup(context)
    return probe


def test_ddp_gather_equals_one_process_on_the_same_examples():
    vit = H.tiny_vit(depth=2).eval()
    data = H.image_dataset(56, seed=3)
    batches = [data[i : i + 8] for i in range(0, 56, 8)]
    layers = ["blocks.0", "blocks.1"]
    shards = [batches[0::2], batches[1::2]]  # rank 0: 4 batches (32 examples), rank 1: 3 (24)
    ranks = Ranks(2)
    probes = [probe_for(vit, layers, ranks, max_examples=30, probe_dim=24) for _ in range(2)]
    for probe, shard in zip(probes, shards, strict=True):
        measured(probe, vit, shard)
    values = ranks.run([probe.compute for probe in probes])
    assert values[0] == values[1]
    assert probes[0].num_examples == 30 + 24
    single = probe_for(vit, layers, max_examples=1000, probe_dim=24)
    x = torch.cat([torch.cat([b[0] for b in s])[:30] for s in shards])
    y = torch.cat([torch.cat([b[1] for b in s])[:30] for s in shards])
    measured(single, vit, [(x, y)])
    assert single.compute() == values[0]


def test_ddp_rank_without_examples_still_joins_the_collectives():
    vit = H.tiny_vit(depth=1).eval()
    data = H.image_dataset(24, seed=4)
    ranks = Ranks(2)
    probes = [probe_for(vit, ["blocks.0"], ranks, probe_dim=16) for _ in range(2)]
    measured(probes[0], vit, [data[0:12], data[12:24]])
    measured(probes[1], vit, [])
    values = ranks.run([probe.compute for probe in probes])
    assert values[0] == values[1] and set(values[0]["blocks.0"]) == {"cls", "mean"}
    nobody = [probe_for(vit, ["blocks.0"], ranks) for _ in range(2)]
    for probe in nobody:
        measured(probe, vit, [])
    assert ranks.run([probe.compute for probe in nobody]) == [None, None]


# --------------------------------------------------------------------------- live, in a Lightning fit
def events(path: Path | str) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_callback_logs_probe_scalars_image_caption_and_history(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    val = H.loader(H.image_dataset(40, seed=1))
    cb = CKACallback(layers="sublayers", analyses=[LinearProbe(probe_dim=32)])
    logger = TensorBoardLogger(str(tmp_path))
    trainer = H.trainer(tmp_path, max_epochs=2, callbacks=[cb], logger=logger)
    trainer.fit(module, H.loader(H.image_dataset(32), shuffle=True), val)
    assert len(cb.history) == 2
    for record in cb.history:
        value = record["probe"]
        assert list(value) == cb.rows
        assert all(set(pools) == {"cls", "mean"} for pools in value.values())
        assert all(0.0 <= acc <= 1.0 for pools in value.values() for acc in pools.values())
    acc = events(logger.log_dir)
    expected = {f"probe/{row.removeprefix('model.')}/{pool}" for row in cb.rows for pool in ("cls", "mean")}
    assert expected <= set(acc.Tags()["scalars"])
    steps = [e.step for e in acc.Scalars("val_loss")]
    for row in cb.rows:
        events_ = acc.Scalars(f"probe/{row.removeprefix('model.')}/mean")
        assert [e.step for e in events_] == steps
        assert [e.value for e in events_] == pytest.approx([r["probe"][row]["mean"] for r in cb.history], abs=1e-6)
    images = acc.Images("probe/accuracy")
    assert len(images) == 2 and all(e.width > 100 for e in images)
    assert "cka/self" in acc.Tags()["images"]
    captions = acc.Tensors("probe/accuracy/text_summary")
    assert len(captions) == 1 and b"cross-validation" in captions[0].tensor_proto.string_val[0]
    # The last validation ran on the final weights: the offline probe of the same examples agrees.
    offline = linear_probe(module, val, cb.rows, probe_dim=32)
    for row in cb.rows:
        assert offline.accuracy[row] == pytest.approx(cb.history[-1]["probe"][row], abs=1e-6)


class NoLabels(H.LitClassifier):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_norm", self(batch[0]).norm())


def test_no_labels_warns_and_logs_no_probe_but_cka(tmp_path):
    module = NoLabels(H.tiny_vit(depth=2))
    x, _ = H.image_dataset(16, seed=1).tensors
    cb = CKACallback(layers="sublayers", analyses=[LinearProbe()], norm_ratio=False, attention_distance=False)
    trainer = H.trainer(tmp_path, max_epochs=1, callbacks=[cb], logger=TensorBoardLogger(str(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, H.loader(H.image_dataset(16), shuffle=True), H.loader(TensorDataset(x)))
    messages = [str(w.message) for w in caught if "'probe' analysis" in str(w.message)]
    assert len(messages) == 1 and "no labels" in messages[0]
    assert len(cb.history) == 1 and "probe" not in cb.history[0] and "self" in cb.history[0]
