"""CKACallback configuration errors: refused at construction, or at setup before any training
step runs or any hook is armed, with a message that says what to change.

Errors in layer specifications have their own cases in ``test_layers.py``."""

from __future__ import annotations

import helpers as H
import pytest
import torch

from lightning_cka import CKACallback


def _fit_expecting(tmp_path, module, callbacks, exc, match):
    with pytest.raises(exc, match=match) as info:
        H.trainer(tmp_path, callbacks=callbacks).fit(module, H.train_data(16), H.val_data(8))
    assert module.training_steps == 0
    assert module.val_hooks == []
    assert H.hook_count(module) == 0
    return str(info.value)


def test_unknown_layer_name_lists_closest(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    cb = CKACallback(layers=["model.blocks.0", "model.blokcs.1"])
    msg = _fit_expecting(tmp_path, module, [cb], ValueError, r"model\.blokcs\.1")
    assert "model.blokcs.1" in msg
    assert "'model.blocks.1'" in msg  # the closest existing name is suggested


def test_glob_matching_nothing(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    msg = _fit_expecting(tmp_path, module, [CKACallback(layers="model.stages.*")], ValueError, "matches no module")
    assert "model.stages.*" in msg


def test_auto_on_unrecognised_model_says_how(tmp_path):
    module = H.LitClassifier(H.tiny_mlp())
    msg = _fit_expecting(tmp_path, module, [CKACallback()], ValueError, "auto")
    assert "named_modules" in msg and "layers=" in msg


def test_cls_reduction_on_resnet(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    _fit_expecting(tmp_path, module, [CKACallback(reduction="cls")], ValueError, "cls")


def test_cls_reduction_on_resnet_reference(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    ref = H.timm_resnet("resnet10t")
    _fit_expecting(tmp_path, module, [CKACallback(reduction="cls", reference=ref)], ValueError, "reference_layers")


def test_duplicate_log_prefix(tmp_path):
    module = H.LitClassifier(H.tiny_vit())
    cbs = [CKACallback(), CKACallback(layers="sublayers")]
    # The prefix is the callback's checkpoint key, so Lightning itself refuses the pair before setup.
    _fit_expecting(tmp_path, module, cbs, RuntimeError, "state_key. must be unique")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_epochs": 0},
        {"every_n_epochs": -1},
        {"max_batches": 0},
        {"max_examples": 0},
        {"reduction": "max"},
        {"reference": "resnet18"},
        {"reference": torch.zeros(3)},
        {"precision": "float16"},
    ],
)
def test_bad_init_arguments(kwargs):
    with pytest.raises((ValueError, TypeError)):
        CKACallback(**kwargs)
