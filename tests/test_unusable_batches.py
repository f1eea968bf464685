"""CKACallback on validation batches it cannot use: non-finite activations in some layers, tail
batches of fewer than 4 examples, and runs where no batch is usable."""

from __future__ import annotations

import math

import helpers as H
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import Subset

from lightning_cka import CKACallback, MinibatchCKA

ROWS = [f"model.blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]


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


# --------------------------------------------------------------------------- non-finite activations
def test_nan_batches_are_skipped(tmp_path):
    module = H.vit_module()
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
    ratios = cb.history[0]["norm_ratio"]
    assert ratios and all(math.isfinite(v) for v in ratios.values())

    # Non-finite values are skipped per layer: pairs of upstream layers (before the poisoned one)
    # use all 5 batches, every pair touching a poisoned layer only the good batches (0, 2, 4).
    upstream = [ROWS.index("model.blocks.0.attn"), ROWS.index("model.blocks.0.mlp")]
    everything = H.cmp(module, val, "sublayers").matrix
    good = [i for b in (0, 2, 4) for i in range(8 * b, 8 * b + 8)]
    good_only = H.cmp(module, H.loader(Subset(data, good)), "sublayers").matrix
    expected = good_only.clone()
    for i in upstream:
        for j in upstream:
            expected[i, j] = everything[i, j]
    assert H.max_diff(got, expected) < H.TOL
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
    assert H.max_diff(got[downstream], metric.compute()[downstream]) < H.TOL
    assert H.max_diff(got, everything) > 1e-6  # the poisoned batches made a difference
    assert H.tb_steps(logger.log_dir, "cka/self") == [0]
    assert H.hook_count(module) == 1  # only the test's own poison hook is left


# --------------------------------------------------------------------------- small batches
def test_small_tail_batch_warns_and_is_skipped(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    data = H.image_dataset(18, seed=1)
    cb = CKACallback()
    with pytest.warns(UserWarning, match="at least 4"):
        H.trainer(tmp_path, callbacks=[cb]).validate(module, H.loader(data), verbose=False)
    assert len(cb.history) == 1
    full_batches_only = H.cmp(module, H.loader(Subset(data, range(16))), "auto")
    assert H.max_diff(cb.history[0]["self"].matrix, full_batches_only.matrix) < H.TOL
    assert torch.isfinite(cb.history[0]["self"].matrix).all()


def test_only_tiny_batches_gives_no_entry(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    cb = CKACallback()
    with pytest.warns(UserWarning, match="at least 4"):
        H.trainer(tmp_path, callbacks=[cb]).validate(module, H.loader(H.image_dataset(3)), verbose=False)
    assert [key for record in cb.history for key in record if key in ("self", "reference")] == []
    assert H.hook_count(module) == 0
