"""Datasets for the demo.

- ``"strokes"`` (default): stroke glyphs generated from a seed (nothing is downloaded or
  shipped): ten classes (seven-segment 0-7, X and T) drawn with straight strokes of random
  width, size, aspect, rotation and position (optionally with short distractor strokes and pixel
  noise, which make the ViT's residual stream much less uniform; see docs/paper-figures.md).
- ``"digits"``: scikit-learn's 1,797 handwritten 8 x 8 digits (needs ``pip install
  'lightning-cka[demo]'``).
- ``"cifar10"``: CIFAR-10 through torchvision (downloaded on first use).
- a path: an image folder.

``torch`` and the optional packages are imported inside the functions, so importing this module
is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DatasetSpec",
    "GeneratedImages",
    "dataset_defaults",
    "load_dataset",
    "make_strokes",
]

DEFAULT_DATASET = "strokes"
DATASETS = ("strokes", "digits", "cifar10")


def dataset_defaults(name: str) -> dict[str, Any]:
    """Default sizes of a dataset (``train_size``, ``val_size``, ``img_size``) for help texts."""
    if name == "strokes":
        return dict(_STROKE_DEFAULTS)
    return {"train_size": None, "val_size": None, "img_size": 32}


@dataclass
class DatasetSpec:
    """Train/validation datasets of ``(image (C, H, W) float, label int)`` and their shape."""

    train: Dataset
    val: Dataset
    in_chans: int
    img_size: int
    num_classes: int
    name: str


class GeneratedImages:
    """A map-style dataset over ``uint8`` images held in memory (1 byte per pixel), returned as
    ``float32`` standardised with ``mean`` and ``std`` (grey levels 0-255; by default those of
    ``images`` themselves, so pass the training set's to the validation set). Batches are gathered
    in one indexing operation (``__getitems__``), so a ``DataLoader`` costs almost nothing."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: float | None = None, std: float | None = None
    ) -> None:
        if images.dtype.is_floating_point or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("images must be an integer (n, C, H, W) tensor with one label per image")
        self.images = images
        self.labels = labels
        sample = images[:4096].float()
        self.mean = float(sample.mean()) if mean is None else float(mean)
        self.std = (float(sample.std()) or 1.0) if std is None else float(std)

    def __len__(self) -> int:
        return len(self.labels)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().sub_(self.mean).div_(self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scale(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        idx = torch.as_tensor(indices)
        return list(zip(self._scale(self.images[idx]).unbind(0), self.labels[idx].unbind(0), strict=True))


#: Stroke glyphs: segments ``(x0, y0, x1, y1)`` in a unit box (x to the right, y down), seven-segment style.
SEGMENTS = {
    "a": (0.0, 0.0, 1.0, 0.0),  # top
    "b": (1.0, 0.0, 1.0, 0.5),  # upper right
    "c": (1.0, 0.5, 1.0, 1.0),  # lower right
    "d": (0.0, 1.0, 1.0, 1.0),  # bottom
    "e": (0.0, 0.5, 0.0, 1.0),  # lower left
    "f": (0.0, 0.0, 0.0, 0.5),  # upper left
    "g": (0.0, 0.5, 1.0, 0.5),  # middle
    "h": (0.0, 0.0, 1.0, 1.0),  # diagonal
    "i": (1.0, 0.0, 0.0, 1.0),  # anti-diagonal
    "j": (0.5, 0.0, 0.5, 1.0),  # centre vertical
}
#: The ten classes: seven-segment 0, 1, 2, 3, 4, 5, 6, 7, then X and T.
GLYPHS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afedcg", "abc", "hi", "aj")
CLASS_NAMES = ("0", "1", "2", "3", "4", "5", "6", "7", "X", "T")

_STROKE_DEFAULTS = {
    "train_size": 16000,
    "val_size": 1024,
    "img_size": 32,
    "jitter": 0.125,
    "distractors": 0,
    "noise": 0.0,
}


def make_strokes(
    n: int,
    seed: int = 0,
    img_size: int = 32,
    jitter: float = 0.125,
    distractors: int = 0,
    noise: float = 0.0,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` stroke glyphs: ``(images uint8 (n, 1, img_size, img_size), labels)``, deterministic in ``seed``.

    Each image draws one of the ten :data:`GLYPHS` with straight strokes of random width
    (1-1.8 pixels) after a random affine map: height 45-70 % of the image, width 60-80 % of
    the height, rotation within +-15 degrees, centre shifted by up to ``jitter`` of the image
    size in each direction. ``distractors`` short strokes (3-7 pixels) go anywhere, then
    Gaussian pixel noise of ``noise`` (ink is 1, paper 0) is added and values are mapped to
    bytes (``-0.5 .. 1.5`` to ``0 .. 255``).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(GLYPHS), (n,), generator=gen)
    images = torch.empty(n, 1, img_size, img_size, dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = labels[start : start + chunk]
        images[start : start + len(part), 0] = _draw_strokes(part, img_size, jitter, distractors, noise, gen)
    return images, labels


def _draw_strokes(
    labels: torch.Tensor, size: int, jitter: float, distractors: int, noise: float, gen: torch.Generator
) -> torch.Tensor:
    import torch

    n = len(labels)
    width = max(len(g) for g in GLYPHS)
    segs = torch.zeros(len(GLYPHS), width, 4)
    present = torch.zeros(len(GLYPHS), width, dtype=torch.bool)
    for k, glyph in enumerate(GLYPHS):
        segs[k, : len(glyph)] = torch.tensor([SEGMENTS[s] for s in glyph])
        present[k, : len(glyph)] = True
    p, valid = segs[labels], present[labels]  # (n, S, 4), (n, S)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, generator=gen)

    height = uniform(0.45, 0.70) * size
    wide = height * uniform(0.6, 0.8)
    angle = uniform(-15.0, 15.0) * (math.pi / 180)
    cx = size / 2 + uniform(-jitter, jitter) * size
    cy = size / 2 + uniform(-jitter, jitter) * size
    cos, sin = torch.cos(angle), torch.sin(angle)

    def place(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (x - 0.5) * wide, (y - 0.5) * height
        return cx + x * cos - y * sin, cy + x * sin + y * cos

    x0, y0 = place(p[..., 0], p[..., 1])
    x1, y1 = place(p[..., 2], p[..., 3])
    if distractors:
        dx0 = torch.rand(n, distractors, generator=gen) * size
        dy0 = torch.rand(n, distractors, generator=gen) * size
        theta = torch.rand(n, distractors, generator=gen) * (2 * math.pi)
        length = 3 + 4 * torch.rand(n, distractors, generator=gen)
        x0, y0 = torch.cat([x0, dx0], 1), torch.cat([y0, dy0], 1)
        x1 = torch.cat([x1, dx0 + length * torch.cos(theta)], 1)
        y1 = torch.cat([y1, dy0 + length * torch.sin(theta)], 1)
        valid = torch.cat([valid, torch.ones(n, distractors, dtype=torch.bool)], 1)
    stroke = uniform(1.0, 1.8).view(n, 1, 1)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = grid.view(1, size, 1), grid.view(1, 1, size)
    ink = torch.zeros(n, size, size)
    for s in range(x0.shape[1]):
        ax, ay = x0[:, s].view(n, 1, 1), y0[:, s].view(n, 1, 1)
        vx, vy = x1[:, s].view(n, 1, 1) - ax, y1[:, s].view(n, 1, 1) - ay
        px, py = xs - ax, ys - ay  # (n, size, size) by broadcasting
        t = ((px * vx + py * vy) / (vx * vx + vy * vy + 1e-6)).clamp_(0, 1)
        dist = torch.hypot(px - t * vx, py - t * vy)
        line = (stroke + 0.5 - dist).clamp_(0, 1) * valid[:, s].view(n, 1, 1)
        torch.maximum(ink, line, out=ink)
    ink += noise * torch.randn(ink.shape, generator=gen)
    return ((ink + 0.5) * (255 / 2)).round_().clamp_(0, 255).to(torch.uint8)


def load_strokes_dataset(
    train_size: int | None = None,
    val_size: int | None = None,
    img_size: int | None = None,
    seed: int = 0,
) -> DatasetSpec:
    """The ``"strokes"`` dataset (see :func:`make_strokes`): training and validation images come
    from different seeds derived from ``seed``."""
    d = _STROKE_DEFAULTS
    train_size = d["train_size"] if train_size is None else train_size
    val_size = d["val_size"] if val_size is None else val_size
    img_size = d["img_size"] if img_size is None else img_size
    kwargs = {"img_size": img_size, "jitter": d["jitter"], "distractors": d["distractors"], "noise": d["noise"]}
    train = GeneratedImages(*make_strokes(train_size, seed=2 * seed, **kwargs))
    val = GeneratedImages(*make_strokes(val_size, seed=2 * seed + 1, **kwargs), mean=train.mean, std=train.std)
    return DatasetSpec(
        train,
        val,
        in_chans=1,
        img_size=img_size,
        num_classes=len(GLYPHS),
        name="strokes",
    )


def load_digits_dataset(img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> DatasetSpec:
    """scikit-learn's 1,797 handwritten digits (8 x 8, shipped inside scikit-learn), scaled to
    ``[-1, 1]``, upsampled bilinearly to ``img_size`` and split with a fixed seed."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import TensorDataset

    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "dataset 'digits' needs scikit-learn: pip install 'lightning-cka[demo]' (or use --dataset strokes)"
        ) from err

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * len(labels))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return DatasetSpec(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
        in_chans=1,
        img_size=img_size,
        num_classes=10,
        name="digits",
    )


def _image_transform(img_size: int, channels: int) -> Any:
    from torchvision import transforms

    mean, std = [0.5] * channels, [0.5] * channels
    return transforms.Compose(
        [transforms.Resize((img_size, img_size)), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


def load_cifar10(root: str | Path, img_size: int = 32, download: bool = True) -> DatasetSpec:
    """CIFAR-10 through torchvision (downloads into ``root`` unless already there)."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:  # pragma: no cover - torchvision is an optional dependency
        raise RuntimeError("dataset 'cifar10' needs torchvision: pip install 'lightning-cka[vision]'") from err
    transform = _image_transform(img_size, 3)
    try:
        train = CIFAR10(str(root), train=True, download=download, transform=transform)
        val = CIFAR10(str(root), train=False, download=download, transform=transform)
    except (OSError, RuntimeError) as err:
        raise RuntimeError(
            f"Could not load CIFAR-10 from {root} ({err}). It is downloaded on first use, which needs internet; "
            "offline, copy the extracted 'cifar-10-batches-py' folder into that directory or use "
            "--dataset strokes."
        ) from err
    return DatasetSpec(train, val, in_chans=3, img_size=img_size, num_classes=10, name="cifar10")


def load_image_folder(path: str | Path, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> DatasetSpec:
    """An image folder: either ``path/train`` and ``path/val`` ImageFolders, or one ImageFolder
    (``path/<class>/<image>``) split with a fixed seed."""
    import torch
    from torch.utils.data import Subset

    try:
        from torchvision.datasets import ImageFolder
    except ImportError as err:  # pragma: no cover - torchvision is an optional dependency
        raise RuntimeError("image folders need torchvision: pip install 'lightning-cka[vision]'") from err

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset path {root} is not a directory; expected <path>/<class>/<image> files.")
    transform = _image_transform(img_size, 3)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train: Dataset = ImageFolder(str(root / "train"), transform=transform)
        val: Dataset = ImageFolder(str(root / "val"), transform=transform)
        num_classes = len(train.classes)  # type: ignore[attr-defined]
    else:
        try:
            full = ImageFolder(str(root), transform=transform)
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(
                f"No images found under {root}: expected <path>/<class>/<image> files ({err})."
            ) from err
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, round(val_fraction * len(full)))
        train, val = Subset(full, order[n_val:]), Subset(full, order[:n_val])
        num_classes = len(full.classes)
    return DatasetSpec(train, val, in_chans=3, img_size=img_size, num_classes=num_classes, name=root.name)


def load_dataset(
    name: str,
    img_size: int | None = None,
    data_dir: str | Path = "./data",
    seed: int = 0,
    train_size: int | None = None,
) -> DatasetSpec:
    """``"strokes"`` (default, generated from ``seed``), ``"digits"`` (scikit-learn), ``"cifar10"``
    (downloads into ``data_dir``) or a path to an image folder. ``img_size=None`` is the
    dataset's own size (32 for all but a generated dataset asked for another); ``train_size``
    applies to generated datasets only."""
    if name == "strokes":
        return load_strokes_dataset(train_size=train_size, img_size=img_size, seed=seed)
    if train_size is not None:
        raise ValueError(f"train_size applies to generated datasets only, not to {name!r}")
    size = 32 if img_size is None else img_size
    if name == "digits":
        return load_digits_dataset(size, seed=seed)
    if name == "cifar10":
        return load_cifar10(Path(data_dir), size)
    if Path(name).exists():
        return load_image_folder(name, size, seed=seed)
    raise ValueError(f"Unknown dataset {name!r}: use one of {', '.join(DATASETS)} or the path to an image folder.")
