"""Convergence, linear probes and localization under 2-process CPU DDP (gloo) equal one process on
the same examples, and an analysis whose ``compute()`` fails on some processes only is skipped on all
of them without a deadlock.

One 2-process ``fit`` (2 validations) runs all of it; the single-process oracle replays the weights of
each validation with ``trainer.validate`` on the union of both ranks' validation batches, rank 0's
first: the order in which the probes gather examples, so that their folds are the same. The failure
agreement is also driven with threads standing in for processes, for the cases one run cannot hold.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path

import helpers as H
import pytest
import torch
from ddp_harness import run_ddp
from torch.utils.data import TensorDataset

from lightning_cka import CKACallback
from lightning_cka.analyses import Analysis, MeasuredBatch, SetupContext
from lightning_cka.analyses.localization import localization
from lightning_cka.callback import _Ranks

N_VAL = 32  # 2 ranks x 2 batches of 8: DistributedSampler(shuffle=False) needs no padding
EPOCHS = 2
LAYERS = ["model.blocks.0", "model.blocks.1"]
LAST = "model.blocks.1"  # the localization layer (the last block)
TOL = 1e-5


class IndexedLit(H.LitClassifier):
    """Records the dataset indices of every validation batch, per validation (batches are ``(x, y, index)``)."""

    def on_validation_epoch_start(self):
        self.seen = getattr(self, "seen", [])
        self.seen.append([])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        super().validation_step(batch, batch_idx, dataloader_idx)
        self.seen[-1].append(batch[2].tolist())


class FailsOnRankOne(Analysis):
    """``compute()`` raises on process 1 only: at the first validation before the collective that
    process 0 makes, at the second after it."""

    key = "flaky"

    def setup(self, context: SetupContext) -> bool:
        self.sum_over_ranks = context.sum_over_ranks
        self.calls = 0
        return True

    def update(self, batch: MeasuredBatch) -> None:
        pass

    def compute(self) -> float:
        self.calls += 1
        rank = torch.distributed.get_rank()
        if rank == 1 and self.calls == 1:
            raise RuntimeError("flaky before the collective")
        total = self.sum_over_ranks(torch.tensor([rank + 1.0]))
        if rank == 1:
            raise RuntimeError("flaky after the collective")
        return float(total)


def callback(*extra: Analysis) -> CKACallback:
    return CKACallback(
        layers=LAYERS,
        norm_ratio=False,
        attention_distance=False,
        convergence=True,
        probes=True,
        probe_max_examples=N_VAL,
        probe_folds=4,
        localization=True,
        analyses=extra,
    )


def val_set() -> TensorDataset:
    x, y = H.image_dataset(N_VAL, seed=1).tensors
    return TensorDataset(x, y, torch.arange(N_VAL))


def plain(record: dict) -> dict:
    """A history record as JSON (tensors as lists)."""
    out = {"keys": sorted(record), **{k: record[k] for k in ("epoch", "step", "convergence", "probe") if k in record}}
    if "localization" in record:
        out["localization"] = {
            layer: {k: e[k].tolist() if k == "matrix" else e[k] for k in ("matrix", "diagonal", "hit_rate", "grid")}
            for layer, e in record["localization"].items()
        }
    return out


def _record(trainer, module, callbacks):
    cb, snaps = callbacks
    if trainer.global_rank == 0:
        torch.save(snaps.states, Path(trainer.default_root_dir) / "states.pt")
    return {"seen": module.seen, "global_step": trainer.global_step, "history": [plain(r) for r in cb.history]}


def fit_all():
    """Scenario: a short fit of a tiny ViT with convergence, probes, localization and a flaky analysis."""
    torch.set_num_threads(1)  # two processes on a busy machine; the same thread count as the oracle
    return {
        "module": IndexedLit(H.tiny_vit(depth=2), lr=0.2),
        "callbacks": [callback(FailsOnRankOne()), H.Snapshots()],
        "train": H.loader(H.image_dataset(32)),
        "val": H.loader(val_set()),
        "epochs": EPOCHS,
        "record": _record,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_analyses")
    ranks = run_ddp(tmp, "test_ddp_analyses:fit_all", timeout=150)
    out = tmp / "out"
    states = torch.load(out / "states.pt", weights_only=True)
    assert len(states) == EPOCHS

    # each rank saw the same half, in the same order, at every validation; together all of it once
    for r in ranks:
        assert len(r["seen"]) == EPOCHS and all(v == r["seen"][0] for v in r["seen"])
    batches = ranks[0]["seen"][0] + ranks[1]["seen"][0]
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(N_VAL)) and [len(b) for b in batches] == [8] * 4

    # the oracle: one process, the same weights, the same minibatches, rank 0's first
    x, y, index = val_set().tensors
    loader = H.loader(TensorDataset(x[order], y[order], index[order]))
    module, oracle = IndexedLit(H.tiny_vit(depth=2)), callback()
    trainer = H.trainer(tmp / "oracle", callbacks=[oracle])
    for state in states:
        module.load_state_dict(state)
        trainer.validate(module, loader, verbose=False)
    assert module.seen == [batches] * EPOCHS
    return ranks, [plain(r) for r in oracle.history], states, out, (x, batches)


@pytest.mark.slow
def test_convergence_equals_one_process(run):
    ranks, oracle, *_ = run
    for r in ranks:
        history = r["history"]
        assert "convergence" not in history[0]  # nothing to compare with yet
        value = history[1]["convergence"]
        for against in ("previous", "first"):
            assert list(value[against]) == LAYERS
            assert [value[against][n] for n in LAYERS] == pytest.approx(
                [oracle[1]["convergence"][against][n] for n in LAYERS], abs=TOL
            )
    assert min(ranks[0]["history"][1]["convergence"]["first"].values()) < 1 - 1e-4  # the layers moved


@pytest.mark.slow
def test_probes_equal_one_process_with_the_same_folds(run):
    ranks, oracle, *_ = run
    for validation in range(EPOCHS):
        expected = oracle[validation]["probe"]
        assert set(expected) == set(LAYERS) and all(set(p) == {"cls", "mean"} for p in expected.values())
        for r in ranks:
            got = r["history"][validation]["probe"]
            assert got.keys() == expected.keys()
            for layer, pools in expected.items():
                assert got[layer] == pytest.approx(pools, abs=0.01)


@pytest.mark.slow
def test_localization_equals_one_process(run):
    ranks, oracle, states, _, (x, batches) = run
    for validation in range(EPOCHS):
        expected = oracle[validation]["localization"][LAST]
        matrix = torch.tensor(expected["matrix"], dtype=torch.float64)
        assert matrix.shape == (64, 64) and list(expected["grid"]) == [8, 8]
        for r in ranks:
            got = r["history"][validation]["localization"]
            assert list(got) == [LAST]
            assert H.max_diff(torch.tensor(got[LAST]["matrix"], dtype=torch.float64), matrix) < TOL
            assert got[LAST]["diagonal"] == pytest.approx(expected["diagonal"], abs=TOL)
            assert got[LAST]["hit_rate"] == pytest.approx(expected["hit_rate"], abs=TOL)
    # and the sums of both ranks mattered: rank 0's half alone gives another map
    module = IndexedLit(H.tiny_vit(depth=2))
    module.load_state_dict(states[-1])
    half = localization(module, [x[b] for b in batches[:2]], LAST).matrix
    assert H.max_diff(half, torch.tensor(ranks[0]["history"][-1]["localization"][LAST]["matrix"])) > 1e-4


@pytest.mark.slow
def test_rank_zero_alone_logs(run):
    ranks, _, _, out, _ = run
    (event_file,) = out.rglob("events.out.tfevents.*")
    acc = H.events(event_file)
    last = ranks[0]["history"][-1]
    logged = {
        "cka/convergence/previous/blocks.0": last["convergence"]["previous"]["model.blocks.0"],
        "cka/convergence/first/blocks.1": last["convergence"]["first"]["model.blocks.1"],
        "probe/blocks.1/mean": last["probe"]["model.blocks.1"]["mean"],
        "localization/blocks.1/diagonal": last["localization"][LAST]["diagonal"],
        "localization/blocks.1/hit_rate": last["localization"][LAST]["hit_rate"],
    }
    for tag, value in logged.items():
        assert acc.Scalars(tag)[-1].value == pytest.approx(value, abs=1e-6), tag
    assert len(acc.Scalars("probe/blocks.1/mean")) == EPOCHS
    assert {"localization/blocks.1", "probe/accuracy", "cka/convergence"} <= set(acc.Tags()["images"])


@pytest.mark.slow
def test_compute_failing_on_one_rank_is_skipped_on_both_without_deadlock(run):
    ranks, *_ = run
    for r in ranks:
        assert r["global_step"] == 2 * EPOCHS  # training went on after the failure at the first validation
        assert all("flaky" not in h["keys"] for h in r["history"])  # skipped on both ranks, both times
        assert [h["keys"] for h in r["history"]] == [h["keys"] for h in ranks[0]["history"]]
    rank0 = [w for w in ranks[0]["warnings"] if "'flaky'" in w]
    assert len(rank0) == 1 and "failed in compute on process(es) [1]" in rank0[0], rank0
    assert "skipped for this validation on every process" in rank0[0]
    rank1 = [w for w in ranks[1]["warnings"] if "'flaky'" in w]
    for when in ("before", "after"):
        assert any(f"on process 1 (RuntimeError: flaky {when} the collective)" in w for w in rank1), rank1
    assert not any(math.isnan(v) for r in ranks for v in r["history"][1]["convergence"]["first"].values())


# --------------------------------------------------------------------------- the agreement, ranks as threads
class Threads:
    """``world`` threads standing in for processes, each with its own CKACallback whose collective
    functions exchange tensors between the threads (a mismatched protocol breaks the barrier, never hangs)."""

    def __init__(self, world: int, strict: bool = False) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=10)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.local = threading.local()
        self.callbacks = [CKACallback(strict=strict) for _ in range(world)]
        for rank, cb in enumerate(self.callbacks):
            cb._ranks = _Ranks(None)
            cb._ranks.world_size, cb._ranks.rank, cb._ranks._sum = world, rank, self.sum_over_ranks

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        assert len({s.shape for s in self.slots}) == 1, "all_gather needs equal shapes"
        out = torch.stack(self.slots)
        self.barrier.wait()
        return out

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_gather(t).sum(0)

    def compute(self, make: Callable[[int, CKACallback], Analysis]) -> list:
        """``callback._compute(make(rank, callback))`` on every rank: the values, or the exceptions."""
        results: list = [None] * self.world

        def body(rank: int) -> None:
            self.local.rank = rank
            cb = self.callbacks[rank]
            try:
                results[rank] = cb._compute(make(rank, cb))
            except Exception as err:
                results[rank] = err

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a rank is still waiting"
        assert not any(isinstance(r, threading.BrokenBarrierError) for r in results), results
        return results


class Collects(Analysis):
    """Two collectives (a sum, then a gather); raises on the ranks of ``fail`` at ``where``
    (``0``: before the first collective, ``1``: between them, ``2``: after both)."""

    key = "collects"

    def __init__(self, rank: int, cb: CKACallback, threads: Threads, fail: dict[int, int], swallow: bool = False):
        self.rank, self.fail, self.swallow = rank, fail, swallow
        self.sum, self.gather = cb._checked(threads.sum_over_ranks), cb._checked(threads.all_gather)

    def setup(self, context: SetupContext) -> bool:
        return True

    def update(self, batch: MeasuredBatch) -> None:
        pass

    def _step(self, where: int) -> None:
        if self.fail.get(self.rank) == where:
            raise RuntimeError(f"rank {self.rank} fails at {where}")

    def compute(self) -> float:
        self._step(0)
        total = self._call(self.sum, torch.tensor([self.rank + 1.0]))
        self._step(1)
        gathered = self._call(self.gather, torch.tensor([10.0 * (self.rank + 1)]))
        self._step(2)
        return float(total.sum() + gathered.sum())

    def _call(self, collective, t):
        try:
            return collective(t)
        except Exception:
            if not self.swallow:
                raise
            return torch.zeros(1)  # an analysis that ignores the failure and goes on


def healthy(world: int) -> float:
    return world * (world + 1) / 2 * 11


@pytest.mark.filterwarnings("ignore:CKACallback")
@pytest.mark.parametrize(
    "world, fail, swallow",
    [
        (2, {}, False),
        (2, {1: 0}, False),  # before any collective
        (2, {1: 1}, False),  # between the two
        (2, {1: 2}, False),  # after both
        (2, {0: 1}, False),  # on rank zero
        (2, {0: 1, 1: 1}, False),  # everywhere, alike
        (3, {1: 0, 2: 1}, False),  # at different points
        (3, {2: 0}, True),  # the others swallow the failure at their collective and go on
    ],
)
def test_compute_failure_agreement(world, fail, swallow):
    threads = Threads(world)
    values = threads.compute(lambda rank, cb: Collects(rank, cb, threads, fail, swallow))
    assert values == ([healthy(world)] * world if not fail else [None] * world)
    # the ranks are in step again: the next validation computes on every rank
    assert threads.compute(lambda rank, cb: Collects(rank, cb, threads, {})) == [healthy(world)] * world


def test_compute_failure_warnings(recwarn):
    threads = Threads(2)
    threads.compute(lambda rank, cb: Collects(rank, cb, threads, {1: 1}))
    messages = [str(w.message) for w in recwarn]
    assert any("failed in compute on process 1 (RuntimeError: rank 1 fails at 1)" in m for m in messages)
    assert any("failed in compute on process(es) [1] (their own warnings give the cause)" in m for m in messages)
    recwarn.clear()
    threads.compute(lambda rank, cb: Collects(rank, cb, threads, {0: 2, 1: 2}))  # alike everywhere: said once
    messages = [str(w.message) for w in recwarn if "fails at 2" in str(w.message) or "process" in str(w.message)]
    assert all("on process" not in m and "process(es)" not in m for m in messages), messages


def test_strict_stops_every_rank():
    threads = Threads(2, strict=True)
    errors = threads.compute(lambda rank, cb: Collects(rank, cb, threads, {1: 0}))
    assert isinstance(errors[1], RuntimeError) and "rank 1 fails at 0" in str(errors[1])
    assert isinstance(errors[0], RuntimeError) and "on process(es) [1] (strict=True)" in str(errors[0])
