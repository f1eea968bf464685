"""CKACallback under 2-process CPU DDP (gloo): sums are all-reduced, rank zero alone logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers as H
import numpy as np
import pytest
import torch

from lightning_cka import compare

TIMEOUT_S = 180
N_VAL = 32  # 2 ranks x 2 batches x 8: divides evenly, so no DistributedSampler padding
EPOCHS = 2

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import helpers as H
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import TensorDataset

    from lightning_cka import CKACallback


    class Lit(H.LitClassifier):
        def on_validation_epoch_start(self):
            self.seen = []

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            super().validation_step(batch, batch_idx, dataloader_idx)
            self.seen.append(batch[2].tolist())


    def indexed(n, seed):
        x, y = H.image_dataset(n, seed=seed).tensors
        return TensorDataset(x, y, torch.arange(n))


    if __name__ == "__main__":
        out = Path(sys.argv[1])
        n_val, epochs = int(sys.argv[2]), int(sys.argv[3])
        module = Lit(H.tiny_vit(depth=2))
        cb = CKACallback(layers="sublayers")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            callbacks=[cb],
            max_epochs=epochs,
            limit_train_batches=2,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=TensorBoardLogger(str(out), name="tb", version=0),
            default_root_dir=str(out),
        )
        trainer.fit(module, H.loader(indexed(32, 0)), H.loader(indexed(n_val, 1)))
        rank = trainer.global_rank
        record = {
            "world_size": trainer.world_size,
            "seen": module.seen,
            "rows": cb.rows,
            "steps": [r["step"] for r in cb.history],
            "matrices": [r["self"].matrix.tolist() for r in cb.history],
        }
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            torch.save(module.state_dict(), out / "final.pt")
    """
)


def run_script(tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ)
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH", "")) if p)
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(N_VAL), str(EPOCHS)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # rank 1 is our grandchild: kill the whole group on a hang
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"DDP run did not finish within {TIMEOUT_S}s (deadlock?)")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


@pytest.mark.slow
def test_ddp_one_event_file_and_all_reduced_matrix(ddp_run):
    out, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2]

    # rank zero alone logs: one event file in the whole output tree, one image per epoch
    event_files = list(out.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_files[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    # logged at the step of Lightning's validation scalars, one before the global step
    assert [e.step for e in acc.Images("cka/self")] == [s - 1 for s in ranks[0]["steps"]]
    assert len(ranks[0]["steps"]) == EPOCHS
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
    module = H.LitClassifier(H.tiny_vit(depth=2))
    module.load_state_dict(torch.load(out / "final.pt", weights_only=True))
    x, y = H.image_dataset(N_VAL, seed=1).tensors
    batches = [(x[b], y[b]) for rank_batches in seen for b in rank_batches]
    rows = ranks[0]["rows"]
    assert rows == [f"model.blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]
    expected = compare(module, batches, layers=rows, progress=False)
    assert float((expected.matrix - logged).abs().max()) < 1e-6

    # and it is not what rank zero's half alone gives: the all-reduce mattered
    half = compare(module, [(x[b], y[b]) for b in seen[0]], layers=rows, progress=False)
    assert float((half.matrix - logged).abs().max()) > 1e-6
