"""Mean attention distance per head of timm ViTs (Raghu et al. 2021; Dosovitskiy et al. 2021).

For head ``h`` the distance of query patch ``i`` is ``sum_j A_ij dist(i, j)``, where ``A`` is
the attention of patch ``i`` over the patch tokens and ``dist`` the Euclidean distance of the
two patches' grid positions in pixels, ``sqrt((dy * ph)^2 + (dx * pw)^2)`` for a patch of
``ph x pw`` pixels. It is averaged over query patches and then over images.

Prefix tokens (class and register tokens) are dropped from queries and keys, and each
patch-to-patch attention row is renormalised to sum to 1, so the distance is a weighted mean
over patches whatever share of attention went to the prefix tokens.

timm computes attention with fused ``scaled_dot_product_attention``, which never materialises
``A``; the hooks recompute it from the block's ``qkv`` projection (with ``q_norm`` / ``k_norm``)
and leave the model's own forward untouched.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_cka.capture import HookSet
from lightning_cka.layers import find_backbones
from lightning_cka.running_mean import RunningMean

__all__ = [
    "AttentionDistance",
    "AttentionDistanceCapture",
    "attention_weights",
    "mean_attention_distance",
    "patch_distances",
    "plot_attention_distances",
    "uniform_attention_distance",
]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def patch_distances(
    grid: tuple[int, int],
    patch_size: tuple[int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(N, N)`` pixel distances between the ``N = gh * gw`` patches of a row-major grid."""
    gh, gw = _pair(grid)
    ph, pw = _pair(patch_size)
    rows = torch.arange(gh, device=device, dtype=dtype).repeat_interleave(gw) * ph
    cols = torch.arange(gw, device=device, dtype=dtype).repeat(gh) * pw
    dy = rows[:, None] - rows[None, :]
    dx = cols[:, None] - cols[None, :]
    return torch.sqrt(dy * dy + dx * dx)


def mean_attention_distance(
    attn: Tensor,
    grid: tuple[int, int],
    patch_size: tuple[int, int],
    num_prefix_tokens: int = 0,
) -> tuple[Tensor, Tensor]:
    """Per-head mean attention distance of a batch, summed over examples.

    Args:
        attn: ``(n, H, T, T)`` softmax attention over all ``T = num_prefix_tokens + gh * gw``
            tokens (prefix tokens first, patches in row-major order).
        grid: ``(gh, gw)`` patch grid.
        patch_size: ``(ph, pw)`` patch size in pixels.
        num_prefix_tokens: leading class/register tokens, dropped from queries and keys.

    Returns:
        ``(sums, counts)``, both ``(H,)`` float64: the sum over examples of each example's
        mean over query patches of ``sum_j A_ij dist(i, j)`` (pixels, with the patch rows
        renormalised to sum to 1), and the number of examples summed. Queries whose
        patch-to-patch attention is all zero are left out of the mean; an example with no
        such valid query is left out of the sum and the count.
    """
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (n, H, T, T), got shape {tuple(attn.shape)}.")
    gh, gw = _pair(grid)
    tokens = attn.shape[-1] - num_prefix_tokens
    if tokens != gh * gw:
        raise ValueError(
            f"{attn.shape[-1]} tokens minus {num_prefix_tokens} prefix tokens is {tokens}, "
            f"not the {gh} x {gw} = {gh * gw} patches of the grid."
        )
    dtype = torch.promote_types(attn.dtype, torch.float32)
    a = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].to(dtype)
    a = a / a.sum(dim=-1, keepdim=True)  # renormalise over patches (0/0 -> NaN rows)
    dist = patch_distances((gh, gw), patch_size, device=attn.device, dtype=dtype)
    per_query = (a * dist).sum(dim=-1)  # (n, H, N)
    per_example = torch.nanmean(per_query, dim=-1)  # (n, H)
    valid = ~torch.isnan(per_example)
    sums = torch.where(valid, per_example, per_example.new_zeros(())).sum(dim=0, dtype=torch.float64)
    return sums, valid.sum(dim=0, dtype=torch.float64)


@contextlib.contextmanager
def _autocast_off(device_type: str) -> Any:
    try:
        context: Any = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        context = contextlib.nullcontext()
    with context:
        yield


def attention_weights(attn_module: nn.Module, x: Tensor) -> Tensor:
    """Recompute the softmax attention of a timm ``Attention`` for its input ``x`` ``(n, T, C)``.

    Uses ``attn_module.qkv``, ``q_norm``, ``k_norm`` and ``scale`` exactly like timm's non-fused
    path (without mask or dropout), calling their ``forward`` directly so that other hooks on
    those modules do not fire. Scores and softmax are computed in at least float32 with
    autocast off. Returns ``(n, H, T, T)``.
    """
    n, tokens, _ = x.shape
    heads = int(attn_module.num_heads)
    qkv_layer: Any = attn_module.qkv
    head_dim = int(getattr(attn_module, "head_dim", 0)) or qkv_layer.out_features // (3 * heads)
    qkv = qkv_layer.forward(x).reshape(n, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q_norm: Any = attn_module.q_norm
    k_norm: Any = attn_module.k_norm
    q, k = q_norm.forward(q), k_norm.forward(k)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with _autocast_off(x.device.type):
        scores = (q.to(dtype) * attn_module.scale) @ k.to(dtype).transpose(-2, -1)
        return scores.softmax(dim=-1)


class AttentionDistance(RunningMean):
    """Streaming mean attention distance per (layer, head), in pixels.

    A :class:`~lightning_cka.running_mean.RunningMean` of shape ``(L, H)`` (``H`` = the largest
    head count; heads a layer lacks stay NaN).

    Args:
        num_heads: heads of each of the ``L`` layers (an int for one layer).

    Example:
        >>> distance = AttentionDistance([2, 1])
        >>> distance.update(torch.tensor([8.0, 12.0]), counts=2, layer=0)
        >>> distance.compute()
        tensor([[4., 6.],
                [nan, nan]], dtype=torch.float64)
    """

    def __init__(self, num_heads: int | Sequence[int], **kwargs: Any) -> None:
        heads = [num_heads] if isinstance(num_heads, int) else [int(h) for h in num_heads]
        super().__init__((len(heads), max(heads, default=0)), **kwargs)
        self.num_heads = heads

    def update(self, sums: Tensor, counts: Tensor | float, layer: int | None = None) -> None:  # type: ignore[override]
        """Add per-head ``sums`` and ``counts`` (as from :func:`mean_attention_distance`): shaped
        ``(h,)`` for layer ``layer``, or ``(L, H)`` for all layers when ``layer`` is ``None``.

        Raises:
            ValueError: the sums do not fit the layer (or all layers).
        """
        layers, width = self.total.shape
        if layer is None:
            super().update(sums, counts)
            return
        if sums.ndim != 1 or not 0 <= layer < layers or sums.shape[0] > width:
            raise ValueError(f"sums of shape {tuple(sums.shape)} for layer {layer} do not fit {layers} x {width}.")
        super().update(sums, counts, index=(layer, slice(0, sums.shape[0])))


@dataclass
class _Layer:
    name: str
    module: nn.Module
    vit: int
    heads: int


class AttentionDistanceCapture:
    """Hooks that stream the mean attention distance of every head of every timm ViT under ``root``.

    Args:
        root: the model; layer names are relative to it (e.g. ``"model.blocks.3.attn"``).
        max_examples_per_batch: use only the first examples of each batch (bounds the cost of
            recomputing attention); all when ``None``.
        chunk_size: examples per attention recomputation inside a hook (bounds memory).

    The grid is taken from the input image size seen by ``patch_embed``
    (``dynamic_feat_size``), falling back to ``patch_embed.grid_size``; the patch size in
    pixels from ``patch_embed.feat_ratio`` (else ``patch_size``).
    """

    def __init__(self, root: nn.Module, max_examples_per_batch: int | None = None, chunk_size: int = 64) -> None:
        from timm.layers import Attention

        self.max_examples_per_batch = max_examples_per_batch
        self.chunk_size = max(1, int(chunk_size))
        self._vits: list[nn.Module] = []
        self._layers: list[_Layer] = []
        for backbone in find_backbones(root):
            if backbone.kind != "vit":
                continue
            self._vits.append(backbone.module)
            for i, block in enumerate(backbone.module.blocks):  # type: ignore[arg-type]
                attn = getattr(block, "attn", None)
                if isinstance(attn, Attention):
                    name = backbone.qualify(f"blocks.{i}.attn")
                    self._layers.append(_Layer(name, attn, len(self._vits) - 1, int(attn.num_heads)))
        if not self._layers:
            raise ValueError(
                f"No timm VisionTransformer block with a timm Attention module found in {type(root).__name__}; "
                "attention distances need the qkv projection of timm's Attention."
            )
        self.layers: list[str] = [layer.name for layer in self._layers]
        self.metric = AttentionDistance([layer.heads for layer in self._layers])
        self._image_size: list[tuple[int, int] | None] = [None] * len(self._vits)
        #: Per ViT, the ``(grid, patch size)`` of the last measured batch.
        self.geometry: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        self._warned: set[str] = set()

    def attach(self, hooks: HookSet) -> None:
        """Register an image-size pre-hook on each ``patch_embed`` and a pre-hook on each ``attn``."""
        for index, vit in enumerate(self._vits):
            hooks.forward_pre(vit.patch_embed, self._image_hook(index))  # type: ignore[arg-type]
        for index, layer in enumerate(self._layers):
            hooks.forward_pre(layer.module, self._attn_hook(index))

    def _image_hook(self, vit: int) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            self._image_size[vit] = (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, Tensor) else None

        return hook

    def _geometry(self, vit: int, num_patches: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Grid ``(gh, gw)`` and patch size ``(ph, pw)`` for ``num_patches`` patch tokens."""
        embed: Any = self._vits[vit].patch_embed
        # pixels per patch token (a hybrid CNN stem's feat_ratio includes the CNN's stride)
        patch = _pair(embed.feat_ratio(as_scalar=False) if hasattr(embed, "feat_ratio") else embed.patch_size)
        candidates = []
        image = self._image_size[vit]
        if image is not None and hasattr(embed, "dynamic_feat_size"):
            candidates.append(_pair(embed.dynamic_feat_size(image)))
        if getattr(embed, "grid_size", None) is not None:
            candidates.append(_pair(embed.grid_size))
        for grid in candidates:
            if grid[0] * grid[1] == num_patches:
                return grid, patch
        raise ValueError(f"cannot place {num_patches} patch tokens on a grid (candidates {candidates})")

    def _attn_hook(self, index: int) -> Callable[[nn.Module, Any], None]:
        layer = self._layers[index]

        def hook(module: nn.Module, args: Any) -> None:
            try:
                x = args[0]
                if not isinstance(x, Tensor) or x.ndim != 3:
                    raise TypeError(f"expected a (n, T, C) tensor input, got {type(x).__name__}")
                x = x.detach()
                if self.max_examples_per_batch is not None:
                    x = x[: self.max_examples_per_batch]
                prefix = int(getattr(self._vits[layer.vit], "num_prefix_tokens", 0))
                grid, patch = self._geometry(layer.vit, x.shape[1] - prefix)
                self.geometry[layer.vit] = (grid, patch)
                with torch.no_grad():
                    sums, counts = None, None
                    for chunk in x.split(self.chunk_size):
                        s, c = mean_attention_distance(attention_weights(module, chunk), grid, patch, prefix)
                        sums, counts = (s, c) if sums is None or counts is None else (sums + s, counts + c)
                    if sums is not None and counts is not None:
                        self.metric.update(sums, counts, layer=index)
            except Exception as err:  # never break the user's forward pass
                if layer.name not in self._warned:
                    self._warned.add(layer.name)
                    rank_zero_warn(
                        f"Attention distance of layer {layer.name!r} could not be measured ({err}); it is skipped.",
                        category=UserWarning,
                        stacklevel=2,
                    )

        return hook

    def compute(self) -> dict[str, Tensor]:
        """``{layer: (heads,) float64 mean distance in pixels}`` (a collective under DDP: call on every rank)."""
        values = self.metric.compute().cpu()
        return {layer.name: values[i, : layer.heads] for i, layer in enumerate(self._layers)}

    def reset(self) -> None:
        """Clear the accumulated distances."""
        self.metric.reset()


_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def uniform_attention_distance(grid: tuple[int, int], patch_size: tuple[int, int]) -> tuple[float, float]:
    """``(uniform, largest)``: the mean attention distance (pixels) of a head attending uniformly
    to every patch, and the largest value a head can reach (every query attending only to its
    farthest patch). A measured distance means something only against these two.

    Example:
        >>> uniform, largest = uniform_attention_distance((8, 8), (4, 4))
        >>> round(uniform, 2), round(largest, 2)
        (16.55, 31.43)
    """
    dist = patch_distances(grid, patch_size, dtype=torch.float64)
    return float(dist.mean()), float(dist.amax(dim=1).mean())


def plot_attention_distances(
    values: dict[str, Tensor],
    title: str | None = None,
    ax: Any = None,
    uniform: float | None = None,
    largest: float | None = None,
) -> tuple[Any, Any]:
    """Scatter of mean attention distance (pixels) against layer index, one point per head
    (the paper's Figure 3); one colour per model when ``values`` holds several. ``uniform`` and
    ``largest`` (see :func:`uniform_attention_distance`) draw the uniform-attention line and fix
    the y range to the possible one. Returns ``(fig, ax)``."""
    from lightning_cka.plotting import plot_series

    hlines = {"uniform attention": uniform} if uniform is not None else None
    ylim = (0.0, largest * 1.02) if largest is not None else None
    groups: dict[str, tuple[list[float], list[list[float]]]] = {}
    for name, heads in values.items():
        match = _BLOCK_INDEX.search(name)
        model = name[: match.start()] if match else ""
        xs, ys = groups.setdefault(model, ([], []))
        xs.append(float(match.group(1)) if match else float(len(xs)))
        ys.append([float(v) for v in torch.as_tensor(heads).flatten().tolist()])
    fig, axes = None, ax
    for model, (xs, ys) in groups.items():
        fig, axes = plot_series(
            {f"{model.rstrip('.')} heads" if len(groups) > 1 else "heads": ys},
            x=xs,
            ax=axes,
            title=title,
            xlabel="block",
            ylabel="mean attention distance (pixels)",
            scatter=True,
            hlines=hlines,
            ylim=ylim,
        )
        hlines = None  # one reference line, drawn with the first model
    if fig is None:
        fig, axes = plot_series({}, ax=ax, title=title, xlabel="layer", ylabel="mean attention distance (pixels)")
    return fig, axes
