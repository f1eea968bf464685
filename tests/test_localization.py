"""Spatial localization maps (Raghu et al. 2021, section 6): offline function, plot and callback analysis."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import helpers as H
import numpy as np
import pytest
import reference as R
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_cka import CKACallback
from lightning_cka.analyses.base import AnalysisSkipped, MeasuredBatch, SetupContext
from lightning_cka.analyses.localization import (
    Localization,
    default_queries,
    grid_labels,
    localization,
    localization_summary,
    plot_localization,
    spatial_tokens,
    token_grams,
)
from lightning_cka.capture import HookSet
from lightning_cka.compare import CKAResult
from lightning_cka.functional import gram


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from H.one_thread()


def images(batches: int, n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, *size, generator=g) for _ in range(batches)]


def identity_vit(img_size: int | tuple[int, int] = 32, patch_size: int = 8, **kwargs: object) -> VisionTransformer:
    """A timm ViT whose blocks are exact identities and whose position embedding is zero."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=24, depth=2, num_heads=2, num_classes=3, **kwargs
    )
    with torch.no_grad():
        for block in vit.blocks:
            for p in (block.attn.proj.weight, block.attn.proj.bias, block.mlp.fc2.weight, block.mlp.fc2.bias):
                p.zero_()
        vit.pos_embed.zero_()
    return vit.eval()


def assert_identity(result: CKAResult, grid: tuple[int, int]) -> None:
    m = result.matrix
    t = grid[0] * grid[1]
    assert m.shape == (t, t) and m.dtype == torch.float64
    assert (result.meta["grid_h"], result.meta["grid_w"]) == grid
    assert result.rows == result.cols == grid_labels(grid)
    assert float(torch.diagonal(m).min()) >= 0.99
    assert torch.equal(m.argmax(dim=1), torch.arange(t))
    assert localization_summary(m)["hit_rate"] == 1.0


# ----------------------------------------------------------------------------------- pieces
def test_token_grams_per_position(gen):
    x = torch.randn(10, 5, 7, generator=gen) + 50.0
    k = token_grams(x)
    assert k.shape == (5, 10, 10) and k.dtype == torch.float32
    for t in range(5):
        torch.testing.assert_close(k[t], gram(x[:, t]), atol=1e-4, rtol=1e-5)
    assert token_grams(x.bfloat16()).dtype == torch.float32
    assert token_grams(x, torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(n, T, C\)"):
        token_grams(torch.zeros(4, 5))


def test_spatial_tokens_layouts(gen):
    flat = torch.randn(3, 6, 4, generator=gen)  # (n, T, C) on a 2 x 3 grid
    nchw = flat.transpose(1, 2).reshape(3, 4, 2, 3)
    nhwc = flat.reshape(3, 2, 3, 4)
    assert torch.equal(spatial_tokens(nchw, (2, 3)), flat)
    assert torch.equal(spatial_tokens(nhwc, (2, 3)), flat)
    with_prefix = torch.cat([torch.zeros(3, 2, 4), flat], dim=1)
    assert torch.equal(spatial_tokens(with_prefix, (2, 3), num_prefix_tokens=2), flat)
    square = torch.randn(2, 3, 3, 3, generator=gen)  # h == w == C: the hint decides
    assert torch.equal(spatial_tokens(square, (3, 3), channels_last=True), square.reshape(2, 9, 3))
    assert torch.equal(spatial_tokens(square, (3, 3)), square.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="do not fit"):
        spatial_tokens(with_prefix, (2, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="4-D map"):
        spatial_tokens(nchw, (3, 2))


def test_summary_and_queries():
    m = torch.tensor([[1.0, 0.2, 0.1], [0.9, 0.5, float("nan")], [float("nan")] * 3], dtype=torch.float64)
    assert localization_summary(m) == pytest.approx({"diagonal": 0.75, "hit_rate": 1 / 3})
    assert default_queries((1, 1)) == [(0, 0)]
    assert default_queries((2, 5)) == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (1, 4)]


# ----------------------------------------------------------------------------------- offline
def test_identity_blocks_give_identity_map():
    result = localization(identity_vit(), images(2, 16), "blocks.1")
    assert_identity(result, (4, 4))
    assert result.meta["layer"] == "blocks.1" and result.meta["reference_layer"] == "patch_embed"
    assert result.meta["batches"] == 2


class PermuteTokens(nn.Module):
    """Reorders the patch tokens (prefix tokens stay first): position i takes patch ``perm[i]``."""

    def __init__(self, perm: torch.Tensor, prefix: int) -> None:
        super().__init__()
        self.perm, self.prefix = perm, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.prefix], x[:, self.prefix :][:, self.perm]], dim=1)


def test_permuted_tokens_give_the_permutation():
    vit = identity_vit()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    vit.norm = nn.Sequential(PermuteTokens(perm, vit.num_prefix_tokens), vit.norm)
    net = H.Wrapper(vit)  # names relative to the ViT inside a container
    result = localization(net, images(2, 16), "norm.0")
    assert result.meta["layer"] == "model.norm.0" and result.meta["reference_layer"] == "model.patch_embed"
    assert torch.equal(result.matrix.argmax(dim=1), perm)
    assert float(result.matrix[torch.arange(16), perm].min()) >= 0.99


def test_non_square_grid():
    result = localization(identity_vit(img_size=(32, 48)), images(2, 12, (32, 48)), "blocks.1")
    assert_identity(result, (4, 6))


def test_dynamic_image_size():
    vit = identity_vit(img_size=32, dynamic_img_size=True)  # patch_embed outputs NHWC
    result = localization(vit, images(2, 12, (24, 40)), "blocks.1")
    assert_identity(result, (3, 5))
    with pytest.raises(ValueError, match="different image sizes"):
        localization(vit, [*images(1, 8, (24, 40)), *images(1, 8, (32, 32))], "blocks.1")


@pytest.mark.parametrize("class_token", [True, False])
def test_register_tokens(class_token):
    vit = identity_vit(reg_tokens=2, class_token=class_token, global_pool="token" if class_token else "avg")
    assert vit.num_prefix_tokens == 2 + class_token
    assert_identity(localization(vit, images(2, 12), "blocks.1"), (4, 4))


def test_torchvision_vit():
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    with torch.no_grad():
        tv.encoder.pos_embedding.zero_()
        for layer in tv.encoder.layers:
            for p in (layer.self_attention.out_proj.weight, layer.self_attention.out_proj.bias):
                p.zero_()
            layer.mlp[3].weight.zero_()
            layer.mlp[3].bias.zero_()
    result = localization(tv, images(2, 12), "encoder.layers.encoder_layer_1")  # "patch_embed" means conv_proj
    assert result.meta["reference_layer"] == "conv_proj"
    assert_identity(result, (4, 4))


@pytest.mark.parametrize(("precision", "tol"), [("float64", 1e-9), ("float32", 1e-4)])
def test_matches_naive_per_position_loop(precision, tol):
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, reg_tokens=1).eval()
    data = [x + 3.0 for x in images(2, 7, (16, 16), seed=5)]
    captured: dict[str, list[torch.Tensor]] = {"blocks.0": [], "patch_embed": []}
    handles = [
        vit.blocks[0].register_forward_hook(lambda m, a, out: captured["blocks.0"].append(out.detach().clone())),
        vit.patch_embed.register_forward_hook(lambda m, a, out: captured["patch_embed"].append(out.detach().clone())),
    ]
    with torch.no_grad():
        for x in data:
            vit(x)
    for h in handles:
        h.remove()
    prefix = vit.num_prefix_tokens
    rows = [[x[:, prefix + t] for t in range(4)] for x in captured["blocks.0"]]
    cols = [[p[:, t] for t in range(4)] for p in captured["patch_embed"]]
    expected = R.minibatch_cka(rows, cols)
    result = localization(vit, data, "blocks.0", precision=precision)
    assert R.max_abs_err(result.matrix, expected) < tol


def test_offline_arguments():
    vit = identity_vit()
    with pytest.raises(ValueError, match="VisionTransformer"):
        localization(H.tiny_mlp(), images(1, 8), "1")
    with pytest.raises(ValueError, match="Unknown module"):
        localization(vit, images(1, 8), "blocks.7")
    with pytest.raises(ValueError, match="one layer"):
        localization(vit, images(1, 8), "blocks.*")
    with pytest.raises(ValueError, match="max_batches"):
        localization(vit, images(1, 8), "blocks.1", max_batches=0)
    with pytest.raises(ValueError, match="no usable batch"), pytest.warns(UserWarning, match="Skipping a minibatch"):
        localization(vit, images(1, 3), "blocks.1")
    assert H.hook_count(vit) == 0 and not vit.training


# ----------------------------------------------------------------------------------- plotting
def test_plot_localization(tmp_path: Path):
    result = localization(identity_vit(img_size=(32, 48)), images(1, 8, (32, 48)), "blocks.1")
    loaded = CKAResult.load(result.save(tmp_path / "loc"))
    assert (loaded.meta["grid_h"], loaded.meta["grid_w"]) == (4, 6)
    fig, axes = plot_localization(loaded, title="t")
    assert [ax.get_title() for ax in axes] == [f"({r}, {c})" for r, c in default_queries((4, 6))]
    assert all(ax.get_images()[0].get_array().shape == (4, 6) for ax in axes)
    assert {ax.get_images()[0].get_clim() for ax in axes} == {(0.0, 1.0)}
    assert len(fig.axes) == len(axes) + 1  # one shared colour bar
    fig, axes = plot_localization(result.matrix, grid=(4, 6), queries=[(1, 2), 23, (0, 0)], max_cols=2)
    assert [ax.get_title() for ax in axes] == ["(1, 2)", "(3, 5)", "(0, 0)"]
    assert np.allclose(axes[0].get_images()[0].get_array(), result.matrix[8].reshape(4, 6).numpy())
    _, heatmap = result.plot()  # the plain (T, T) heatmap
    assert heatmap.get_images()[0].get_array().shape == (24, 24)
    with pytest.raises(ValueError, match="outside"):
        plot_localization(result, queries=[(4, 0)])
    with pytest.raises(ValueError, match="grid"):
        plot_localization(result.matrix)  # 24 positions: not square, no grid


# ----------------------------------------------------------------------------------- analysis
def run_batches(analysis: Localization, module: nn.Module, batches: list[torch.Tensor]) -> None:
    for i, x in enumerate(batches):
        with HookSet() as hooks, torch.no_grad():
            analysis.attach(hooks)
            module(x)
        analysis.update(MeasuredBatch(x, None, lambda: None, index=i))


def test_analysis_off_without_vit():
    for net in (H.tiny_mlp(), H.timm_resnet()):
        assert not Localization().setup(SetupContext(module=H.Wrapper(net), layers=[]))


def test_analysis_unit_grid_and_ranks():
    module = H.Wrapper(identity_vit(img_size=32, dynamic_img_size=True))
    analysis = Localization(max_examples=6)
    assert analysis.setup(SetupContext(module=module, layers=[]))
    assert analysis.rows == ["model.blocks.1"] and analysis.reference == "model.patch_embed"
    analysis.reset(torch.device("cpu"))
    run_batches(analysis, module, images(2, 10, (24, 32)))
    assert int(analysis.metric.num_batches) == 2
    with pytest.raises(AnalysisSkipped, match="patch grid"):
        run_batches(analysis, module, images(1, 8, (32, 32)))
    value = analysis.compute()
    entry = value["model.blocks.1"]
    assert entry["grid"] == (3, 4) and entry["matrix"].shape == (12, 12) and entry["hit_rate"] == 1.0

    # A rank that saw nothing follows the grid of the ranks that did; disagreeing ranks raise on every rank.
    analysis.reset(torch.device("cpu"))
    analysis._all_gather = lambda t: torch.stack([t, torch.tensor([3, 4, 1])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no usable batch on this process: all-NaN sums
        value = analysis.compute()
    assert value["model.blocks.1"]["matrix"].shape == (12, 12)
    run_batches(analysis, module, images(1, 8, (32, 32)))
    with pytest.raises(ValueError, match="different patch grids"):
        analysis.compute()
    analysis._all_gather = lambda t: t.unsqueeze(0)
    analysis.reset(torch.device("cpu"))
    assert analysis.compute() is None  # nothing measured anywhere


def test_analysis_layers_relative_to_vit():
    module = H.LitClassifier(identity_vit(reg_tokens=1))
    analysis = Localization(layers=["blocks.0", "model.blocks.1.norm2:in"], reference_layer="patch_embed")
    assert analysis.setup(SetupContext(module=module, layers=[]))
    assert analysis.rows == ["model.blocks.0", "model.blocks.1.norm2:in"]
    analysis.reset(torch.device("cpu"))
    run_batches(analysis, module, images(2, 8))
    value = analysis.compute()
    for layer in analysis.rows:
        assert value[layer]["diagonal"] >= 0.99 and value[layer]["hit_rate"] == 1.0
    report = analysis.report(value, epoch=0, step=5)
    assert set(report.figures) == {f"localization/{layer}" for layer in analysis.rows}
    assert set(report.captions) == set(report.figures)
    assert set(report.matrices) == {"localization_model.blocks.0", "localization_model.blocks.1.norm2_in"}
    assert not analysis.report(value, epoch=1, step=6).captions  # captions once per tag
    with pytest.raises(ValueError, match="at least 4"):
        Localization(max_examples=0)
    with pytest.raises(TypeError, match="layer names"):
        Localization(layers=[3])  # type: ignore[list-item]


def test_callback_tensorboard(tmp_path: Path):
    module = H.LitClassifier(H.tiny_vit(depth=2))
    val = H.loader(H.image_dataset(16, seed=1), batch_size=8)
    cb = CKACallback(
        layers="blocks", analyses=[Localization()], norm_ratio=False, attention_distance=False, strict=True
    )
    logger = TensorBoardLogger(str(tmp_path), version=0)
    tr = H.trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[cb], logger=logger)
    tr.fit(module, H.loader(H.image_dataset(8)), val)
    value = cb.history[-1]["localization"]
    entry = value["model.blocks.1"]
    assert entry["grid"] == (8, 8) and entry["matrix"].shape == (64, 64)
    assert 0.0 <= entry["hit_rate"] <= 1.0 and math.isfinite(entry["diagonal"])

    acc = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tag = "localization/blocks.1"  # tags drop the `model.` attribute; files keep full names
    assert tag in acc.Tags()["images"]
    image = acc.Images(tag)[-1]
    assert image.width >= 100 and image.height >= 100
    for scalar in ("diagonal", "hit_rate"):
        (event,) = acc.Scalars(f"{tag}/{scalar}")
        assert event.value == pytest.approx(entry[scalar], abs=1e-6)
    assert any(t.startswith(tag) for t in acc.Tags()["tensors"])  # the caption (text plugin)
    assert list((Path(logger.log_dir) / "cka").glob("localization_model.blocks.1_step*.npz"))

    # the live map equals the offline one on the same weights and batches
    offline = localization(module, val, "model.blocks.1")
    assert float((offline.matrix - entry["matrix"]).abs().nan_to_num().max()) < 1e-6

    # the history survives a weights_only checkpoint load
    path = tmp_path / "state.pt"
    torch.save(cb.state_dict(), path)
    restored = torch.load(path, weights_only=True)
    assert torch.equal(restored["history"][-1]["localization"]["model.blocks.1"]["matrix"], entry["matrix"])
