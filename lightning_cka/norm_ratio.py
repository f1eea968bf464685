"""Skip-connection norm ratio ``||z|| / ||f(z)||`` of residual units (Raghu et al. 2021).

For a residual unit ``out = z + f(z)`` the ratio is taken per token (ViT, ``(n, T, C)``) or per
spatial position (CNN, ``(n, C, H, W)``) over the channel dimension, then averaged over
positions and examples (a mean of ratios, streamed as a sum and a count).

- timm ViT ``Block``: two units. ``attn``: z = input of ``norm1``, f(z) = output of ``ls1``;
  ``mlp``: z = input of ``norm2``, f(z) = output of ``ls2``. Tokens are split into groups
  ``"cls"`` (token 0, when the model has a class token) and ``"spatial"`` (the patch tokens
  after ``num_prefix_tokens``); register tokens belong to neither.
- torchvision ViT ``EncoderBlock``: the same two units. ``attn``: z = input of ``ln_1``,
  f(z) = output of ``dropout`` (the attention output added to z); ``mlp``: z = input of
  ``ln_2``, f(z) = output of ``mlp``. Token 0 is the class token.
- ResNet blocks (timm and torchvision ``BasicBlock`` / ``Bottleneck``): one unit
  ``residual``: z = output of ``downsample`` (else the block input), f(z) = the branch just
  before the addition (timm: ``drop_path``, else ``se``, else the last batch norm;
  torchvision: the last batch norm). One group ``"all"`` (every spatial position).

Series are named ``f"{block}/{unit}/{group}"``, e.g. ``"model.blocks.0/attn/cls"`` or
``"model.layer2.0/residual/all"``. Hooks reduce each tensor to its per-position norms at
once, so ResNet's in-place ``x += shortcut`` and in-place ReLU cannot change the result.

A position where ``||f(z)|| = 0`` has an infinite ratio and makes its series infinite (timm
ResNets zero-initialise the last batch norm of each block, so an untrained one shows ``inf``);
positions where both norms are 0 (or NaN) are left out of the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_cka.capture import HookSet, select_output
from lightning_cka.layers import find_backbones, module_map
from lightning_cka.running_mean import RunningMean

__all__ = [
    "NormRatio",
    "NormRatioCapture",
    "ResidualUnit",
    "find_residual_units",
    "plot_norm_ratios",
]

UNITS = ("attn", "mlp", "residual")
GROUPS = ("cls", "spatial", "all")


class NormRatio(RunningMean):
    """Streaming means of named series (here: skip-connection norm ratios).

    A :class:`~lightning_cka.running_mean.RunningMean` of shape ``(S,)`` whose units are named.

    Args:
        series: the ``S`` series names, in state order.

    Example:
        >>> ratios = NormRatio(["blocks.0/attn/cls", "blocks.0/attn/spatial"])
        >>> ratios.update(torch.tensor([6.0, 10.0]), counts=torch.tensor([2.0, 5.0]))
        >>> ratios.as_dict()
        {'blocks.0/attn/cls': 3.0, 'blocks.0/attn/spatial': 2.0}
    """

    def __init__(self, series: Sequence[str], **kwargs: Any) -> None:
        super().__init__((len(series),), **kwargs)
        self.series = list(series)

    def update(self, sums: Tensor, counts: Tensor | float, start: int = 0) -> None:  # type: ignore[override]
        """Add ``sums`` (``(k,)``, sums of values) and ``counts`` (``(k,)`` or a number, how many
        values each sum holds) to series ``start .. start + k - 1``. No host synchronisation.

        Raises:
            ValueError: the ``k`` sums do not fit the series from ``start`` on.
        """
        sums = torch.as_tensor(sums)
        if sums.ndim != 1 or start < 0 or start + sums.shape[0] > self.total.shape[0]:
            raise ValueError(
                f"sums of shape {tuple(sums.shape)} at start={start} do not fit {self.total.shape[0]} series."
            )
        super().update(sums, counts, index=slice(start, start + sums.shape[0]))

    def as_dict(self, values: Tensor | None = None) -> dict[str, float]:
        """``{series name: mean}`` of ``values`` (computed when ``None``)."""
        values = self.compute() if values is None else values
        return dict(zip(self.series, values.tolist(), strict=True))

    def plot(self, val: Tensor | None = None, ax: Any = None, title: str | None = None) -> tuple[Any, Any]:
        """Draw the means with :func:`plot_norm_ratios`; returns ``(fig, ax)``."""
        return plot_norm_ratios(self.as_dict(val), title=title, ax=ax)


@dataclass(frozen=True)
class ResidualUnit:
    """One residual unit ``out = z + f(z)`` and where its hooks go.

    Attributes:
        block: block name under the root, e.g. ``"model.blocks.0"`` or ``"model.layer2.0"``.
        unit: ``"attn"`` or ``"mlp"`` (ViT) or ``"residual"`` (ResNet).
        groups: token groups reported: ``"cls"`` (token 0), ``"spatial"`` (tokens from
            ``num_prefix_tokens`` on), ``"all"`` (every position).
        z: name of the module whose input (``z_is_input``) or output is ``z``.
        z_is_input: take ``z`` from the input of module ``z`` (else from its output).
        f: name of the module whose output is ``f(z)``.
        channel_dim: channel dimension of both tensors: ``-1`` for ``(n, T, C)`` tokens,
            ``1`` for ``(n, C, H, W)`` feature maps.
        num_prefix_tokens: leading non-patch tokens (class and register tokens).
    """

    block: str
    unit: str
    groups: tuple[str, ...]
    z: str
    z_is_input: bool
    f: str
    channel_dim: int = -1
    num_prefix_tokens: int = 0

    @property
    def series(self) -> list[str]:
        """Series names ``f"{block}/{unit}/{group}"``, one per group."""
        return [f"{self.block}/{self.unit}/{group}" for group in self.groups]


def _vit_block_type() -> type:
    from timm.models.vision_transformer import Block

    return Block


def _resnet_block_types() -> dict[type, str]:
    """ResNet block type -> name of its last batch norm."""
    from timm.models import resnet as timm_resnet

    types: dict[type, str] = {timm_resnet.BasicBlock: "bn2", timm_resnet.Bottleneck: "bn3"}
    try:
        from torchvision.models import resnet as tv_resnet

        types.update({tv_resnet.BasicBlock: "bn2", tv_resnet.Bottleneck: "bn3"})
    except ImportError:  # torchvision is optional
        pass
    return types


def _vit_units(prefix: str, vit: nn.Module) -> list[ResidualUnit]:
    block_type = _vit_block_type()
    prefix_tokens = int(getattr(vit, "num_prefix_tokens", 0))
    has_cls = getattr(vit, "cls_token", None) is not None
    groups = ("cls", "spatial") if has_cls else ("spatial",)
    units = []
    for i, block in enumerate(vit.blocks):  # type: ignore[arg-type]
        if not isinstance(block, block_type):
            continue
        name = f"{prefix}blocks.{i}"
        for unit, norm, scale in (("attn", "norm1", "ls1"), ("mlp", "norm2", "ls2")):
            units.append(ResidualUnit(name, unit, groups, f"{name}.{norm}", True, f"{name}.{scale}", -1, prefix_tokens))
    return units


def _tv_vit_units(prefix: str, vit: nn.Module) -> list[ResidualUnit]:
    """torchvision ``EncoderBlock``: ``x = input + dropout(self_attention(ln_1(input)))``,
    ``out = x + mlp(ln_2(x))``; one class token in front of the patches."""
    from torchvision.models.vision_transformer import EncoderBlock

    units = []
    for name, block in vit.encoder.layers.named_children():  # type: ignore[union-attr]
        if not isinstance(block, EncoderBlock):
            continue
        block_name = f"{prefix}encoder.layers.{name}"
        for unit, norm, branch in (("attn", "ln_1", "dropout"), ("mlp", "ln_2", "mlp")):
            units.append(
                ResidualUnit(
                    block_name, unit, ("cls", "spatial"), f"{block_name}.{norm}", True, f"{block_name}.{branch}", -1, 1
                )
            )
    return units


def _resnet_units(prefix: str, resnet: nn.Module) -> list[ResidualUnit]:
    types = _resnet_block_types()
    units = []
    for name, block in module_map(resnet).items():
        last_bn = types.get(type(block))
        if last_bn is None:
            last_bn = next((bn for t, bn in types.items() if isinstance(block, t)), None)
        if last_bn is None:
            continue
        block_name = f"{prefix}{name}"
        f_attr = last_bn
        for attr in ("se", "drop_path"):  # later in the branch wins (timm only)
            if isinstance(getattr(block, attr, None), nn.Module):
                f_attr = attr
        if isinstance(getattr(block, "downsample", None), nn.Module):
            z, z_is_input = f"{block_name}.downsample", False
        else:
            z, z_is_input = block_name, True
        units.append(ResidualUnit(block_name, "residual", ("all",), z, z_is_input, f"{block_name}.{f_attr}", 1))
    return units


def find_residual_units(root: nn.Module) -> list[ResidualUnit]:
    """Residual units of every timm ViT ``Block``, torchvision ViT ``EncoderBlock`` and
    timm/torchvision ResNet block under
    ``root`` (found by module type through :func:`~lightning_cka.layers.find_backbones`),
    in module order; names are relative to ``root``."""
    units: list[ResidualUnit] = []
    for backbone in find_backbones(root):
        prefix = f"{backbone.name}." if backbone.name else ""
        if backbone.kind == "vit":
            units.extend(_vit_units(prefix, backbone.module))
        elif backbone.kind == "tv_vit":
            units.extend(_tv_vit_units(prefix, backbone.module))
        elif backbone.kind == "resnet":
            units.extend(_resnet_units(prefix, backbone.module))
    return units


def _position_norms(x: Tensor, channel_dim: int) -> Tensor:
    """Euclidean norm over channels of ``(n, T, C)`` (``channel_dim=-1``) or ``(n, C, H, W)``
    (``channel_dim=1``) activations -> ``(n, positions)``, at least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    norms = torch.linalg.vector_norm(x, dim=channel_dim, dtype=dtype)
    return norms.flatten(1)


class NormRatioCapture:
    """Hooks that stream the skip-connection norm ratios of residual units into a :class:`NormRatio`.

    Args:
        root: the model; unit names are relative to it.
        units: units to measure; all of :func:`find_residual_units` when ``None``.

    Use :meth:`attach` to register the hooks into a :class:`~lightning_cka.capture.HookSet`,
    run forward passes, then :meth:`compute` for ``{series: mean ratio}``.
    """

    def __init__(self, root: nn.Module, units: list[ResidualUnit] | None = None) -> None:
        self.units = list(find_residual_units(root) if units is None else units)
        if not self.units:
            raise ValueError(
                f"No residual unit found in {type(root).__name__}: norm ratios support timm VisionTransformer "
                "blocks and timm/torchvision ResNet BasicBlock/Bottleneck blocks."
            )
        modules = module_map(root)
        missing = [name for u in self.units for name in (u.z, u.f) if name not in modules]
        if missing:
            raise ValueError(f"Modules {missing} of the residual units are not in {type(root).__name__}.")
        self._modules = modules
        self.series: list[str] = [s for u in self.units for s in u.series]
        self._offsets: list[int] = []
        offset = 0
        for unit in self.units:
            self._offsets.append(offset)
            offset += len(unit.groups)
        self.metric = NormRatio(self.series)
        self._pending: list[dict[str, Tensor | None]] = [{"z": None, "f": None} for _ in self.units]
        self._warned: set[int] = set()

    def attach(self, hooks: HookSet) -> None:
        """Register the z and f(z) hooks of every unit into ``hooks``."""
        for index, unit in enumerate(self.units):
            if unit.z_is_input:
                hooks.forward_pre(self._modules[unit.z], self._pre_hook(index, "z"))
            else:
                hooks.forward(self._modules[unit.z], self._hook(index, "z"))
            hooks.forward(self._modules[unit.f], self._hook(index, "f"))

    def _pre_hook(self, index: int, which: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._record(index, which, args)

        return hook

    def _hook(self, index: int, which: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(index, which, output)

        return hook

    def _record(self, index: int, which: str, value: Any) -> None:
        """Reduce ``value`` to per-position norms now; combine once both z and f(z) are in."""
        pending = self._pending[index]
        try:
            unit = self.units[index]
            with torch.no_grad():
                norms = _position_norms(select_output(value).detach(), unit.channel_dim)
                other = pending["f" if which == "z" else "z"]
                if other is None:  # z comes first in ViTs, f(z) first in ResNets with downsample
                    pending[which] = norms
                    return
                pending["z"] = pending["f"] = None
                z_norms, f_norms = (norms, other) if which == "z" else (other, norms)
                self._accumulate(index, z_norms, f_norms)
        except Exception as err:  # never break the user's forward pass
            pending["z"] = pending["f"] = None
            self._warn_once(index, err)

    def _accumulate(self, index: int, z_norms: Tensor, f_norms: Tensor) -> None:
        unit = self.units[index]
        if z_norms.shape != f_norms.shape:
            raise ValueError(f"z has {tuple(z_norms.shape)} positions but f(z) has {tuple(f_norms.shape)}")
        ratio = z_norms / f_norms
        sums, counts = [], []
        for group in unit.groups:
            if group == "cls":
                part = ratio[:, :1]
            elif group == "spatial":
                part = ratio[:, unit.num_prefix_tokens :]
            else:
                part = ratio
            valid = ~torch.isnan(part)
            sums.append(torch.where(valid, part, part.new_zeros(())).sum(dtype=torch.float64))
            counts.append(valid.sum(dtype=torch.float64))
        self.metric.update(torch.stack(sums), torch.stack(counts), start=self._offsets[index])

    def _warn_once(self, index: int, err: Exception) -> None:
        if index not in self._warned:
            self._warned.add(index)
            unit = self.units[index]
            rank_zero_warn(
                f"Norm ratio of {unit.block!r} ({unit.unit}) could not be measured ({err}); it is skipped.",
                category=UserWarning,
                stacklevel=3,
            )

    def compute(self) -> dict[str, float]:
        """``{series: mean ratio}`` over everything seen (a collective under DDP: call it on every rank)."""
        return self.metric.as_dict()

    def clear(self) -> None:
        """Forget anything half-recorded (a z without its f(z))."""
        self._pending = [{"z": None, "f": None} for _ in self.units]

    def reset(self) -> None:
        """Clear the means and anything half-recorded."""
        self.metric.reset()
        self.clear()


def _split(name: str) -> tuple[str, str, str]:
    block, unit, group = name.rsplit("/", 2)
    return block, unit, group


def plot_norm_ratios(values: dict[str, float], title: str | None = None, ax: Any = None) -> tuple[Any, Any]:
    """Ratio ``||z|| / ||f(z)||`` (log y) against block index, one line per unit and token group.

    ``values`` maps ``"block/unit/group"`` series names to mean ratios (as from
    :meth:`NormRatioCapture.compute`); each line's blocks are numbered in the order given.
    Returns ``(fig, ax)``.
    """
    from lightning_cka.plotting import plot_series, short_names

    parsed = [(*_split(name), value) for name, value in values.items()]
    blocks = list(dict.fromkeys(block for block, *_ in parsed))
    # Several models under one root: prefix the lines with the part before "blocks.i"/"layerK.j".
    prefixes = {block.rsplit(".", 2)[0] if block.count(".") >= 2 else "" for block, *_ in parsed}
    series: dict[str, list[float]] = {}
    for block, unit, group, value in parsed:
        label = f"{unit} {group}"
        if len(prefixes) > 1:
            label = f"{block.rsplit('.', 2)[0] if block.count('.') >= 2 else ''} {label}".strip()
        series.setdefault(label, []).append(float(value))
    single_model = len(prefixes) == 1 and all(len(v) == len(blocks) for v in series.values())
    return plot_series(
        series,
        ax=ax,
        title=title,
        xlabel="block",
        ylabel="||z|| / ||f(z)||  (log scale)",
        logy=True,
        xticklabels=short_names(blocks) if single_model else None,
        hlines={"||z|| = ||f(z)||": 1.0},
    )
