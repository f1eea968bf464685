"""Datasets for the demo: scikit-learn's digits (embedded, no download), CIFAR-10 and image folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DatasetSpec", "load_dataset"]


@dataclass
class DatasetSpec:
    """Train/validation datasets of ``(image (C, H, W) float, label int)`` and their shape."""

    train: Dataset
    val: Dataset
    in_chans: int
    img_size: int
    num_classes: int
    name: str


def load_digits_dataset(img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> DatasetSpec:
    """scikit-learn's 1,797 handwritten digits (8 x 8, shipped inside scikit-learn), scaled to
    ``[0, 1]``, upsampled bilinearly to ``img_size`` and split with a fixed seed."""
    from sklearn.datasets import load_digits

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


def _image_transform(img_size: int, channels: int):
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
            "offline, copy the extracted 'cifar-10-batches-py' folder into that directory or use --dataset digits."
        ) from err
    return DatasetSpec(train, val, in_chans=3, img_size=img_size, num_classes=10, name="cifar10")


def load_image_folder(path: str | Path, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> DatasetSpec:
    """An image folder: either ``path/train`` and ``path/val`` ImageFolders, or one ImageFolder
    (``path/<class>/<image>``) split with a fixed seed."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

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


def load_dataset(name: str, img_size: int = 32, data_dir: str | Path = "./data") -> DatasetSpec:
    """``"digits"`` (default, embedded), ``"cifar10"`` (downloads into ``data_dir``) or a path to an image folder."""
    if name == "digits":
        return load_digits_dataset(img_size)
    if name == "cifar10":
        return load_cifar10(Path(data_dir), img_size)
    if Path(name).exists():
        return load_image_folder(name, img_size)
    raise ValueError(f"Unknown dataset {name!r}: use 'digits', 'cifar10' or the path to an image folder.")
