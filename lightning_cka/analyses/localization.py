"""Spatial localization maps of ViT tokens (Raghu et al. 2021, "Do Vision Transformers See Like
Convolutional Neural Networks?", section 6).

For a ViT with an ``h x w`` patch grid, the token at grid position ``i`` of a layer is compared with
the input patch at grid position ``j``: minibatch CKA over the images of ``token_i(layer)`` and
``patch_j(reference layer)``, for all ``i, j``, gives a ``(T, T)`` matrix (``T = h * w``). Row ``i``
reshaped to ``h x w`` is a map of where token ``i``'s information comes from: a sharp peak on its own
position means the token stays localized.

Each token position is one "layer" of :class:`~lightning_cka.MinibatchCKA`: per minibatch the ``T``
Gram matrices ``(n, n)`` of each side are formed at once, ``einsum("itc,jtc->tij")`` of the
example-centred tokens (:func:`token_grams`), ``O(T n^2 C)``; the metric then pairs all positions in
one product, ``O(T^2 n^2)``. Activations are never stored.

What is compared:

- rows: the spatial tokens of ``layer``, prefix tokens (class and register tokens) left out;
- columns: the input patches, by default the output of the patch embedding *before* position
  embeddings are added: timm ``patch_embed`` (``(n, T, C)``, or ``(n, h, w, C)`` with
  ``dynamic_img_size``), torchvision ``conv_proj`` (``(n, C, h, w)``, flattened row-major to
  ``(n, T, C)`` exactly as torchvision does). For a torchvision ViT the name ``"patch_embed"``
  means ``conv_proj``.

Token positions are row-major (``t = r * w + c``) and named ``"(r, c)"``. The grid is taken from the
image size entering the patch embedding (timm ``dynamic_feat_size``, so non-square and dynamic image
sizes work; torchvision ``image // patch_size``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_cka.analyses.base import Analysis, AnalysisSkipped, MeasuredBatch, Report, SetupContext
from lightning_cka.capture import HookSet, extract_input, select_output
from lightning_cka.compare import CKAResult, eval_mode, to_model_input
from lightning_cka.compiled import EagerWhileMeasuring
from lightning_cka.functional import MIN_EXAMPLES, gram_dtype, resolve_precision
from lightning_cka.layers import Backbone, LayerSpec, backbone_of, find_backbones, hook_points, module_map
from lightning_cka.metric import MinibatchCKA

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

__all__ = [
    "Localization",
    "default_queries",
    "grid_labels",
    "localization",
    "localization_summary",
    "plot_localization",
    "spatial_tokens",
    "token_grams",
]

Grid = tuple[int, int]

#: How to read a localization image (logged once per tag).
CAPTION = (
    "Each small map belongs to one token position of the layer (outlined): CKA over the validation images "
    "between that token and every input patch (patch embedding, before position embeddings), laid out on the "
    "patch grid, on a 0..1 scale. A bright outlined cell on a dark map: the token still carries its own patch "
    "(localized); a spread-out map: its information comes from many patches. Scalars: diagonal = mean CKA of "
    "each token with its own patch; hit_rate = fraction of positions whose most similar patch is their own."
)


# ----------------------------------------------------------------------------------- tensors
def grid_labels(grid: Grid) -> list[str]:
    """Names ``"(r, c)"`` of the ``h * w`` positions of a row-major grid.

    Example:
        >>> grid_labels((2, 3))
        ['(0, 0)', '(0, 1)', '(0, 2)', '(1, 0)', '(1, 1)', '(1, 2)']
    """
    h, w = grid
    return [f"({r}, {c})" for r in range(h) for c in range(w)]


def _channels_last(module: nn.Module | None) -> bool | None:
    """Whether a 4-D output of ``module`` is NHWC (timm ``output_fmt``), if it says."""
    fmt = getattr(module, "output_fmt", None)
    if fmt is None:
        return None
    return str(getattr(fmt, "value", fmt)) == "NHWC"


def spatial_tokens(x: Tensor, grid: Grid, num_prefix_tokens: int = 0, channels_last: bool | None = None) -> Tensor:
    """The ``(n, T, C)`` spatial tokens (``T = h * w``, row-major) of a ViT activation.

    Args:
        x: ``(n, S, C)`` tokens, ``S = T`` (a patch embedding) or ``S = num_prefix_tokens + T``
            (prefix tokens first, dropped); or a 4-D map ``(n, C, h, w)`` / ``(n, h, w, C)``.
        grid: ``(h, w)`` patch grid.
        num_prefix_tokens: class and register tokens leading the sequence.
        channels_last: layout of a 4-D ``x`` when its shape alone is ambiguous (``h == w == C``).

    Raises:
        ValueError: ``x`` does not fit the grid.

    Example:
        >>> x = torch.arange(2 * 7 * 1.0).reshape(2, 7, 1)  # 1 class token + a 2 x 3 grid
        >>> spatial_tokens(x, (2, 3), num_prefix_tokens=1)[0, :, 0]
        tensor([1., 2., 3., 4., 5., 6.])
        >>> spatial_tokens(torch.zeros(4, 8, 2, 3), (2, 3)).shape  # NCHW (torchvision conv_proj)
        torch.Size([4, 6, 8])
    """
    h, w = grid
    tokens = h * w
    if x.ndim == 3:
        if x.shape[1] == tokens:
            return x
        if num_prefix_tokens and x.shape[1] == tokens + num_prefix_tokens:
            return x[:, num_prefix_tokens:]
        raise ValueError(
            f"{x.shape[1]} tokens do not fit a {h} x {w} patch grid ({tokens} patches, {num_prefix_tokens} prefix "
            f"tokens); shape {tuple(x.shape)}."
        )
    if x.ndim == 4:
        nhwc, nchw = tuple(x.shape[1:3]) == (h, w), tuple(x.shape[2:4]) == (h, w)
        if nhwc and (not nchw or channels_last):
            return x.reshape(x.shape[0], tokens, x.shape[3])
        if nchw:
            return x.flatten(2).transpose(1, 2)
    raise ValueError(f"Expected (n, T, C) tokens or a 4-D map on the {h} x {w} grid, got shape {tuple(x.shape)}.")


def token_grams(tokens: Tensor, precision: torch.dtype | None = None) -> Tensor:
    """``(T, n, n)`` Gram matrices, one per token position, of ``(n, T, C)`` tokens.

    ``K_t = X_t X_tᵀ`` of the tokens at position ``t`` centred over the ``n`` examples (exact for
    unbiased HSIC, see :func:`~lightning_cka.functional.gram`): ``einsum("itc,jtc->tij")`` as one
    batched product, ``T n^2 C`` multiply-adds.

    Args:
        tokens: ``(n, T, C)``.
        precision: dtype of the product; ``None``: the token dtype, at least float32.

    Returns:
        ``(T, n, n)`` in float32 or wider.

    Example:
        >>> x = torch.randn(6, 4, 3)
        >>> k = token_grams(x)
        >>> k.shape
        torch.Size([4, 6, 6])
        >>> from lightning_cka.functional import gram
        >>> torch.allclose(k[2], gram(x[:, 2]), atol=1e-5)
        True
    """
    if tokens.ndim != 3 or tokens.shape[0] == 0:
        raise ValueError(f"Expected tokens of shape (n, T, C) with n > 0, got {tuple(tokens.shape)}.")
    n, t, c = tokens.shape
    dtype = gram_dtype(tokens.dtype, precision)
    wide = torch.promote_types(tokens.dtype, dtype)
    x = tokens.to(wide)
    centred = torch.empty((t, n, c), dtype=wide, device=tokens.device)  # contiguous (T, n, C)
    torch.sub(x.transpose(0, 1), x.mean(dim=0, keepdim=True).transpose(0, 1), out=centred)
    centred = centred.to(dtype)
    out = torch.promote_types(dtype, torch.float32)
    if dtype in (torch.bfloat16, torch.float16) and centred.is_cuda:
        # keep the float32 accumulator instead of rounding the Grams to 16 bits (torch >= 2.8)
        with contextlib.suppress(TypeError, RuntimeError):
            return torch.bmm(centred, centred.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(centred, centred.transpose(1, 2)).to(out)


def localization_summary(matrix: Tensor) -> dict[str, float]:
    """``{"diagonal", "hit_rate"}`` of a ``(T, T)`` localization matrix.

    ``diagonal``: mean CKA of each token with its own input patch (NaNs ignored); ``hit_rate``:
    fraction of positions whose most similar input patch is their own (rows with no defined
    value count as misses).

    Example:
        >>> localization_summary(torch.tensor([[0.75, 0.5], [0.5, 0.25]]))
        {'diagonal': 0.5, 'hit_rate': 0.5}
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"Expected a square (T, T) matrix, got shape {tuple(matrix.shape)}.")
    defined = ~torch.isnan(matrix).all(dim=1)
    best = torch.nan_to_num(matrix, nan=-math.inf).argmax(dim=1)
    hits = (best == torch.arange(matrix.shape[0], device=matrix.device)) & defined
    return {"diagonal": float(torch.diagonal(matrix).nanmean()), "hit_rate": float(hits.double().mean())}


# ----------------------------------------------------------------------------------- plotting
def default_queries(grid: Grid) -> list[Grid]:
    """The four corners, four edge midpoints and the centre of the grid (duplicates dropped),
    row-major.

    Example:
        >>> default_queries((4, 6))
        [(0, 0), (0, 3), (0, 5), (2, 0), (2, 3), (2, 5), (3, 0), (3, 3), (3, 5)]
    """
    h, w = grid
    rows, cols = sorted({0, h // 2, h - 1}), sorted({0, w // 2, w - 1})
    return [(r, c) for r in rows for c in cols]


def _matrix_and_grid(result: CKAResult | Tensor | np.ndarray, grid: Grid | None) -> tuple[np.ndarray, Grid]:
    if isinstance(result, CKAResult):
        matrix: Any = result.matrix
        if grid is None and "grid_h" in result.meta and "grid_w" in result.meta:
            grid = (int(result.meta["grid_h"]), int(result.meta["grid_w"]))
    else:
        matrix = result
    values = matrix.detach().double().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, float)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"Expected a square (T, T) localization matrix, got shape {values.shape}.")
    if grid is None:
        side = math.isqrt(values.shape[0])
        if side * side != values.shape[0]:
            raise ValueError(f"Pass grid=(h, w): {values.shape[0]} positions are not a square grid.")
        grid = (side, side)
    h, w = int(grid[0]), int(grid[1])
    if h * w != values.shape[0]:
        raise ValueError(f"grid {h} x {w} does not hold the matrix's {values.shape[0]} positions.")
    return values, (h, w)


def plot_localization(
    result: CKAResult | Tensor | np.ndarray,
    grid: Grid | None = None,
    queries: Sequence[Grid | int] | None = None,
    fig: Figure | SubFigure | None = None,
    title: str | None = None,
    cmap: str = "magma",
    max_cols: int = 5,
) -> tuple[Figure | SubFigure, list[Axes]]:
    """The paper's localization figure: for each query position, its row of the matrix laid out on
    the patch grid as a small map (the query's own cell outlined), on one shared 0..1 colour scale.

    Args:
        result: a ``(T, T)`` localization matrix, or the :class:`~lightning_cka.compare.CKAResult`
            of :func:`localization` (its ``meta`` holds the grid).
        grid: ``(h, w)``; read from ``result.meta`` (``grid_h``, ``grid_w``) when ``None``, else a
            square grid is assumed.
        queries: positions to draw, as ``(r, c)`` or row-major indices; default
            :func:`default_queries`, drawn where they sit on the grid (a 3 x 3 layout); given
            queries are drawn in rows of ``max_cols``.
        fig: a figure (or subfigure) to draw into; a new one when ``None``.
        title: figure title.
        cmap: matplotlib colour map (NaN drawn grey).
        max_cols: maps per row for given ``queries``.

    Returns:
        ``(fig, axes)``, one axes per query.

    Example:
        >>> fig, axes = plot_localization(torch.eye(12), grid=(3, 4))
        >>> len(axes), axes[0].get_title()
        (9, '(0, 0)')
        >>> fig, axes = plot_localization(torch.eye(4), queries=[(1, 1), 0])
        >>> [ax.get_title() for ax in axes]
        ['(1, 1)', '(0, 0)']
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values, (h, w) = _matrix_and_grid(result, grid)
    cells: list[tuple[Grid, int]] = []  # (query, subplot index from 1)
    if queries is None:
        points = default_queries((h, w))
        rows, cols = sorted({r for r, _ in points}), sorted({c for _, c in points})
        nrows, ncols = len(rows), len(cols)
        cells = [((r, c), rows.index(r) * ncols + cols.index(c) + 1) for r, c in points]
    else:
        points = [divmod(int(q), w) if isinstance(q, int | np.integer) else (int(q[0]), int(q[1])) for q in queries]
        if not points:
            raise ValueError("queries is empty; pass None for the default positions.")
        for r, c in points:
            if not (0 <= r < h and 0 <= c < w):
                raise ValueError(f"query {(r, c)} is outside the {h} x {w} grid.")
        ncols = max(1, min(int(max_cols), len(points)))
        nrows = -(-len(points) // ncols)
        cells = [(p, i + 1) for i, p in enumerate(points)]
    if fig is None:
        cell = 1.6
        fig = Figure(
            figsize=(cell * ncols * max(1.0, w / h) + 1.2, cell * nrows * max(1.0, h / w) + 0.6),
            dpi=100,
            layout="constrained",
        )
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    axes: list[Axes] = []
    image = None
    for (r, c), index in cells:
        ax = fig.add_subplot(nrows, ncols, index)
        image = ax.imshow(
            np.ma.masked_invalid(values[r * w + c].reshape(h, w)),
            vmin=0.0,
            vmax=1.0,
            cmap=colormap,
            interpolation="nearest",
        )
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1.0, 1.0, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_title(f"({r}, {c})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        axes.append(ax)
    fig.colorbar(image, ax=axes, label="CKA", shrink=0.85)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig, axes


# ----------------------------------------------------------------------------------- capture
def _embedding(backbone: Backbone) -> str:
    """Name (relative to the backbone) of its patch embedding: timm ``patch_embed``, torchvision ``conv_proj``."""
    return "conv_proj" if backbone.kind == "tv_vit" else "patch_embed"


def _last_block(backbone: Backbone) -> str:
    """Name (under the root) of the backbone's last transformer block."""
    module: Any = backbone.module
    if backbone.kind == "tv_vit":
        last = list(module.encoder.layers.named_children())[-1][0]
        return backbone.qualify(f"encoder.layers.{last}")
    return backbone.qualify(f"blocks.{len(module.blocks) - 1}")


def _alias(spec: LayerSpec, backbone: Backbone) -> LayerSpec:
    """``"patch_embed"`` means ``conv_proj`` in a torchvision ViT."""
    if backbone.kind != "tv_vit":
        return spec
    if isinstance(spec, str):
        return "conv_proj" if spec == "patch_embed" else spec
    if isinstance(spec, type):
        return spec
    return ["conv_proj" if item == "patch_embed" else item for item in spec]


def _resolve(root: nn.Module, backbone: Backbone, spec: LayerSpec, what: str) -> list[str]:
    """Names under ``root`` for ``spec``: each entry relative to ``root`` first, else to the backbone."""
    spec = _alias(spec, backbone)
    items: Sequence[Any] = [spec] if isinstance(spec, str | type) else list(spec)
    names: list[str] = []
    for item in items:
        try:
            found = list(hook_points(root, item, what))
        except ValueError as err:
            if not backbone.name:
                raise
            try:
                found = [backbone.qualify(name) for name in hook_points(backbone.module, item, what)]
            except ValueError:
                raise err from None
        names.extend(n for n in found if n not in names)
    if not names:
        raise ValueError(f"`{what}` is empty.")
    return names


def _vit_of(root: nn.Module, name: str | None = None) -> Backbone:
    """The ViT holding layer ``name`` (else the first ViT under ``root``)."""
    if name is not None:
        owner = backbone_of(root, name)
        if owner is not None and owner.is_vit:
            return owner
    for backbone in find_backbones(root):
        if backbone.is_vit:
            return backbone
    raise ValueError(
        f"Spatial localization needs a timm or torchvision VisionTransformer, found none in {type(root).__name__}."
    )


class _TokenGramCapture:
    """Hooks that turn the spatial tokens of ``layers`` and ``reference`` into ``(T, n, n)`` Grams on the spot.

    The grid comes from the image entering the backbone's patch embedding (a forward pre-hook).
    Failures inside hooks are recorded, never raised into the forward pass; :meth:`collect` raises them.
    """

    def __init__(
        self,
        root: nn.Module,
        backbone: Backbone,
        layers: Sequence[str],
        reference: str,
        precision: torch.dtype | None,
        max_examples: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.layers = list(layers)
        self.reference = reference
        self.precision = precision
        self.max_examples = max_examples
        self._embed = module_map(root)[backbone.qualify(_embedding(backbone))]
        points = hook_points(root, [*self.layers, reference])
        self._points = [points[name] for name in dict.fromkeys([*self.layers, reference])]
        self._prefix: dict[str, int] = {}
        for point in self._points:
            owner = backbone_of(root, point.name)
            self._prefix[point.name] = (owner if owner is not None and owner.is_vit else backbone).num_prefix_tokens
        self._image: Grid | None = None
        self._grams: dict[str, Tensor] = {}
        self._grids: dict[str, Grid] = {}
        self._errors: dict[str, str] = {}

    def attach(self, hooks: HookSet) -> None:
        """Register the image-size pre-hook and one hook per hook point."""
        hooks.forward_pre(self._embed, self._image_hook)
        for point in self._points:
            if point.on_input:
                hooks.forward_pre(point.module, self._pre_hook(point.name))
            else:
                hooks.forward(point.module, self._hook(point.name))

    def _image_hook(self, module: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        self._image = (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, Tensor) and x.ndim >= 2 else None

    def grid(self) -> Grid:
        """The patch grid of the image seen by the patch embedding in this forward pass."""
        module: Any = self.backbone.module
        if self.backbone.kind == "tv_vit":
            if self._image is None:
                size = int(module.image_size)
                self._image = (size, size)
            p = int(module.patch_size)
            return self._image[0] // p, self._image[1] // p
        embed: Any = module.patch_embed
        if self._image is not None and hasattr(embed, "dynamic_feat_size"):
            h, w = embed.dynamic_feat_size(self._image)
            return int(h), int(w)
        size = getattr(embed, "grid_size", None)
        if size is None:
            raise ValueError("cannot tell the patch grid: patch_embed has neither dynamic_feat_size nor grid_size")
        return int(size[0]), int(size[1])

    def _record(self, name: str, module: nn.Module, activation: Callable[[], Tensor]) -> None:
        if name in self._grams or name in self._errors:
            return  # a module that runs twice per forward is measured at its first call
        try:
            x = activation().detach()
            if self.max_examples is not None:
                x = x[: self.max_examples]
            grid = self.grid()
            tokens = spatial_tokens(x, grid, self._prefix[name], _channels_last(module))
            with torch.no_grad():
                self._grams[name] = token_grams(tokens, self.precision)
            self._grids[name] = grid
        except Exception as err:  # never break the user's forward pass
            self._errors[name] = f"{type(err).__name__}: {err}"

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(name, module, lambda: select_output(output, 0))

        return hook

    def _pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            def first() -> Tensor:
                if not args or not isinstance(args[0], Tensor):
                    raise TypeError(f"the first input of {type(module).__name__} is not a tensor")
                return args[0]

            self._record(name, module, first)

        return hook

    def collect(self) -> tuple[Tensor, Tensor, Grid] | None:
        """``(k, l, grid)`` of the last forward pass and forget it: ``k`` ``(L*T, n, n)`` stacks the
        layers' token Grams (layer-major), ``l`` ``(T, n, n)`` the reference's; ``None`` when no hook
        fired.

        Raises:
            ValueError: a layer could not be measured (the reason), did not run, or the layers
                disagree on the grid or the number of examples.
        """
        grams, grids, errors = self._grams, self._grids, self._errors
        self.clear()
        if not grams and not errors:
            return None
        if errors:
            name, reason = next(iter(errors.items()))
            raise ValueError(f"spatial tokens of {name!r} could not be measured ({reason})")
        missing = [p.name for p in self._points if p.name not in grams]
        if missing:
            raise ValueError(f"layer(s) {missing} did not run in the forward pass")
        grid = grids[self.reference]
        n = grams[self.reference].shape[-1]
        for name in self.layers:
            if grids[name] != grid or grams[name].shape[-1] != n:
                raise ValueError(f"{name!r} and the reference {self.reference!r} saw different inputs")
        k = torch.cat([grams[name] for name in self.layers]) if len(self.layers) > 1 else grams[self.layers[0]]
        return k, grams[self.reference], grid

    def clear(self) -> None:
        """Forget anything recorded since the last :meth:`collect`."""
        self._grams, self._grids, self._errors = {}, {}, {}
        self._image = None


def _new_metric(
    layers: Sequence[str],
    grid: Grid,
    precision: torch.dtype | None,
    device: Any,
    all_gather: Callable[[Tensor], Tensor] | None = None,
) -> MinibatchCKA:
    """The metric of one validation; under DDP its sums are gathered with ``all_gather`` when given
    (``SetupContext.all_gather``), else with torchmetrics' own collective."""
    labels = grid_labels(grid)
    sync: dict[str, Any] = {}
    if all_gather is not None:
        sync["dist_sync_fn"] = lambda t, group=None: list(all_gather(t).unbind(0))
    with torch.inference_mode(False):
        return MinibatchCKA(
            precision=precision,
            layer_names=[f"{layer} {label}" for layer in layers for label in labels],
            reference_layer_names=labels,
            **sync,
        ).to(device)


def _result(matrix: Tensor, grid: Grid, layer: str, reference: str, batches: int | None = None) -> CKAResult:
    labels = grid_labels(grid)
    meta: dict[str, Any] = {"grid_h": grid[0], "grid_w": grid[1], "layer": layer, "reference_layer": reference}
    if batches is not None:
        meta["batches"] = batches
    return CKAResult(matrix, list(labels), list(labels), meta)


# ----------------------------------------------------------------------------------- offline
def localization(
    model: nn.Module,
    dataloader: Iterable[Any],
    layer: str,
    reference_layer: str = "patch_embed",
    max_batches: int | None = None,
    input_key: str | int = 0,
    precision: str | torch.dtype = "float32",
    progress: bool = False,
) -> CKAResult:
    """Spatial localization map of ``layer``: minibatch CKA of its token at every grid position with
    the input patch at every grid position (Raghu et al. 2021, section 6).

    Args:
        model: a timm or torchvision ``VisionTransformer``, or a module holding one.
        dataloader: batches (tensors, tuples/lists or dicts with ``input_key``).
        layer: the layer whose tokens are the rows (``"blocks.11"``, ``"blocks.3.norm2:in"``, ...),
            a name relative to ``model``, or else to the (first) ViT inside it.
        reference_layer: the columns, by default the patch embedding before position embeddings
            (timm ``patch_embed``; torchvision ``conv_proj``, also reached as ``"patch_embed"``);
            resolved like ``layer``.
        max_batches: stop after this many batches.
        input_key: dict key or tuple index of the input in a batch.
        precision: Gram product dtype, ``"float32"``, ``"bfloat16"`` or ``"float64"``.
        progress: show a progress bar.

    Returns:
        :class:`~lightning_cka.compare.CKAResult` with the ``(T, T)`` float64 matrix (row ``i``: the
        token at position ``i`` of ``layer``; column ``j``: the input patch at ``j``), rows and
        columns named ``"(r, c)"`` (row-major), and ``meta`` with ``grid_h``, ``grid_w``,
        ``layer``, ``reference_layer`` and ``batches``. ``.plot()`` draws the plain heatmap;
        :func:`plot_localization` the per-position maps.

    Raises:
        TypeError, ValueError: a bad argument, a model without a ViT, layers that do not resolve
            to one module, batches of different image sizes, or no usable batch.

    Cost per batch of ``n`` examples, ``T`` positions, ``C`` channels: two ``T n^2 C`` Gram
    products and one ``T^2 n^2`` pairing, memory ``O(T n^2)``. The model runs in eval mode under
    ``torch.no_grad()`` (modes restored, hooks removed afterwards).

    Example:
        >>> from timm.models.vision_transformer import VisionTransformer
        >>> vit = VisionTransformer(img_size=(16, 24), patch_size=8, embed_dim=16, depth=2, num_heads=2)
        >>> batches = [torch.randn(8, 3, 16, 24) for _ in range(2)]
        >>> result = localization(vit, batches, layer="blocks.1")
        >>> result.matrix.shape, result.rows[:3], (result.meta["grid_h"], result.meta["grid_w"])
        (torch.Size([6, 6]), ['(0, 0)', '(0, 1)', '(0, 2)'], (2, 3))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(dataloader, Tensor):
        raise TypeError("`dataloader` is a single tensor; pass a DataLoader or a list of batches, e.g. [tensor].")
    if not isinstance(layer, str) or not isinstance(reference_layer, str):
        raise TypeError("`layer` and `reference_layer` must be layer names (str).")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}.")
    try:
        dtype = resolve_precision(precision)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"`precision` must be 'float32', 'bfloat16' or 'float64', got {precision!r}.") from None
    vit = _vit_of(model)
    reference = _single(_resolve(model, vit, reference_layer, "reference_layer"), "reference_layer")
    vit = _vit_of(model, reference)
    row = _single(_resolve(model, vit, layer, "layer"), "layer")
    capture = _TokenGramCapture(model, vit, [row], reference, dtype)
    metric: MinibatchCKA | None = None
    grid: Grid | None = None
    total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    batches: Iterable[Any] = dataloader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(dataloader, total=total, desc="localization", unit="batch")
    eager = EagerWhileMeasuring(model)
    seen = 0
    with HookSet() as hooks, eval_mode(model), torch.no_grad(), contextlib.ExitStack() as restore:
        eager.enter()
        restore.callback(eager.exit)
        capture.attach(hooks)
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            seen += 1
            model(to_model_input(extract_input(batch, input_key), model))
            got = capture.collect()
            if got is None:
                raise ValueError(f"the hooks on {row!r} and {reference!r} did not fire in the forward pass")
            k, l, batch_grid = got
            if metric is None:
                grid, metric = batch_grid, _new_metric([row], batch_grid, dtype, k.device)
            elif batch_grid != grid:
                raise ValueError(f"batches of different image sizes: patch grid {batch_grid} after {grid}")
            metric.update_grams(k, l)
    used = 0 if metric is None else int(metric.num_batches)
    if metric is None or grid is None or used == 0:
        raise ValueError(
            f"localization() saw no usable batch out of {seen}: the dataloader was empty, or every batch had fewer "
            f"than {MIN_EXAMPLES} examples or non-finite activations."
        )
    return _result(metric.compute().cpu(), grid, row, reference, used)


def _single(names: list[str], what: str) -> str:
    if len(names) != 1:
        raise ValueError(f"`{what}` must name one layer, got {len(names)}: {names}.")
    return names[0]


# ----------------------------------------------------------------------------------- analysis
def _plain(t: Tensor) -> Tensor:
    """A CPU copy that is an ordinary tensor even when made under Lightning's inference mode."""
    with torch.inference_mode(False):
        return t.detach().cpu().clone()


class Localization(Analysis):
    """Spatial localization maps of the (first) timm or torchvision ViT of the LightningModule,
    measured live on the validation batches (Raghu et al. 2021, section 6); off without a ViT.

    For each layer, minibatch CKA of its token at every grid position with every input patch of
    ``reference_layer`` (see :func:`localization`). Logs, per layer (name relative to the
    LightningModule):

    - image ``localization/<layer>``: the per-position maps of :func:`plot_localization` (corners,
      edge midpoints and centre), with a caption on how to read them;
    - scalars ``localization/<layer>/diagonal`` (mean CKA of each token with its own input patch)
      and ``localization/<layer>/hit_rate`` (fraction of positions whose most similar input
      patch is their own);
    - the file ``localization_<layer>_step<step>.npz`` (a :class:`~lightning_cka.compare.CKAResult`
      whose ``meta`` holds ``grid_h``/``grid_w``).

    ``history`` holds ``{layer: {"diagonal": float, "hit_rate": float, "matrix": (T, T) float64
    tensor, "grid": (h, w), "reference_layer": str}}`` (plain types, so checkpoints load with
    ``weights_only=True``); ``plot_localization(entry["matrix"], entry["grid"])`` draws one.

    The metric all-reduces its sums under DDP like the other analyses; ``compute`` is called on
    every rank. The grid follows the image size (timm ``dynamic_img_size``): it is fixed by the
    first batch of each validation, and batches of another size are skipped with a warning.

    Args:
        layers: layers whose tokens are the rows: names, globs or presets relative to the
            LightningModule (or else to the ViT, e.g. ``"blocks.5"``); ``None``: the ViT's last block.
        reference_layer: the columns; ``None``: the ViT's patch embedding before position
            embeddings (timm ``patch_embed``, torchvision ``conv_proj``).
        max_examples: examples of each batch used (cost ``O(T n^2 (C + T))``); ``None`` for all.

    Example:
        >>> from lightning_cka import CKACallback
        >>> callback = CKACallback(analyses=[Localization(layers=["model.blocks.3"], max_examples=128)])
    """

    key = "localization"
    model_wide = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        reference_layer: str | None = None,
        max_examples: int | None = None,
    ) -> None:
        if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)):
            raise ValueError(f"localization max_examples must be a positive int or None, got {max_examples!r}.")
        if max_examples is not None and max_examples < MIN_EXAMPLES:
            raise ValueError(f"localization max_examples must be at least {MIN_EXAMPLES}, got {max_examples}.")
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None and (not layers or not all(isinstance(n, str) for n in layers)):
            raise TypeError(f"localization layers must be a non-empty sequence of layer names, got {layers!r}.")
        if reference_layer is not None and not isinstance(reference_layer, str):
            raise TypeError(f"localization reference_layer must be a layer name, got {reference_layer!r}.")
        self.layers = None if layers is None else list(layers)
        self.reference_layer = reference_layer
        self.max_examples = max_examples
        self.rows: list[str] = []
        self.reference = ""
        self.capture: _TokenGramCapture | None = None
        self.metric: MinibatchCKA | None = None
        self.grid: Grid | None = None
        self._precision: torch.dtype | None = torch.float32
        self._device: torch.device = torch.device("cpu")
        self._all_gather: Callable[[Tensor], Tensor] = lambda t: t.unsqueeze(0)
        self._captioned: set[str] = set()

    def setup(self, context: SetupContext) -> bool:
        module = context.module
        if not any(b.is_vit for b in find_backbones(module)):
            return False
        vit = _vit_of(module)
        if self.reference_layer is None:
            self.reference = vit.qualify(_embedding(vit))
        else:
            self.reference = _single(_resolve(module, vit, self.reference_layer, "reference_layer"), "reference_layer")
            vit = _vit_of(module, self.reference)
        self.rows = [_last_block(vit)] if self.layers is None else _resolve(module, vit, self.layers, "layers")
        self._precision = context.precision
        self._all_gather = context.all_gather
        self.capture = _TokenGramCapture(module, vit, self.rows, self.reference, self._precision, self.max_examples)
        self.metric, self.grid = None, None
        return True

    def attach(self, hooks: HookSet) -> None:
        assert self.capture is not None
        self.capture.attach(hooks)

    def reset(self, device: torch.device) -> None:
        self._device = torch.device(device)
        self.metric, self.grid = None, None  # made on the first batch, for its grid
        if self.capture is not None:
            self.capture.clear()

    def clear(self) -> None:
        if self.capture is not None:
            self.capture.clear()

    def update(self, batch: MeasuredBatch) -> None:
        assert self.capture is not None
        try:
            got = self.capture.collect()
        except ValueError as err:
            raise AnalysisSkipped(str(err)) from None
        if got is None:
            return
        k, l, grid = got
        if self.metric is not None and grid != self.grid:
            if int(self.metric.num_batches) > 0:
                raise AnalysisSkipped(
                    f"this batch's patch grid {grid} differs from {self.grid} of the first batch of this validation; "
                    "localization maps need one image size per validation"
                )
            self.metric = None
        if self.metric is None:
            self.metric, self.grid = _new_metric(self.rows, grid, self._precision, k.device, self._all_gather), grid
        self.metric.update_grams(k, l)

    def compute(self) -> dict[str, dict[str, Any]] | None:
        # A collective under DDP: every rank agrees on the grid first (a rank without data has no
        # metric, or one of another grid), then the metric's sums are gathered; both go through the
        # context's `all_gather`, so a rank that fails in between is met by the others, never waited for.
        has = self.metric is not None and int(self.metric.num_batches) > 0
        gh, gw = self.grid if (has and self.grid is not None) else (0, 0)
        device = self.metric.num_batches.device if self.metric is not None else self._device
        info = self._all_gather(torch.tensor([gh, gw, int(has)], dtype=torch.long, device=device)).reshape(-1, 3)
        grids = {(int(r[0]), int(r[1])) for r in info.cpu() if int(r[2]) > 0}
        if not grids:
            return None
        if len(grids) > 1:
            raise ValueError(f"processes measured different patch grids {sorted(grids)}; use one image size")
        grid = grids.pop()
        if not has or self.metric is None:
            self.metric, self.grid = _new_metric(self.rows, grid, self._precision, device, self._all_gather), grid
        matrix = _plain(self.metric.compute())
        t = grid[0] * grid[1]
        value: dict[str, dict[str, Any]] = {}
        for i, layer in enumerate(self.rows):
            block = matrix[i * t : (i + 1) * t].clone()
            value[layer] = {
                **localization_summary(block),
                "matrix": block,
                "grid": grid,
                "reference_layer": self.reference,
            }
        return value

    def report(self, value: dict[str, dict[str, Any]], epoch: int, step: int) -> Report:
        report = Report()
        for layer, entry in value.items():
            grid = tuple(entry["grid"])
            reference = entry.get("reference_layer", self.reference)
            result = _result(entry["matrix"], (int(grid[0]), int(grid[1])), layer, reference)
            tag = f"localization/{layer}"
            title = f"Localization of {layer} vs {reference}, epoch {epoch} (step {step})"
            report.figures[tag], _ = plot_localization(result, title=title)  # type: ignore[assignment]
            report.scalars[f"{tag}/diagonal"] = float(entry["diagonal"])
            report.scalars[f"{tag}/hit_rate"] = float(entry["hit_rate"])
            report.matrices[f"localization_{layer.replace(':', '_')}"] = result
            if tag not in self._captioned:
                self._captioned.add(tag)
                report.captions[tag] = CAPTION
        return report
