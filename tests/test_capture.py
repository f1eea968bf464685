"""GramCapture built from hook points: module outputs and (``":in"``) module inputs, the legacy
``name -> module`` mapping, first-call semantics and rank-zero, once-per-layer warnings."""

from __future__ import annotations

import warnings

import helpers as H
import pytest
import torch
from torch import nn

from lightning_cka.capture import GramCapture, HookSet, rank_zero_only
from lightning_cka.layers import HookPoint, hook_points


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).eval()


def run(capture: GramCapture, model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor | None]:
    out = []
    with HookSet() as hooks, torch.no_grad():
        capture.attach(hooks)
        for x in inputs:
            model(x)
            out.append(capture.collect())
    return out


def test_input_and_output_points(net):
    x = torch.randn(9, 6)
    capture = GramCapture.for_layers(net, ["1:in", "1", "2:in"], precision=torch.float64)
    assert capture.names == ["1:in", "1", "2:in"]
    assert capture.points["1:in"] == HookPoint("1:in", net[1], True)
    (grams,) = run(capture, net, x)
    with torch.no_grad():
        h = net[0](x)
        expected = [H.centred_gram(h), H.centred_gram(torch.tanh(h)), H.centred_gram(torch.tanh(h))]
    for k, e in zip(grams, expected, strict=True):
        assert torch.allclose(k, e, atol=1e-10)
    assert H.hook_count(net) == 0


def test_legacy_module_mapping_and_hook_point_mapping_agree(net):
    x = torch.randn(9, 6)
    legacy = GramCapture({"0": net[0], "2": net[2]})
    assert legacy.points["0"] == HookPoint("0", net[0], False)
    assert legacy.modules == {"0": net[0], "2": net[2]}
    points = GramCapture(hook_points(net, ["0", "2"]))
    (a,), (b,) = run(legacy, net, x), run(points, net, x)
    assert torch.equal(a, b)


def test_bad_mapping_value(net):
    with pytest.raises(TypeError, match="HookPoint"):
        GramCapture({"0": "not a module"})  # type: ignore[dict-item]


def test_preset_through_for_layers():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    capture = GramCapture.for_layers(vit, "stream", reduction="cls")
    assert capture.names == ["blocks.0.norm2:in", "blocks.0", "blocks.1.norm2:in", "blocks.1"]
    assert [p.on_input for p in capture.points.values()] == [True, False, True, False]


def test_shared_module_input_measured_at_first_call():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
    model = nn.Sequential(block, block).eval()  # the same instance twice
    x = torch.randn(8, 5)
    (grams,) = run(GramCapture.for_layers(model, ["0:in", "0"], precision=torch.float64), model, x)
    with torch.no_grad():
        first = block(x)
    assert torch.allclose(grams[0], H.centred_gram(x), atol=1e-10)
    assert torch.allclose(grams[1], H.centred_gram(first), atol=1e-10)


class NoneOut(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class KwargsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(input=x)


@pytest.mark.parametrize(
    ("model", "names", "match"),
    [
        (nn.Sequential(nn.Linear(4, 4), NoneOut()), ["0", "1"], "NoneType"),
        (KwargsOnly(), ["inner:in"], "first positional input"),
    ],
    ids=["bad_output", "kwargs_only_input"],
)
def test_hook_failure_warns_once_per_layer(model, names, match):
    capture = GramCapture.for_layers(model, names)
    x = torch.randn(6, 4)
    with pytest.warns(UserWarning, match=match) as record:
        results = run(capture, model, x, x, x)
    assert results == [None, None, None]  # the failed layer makes every batch unusable
    assert len([w for w in record if match in str(w.message)]) == 1


def test_warnings_only_on_rank_zero(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4), NoneOut())
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(GramCapture.for_layers(model, ["1"]), model, torch.randn(6, 4)) == [None]
