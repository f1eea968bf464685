"""MinibatchCKA under torch.distributed (two gloo processes on CPU).

The children write their compute() results to files; the parent compares them with a
single-process metric over all minibatches.
"""

import datetime
import warnings
from pathlib import Path

import helpers as H
import pytest
import reference as ref
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_cka import MinibatchCKA

WORLD = 2
# torch.multiprocessing.spawn semantics; "fork" where available skips re-importing torch,
# lightning and the library in each child (~20 s on a 2-core machine). Children use one
# thread each, so no OpenMP pool is used across the fork.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def make_batches(seed: int, sizes: tuple[int, ...], cross: bool = False):
    """Deterministic minibatches of three layers (2-D, tokens, conv) and, if cross, two other layers."""
    g = torch.Generator().manual_seed(seed)
    xs_list, ys_list = [], []
    for n in sizes:
        a = torch.randn(n, 10, generator=g) + 2.0
        tokens = (a @ torch.randn(10, 12, generator=g)).reshape(n, 3, 4) + 0.3 * torch.randn(n, 3, 4, generator=g)
        conv = torch.randn(n, 2, 3, 3, generator=g) + a[:, :1, None, None]
        xs_list.append([a, tokens, conv])
        if cross:
            ys_list.append([a[:, :5] + torch.randn(n, 5, generator=g), torch.randn(n, 7, generator=g)])
    return xs_list, ys_list


SELF_SIZES = (8, 12, 5, 16, 9, 3)  # 3: a tail batch that must be skipped on its rank
CROSS_SIZES = (6, 10, 7, 11)
PRESET_SIZES = (8, 6, 10)


def _rank_slice(items, rank):
    return items[rank::WORLD]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        out = {}
        # Self-similarity, different minibatches (and sizes) on each rank.
        xs, _ = make_batches(0, SELF_SIZES)
        metric = MinibatchCKA()
        for batch in _rank_slice(xs, rank):
            metric.update(batch)
        out["self"] = metric.compute()
        out["self_skipped"] = torch.tensor(metric.num_skipped_small)
        # Local state is restored after the synced compute: keep accumulating works.
        out["self_local_batches"] = metric.num_batches.clone()

        # Cross-similarity.
        xs, ys = make_batches(1, CROSS_SIZES, cross=True)
        metric = MinibatchCKA()
        for bx, by in zip(_rank_slice(xs, rank), _rank_slice(ys, rank), strict=True):
            metric.update(bx, by)
        out["cross"] = metric.compute()

        # Rank 1 never receives a minibatch; the layer count is preset so the states agree.
        xs, _ = make_batches(2, PRESET_SIZES)
        metric = MinibatchCKA(num_layers=3)
        if rank == 0:
            for batch in xs:
                metric.update(batch)
        out["preset"] = metric.compute()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True, start_method=START_METHOD)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_self_similarity_equals_single_process(results):
    xs, _ = make_batches(0, SELF_SIZES)
    with pytest.warns(UserWarning, match="at least 4"):  # the tail batch of 3
        expected = H.metric_over(xs)
    for rank in range(WORLD):
        got = results[rank]["self"]
        assert got.shape == (3, 3)
        assert ref.max_abs_err(got, expected) < H.TOL64
    assert ref.max_abs_err(expected, ref.minibatch_cka([b for b in xs if b[0].shape[0] >= 4])) < H.TOL32
    # A single rank's partial result differs, so the comparison above really tests the all-reduce.
    assert ref.max_abs_err(H.metric_over(_rank_slice(xs, 0)), expected) > 1e-4


def test_small_batch_skipped_on_its_rank_only(results):
    skipped = [int(results[r]["self_skipped"]) for r in range(WORLD)]
    assert skipped == [0, 1]  # the n=3 batch is the 6th, which lands on rank 1
    assert [int(results[r]["self_local_batches"]) for r in range(WORLD)] == [3, 2]


def test_cross_similarity_equals_single_process(results):
    xs, ys = make_batches(1, CROSS_SIZES, cross=True)
    expected = H.metric_over(xs, ys)
    for rank in range(WORLD):
        assert results[rank]["cross"].shape == (3, 2)
        assert ref.max_abs_err(results[rank]["cross"], expected) < H.TOL64
    assert ref.max_abs_err(expected, ref.minibatch_cka(xs, ys)) < H.TOL32


def test_rank_without_updates_with_preset_num_layers(results):
    xs, _ = make_batches(2, PRESET_SIZES)
    expected = H.metric_over(xs)
    for rank in range(WORLD):
        assert ref.max_abs_err(results[rank]["preset"], expected) < H.TOL64
    assert torch.isfinite(expected).all()
