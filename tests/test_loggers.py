"""What CKACallback writes with each logger: TensorBoard images and matrices for a lone
``trainer.validate``, PNG figures and CSV scalars with the CSVLogger, nothing without a logger,
and never an overwritten file."""

from __future__ import annotations

from pathlib import Path

import helpers as H
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_cka import CKACallback, CKAResult


def test_validate_alone_logs(tmp_path):
    module = H.vit_module()
    val = H.val_data()
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path))
    H.trainer(tmp_path, callbacks=[cb], logger=logger).validate(module, val, verbose=False)
    assert len(cb.history) == 1 and cb.history[0]["step"] == 0
    images = H.events(logger.log_dir).Images("cka/self")
    assert [e.step for e in images] == [0]
    assert H.max_diff(cb.history[0]["self"].matrix, H.cmp(module, val, "sublayers").matrix) < H.TOL
    assert len(list((Path(logger.log_dir) / "cka").glob("self_step*.npz"))) == 1


def test_two_validates_at_one_step_keep_both_files(tmp_path):
    module = H.vit_module()
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path), version=0)
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger)
    tr.validate(module, H.val_data(seed=1), verbose=False)
    with pytest.warns(UserWarning, match="validation inputs differ from the kept ones"):  # layer convergence
        tr.validate(module, H.val_data(seed=2), verbose=False)
    files = sorted(p.name for p in (Path(logger.log_dir) / "cka").glob("self_step*.npz"))
    assert files == ["self_step00000000-v1.npz", "self_step00000000.npz"]
    first = CKAResult.load(Path(logger.log_dir) / "cka" / files[1])
    second = CKAResult.load(Path(logger.log_dir) / "cka" / files[0])
    assert H.max_diff(first.matrix, cb.history[0]["self"].matrix) == 0.0
    assert H.max_diff(second.matrix, cb.history[1]["self"].matrix) == 0.0
    assert H.max_diff(first.matrix, second.matrix) > 1e-6  # two different validations, two different files


def test_no_logger(tmp_path):
    module = H.vit_module()
    cb = CKACallback(layers="sublayers")
    tr = H.trainer(tmp_path, callbacks=[cb], logger=False)
    tr.fit(module, H.train_data(16), H.val_data())
    assert tr.loggers == []
    assert len(cb.history) == 2
    assert all(torch.isfinite(r["self"].matrix).all() for r in cb.history)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_csv_logger_writes_png_figures(tmp_path):
    module = H.vit_module()
    cb = CKACallback(reference=H.timm_resnet("resnet10t"))
    logger = CSVLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger)
    tr.fit(module, H.train_data(16), H.val_data())
    from PIL import Image

    figures = Path(logger.log_dir) / "figures"
    self_pngs = sorted(figures.glob("cka_self_step*.png"))
    ref_pngs = sorted(figures.glob("cka_reference_step*.png"))
    assert [p.name for p in self_pngs] == ["cka_self_step00000001.png", "cka_self_step00000003.png"]
    assert len(ref_pngs) == 2
    with Image.open(self_pngs[0]) as img:
        assert img.width > 100 and img.height > 100
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "cka/self/adjacent_mean" in metrics
    assert len(list((Path(logger.log_dir) / "cka").glob("*.npz"))) == 4
