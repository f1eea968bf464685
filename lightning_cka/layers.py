"""Layer selection: explicit names, glob patterns, module types and architecture presets.

Names are those of ``root.named_modules()`` (for the callback, relative to the
LightningModule, e.g. ``"model.blocks.0.attn"``), with the ``_orig_mod`` level that
``torch.compile`` wraps around a module left out, so a name does not change when the model
is compiled (see :func:`module_map`).

**Hook points.** A name denotes the *output* of that module. A name ending in ``":in"``
denotes the *input* of the module (its first positional argument, read by a forward
pre-hook): ``"model.blocks.3.norm2:in"`` is what enters ``norm2`` of block 3, i.e. the
residual stream after the attention add of a timm ViT block. The suffix is accepted
wherever a layer name is (explicit names, glob patterns such as ``"blocks.*.norm2:in"``,
``compare()``, :class:`~lightning_cka.capture.GramCapture`, the callback), and
:func:`hook_points` turns names into :class:`HookPoint` objects. Names without the suffix
mean exactly what they always did.

**Presets** use the architectures' own structure (module types and timm's
``feature_info``), not string heuristics:

- ``"auto"`` / ``"blocks"``: residual block outputs: timm ``VisionTransformer.blocks[i]``,
  torchvision ``VisionTransformer.encoder.layers[i]``, timm and torchvision
  ``ResNet.layer1..4[j]``; other timm models fall back to the modules named in their
  ``feature_info``.
- ``"sublayers"``: each transformer block's residual *branches*: timm ``attn`` and ``mlp``
  outputs, torchvision ``self_attention`` and ``mlp`` outputs (ResNets: their blocks).
- ``"stream"``: the residual *stream* after every residual add (Raghu et al. 2021, whose
  fairly uniform ViT heatmaps are of the stream: ``||z|| >> ||f(z)||`` there). Two points per
  transformer block: after the attention add (timm ``Block``: ``"blocks.i.norm2:in"``;
  torchvision ``EncoderBlock``: ``"encoder.layers.encoder_layer_i.ln_2:in"``) and after the
  MLP add (the block output). ResNets: every block output, as with ``"blocks"``.

Recognised architectures are reported by :func:`find_backbones` as :class:`Backbone` objects
whose ``kind`` is ``"vit"`` (timm ``VisionTransformer`` only: code that relies on timm's
``blocks``/``cls_token``/``Attention`` checks this kind), ``"tv_vit"`` (torchvision
``VisionTransformer``), ``"resnet"`` or ``"timm"``; :attr:`Backbone.is_vit`,
:attr:`Backbone.has_class_token` and :attr:`Backbone.num_prefix_tokens` answer the
questions that do not depend on the implementation.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "INPUT_SUFFIX",
    "PRESETS",
    "Backbone",
    "HookPoint",
    "LayerSpec",
    "backbone_of",
    "find_backbones",
    "hook_points",
    "module_map",
    "resolve_layers",
    "split_point",
]

#: What can be passed as ``layers``: a preset name, a module name or glob, a module type, or a list of those.
LayerSpec = str | type[nn.Module] | Sequence[str | type[nn.Module]]

PRESETS = ("auto", "blocks", "sublayers", "stream")

#: Suffix of a name that denotes a module's input rather than its output.
INPUT_SUFFIX = ":in"


@dataclass(frozen=True)
class Backbone:
    """A recognised architecture found inside a module tree.

    Attributes:
        name: its module name under the root (``""`` when it is the root).
        module: the backbone module.
        kind: ``"vit"`` (timm VisionTransformer), ``"tv_vit"`` (torchvision VisionTransformer),
            ``"resnet"`` (timm or torchvision ResNet) or ``"timm"`` (another timm model with
            ``feature_info``).

    Example:
        >>> import torchvision
        >>> tv = torchvision.models.VisionTransformer(32, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
        >>> backbone = find_backbones(tv)[0]
        >>> backbone.kind, backbone.is_vit, backbone.has_class_token, backbone.num_prefix_tokens
        ('tv_vit', True, True, 1)
    """

    name: str
    module: nn.Module
    kind: str

    def qualify(self, child: str) -> str:
        """The name under the root of ``child``, a name relative to the backbone."""
        return f"{self.name}.{child}" if self.name else child

    @property
    def is_vit(self) -> bool:
        """Whether the backbone is a vision transformer (token activations ``(n, T, C)``)."""
        return self.kind in ("vit", "tv_vit")

    @property
    def has_class_token(self) -> bool:
        """Whether token 0 of its block activations is a class token (timm: ``cls_token`` is set;
        torchvision ViT: always)."""
        if self.kind == "vit":
            return getattr(self.module, "cls_token", None) is not None
        return self.kind == "tv_vit"

    @property
    def num_prefix_tokens(self) -> int:
        """Number of non-patch tokens leading the sequence (class and register tokens; 0 for CNNs)."""
        if self.kind == "vit":
            return int(getattr(self.module, "num_prefix_tokens", int(self.has_class_token)))
        return 1 if self.kind == "tv_vit" else 0


@dataclass(frozen=True)
class HookPoint:
    """Where an activation is read: a module's output, or (``on_input``) its first positional input.

    Attributes:
        name: the layer name, with the ``":in"`` suffix for input points.
        module: the module to hook.
        on_input: read the input (forward pre-hook) instead of the output (forward hook).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> hook_points(net, ["1:in", "1"])["1:in"]
        HookPoint(name='1:in', module=ReLU(), on_input=True)
    """

    name: str
    module: nn.Module
    on_input: bool = False


def split_point(name: str) -> tuple[str, bool]:
    """Split a layer name into ``(module name, on_input)``.

    Example:
        >>> split_point("model.blocks.3.norm2:in")
        ('model.blocks.3.norm2', True)
        >>> split_point("model.blocks.3")
        ('model.blocks.3', False)
    """
    if name.endswith(INPUT_SUFFIX):
        return name[: -len(INPUT_SUFFIX)], True
    return name, False


def module_map(root: nn.Module) -> dict[str, nn.Module]:
    """``name -> module`` for every module under ``root`` (``""`` is the root itself).

    ``torch.compile(m)`` returns a wrapper whose ``_orig_mod`` is ``m``; that level is dropped
    from names (``"model._orig_mod.blocks.0"`` is ``"model.blocks.0"``), and the wrapper shares
    its name with the module it wraps (the map keeps the wrapped module).

    Example:
        >>> from torch import nn
        >>> list(module_map(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
        ['', '0', '1']
    """
    modules: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        parts = [p for p in name.split(".") if p and p != "_orig_mod"]
        modules[".".join(parts)] = module
    return modules


def _vit_types() -> tuple[type, ...]:
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer,)


def _tv_vit_types() -> tuple[type, ...]:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # torchvision is optional
        return ()
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
    if isinstance(module, _tv_vit_types()):
        return "tv_vit"
    if isinstance(module, _resnet_types()):
        return "resnet"
    info = getattr(module, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(f, dict) and "module" in f for f in info):
        return "timm"
    return None


def find_backbones(root: nn.Module) -> list[Backbone]:
    """Outermost recognised architectures under ``root`` (the root included), in module order.

    Example:
        >>> import torchvision
        >>> from torch import nn
        >>> net = nn.Sequential(torchvision.models.resnet18())
        >>> [(b.name, b.kind) for b in find_backbones(net)]
        [('0', 'resnet')]
    """
    found: list[Backbone] = []
    for name, module in module_map(root).items():
        if any(name.startswith(b.name + ".") or b.name == "" for b in found):
            continue  # nested inside a backbone already found
        kind = _kind(module)
        if kind is not None:
            found.append(Backbone(name, module, kind))
    return found


def _timm_stream_point(block: nn.Module) -> str | None:
    """The hook point (relative to a timm ViT block) of the stream after its attention add."""
    from timm.models import vision_transformer as tv

    if isinstance(block, tv.ResPostBlock):  # x + norm1(attn(x)): the stream enters mlp
        return f"mlp{INPUT_SUFFIX}"
    if isinstance(block, tv.ParallelThingsBlock):  # x + sum(attns(x)): the stream enters the ffns
        return f"ffns.0{INPUT_SUFFIX}"
    if isinstance(block, tv.Block) and hasattr(block, "norm2"):  # x + ls1(attn(norm1(x))): enters norm2
        return f"norm2{INPUT_SUFFIX}"
    return None  # e.g. ParallelScalingBlock: one add per block, only its output is on the stream


def _preset_layers(backbone: Backbone, preset: str) -> Iterator[str]:
    module = backbone.module
    if backbone.kind == "vit":
        for i, block in enumerate(module.blocks):  # type: ignore[arg-type]
            if preset == "sublayers":
                for child in ("attn", "mlp"):
                    if hasattr(block, child):
                        yield backbone.qualify(f"blocks.{i}.{child}")
            elif preset == "stream":
                point = _timm_stream_point(block)
                if point is not None:
                    yield backbone.qualify(f"blocks.{i}.{point}")
                yield backbone.qualify(f"blocks.{i}")
            else:
                yield backbone.qualify(f"blocks.{i}")
    elif backbone.kind == "tv_vit":
        for name, _ in module.encoder.layers.named_children():  # type: ignore[union-attr]
            block = f"encoder.layers.{name}"
            if preset == "sublayers":
                yield backbone.qualify(f"{block}.self_attention")
                yield backbone.qualify(f"{block}.mlp")
            elif preset == "stream":
                yield backbone.qualify(f"{block}.ln_2{INPUT_SUFFIX}")
                yield backbone.qualify(block)
            else:
                yield backbone.qualify(block)
    elif backbone.kind == "resnet":
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for j, _ in enumerate(getattr(module, stage, [])):
                yield backbone.qualify(f"{stage}.{j}")
    else:
        for info in module.feature_info:  # type: ignore[union-attr]
            yield backbone.qualify(info["module"])


def _closest(name: str, names: Sequence[str], suffix: str = "") -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    return ", ".join(repr(c + suffix) for c in close) if close else "(no similar names)"


_HOW = (
    "Pass layers='auto' for a timm/torchvision ViT or ResNet, layers='sublayers' for ViT attention/MLP outputs, "
    "layers='stream' for the residual stream after every residual add, module names from named_modules() "
    "(e.g. 'model.blocks.0.attn'; append ':in' for a module's input, e.g. 'model.blocks.0.norm2:in'), "
    "glob patterns (e.g. 'model.blocks.*.mlp') or module types (e.g. torch.nn.Conv2d)."
)


def _match_name(item: str, modules: dict[str, nn.Module], names: list[str], what: str) -> list[str]:
    """Names matched by one string entry (exact name or glob, either with an ``":in"`` suffix)."""
    base, on_input = split_point(item)
    suffix = INPUT_SUFFIX if on_input else ""
    if not on_input and ":" in item and item not in modules:
        raise ValueError(
            f"Unknown hook point suffix in {item!r} in `{what}`: the only suffix is {INPUT_SUFFIX!r} "
            f"(the module's input). {_HOW}"
        )
    if any(c in base for c in "*?["):
        matches = [n + suffix for n in names if fnmatch.fnmatchcase(n, base)]
        if not matches:
            close = _closest(base, names, suffix)
            raise ValueError(f"Pattern {item!r} in `{what}` matches no module. Closest names: {close}. {_HOW}")
        return matches
    if base in modules and (base or on_input):
        return [item]
    raise ValueError(f"Unknown module {item!r} in `{what}`. Closest names: {_closest(base, names, suffix)}. {_HOW}")


def resolve_layers(root: nn.Module, spec: LayerSpec, what: str = "layers") -> list[str]:
    """Turn a layer specification into layer names of ``root``, in a stable order.

    Args:
        root: module whose ``named_modules()`` the names refer to.
        spec: a preset (``"auto"``, ``"blocks"``, ``"sublayers"``, ``"stream"``), a name, a glob
            pattern (either optionally ending in ``":in"``: the module's input), a module type,
            or a sequence of those (concatenated, duplicates dropped).
        what: argument name used in error messages.

    Returns:
        the names, each a module name optionally followed by ``":in"`` (see :func:`hook_points`).

    Raises:
        ValueError: unknown names (listing the closest existing ones), a pattern or type that
            matches nothing, or a preset on an architecture that is not recognised.

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
        >>> resolve_layers(vit, "stream")
        ['blocks.0.norm2:in', 'blocks.0', 'blocks.1.norm2:in', 'blocks.1']
        >>> resolve_layers(vit, ["blocks.*.mlp", "norm:in"])
        ['blocks.0.mlp', 'blocks.1.mlp', 'norm:in']
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
                    f"`{what}={item!r}` found no recognised architecture (timm or torchvision VisionTransformer, "
                    f"timm or torchvision ResNet, or a timm model with feature_info) in {type(root).__name__}. {_HOW}"
                )
            matches = [n for b in backbones for n in _preset_layers(b, item)]
        else:
            matches = _match_name(item, modules, names, what)
        selected.extend(m for m in matches if m not in selected)
    return selected


def hook_points(root: nn.Module, names: LayerSpec, what: str = "layers") -> dict[str, HookPoint]:
    """``name -> HookPoint`` for the layers ``names`` of ``root``, in order.

    Args:
        root: module the names are relative to (``torch.compile`` wrappers are looked through,
            see :func:`module_map`).
        names: layer names (``"blocks.0"``, ``"blocks.0.norm2:in"``), or anything
            :func:`resolve_layers` accepts (presets, globs, types).
        what: argument name used in error messages.

    Raises:
        ValueError: as :func:`resolve_layers`.

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
        >>> points = hook_points(vit, "stream")
        >>> [(p.name, type(p.module).__name__, p.on_input) for p in points.values()]
        [('blocks.0.norm2:in', 'LayerNorm', True), ('blocks.0', 'Block', False)]
    """
    modules = module_map(root)
    points: dict[str, HookPoint] = {}
    for name in resolve_layers(root, names, what):
        base, on_input = split_point(name)
        points[name] = HookPoint(name, modules[base], on_input)
    return points


def backbone_of(root: nn.Module, layer: str) -> Backbone | None:
    """The recognised backbone that contains layer ``layer`` (``":in"`` names too), if any.

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
        >>> backbone_of(vit, "blocks.0.norm2:in").has_class_token
        True
    """
    layer, _ = split_point(layer)
    for backbone in find_backbones(root):
        if backbone.name == "" or layer == backbone.name or layer.startswith(backbone.name + "."):
            return backbone
    return None
