"""Skip-connection norm ratios against independent float64 computations."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import helpers as H
import pytest
import torch
import torch.multiprocessing as mp
from helpers import Wrapper, timm_vit_tiny
from torch import Tensor, nn

from lightning_cka.attention import AttentionDistance
from lightning_cka.capture import HookSet
from lightning_cka.norm_ratio import (
    NormRatio,
    NormRatioCapture,
    ResidualUnit,
    find_residual_units,
    plot_norm_ratios,
)


def _torchvision_resnet18() -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return _randomise_bn(models.resnet18(num_classes=10))


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm affine parameters and statistics (timm zero-inits the last BN of a block)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean = torch.randn(c, generator=gen) * 0.1
            m.running_var = torch.rand(c, generator=gen) + 0.5
    return model.eval()


def _run_capture(root: nn.Module, batches: list[Tensor], inference: bool = True) -> dict[str, float]:
    capture = NormRatioCapture(root)
    with HookSet() as hooks:
        capture.attach(hooks)
        for x in batches:
            with torch.inference_mode(inference):
                root(x)
    return capture.compute()


# ----------------------------------------------------------------------------- references
def _vit_reference(vit: nn.Module, batches: list[Tensor], prefix: int, has_cls: bool) -> dict[str, float]:
    """Recompute each block's two residual branches in float64 from its recorded input."""
    ratios: dict[str, list[Tensor]] = {}
    for x in batches:
        inputs: dict[int, Tensor] = {}
        handles = [
            blk.register_forward_pre_hook(lambda m, a, i=i, store=inputs: store.__setitem__(i, a[0].detach().clone()))
            for i, blk in enumerate(vit.blocks)
        ]
        with torch.no_grad():
            vit(x)
            for h in handles:
                h.remove()
            for i, blk in enumerate(vit.blocks):
                b = copy.deepcopy(blk).double()
                z1 = inputs[i].double()
                f1 = b.ls1(b.attn(b.norm1(z1)))
                z2 = z1 + f1
                f2 = b.ls2(b.mlp(b.norm2(z2)))
                for unit, z, f in (("attn", z1, f1), ("mlp", z2, f2)):
                    r = torch.linalg.norm(z, dim=2) / torch.linalg.norm(f, dim=2)
                    if has_cls:
                        ratios.setdefault(f"model.blocks.{i}/{unit}/cls", []).append(r[:, 0])
                    ratios.setdefault(f"model.blocks.{i}/{unit}/spatial", []).append(r[:, prefix:].flatten())
    return {k: torch.cat(v).mean().item() for k, v in ratios.items()}


def _resnet_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (f"{stage}.{j}", blk)
        for stage in ("layer1", "layer2", "layer3", "layer4")
        for j, blk in enumerate(getattr(model, stage))
    ]


def _resnet_reference(model: nn.Module, batches: list[Tensor]) -> dict[str, float]:
    """z from the block input (through ``downsample``), f(z) = (z + f(z)) - z, where z + f(z) is the
    input of the block's final activation (copied before the in-place ReLU runs)."""
    ratios: dict[str, list[Tensor]] = {}
    for x in batches:
        block_inputs: dict[str, Tensor] = {}
        sums: dict[str, Tensor] = {}
        handles = []
        for name, blk in _resnet_blocks(model):
            handles.append(
                blk.register_forward_pre_hook(
                    lambda m, a, n=name, store=block_inputs: store.__setitem__(n, a[0].detach().clone())
                )
            )
            final_act = getattr(blk, "act3", None) or getattr(blk, "act2", None) or blk.relu
            # The last call of the final activation in the block sees z + f(z) (torchvision reuses `relu`).
            handles.append(
                final_act.register_forward_pre_hook(
                    lambda m, a, n=name, store=sums: store.__setitem__(n, a[0].detach().clone())
                )
            )
        with torch.no_grad():
            model(x)
            for h in handles:
                h.remove()
            for name, blk in _resnet_blocks(model):
                x_in = block_inputs[name]
                z = blk.downsample(x_in) if blk.downsample is not None else x_in
                f = sums[name].double() - z.double()
                r = torch.linalg.norm(z.double(), dim=1) / torch.linalg.norm(f, dim=1)
                ratios.setdefault(f"model.{name}/residual/all", []).append(r.flatten())
    return {k: torch.cat(v).mean().item() for k, v in ratios.items()}


def _assert_close(got: dict[str, float], expected: dict[str, float], rel: float = 1e-4) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert math.isfinite(value)
        assert got[key] == pytest.approx(value, rel=rel), key


# ----------------------------------------------------------------------------- ViT
@pytest.mark.parametrize(
    ("kwargs", "prefix", "has_cls"),
    [
        (dict(init_values=0.1), 1, True),
        (dict(reg_tokens=2), 3, True),
        (dict(class_token=False, global_pool="avg"), 0, False),
    ],
    ids=["cls-layerscale", "cls+2reg", "no-cls"],
)
def test_vit_matches_float64_reference(kwargs: dict, prefix: int, has_cls: bool) -> None:
    vit = timm_vit_tiny(**kwargs)
    root = Wrapper(vit)
    torch.manual_seed(2)
    batches = [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 32, 32)]
    got = _run_capture(root, batches)
    expected = _vit_reference(vit, batches, prefix, has_cls)
    groups = ["cls", "spatial"] if has_cls else ["spatial"]
    assert list(got) == [f"model.blocks.{i}/{u}/{g}" for i in range(2) for u in ("attn", "mlp") for g in groups]
    _assert_close(got, expected)


def test_vit_units_point_at_norm_and_layerscale() -> None:
    units = find_residual_units(Wrapper(timm_vit_tiny(reg_tokens=2)))
    assert [(u.block, u.unit) for u in units] == [
        ("model.blocks.0", "attn"),
        ("model.blocks.0", "mlp"),
        ("model.blocks.1", "attn"),
        ("model.blocks.1", "mlp"),
    ]
    assert (units[0].z, units[0].z_is_input, units[0].f) == ("model.blocks.0.norm1", True, "model.blocks.0.ls1")
    assert (units[1].z, units[1].f) == ("model.blocks.0.norm2", "model.blocks.0.ls2")
    assert units[0].num_prefix_tokens == 3
    assert units[0].series == ["model.blocks.0/attn/cls", "model.blocks.0/attn/spatial"]


# ----------------------------------------------------------------------------- ResNets
def _timm_resnet(name: str, **kwargs: object) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _randomise_bn(timm.create_model(name, num_classes=10, **kwargs))


@pytest.mark.parametrize(
    ("make", "f_leaf"),
    [
        (lambda: _timm_resnet("resnet10t"), "bn2"),
        (lambda: _timm_resnet("resnet26"), "bn3"),
        (lambda: _timm_resnet("resnet26", drop_path_rate=0.1, block_args=dict(attn_layer="se")), "drop_path"),
        (_torchvision_resnet18, "bn2"),
    ],
    ids=["timm-basic", "timm-bottleneck", "timm-se-droppath", "torchvision-resnet18"],
)
def test_resnet_matches_reference(make: Callable[[], nn.Module], f_leaf: str) -> None:
    model = make()
    root = Wrapper(model)
    units = find_residual_units(root)
    assert len(units) == len(_resnet_blocks(model))
    assert all(u.groups == ("all",) and u.channel_dim == 1 for u in units)
    # drop_path where present, else se, else the last batch norm
    for u, (_, blk) in zip(units, _resnet_blocks(model), strict=True):
        leaf = f_leaf if f_leaf != "drop_path" or blk.drop_path is not None else "se"
        assert u.f == f"{u.block}.{leaf}"
    with_downsample = [u for u in units if not u.z_is_input]
    assert with_downsample and all(u.z == f"{u.block}.downsample" for u in with_downsample)
    torch.manual_seed(3)
    batches = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    got = _run_capture(root, batches)
    expected = _resnet_reference(model, batches)
    _assert_close(got, expected)


def test_inplace_addition_does_not_change_result() -> None:
    """A stored reference to the branch output is changed by ``x += shortcut`` and the in-place
    ReLU; the capture reduces inside its hook and is unaffected."""
    model = _torchvision_resnet18()
    blk = model.layer1[0]
    kept: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: object, out: Tensor) -> None:
        kept["reference"] = out
        kept["copy"] = out.clone()

    handle = blk.bn2.register_forward_hook(keep)
    x = torch.randn(2, 3, 32, 32)
    got = _run_capture(Wrapper(model), [x])
    handle.remove()
    assert not torch.allclose(kept["reference"], kept["copy"])  # the pitfall is real
    expected = _resnet_reference(model, [x])
    assert got["model.layer1.0/residual/all"] == pytest.approx(expected["model.layer1.0/residual/all"], rel=1e-4)
    # the ratio from the stale reference would have been different
    z = torch.linalg.norm(_block_input(model, x), dim=1)
    stale = (z / torch.linalg.norm(kept["reference"], dim=1)).mean().item()
    assert stale != pytest.approx(got["model.layer1.0/residual/all"], rel=1e-2)


def _block_input(model: nn.Module, x: Tensor) -> Tensor:
    store: list[Tensor] = []
    handle = model.layer1[0].register_forward_pre_hook(lambda m, a: store.append(a[0].clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return store[0]


def test_zero_initialised_branch_gives_inf_not_nan() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()  # zero_init_last: f(z) == 0
    got = _run_capture(Wrapper(model), [torch.randn(2, 3, 32, 32)])
    assert got and all(v == math.inf for v in got.values())


def test_hook_failure_warns_once_and_never_raises() -> None:
    vit = timm_vit_tiny()
    root = Wrapper(vit)
    good = find_residual_units(root)[0]
    # f(z) taken from the classifier head: (n, classes) has no positions -> the hook fails.
    bad = ResidualUnit("model.blocks.0", "attn", ("spatial",), "model.blocks.0.norm1", True, "model.head", -1, 1)
    capture = NormRatioCapture(root, units=[good, bad])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_out = vit(x)
    with HookSet() as hooks, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture.attach(hooks)
        with torch.no_grad():
            out1, out2 = vit(x), vit(x)
    torch.testing.assert_close(out1, expected_out)
    torch.testing.assert_close(out2, expected_out)
    messages = [str(w.message) for w in caught if "could not be measured" in str(w.message)]
    assert len(messages) == 1 and "model.blocks.0" in messages[0]
    values = capture.compute()
    assert math.isfinite(values["model.blocks.0/attn/cls"])


@H.computes_before_update
def test_reset_and_empty_root() -> None:
    root = Wrapper(timm_vit_tiny())
    capture = NormRatioCapture(root)
    with HookSet() as hooks:
        capture.attach(hooks)
        with torch.no_grad():
            root(torch.randn(2, 3, 32, 32))
    values = capture.compute()
    assert len(values) == 8  # 2 blocks x (attn, mlp) x (cls, spatial)
    assert all(math.isfinite(v) for v in values.values())
    capture.reset()
    values = capture.compute()
    assert len(values) == 8
    assert all(math.isnan(v) for v in values.values())
    with pytest.raises(ValueError, match="No residual unit"):
        NormRatioCapture(nn.Sequential(nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- metric
@H.computes_before_update
def test_metric_streams_means_under_inference_mode() -> None:
    metric = NormRatio(["a", "b", "c"])
    with torch.inference_mode():
        metric.update(torch.tensor([1.0, 6.0]), torch.tensor([1.0, 2.0]), start=1)
    torch.testing.assert_close(metric.compute()[1:], torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert math.isnan(metric.compute()[0].item())
    metric.update(torch.tensor([4.0]), 2, start=2)  # outside inference mode, after compute
    with torch.inference_mode():
        metric.update(torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    values = metric.compute()
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, torch.tensor([3.0, 1.0, 2.5], dtype=torch.float64))
    with pytest.raises(ValueError):
        metric.update(torch.tensor([1.0, 1.0]), 1, start=2)
    metric.reset()
    assert torch.isnan(metric.compute()).all()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sums, counts, att_sums, att_counts = _rank_data(rank)
        metric = NormRatio(["a", "b", "c"])
        metric.update(sums, counts)
        attention = AttentionDistance([3, 2])
        attention.update(att_sums, att_counts)
        torch.save({"norm": metric.compute(), "attn": attention.compute()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rank_data(rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    counts = torch.randint(1, 5, (3,), generator=gen).double()
    sums = torch.rand(3, generator=gen, dtype=torch.float64) * counts
    att_counts = torch.randint(1, 5, (2, 3), generator=gen).double()
    att_sums = torch.rand(2, 3, generator=gen, dtype=torch.float64) * att_counts
    return sums, counts, att_sums, att_counts


@H.computes_before_update
def test_ddp_sync_matches_single_process(tmp_path: Path) -> None:
    # fork (where available) skips re-importing torch, torchmetrics and lightning in each worker
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method=method)
    single = NormRatio(["a", "b", "c"])
    attention = AttentionDistance([3, 2])
    for rank in range(2):
        sums, counts, att_sums, att_counts = _rank_data(rank)
        single.update(sums, counts)
        attention.update(att_sums, att_counts)
    expected = single.compute()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["norm"], expected)
        assert not torch.allclose(result["norm"], NormRatio(["a", "b", "c"]).compute(), equal_nan=True)
        torch.testing.assert_close(result["attn"], attention.compute())
    # each rank alone would differ from the synced mean
    alone = NormRatio(["a", "b", "c"])
    alone.update(*_rank_data(0)[:2])
    assert not torch.allclose(alone.compute(), expected)


# ----------------------------------------------------------------------------- plot
def test_plot_norm_ratios_one_line_per_unit_and_group() -> None:
    values = {
        f"model.blocks.{i}/{u}/{g}": float(10 * i + (u == "mlp") + 2 * (g == "cls") + 1)
        for i in range(3)
        for u in ("attn", "mlp")
        for g in ("cls", "spatial")
    }
    _fig, ax = plot_norm_ratios(values, title="ratios")
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert set(lines) == {"attn cls", "attn spatial", "mlp cls", "mlp spatial", "||z|| = ||f(z)||"}
    assert lines["mlp cls"] == [4.0, 14.0, 24.0]
    assert lines["||z|| = ||f(z)||"] == [1.0, 1.0]  # the reference line where the two norms are equal
    assert ax.get_yscale() == "log" and ax.get_title() == "ratios"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["blocks.0", "blocks.1", "blocks.2"]
