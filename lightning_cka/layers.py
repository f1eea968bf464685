"""Layer selection: explicit names, glob patterns, module types and architecture presets.

Names are those of ``root.named_modules()`` (for the callback, relative to the
LightningModule, e.g. ``"model.blocks.0.attn"``), with the ``_orig_mod`` level that
``torch.compile`` wraps around a module left out, so a name does not change when the model
is compiled (see :func:`module_map`). Presets use the architectures' own
structure (module types and timm's ``feature_info``), not string heuristics:

- ``"auto"`` / ``"blocks"``: residual block outputs: timm ``VisionTransformer.blocks[i]``,
  timm and torchvision ``ResNet.layer1..4[j]``; other timm models fall back to the modules
  named in their ``feature_info``.
- ``"sublayers"``: the paper's ViT heatmaps: each block's ``attn`` and ``mlp`` outputs
  (ResNets: their blocks, as with ``"auto"``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["PRESETS", "Backbone", "LayerSpec", "find_backbones", "module_map", "resolve_layers"]

#: What can be passed as ``layers``: a preset name, a module name or glob, a module type, or a list of those.
LayerSpec = str | type[nn.Module] | Sequence[str | type[nn.Module]]

PRESETS = ("auto", "blocks", "sublayers")


@dataclass(frozen=True)
class Backbone:
    """A recognised architecture found inside a module tree.

    Attributes:
        name: its module name under the root (``""`` when it is the root).
        module: the backbone module.
        kind: ``"vit"`` (timm VisionTransformer), ``"resnet"`` (timm or torchvision ResNet) or
            ``"timm"`` (another timm model with ``feature_info``).
    """

    name: str
    module: nn.Module
    kind: str

    def qualify(self, child: str) -> str:
        return f"{self.name}.{child}" if self.name else child


def module_map(root: nn.Module) -> dict[str, nn.Module]:
    """``name -> module`` for every module under ``root`` (``""`` is the root itself).

    ``torch.compile(m)`` returns a wrapper whose ``_orig_mod`` is ``m``; that level is dropped
    from names (``"model._orig_mod.blocks.0"`` is ``"model.blocks.0"``), and the wrapper shares
    its name with the module it wraps (the map keeps the wrapped module).
    """
    modules: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        parts = [p for p in name.split(".") if p and p != "_orig_mod"]
        modules[".".join(parts)] = module
    return modules


def _vit_types() -> tuple[type, ...]:
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer,)


def _resnet_types() -> tuple[type, ...]:
    from timm.models.resnet import ResNet as TimmResNet

    types: list[type] = [TimmResNet]
    try:
        from torchvision.models.resnet import ResNet as TvResNet

        types.append(TvResNet)
    except ImportError:  # torchvision is optional
        pass
    return tuple(types)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _vit_types()):
        return "vit"
    if isinstance(module, _resnet_types()):
        return "resnet"
    info = getattr(module, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(f, dict) and "module" in f for f in info):
        return "timm"
    return None


def find_backbones(root: nn.Module) -> list[Backbone]:
    """Outermost recognised architectures under ``root`` (the root included), in module order."""
    found: list[Backbone] = []
    for name, module in module_map(root).items():
        if any(name.startswith(b.name + ".") or b.name == "" for b in found):
            continue  # nested inside a backbone already found
        kind = _kind(module)
        if kind is not None:
            found.append(Backbone(name, module, kind))
    return found


def _preset_layers(backbone: Backbone, preset: str) -> Iterator[str]:
    module = backbone.module
    if backbone.kind == "vit":
        for i, block in enumerate(module.blocks):  # type: ignore[arg-type]
            if preset == "sublayers":
                for child in ("attn", "mlp"):
                    if hasattr(block, child):
                        yield backbone.qualify(f"blocks.{i}.{child}")
            else:
                yield backbone.qualify(f"blocks.{i}")
    elif backbone.kind == "resnet":
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for j, _ in enumerate(getattr(module, stage, [])):
                yield backbone.qualify(f"{stage}.{j}")
    else:
        for info in module.feature_info:  # type: ignore[union-attr]
            yield backbone.qualify(info["module"])


def _closest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    return ", ".join(repr(c) for c in close) if close else "(no similar names)"


_HOW = (
    "Pass layers='auto' for a timm ViT/ResNet or torchvision ResNet, layers='sublayers' for ViT attn/mlp outputs, "
    "module names from named_modules() (e.g. 'model.blocks.0.attn'), glob patterns (e.g. 'model.blocks.*.mlp') "
    "or module types (e.g. torch.nn.Conv2d)."
)


def resolve_layers(root: nn.Module, spec: LayerSpec, what: str = "layers") -> list[str]:
    """Turn a layer specification into module names of ``root``, in a stable order.

    Args:
        root: module whose ``named_modules()`` the names refer to.
        spec: a preset (``"auto"``, ``"blocks"``, ``"sublayers"``), a name, a glob pattern, a
            module type, or a sequence of names/patterns/types (concatenated, duplicates dropped).
        what: argument name used in error messages.

    Raises:
        ValueError: unknown names (listing the closest existing ones), a pattern or type that
            matches nothing, or a preset on an architecture that is not recognised.
    """
    modules = module_map(root)
    names = [n for n in modules if n]
    items: Sequence[str | type[nn.Module]] = [spec] if isinstance(spec, str | type) else list(spec)
    if not items:
        raise ValueError(f"`{what}` is empty. {_HOW}")
    selected: list[str] = []
    for item in items:
        if isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise TypeError(f"`{what}` types must be nn.Module subclasses, got {item!r}.")
            matches = [n for n in names if isinstance(modules[n], item)]
            if not matches:
                raise ValueError(f"No module of type {item.__name__} found for `{what}`. {_HOW}")
        elif not isinstance(item, str):
            raise TypeError(f"`{what}` entries must be str or nn.Module types, got {type(item).__name__}. {_HOW}")
        elif item in PRESETS:
            backbones = find_backbones(root)
            if not backbones:
                raise ValueError(
                    f"`{what}={item!r}` found no recognised architecture (timm VisionTransformer, timm or "
                    f"torchvision ResNet, or a timm model with feature_info) in {type(root).__name__}. {_HOW}"
                )
            matches = [n for b in backbones for n in _preset_layers(b, item)]
        elif any(c in item for c in "*?["):
            matches = [n for n in names if fnmatch.fnmatchcase(n, item)]
            if not matches:
                raise ValueError(
                    f"Pattern {item!r} in `{what}` matches no module. Closest names: {_closest(item, names)}. {_HOW}"
                )
        elif item in modules and item:
            matches = [item]
        else:
            raise ValueError(f"Unknown module {item!r} in `{what}`. Closest names: {_closest(item, names)}. {_HOW}")
        selected.extend(m for m in matches if m not in selected)
    return selected


def backbone_of(root: nn.Module, layer: str) -> Backbone | None:
    """The recognised backbone that contains module ``layer``, if any."""
    for backbone in find_backbones(root):
        if backbone.name == "" or layer == backbone.name or layer.startswith(backbone.name + "."):
            return backbone
    return None
