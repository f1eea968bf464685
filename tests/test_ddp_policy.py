"""Failure policy under 2-process DDP: a rank whose reference fails, a rank with no usable batch."""

from __future__ import annotations

import helpers as H
import pytest
import torch
from ddp_harness import SeenBatches, batches_of, run_ddp
from lightning.pytorch import Callback
from torch import nn

from lightning_cka import CKACallback

pytestmark = pytest.mark.slow


class FailsOnRankOne(nn.Module):
    """A reference that works on rank 0 and raises on rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = H.timm_resnet("resnet10t")

    def forward(self, x):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("reference unavailable on this node")
        return self.net(x)


def _record(trainer, module, callbacks):
    cb, seen = callbacks
    return {
        "seen": seen.batches,
        "self": [r["self"].matrix.tolist() for r in cb.history if "self" in r],
        "reference": [r["reference"].matrix.tolist() for r in cb.history if "reference" in r],
    }


def failing_reference():
    torch.manual_seed(0)
    return {
        "module": H.LitClassifier(H.tiny_vit(depth=2)),
        "callbacks": [
            CKACallback(layers="sublayers", reference=FailsOnRankOne(), reference_layers="auto"),
            SeenBatches(),
        ],
        "val": H.loader(H.image_dataset(32, seed=1)),
        "record": _record,
    }


class PoisonOnRankOne(Callback):
    """NaN patch embeddings on rank 1: every layer of that rank is non-finite."""

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 1:
            pl_module.model.patch_embed.register_forward_hook(lambda m, a, o: torch.full_like(o, float("nan")))


def empty_rank():
    torch.manual_seed(0)
    return {
        "module": H.LitClassifier(H.tiny_vit(depth=2)),
        "callbacks": [CKACallback(layers="sublayers"), SeenBatches(), PoisonOnRankOne()],
        "val": H.loader(H.image_dataset(16, seed=1)),  # one batch of 8 per rank
        "record": lambda trainer, module, cbs: _record(trainer, module, cbs[:2]),
    }


def test_failing_reference_on_one_rank(tmp_path):
    ranks = run_ddp(tmp_path, "test_ddp_policy:failing_reference")
    assert ranks[0]["self"] == ranks[1]["self"] and len(ranks[0]["self"]) == 1
    assert ranks[0]["reference"] == ranks[1]["reference"] and len(ranks[0]["reference"]) == 1
    spec = failing_reference()
    module, reference = spec["module"], spec["callbacks"][0].reference.net
    everything = H.cmp(module, batches_of(ranks), "sublayers").matrix
    assert H.max_diff(torch.tensor(ranks[0]["self"][0]), everything) < H.TOL
    rank0 = [torch.tensor(b) for b in ranks[0]["seen"]]
    cross = H.cmp(module, rank0, "sublayers", reference=reference, reference_layers="auto")
    assert H.max_diff(torch.tensor(ranks[0]["reference"][0]), cross.matrix) < H.TOL


def test_rank_without_usable_batch_still_reports(tmp_path):
    ranks = run_ddp(tmp_path, "test_ddp_policy:empty_rank")
    assert len(ranks[0]["self"]) == len(ranks[1]["self"]) == 1  # 1 usable batch over 2 ranks
    assert ranks[0]["self"] == ranks[1]["self"]
    module = empty_rank()["module"]
    rank0 = [torch.tensor(b) for b in ranks[0]["seen"]]
    expected = H.cmp(module, rank0, "sublayers").matrix
    assert H.max_diff(torch.tensor(ranks[0]["self"][0]), expected) < H.TOL
