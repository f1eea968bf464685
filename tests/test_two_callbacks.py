"""Two CKACallbacks on one Trainer: separate layers, histories, log tags, files and checkpoint state."""

from __future__ import annotations

from pathlib import Path

import helpers as H
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_cka import CKACallback


def test_two_callbacks_with_different_prefixes(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    val = H.val_data()
    a = CKACallback(layers="sublayers")
    b = CKACallback(layers="model.blocks.*.mlp", log_prefix="cka_mlp/")
    logger = TensorBoardLogger(str(tmp_path))
    H.trainer(tmp_path, callbacks=[a, b], logger=logger).fit(module, H.train_data(16), val)
    assert a.state_key != b.state_key
    assert len(a.history) == len(b.history) == 2
    assert b.rows == [f"model.blocks.{i}.mlp" for i in range(3)]
    assert a.history[-1]["self"].rows != b.history[-1]["self"].rows
    # same weights and data: b's matrix is the mlp sub-block of a's
    idx = [a.rows.index(r) for r in b.rows]
    for ra, rb in zip(a.history, b.history, strict=True):
        assert H.max_diff(ra["self"].matrix[idx][:, idx], rb["self"].matrix) < 1e-9
    acc = H.events(logger.log_dir)
    assert {"cka/self", "cka_mlp/self"} <= set(acc.Tags()["images"])
    assert len(acc.Images("cka/self")) == len(acc.Images("cka_mlp/self")) == 2
    assert "cka_mlp/self/to_last/blocks.2.mlp" in acc.Tags()["scalars"]
    assert "cka/self/to_last/blocks.2.mlp" in acc.Tags()["scalars"]
    assert len(list((Path(logger.log_dir) / "cka").glob("self_*.npz"))) == 2
    assert len(list((Path(logger.log_dir) / "cka_mlp").glob("self_*.npz"))) == 2


def test_two_callbacks_keep_separate_state_and_tags(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    ref = H.tiny_vit(depth=2, seed=5)
    val = H.val_data()
    a = CKACallback(layers="sublayers")
    b = CKACallback(layers="model.blocks.*.mlp", log_prefix="cka_mlp", reference=ref, reference_layers="auto")
    logger = TensorBoardLogger(str(tmp_path))
    tr = H.trainer(tmp_path, callbacks=[a, b], logger=logger, max_epochs=2)
    tr.fit(module, H.train_data(16), val)
    assert a.history is not b.history
    assert len(a.history) == len(b.history) == 2
    assert a.rows == [f"model.blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp")]
    assert b.rows == [f"model.blocks.{i}.mlp" for i in range(3)]
    assert "reference" not in a.history[-1] and b.history[-1]["reference"].matrix.shape == (3, 2)
    # signals measured by the first callback only
    assert "norm_ratio" in a.history[-1] and "attention_distance" in a.history[-1]
    assert "norm_ratio" not in b.history[-1] and "attention_distance" not in b.history[-1]
    assert H.max_diff(a.history[-1]["self"].matrix, H.cmp(module, val, a.rows).matrix) < H.TOL
    assert H.max_diff(b.history[-1]["self"].matrix, H.cmp(module, val, b.rows).matrix) < H.TOL
    expected_ref = H.cmp(module, val, b.rows, other=ref, other_layers="auto")
    assert H.max_diff(b.history[-1]["reference"].matrix, expected_ref.matrix) < H.TOL

    tags = H.tb_tags(logger.log_dir)
    assert tags["cka/self"] == tags["cka_mlp/self"] == tags["cka_mlp/reference"] == 2
    assert "cka/reference" not in tags
    assert tags["cka/self/to_last/blocks.2.mlp"] == tags["cka_mlp/self/to_last/blocks.2.mlp"] == 2
    captions = [t for t in tags if t.endswith("/text_summary")]
    norm = [t for t in tags if t.startswith("norm_ratio/") and t not in captions]
    dist = [t for t in tags if t.startswith("attention_distance/") and t not in captions]
    assert "norm_ratio/blocks.0/attn/cls" in norm and "attention_distance/blocks.0.attn" in dist
    assert all(tags[t] == 2 for t in norm + dist), {t: tags[t] for t in norm + dist}  # once per validation
    # a figure's caption comes with its first appearance only
    assert "attention_distance/heads/text_summary" in captions
    assert all(tags[t] == 1 for t in captions), {t: tags[t] for t in captions}
    # checkpoint state is separate too
    state = tr._checkpoint_connector.dump_checkpoint()["callbacks"]
    assert len(state[a.state_key]["history"]) == len(state[b.state_key]["history"]) == 2
    assert state[a.state_key]["history"][0]["cka"].keys() == {"self"}
    assert state[b.state_key]["history"][0]["cka"].keys() == {"self", "reference"}
