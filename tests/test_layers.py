"""Layer selection as CKACallback sees it: presets, names, globs and types, relative to the LightningModule."""

from __future__ import annotations

import helpers as H
import pytest
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block
from torch import nn

from lightning_cka import CKACallback, compare

VIT_BLOCKS = [f"model.blocks.{i}" for i in range(3)]
VIT_SUB = [f"model.blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp")]
RESNET18 = [f"model.layer{s}.{j}" for s in range(1, 5) for j in range(2)]
RESNET10T = [f"model.layer{s}.0" for s in range(1, 5)]
VIT_STREAM = [n for i in range(3) for n in (f"model.blocks.{i}.norm2:in", f"model.blocks.{i}")]
TV_BLOCKS = [f"model.encoder.layers.encoder_layer_{i}" for i in range(2)]
TV_SUB = [f"{b}.{s}" for b in TV_BLOCKS for s in ("self_attention", "mlp")]
TV_STREAM = [n for b in TV_BLOCKS for n in (f"{b}.ln_2:in", b)]


def validate(tmp_path, module, cb, n=16):
    """Run trainer.validate with ``cb`` on ``n`` random images; return the validation data."""
    val = H.loader(H.image_dataset(n, seed=1))
    H.trainer(tmp_path, callbacks=[cb]).validate(module, val, verbose=False)
    return val


def check_rows(cb, module, val, expected, **compare_kwargs):
    assert cb.rows == expected
    result = cb.history[-1]["self"]
    assert result.rows == result.cols == expected
    assert result.matrix.shape == (len(expected), len(expected))
    assert torch.allclose(torch.diagonal(result.matrix), torch.ones(len(expected), dtype=torch.float64), atol=1e-6)
    oracle = compare(module, val, layers=expected, progress=False, **compare_kwargs)
    assert H.max_diff(oracle.matrix, result.matrix) < H.TOL


ARCHS = {
    "vit_auto": (lambda: H.tiny_vit(depth=3), "auto", VIT_BLOCKS),
    "vit_blocks": (lambda: H.tiny_vit(depth=3), "blocks", VIT_BLOCKS),
    "vit_sublayers": (lambda: H.tiny_vit(depth=3), "sublayers", VIT_SUB),
    "timm_resnet18_auto": (lambda: H.timm_resnet("resnet18"), "auto", RESNET18),
    "timm_resnet10t_auto": (lambda: H.timm_resnet("resnet10t"), "auto", RESNET10T),
    "tv_resnet18_auto": (H.tv_resnet18, "auto", RESNET18),
    "tv_resnet18_sublayers": (H.tv_resnet18, "sublayers", RESNET18),
    "tv_vit_auto": (H.tv_vit, "auto", TV_BLOCKS),
    "tv_vit_sublayers": (H.tv_vit, "sublayers", TV_SUB),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_presets(tmp_path, arch):
    make, spec, expected = ARCHS[arch]
    module = H.LitClassifier(make())
    cb = CKACallback(layers=spec)
    val = validate(tmp_path, module, cb)
    check_rows(cb, module, val, expected)


@pytest.mark.parametrize(
    ("make", "expected"),
    [(lambda: H.tiny_vit(depth=3), VIT_STREAM), (H.tv_vit, TV_STREAM)],
    ids=["vit", "tv_vit"],
)
def test_stream_preset(tmp_path, make, expected):
    module = H.LitClassifier(make())
    cb = CKACallback(layers="stream")
    val = validate(tmp_path, module, cb)
    check_rows(cb, module, val, expected)


def test_explicit_input_points(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    cb = CKACallback(layers=["model.blocks.*.norm2:in", "model.norm:in"])
    val = validate(tmp_path, module, cb)
    check_rows(cb, module, val, [*VIT_STREAM[0::2], "model.norm:in"])


@pytest.mark.parametrize("make", [lambda: H.tiny_vit(depth=3), H.tv_resnet18], ids=["vit", "tv_resnet18"])
def test_auto_finds_nested_backbone(tmp_path, make):
    module = H.LitClassifier(make(), nested=True)
    cb = CKACallback()
    val = validate(tmp_path, module, cb)
    expected = VIT_BLOCKS if isinstance(module.backbone, type(H.tiny_vit())) else RESNET18
    check_rows(cb, module, val, [n.replace("model.", "net.backbone.", 1) for n in expected])


def test_auto_with_two_backbones(tmp_path):
    class Two(H.LitClassifier):
        def __init__(self):
            super().__init__(H.tiny_vit(depth=2))
            self.cnn = H.timm_resnet("resnet10t")

        def forward(self, x):
            return self.model(x) + self.cnn(x)

    module = Two()
    cb = CKACallback()
    val = validate(tmp_path, module, cb)
    expected = ["model.blocks.0", "model.blocks.1", *[n.replace("model.", "cnn.") for n in RESNET10T]]
    check_rows(cb, module, val, expected)


def test_auto_falls_back_to_timm_feature_info(tmp_path):
    model = H.timm_resnet("mobilenetv3_small_050")
    module = H.LitClassifier(model)
    cb = CKACallback()
    val = validate(tmp_path, module, cb)
    expected = [f"model.{info['module']}" for info in model.feature_info]
    assert len(expected) >= 3
    check_rows(cb, module, val, expected)


SPECS = {
    "explicit_order_kept": (["model.blocks.2", "model.blocks.0"], ["model.blocks.2", "model.blocks.0"]),
    "single_name": ("model.blocks.1.mlp", ["model.blocks.1.mlp"]),
    "glob_mlp": ("model.blocks.*.mlp", [f"model.blocks.{i}.mlp" for i in range(3)]),
    "glob_question_mark": ("model.blocks.?", VIT_BLOCKS),
    "type_mlp": (Mlp, [f"model.blocks.{i}.mlp" for i in range(3)]),
    "type_block": (Block, VIT_BLOCKS),
    "types_list": (
        [Attention, Mlp],
        [f"model.blocks.{i}.attn" for i in range(3)] + [f"model.blocks.{i}.mlp" for i in range(3)],
    ),
    "mixed_no_duplicates": (
        ["model.blocks.0", "model.blocks.?", Mlp, "model.blocks.0.mlp"],
        [*VIT_BLOCKS, *[f"model.blocks.{i}.mlp" for i in range(3)]],
    ),
    "patch_embed_and_norm": (["model.patch_embed", "model.norm"], ["model.patch_embed", "model.norm"]),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_names_globs_and_types(tmp_path, name):
    spec, expected = SPECS[name]
    module = H.LitClassifier(H.tiny_vit(depth=3))
    cb = CKACallback(layers=spec)
    val = validate(tmp_path, module, cb)
    check_rows(cb, module, val, expected)


def test_single_name_resolves_at_setup(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    cb = CKACallback(layers="model.blocks.1.mlp")
    cb.setup(H.trainer(tmp_path, callbacks=[cb]), module, "validate")
    assert cb.rows == ["model.blocks.1.mlp"]
    assert H.hook_count(module) == 0  # resolving arms nothing


@pytest.mark.parametrize("reduction", ["flatten", "mean", "cls"])
def test_reductions_on_vit(tmp_path, reduction):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    cb = CKACallback(layers="sublayers", reduction=reduction)
    val = validate(tmp_path, module, cb)
    check_rows(cb, module, val, VIT_SUB, reduction=reduction)


def test_mean_reduction_on_resnet(tmp_path):
    module = H.LitClassifier(H.timm_resnet("resnet10t"))
    cb = CKACallback(reduction="mean")
    val = validate(tmp_path, module, cb)
    check_rows(cb, module, val, RESNET10T, reduction="mean")
    flat = compare(module, val, layers=RESNET10T, progress=False)
    assert H.max_diff(flat.matrix, cb.history[-1]["self"].matrix) > 1e-6


def test_reference_layers_are_relative_to_reference(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=3))
    ref = H.tv_resnet18(seed=2)
    cb = CKACallback(layers="model.blocks.*.mlp", reference=ref, reference_layers=["layer4.1", "layer1.0"])
    val = validate(tmp_path, module, cb)
    result = cb.history[-1]["reference"]
    assert result.rows == [f"model.blocks.{i}.mlp" for i in range(3)]
    assert result.cols == ["layer4.1", "layer1.0"]
    oracle = compare(module, val, layers=result.rows, other=ref, other_layers=result.cols, progress=False)
    assert H.max_diff(oracle.matrix, result.matrix) < H.TOL


# --------------------------------------------------------------------------- errors
ERRORS = {
    "unknown_name": ("model.blocks.7", ValueError, ["'model.blocks.7'", "'model.blocks.0'"]),
    "typo": ("model.block.1.mlp", ValueError, ["'model.blocks.1.mlp'"]),
    "name_relative_to_wrong_root": ("blocks.0", ValueError, ["'model.blocks.0'"]),
    "empty_list": ([], ValueError, ["empty"]),
    "empty_name": ("", ValueError, []),
    "glob_no_match": ("model.stages.*", ValueError, ["matches no module"]),
    "type_no_match": (nn.Conv3d, ValueError, ["Conv3d"]),
    "not_module_type": (int, TypeError, []),
    "not_str_or_type": ([3], TypeError, []),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_layer_specs_fail_at_setup(tmp_path, name):
    spec, exc, fragments = ERRORS[name]
    module = H.LitClassifier(H.tiny_vit(depth=3))
    with pytest.raises(exc) as info:
        H.trainer(tmp_path, callbacks=[CKACallback(layers=spec)]).fit(
            module, H.loader(H.image_dataset(8)), H.loader(H.image_dataset(8, seed=1))
        )
    for fragment in fragments:
        assert fragment in str(info.value)
    assert module.training_steps == 0
    assert H.hook_count(module) == 0


def test_bad_reference_layers_fail_at_setup(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(reference=H.timm_resnet("resnet10t"), reference_layers="model.layer1.0")
    with pytest.raises(ValueError, match="reference_layers") as info:
        H.trainer(tmp_path, callbacks=[cb]).fit(
            module, H.loader(H.image_dataset(8)), H.loader(H.image_dataset(8, seed=1))
        )
    assert "'layer1.0'" in str(info.value)
    assert module.training_steps == 0


def test_auto_on_reference_without_backbone_fails(tmp_path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    cb = CKACallback(reference=H.tiny_mlp())
    with pytest.raises(ValueError, match="reference_layers"):
        H.trainer(tmp_path, callbacks=[cb]).fit(
            module, H.loader(H.image_dataset(8)), H.loader(H.image_dataset(8, seed=1))
        )
    assert module.training_steps == 0
