"""CKACallback under 2-process CPU DDP (gloo): sums are all-reduced, rank zero alone logs."""

from __future__ import annotations

from pathlib import Path

import helpers as H
import numpy as np
import pytest
import torch
from ddp_harness import run_ddp
from torch.utils.data import TensorDataset

from lightning_cka import CKACallback

pytestmark = pytest.mark.slow
N_VAL = 32  # 2 ranks x 2 batches x 8: divides evenly, so no DistributedSampler padding
EPOCHS = 2


class IndexedLit(H.LitClassifier):
    """Records the dataset indices of every validation batch this rank ran (batches are ``(x, y, index)``)."""

    def on_validation_epoch_start(self):
        self.seen = []

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        super().validation_step(batch, batch_idx, dataloader_idx)
        self.seen.append(batch[2].tolist())


def indexed(n: int, seed: int) -> TensorDataset:
    x, y = H.image_dataset(n, seed=seed).tensors
    return TensorDataset(x, y, torch.arange(n))


def _record(trainer, module, callbacks):
    (cb,) = callbacks
    if trainer.global_rank == 0:
        torch.save(module.state_dict(), Path(trainer.default_root_dir) / "final.pt")
    return {
        "seen": module.seen,
        "rows": cb.rows,
        "steps": [r["step"] for r in cb.history],
        "matrices": [r["self"].matrix.tolist() for r in cb.history],
    }


def fit_sublayers():
    """Scenario: a short fit of a tiny ViT with one CKACallback on its sublayers."""
    return {
        "module": IndexedLit(H.tiny_vit(depth=2)),
        "callbacks": [CKACallback(layers="sublayers")],
        "train": H.loader(indexed(32, 0)),
        "val": H.loader(indexed(N_VAL, 1)),
        "epochs": EPOCHS,
        "record": _record,
    }


def test_ddp_one_event_file_and_all_reduced_matrix(tmp_path):
    ranks = run_ddp(tmp_path, "test_callback_ddp:fit_sublayers")
    out = tmp_path / "out"

    # rank zero alone logs: one event file in the whole output tree, one image per epoch
    event_files = list(out.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    acc = H.events(event_files[0])
    # logged at the step of Lightning's validation scalars, one before the global step
    assert [e.step for e in acc.Images("cka/self")] == [s - 1 for s in ranks[0]["steps"]]
    assert len(ranks[0]["steps"]) == EPOCHS
    assert ranks[1]["steps"] == ranks[0]["steps"]
    npz = sorted((out / "tb" / "version_0" / "cka").glob("self_step*.npz"))
    assert len(npz) == EPOCHS
    logged = torch.from_numpy(np.load(npz[-1])["matrix"])

    # each rank saw half of the validation set, together all of it, once
    seen = [r["seen"] for r in ranks]
    flat = [i for rank_batches in seen for batch in rank_batches for i in batch]
    assert sorted(flat) == list(range(N_VAL))
    assert all(len(b) == 8 for rank_batches in seen for b in rank_batches)

    # both ranks computed the same (all-reduced) matrix; it is the one logged
    for r in ranks:
        assert torch.allclose(torch.tensor(r["matrices"][-1], dtype=torch.float64), logged, atol=1e-12)

    # oracle: compare() on the final weights over the very minibatches the two ranks used
    module = H.vit_module()
    module.load_state_dict(torch.load(out / "final.pt", weights_only=True))
    x, y = H.image_dataset(N_VAL, seed=1).tensors
    batches = [(x[b], y[b]) for rank_batches in seen for b in rank_batches]
    rows = ranks[0]["rows"]
    assert rows == [f"model.blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]
    expected = H.cmp(module, batches, rows)
    assert H.max_diff(expected.matrix, logged) < H.TOL

    # and it is not what rank zero's half alone gives: the all-reduce mattered
    half = H.cmp(module, [(x[b], y[b]) for b in seen[0]], rows)
    assert H.max_diff(half.matrix, logged) > 1e-6
