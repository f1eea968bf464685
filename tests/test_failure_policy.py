"""The callback never ends or changes the user's training, and never overwrites what it wrote."""

from __future__ import annotations

from pathlib import Path

import helpers as H
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_cka import CKACallback, compare

TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from H.one_thread()


def fit(tmp_path, module, callbacks, epochs=2, **kwargs):
    tr = H.trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, **kwargs)
    tr.fit(module, H.loader(H.image_dataset(16)), H.loader(H.image_dataset(16, seed=1)))
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
    assert float((last["reference"].matrix - last["self"].matrix).abs().max()) < TOL


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
    assert all(train for train_flags, _ in seen[1:] for train in train_flags[:2])  # shared modules train


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


def test_every_n_epochs_follows_the_validation_schedule(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(layers="sublayers", every_n_epochs=2)
    fit(tmp_path, module, [cb], epochs=8, check_val_every_n_epoch=2)
    assert module.val_epochs == [1, 3, 5, 7]
    assert [r["epoch"] for r in cb.history] == [1, 5]  # every 2nd validation


def test_two_validates_at_one_step_keep_both_files(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(layers="sublayers")
    logger = TensorBoardLogger(str(tmp_path), version=0)
    tr = H.trainer(tmp_path, callbacks=[cb], logger=logger)
    tr.validate(module, H.loader(H.image_dataset(16, seed=1)), verbose=False)
    tr.validate(module, H.loader(H.image_dataset(16, seed=2)), verbose=False)
    files = sorted(p.name for p in (Path(logger.log_dir) / "cka").glob("self_step*.npz"))
    assert files == ["self_step00000000-v1.npz", "self_step00000000.npz"]
    from lightning_cka import CKAResult

    first = CKAResult.load(Path(logger.log_dir) / "cka" / files[1])
    assert float((first.matrix - cb.history[0]["self"].matrix).abs().max()) == 0.0


def test_resume_with_layers_spelled_differently_restores_history(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    names = [f"model.blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, module, [CKACallback(layers=names), ckpt], epochs=1, enable_checkpointing=True)
    again = CKACallback(layers=tuple(names))
    tr = H.trainer(tmp_path, callbacks=[again], max_epochs=2)
    tr.fit(
        module,
        H.loader(H.image_dataset(16)),
        H.loader(H.image_dataset(16, seed=1)),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    assert [r["epoch"] for r in again.history] == [0, 1]

    other = CKACallback(layers="model.blocks.*.mlp")
    tr = H.trainer(tmp_path, callbacks=[other], max_epochs=2)
    with pytest.warns(UserWarning, match="history was not restored"):
        tr.fit(
            module,
            H.loader(H.image_dataset(16)),
            H.loader(H.image_dataset(16, seed=1)),
            ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        )
    assert [r["epoch"] for r in other.history] == [1]


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
    tr.validate(module, H.loader(H.image_dataset(16, seed=1)), verbose=False)
    assert flags(module) == before and flags(reference) == before_ref
    assert H.hook_count(module, reference) == 0
    assert len(cb.history) == 1
    expected = compare(module, H.loader(H.image_dataset(16, seed=1)), "sublayers", progress=False)
    assert float((cb.history[0]["self"].matrix - expected.matrix).abs().max()) < TOL
