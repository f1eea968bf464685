"""The callback never ends or changes the user's training: shared or failing references, test-time
augmentation, unwritable folders (warned, or raised with ``strict=True``), and the model left as found."""

from __future__ import annotations

from pathlib import Path

import helpers as H
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_cka import CKACallback


def fit(tmp_path, module, callbacks, epochs=2, **kwargs):
    tr = H.trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, **kwargs)
    tr.fit(module, H.train_data(16), H.val_data())
    return tr


def flags(module: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in module.modules()], [p.requires_grad for p in module.parameters()]


def test_reference_that_is_the_model_itself_trains_normally(tmp_path):
    """A reference sharing every module with the model: training goes on, nothing is frozen."""
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(layers="sublayers", reference=module.model, reference_layers="sublayers")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit(tmp_path, module, [cb])
    assert module.training_steps == 4
    assert all(p.requires_grad for p in module.parameters())
    assert all(m.training for m in module.modules())  # Lightning puts the model back in train mode
    moved = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.blocks.0.attn.qkv.weight" in moved
    # the model against itself: the cross matrix equals the self matrix
    last = cb.history[-1]
    assert H.max_diff(last["reference"].matrix, last["self"].matrix) < H.TOL


def test_shared_reference_keeps_each_module_mode_and_grad_flags(tmp_path):
    """Frozen, eval-mode submodules (fine-tuning) stay as the user set them."""
    module = H.LitClassifier(H.tiny_vit(depth=2))
    module.model.patch_embed.requires_grad_(False)
    reference = nn.Sequential(module.model.patch_embed, nn.Flatten(), nn.Linear(64 * 48, 4))
    seen = []

    cb = CKACallback(layers="sublayers", reference=reference, reference_layers=["0", "2"])
    module.on_train_batch_start = lambda *a: seen.append(flags(reference))  # type: ignore[method-assign]
    fit(tmp_path, module, [cb])
    assert cb.history and "reference" in cb.history[-1]
    grads = [p.requires_grad for p in reference.parameters()]
    assert grads == [False, False, True, True]  # the callback never touches requires_grad
    assert len(seen) == 4  # one record per training step
    # the reference and the modules it shares (patch_embed, its conv and norm) train at every step
    assert all(train_flags[:4] == [True] * 4 for train_flags, _ in seen), seen


def test_test_time_augmentation_skips_reference_batches_only(tmp_path):
    """validation_step runs the model on twice the examples of the batch: reference CKA is
    skipped with a warning, self CKA goes on, fit completes."""

    class TTA(H.LitClassifier):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            logits = self(torch.cat([x, x.flip(-1)])).view(2, len(x), -1).mean(0)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))

    module = TTA(H.tiny_vit(depth=2))
    cb = CKACallback(layers="sublayers", reference=H.timm_resnet("resnet10t"))
    with pytest.warns(UserWarning, match="test-time augmentation"):
        fit(tmp_path, module, [cb])
    assert module.training_steps == 4
    assert [sorted(k for k in r if k in ("self", "reference")) for r in cb.history] == [["self"], ["self"]]


def test_unwritable_matrix_folder_warns_and_checkpoints_still_save(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    Path(logger.log_dir).mkdir(parents=True)
    (Path(logger.log_dir) / "cka").write_text("a file where the cka/ folder should be")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(layers="sublayers")
    with pytest.warns(UserWarning, match="writing the file self"):
        fit(tmp_path, module, [cb, ckpt], logger=logger, enable_checkpointing=True)
    assert len(cb.history) == 2
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 2


def test_strict_raises_instead(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    Path(logger.log_dir).mkdir(parents=True)
    (Path(logger.log_dir) / "cka").write_text("not a folder")
    cb = CKACallback(layers="sublayers", strict=True)
    with pytest.raises((FileExistsError, NotADirectoryError)):
        fit(tmp_path, H.LitClassifier(H.tiny_vit(depth=2)), [cb], logger=logger)


def test_model_left_exactly_as_found(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    module.model.blocks[0].eval()
    module.model.head.requires_grad_(False)
    reference = H.timm_resnet("resnet10t").train()
    reference.layer1.eval()
    before_ref = flags(reference)
    cb = CKACallback(layers="sublayers", reference=reference)
    tr = H.trainer(tmp_path, callbacks=[cb])
    before = flags(module)
    tr.validate(module, H.val_data(), verbose=False)
    assert flags(module) == before and flags(reference) == before_ref
    assert H.hook_count(module, reference) == 0
    assert len(cb.history) == 1
    expected = H.cmp(module, H.val_data(), "sublayers")
    assert H.max_diff(cb.history[0]["self"].matrix, expected.matrix) < H.TOL
