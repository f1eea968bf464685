"""The residual-stream preset ``layers="stream"`` and ``":in"`` hook points (Raghu et al. 2021:
the stream z' = z + attn(norm1(z)), z'' = z' + mlp(norm2(z')) vs the branches), on tiny timm and
torchvision ViTs and ResNets. Stream activations are recomputed here by a manual forward pass,
independent of lightning_cka's hooks, and CKA values checked with ``tests/reference.py``."""

from __future__ import annotations

import helpers as H
import pytest
import reference as ref
import torch
from torch import nn

from lightning_cka import compare
from lightning_cka.capture import GramCapture, HookSet
from lightning_cka.layers import HookPoint, backbone_of, find_backbones, hook_points, resolve_layers

TIMM_STREAM = ["blocks.0.norm2:in", "blocks.0", "blocks.1.norm2:in", "blocks.1"]
TV = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
TV_STREAM = [n for b in TV for n in (f"{b}.ln_2:in", b)]
TV_SUB = [f"{b}.{s}" for b in TV for s in ("self_attention", "mlp")]
RESNET18 = [f"layer{s}.{j}" for s in range(1, 5) for j in range(2)]


def tv_vit(seed: int = 0) -> nn.Module:
    """:func:`helpers.tv_vit` with torchvision's default 1000-class head, in eval mode."""
    return H.tv_vit(seed, num_classes=1000).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return H.tiny_vit(depth=2).eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return H.random_images(3, (8, 7, 6))


def timm_stream(vit: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[z'_0, z''_0, z'_1, z''_1, ...] of a timm ViT by a manual forward pass (eval mode)."""
    with torch.no_grad():
        z = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        out = []
        for blk in vit.blocks:
            z = z + blk.ls1(blk.attn(blk.norm1(z)))
            out.append(z)
            z = z + blk.ls2(blk.mlp(blk.norm2(z)))
            out.append(z)
    return out


def tv_stream(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The same for a torchvision ViT: z' = z + self_attention(ln_1(z)), z'' = z' + mlp(ln_2(z'))."""
    with torch.no_grad():
        z = model._process_input(x)
        z = torch.cat([model.class_token.expand(len(x), -1, -1), z], dim=1)
        z = model.encoder.dropout(z + model.encoder.pos_embedding)
        out = []
        for blk in model.encoder.layers:
            h = blk.ln_1(z)
            z = z + blk.self_attention(h, h, h, need_weights=False)[0]
            out.append(z)
            z = z + blk.mlp(blk.ln_2(z))
            out.append(z)
    return out


def captured_grams(model: nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    capture = GramCapture.for_layers(model, names, precision=torch.float64)
    with HookSet() as hooks, torch.no_grad():
        capture.attach(hooks)
        model(x)
        grams = capture.collect()
    assert grams is not None
    return grams


# ------------------------------------------------------------------------------ names
def test_stream_names_timm_vit(vit):
    assert resolve_layers(vit, "stream") == TIMM_STREAM
    assert resolve_layers(H.Wrapper(vit), "stream") == [f"model.{n}" for n in TIMM_STREAM]
    points = hook_points(vit, "stream")
    assert list(points) == TIMM_STREAM
    assert points["blocks.0.norm2:in"] == HookPoint("blocks.0.norm2:in", vit.blocks[0].norm2, True)
    assert points["blocks.1"] == HookPoint("blocks.1", vit.blocks[1], False)


def test_stream_names_torchvision_vit():
    model = tv_vit()
    (backbone,) = find_backbones(model)
    assert backbone.kind == "tv_vit" and backbone.is_vit
    assert backbone.has_class_token and backbone.num_prefix_tokens == 1
    assert resolve_layers(model, "stream") == TV_STREAM
    assert resolve_layers(model, "auto") == resolve_layers(model, "blocks") == TV
    assert resolve_layers(model, "sublayers") == TV_SUB
    assert resolve_layers(H.Nest(model), "stream") == [f"backbone.{n}" for n in TV_STREAM]


def test_stream_names_resnet():
    model = H.tv_resnet18()
    assert resolve_layers(model, "stream") == resolve_layers(model, "blocks") == RESNET18
    timm_model = H.timm_resnet("resnet10t")
    assert resolve_layers(timm_model, "stream") == [f"layer{s}.0" for s in range(1, 5)]


def test_backbone_token_properties():
    import timm

    vit = H.tiny_vit(depth=1)
    assert backbone_of(vit, "blocks.0.norm2:in").kind == "vit"
    assert backbone_of(vit, "blocks.0.norm2:in").has_class_token
    assert backbone_of(vit, "blocks.0").num_prefix_tokens == 1
    gap = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, class_token=False, global_pool="avg"
    )
    assert not find_backbones(gap)[0].has_class_token and find_backbones(gap)[0].num_prefix_tokens == 0
    reg = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, reg_tokens=4)
    assert find_backbones(reg)[0].has_class_token and find_backbones(reg)[0].num_prefix_tokens == 5
    rn = find_backbones(H.tv_resnet18())[0]
    assert not rn.is_vit and not rn.has_class_token and rn.num_prefix_tokens == 0


def test_other_timm_block_types_get_their_own_stream_point():
    from timm.models.vision_transformer import ParallelThingsBlock, ResPostBlock, VisionTransformer

    post = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, block_fn=ResPostBlock)
    assert resolve_layers(post, "stream") == ["blocks.0.mlp:in", "blocks.0"]
    par = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, block_fn=ParallelThingsBlock)
    assert resolve_layers(par, "stream") == ["blocks.0.ffns.0:in", "blocks.0"]


# ------------------------------------------------------------------- the ":in" syntax
def test_input_suffix_on_names_and_globs(vit):
    assert resolve_layers(vit, "blocks.1.norm2:in") == ["blocks.1.norm2:in"]
    assert resolve_layers(vit, "blocks.*.norm2:in") == ["blocks.0.norm2:in", "blocks.1.norm2:in"]
    # the input and the output of a module are two different layers
    assert resolve_layers(vit, ["blocks.0.norm2:in", "blocks.0.norm2", "blocks.0.norm2:in"]) == [
        "blocks.0.norm2:in",
        "blocks.0.norm2",
    ]
    assert resolve_layers(vit, ":in") == [":in"]  # the model input
    assert hook_points(vit, ":in")[":in"] == HookPoint(":in", vit, True)


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("blocks.0.norm3:in", ["'blocks.0.norm2:in'", ":in"]),
        ("blocks.*.norm3:in", ["matches no module", "'blocks.0.norm2:in'"]),
        ("blocks.0.norm2:out", ["suffix", "':in'"]),
    ],
)
def test_input_suffix_errors(vit, spec, fragments):
    with pytest.raises(ValueError) as info:
        resolve_layers(vit, spec)
    for fragment in fragments:
        assert fragment in str(info.value)


# ------------------------------------------------------------- values against a manual forward
def test_gram_at_norm2_input_is_the_stream_after_attention(vit, images):
    x = images[0]
    grams = captured_grams(vit, [*TIMM_STREAM, "blocks.0.norm2"], x)
    hand = timm_stream(vit, x)
    for k, z in zip(grams[:4], hand, strict=True):
        expected = H.centred_gram(z)
        assert float((k - expected).abs().max() / expected.abs().max()) < 1e-10
    # z' is neither the normalised stream nor the block output
    assert not torch.allclose(grams[0], grams[4]) and not torch.allclose(grams[0], grams[1])


def test_gram_at_ln_2_input_is_the_stream_after_attention(images):
    model = tv_vit()
    x = images[0]
    grams = captured_grams(model, TV_STREAM, x)
    for k, z in zip(grams, tv_stream(model, x), strict=True):
        expected = H.centred_gram(z)
        assert float((k - expected).abs().max() / expected.abs().max()) < 1e-10


@pytest.mark.parametrize("arch", ["timm", "torchvision"])
def test_compare_stream_matches_reference(vit, images, arch):
    model, manual, names = (vit, timm_stream, TIMM_STREAM) if arch == "timm" else (tv_vit(), tv_stream, TV_STREAM)
    result = compare(model, images, layers="stream", progress=False)
    assert result.rows == result.cols == names
    acts = [manual(model, x) for x in images]
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32


def tv_branches(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[attn_0, mlp_0, attn_1, mlp_1, ...]: what each torchvision block adds to the stream."""
    with torch.no_grad():
        z = model._process_input(x)
        z = torch.cat([model.class_token.expand(len(x), -1, -1), z], dim=1)
        z = model.encoder.dropout(z + model.encoder.pos_embedding)
        out = []
        for blk in model.encoder.layers:
            h = blk.ln_1(z)
            a = blk.self_attention(h, h, h, need_weights=False)[0]
            z = z + a
            m = blk.mlp(blk.ln_2(z))
            z = z + m
            out += [a, m]
    return out


def test_torchvision_sublayers_use_attention_output(images):
    model = tv_vit()
    result = compare(model, images, layers="sublayers", progress=False)
    assert result.rows == TV_SUB
    acts = [tv_branches(model, x) for x in images]
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32


def test_stream_on_compiled_model(vit, images):
    eager = compare(vit, images, layers="stream", progress=False)
    compiled = torch.compile(vit)
    result = compare(compiled, images, layers="stream", progress=False)
    assert result.rows == TIMM_STREAM
    assert ref.max_abs_err(result.matrix, eager.matrix) < 1e-12
    wrapped = compare(H.Wrapper(compiled), images, layers="stream", progress=False)
    assert wrapped.rows == [f"model.{n}" for n in TIMM_STREAM]
    assert ref.max_abs_err(wrapped.matrix, eager.matrix) < 1e-12
    assert H.hook_count(vit) == 0


def test_stream_is_more_uniform_than_branches(images):
    # Raghu et al. 2021: ||z|| >> ||f(z)|| makes stream states far more alike than branch outputs.
    vit = H.tiny_vit(depth=3).eval()
    stream = compare(vit, images, layers="stream", progress=False).matrix
    branches = compare(vit, images, layers="sublayers", progress=False).matrix
    assert float(stream.mean()) > float(branches.mean()) + 0.2
