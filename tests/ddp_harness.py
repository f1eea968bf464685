"""One harness for 2-process CPU DDP tests (gloo): run a scenario in ``torchrun``-free Lightning
DDP and read back what each rank recorded.

A scenario is a function ``name() -> dict`` in an importable test module, returning:

- ``module``, ``callbacks``, ``val`` (a DataLoader) and optionally ``train`` and ``epochs``
  (without ``train``, the run is ``trainer.validate``);
- ``record(trainer, module, callbacks) -> dict``: what the rank writes, JSON-serialisable.

``run_ddp(tmp_path, "test_module:scenario")`` returns the records of ranks 0 and 1, each with
``world_size`` and ``warnings`` (``"Category: message"`` of every warning that rank raised while
running) added. Test modules
compare them with each other and with a single-process oracle over the same minibatches
(each rank's batches are recorded with :class:`SeenBatches`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

TIMEOUT_S = 240

SCRIPT = textwrap.dedent(
    """
    import importlib
    import json
    import sys
    import warnings
    from pathlib import Path

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    if __name__ == "__main__":
        out = Path(sys.argv[1])
        module_name, name = sys.argv[2].split(":")
        spec = getattr(importlib.import_module(module_name), name)()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            callbacks=spec["callbacks"],
            max_epochs=spec.get("epochs", 1),
            limit_train_batches=2,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=TensorBoardLogger(str(out), name="tb", version=0),
            default_root_dir=str(out),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if "train" in spec:
                trainer.fit(spec["module"], spec["train"], spec["val"])
            else:
                trainer.validate(spec["module"], spec["val"], verbose=False)
        record = spec["record"](trainer, spec["module"], spec["callbacks"])
        record["world_size"] = trainer.world_size
        record["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    """
)


def run_ddp(tmp_path: Path, scenario: str, timeout: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """Run ``scenario`` (``"module:function"``) in 2-process DDP; the records of ranks 0 and 1.

    Both processes are killed and the test fails when they have not finished after ``timeout``
    seconds (a deadlock: one rank waiting in a collective the other never joins)."""
    script = tmp_path / "ddp_scenario.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ)
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH", "")) if p)
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), scenario],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # rank 1 is a grandchild: kill the whole group on a hang
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"DDP scenario {scenario} did not finish within {timeout:g}s (deadlock?)")
    assert proc.returncode == 0, stderr[-4000:]
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    return records


class SeenBatches(pl.Callback):
    """Records the inputs of every validation batch this rank ran (to rebuild the same minibatches
    in one process)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.batches.append(batch[0].tolist())


def batches_of(records: list[dict[str, Any]], key: str = "seen") -> list[torch.Tensor]:
    """Every rank's recorded input batches as tensors, rank 0 first."""
    return [torch.tensor(b) for r in records for b in r[key]]
