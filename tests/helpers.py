"""Shared test helpers: tiny models and data, a LightningModule and Trainer factory, oracles,
TensorBoard readers and small recording callbacks.

Fixtures live in ``tests/conftest.py``; the 2-process DDP harness in ``tests/ddp_harness.py``;
the independent float64 CKA formulas in ``tests/reference.py``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 4
IMG = 32

# --------------------------------------------------------------------------- tolerances
TOL = 1e-6  # CKACallback against compare() on the same weights and data
TOL32 = 1e-5  # float32 Grams against the float64 reference
TOL64 = 1e-10  # float64 Grams against the float64 reference


# --------------------------------------------------------------------------- models
def tiny_vit(depth: int = 2, embed_dim: int = 48, num_heads: int = 3, seed: int = 0, **kwargs: Any) -> nn.Module:
    """timm ``vit_tiny_patch16_224`` shrunk to 32x32 inputs, 4x4 patches (65 tokens), 4 classes,
    train mode; ``kwargs`` override any other ``timm.create_model`` argument."""
    import timm

    args: dict[str, Any] = dict(
        pretrained=False,
        img_size=IMG,
        patch_size=4,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_classes=NUM_CLASSES,
    )
    args.update(kwargs)
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **args)


def timm_vit_tiny(**kwargs: Any) -> nn.Module:
    """timm ``vit_tiny_patch16_224`` at its own width (192 dims, 3 heads) at 32x32 inputs, 4x4
    patches, depth 2, 10 classes, eval mode; ``kwargs`` override any of these."""
    args: dict[str, Any] = dict(depth=2, embed_dim=192, num_heads=3, num_classes=10)
    args.update(kwargs)
    return tiny_vit(**args).eval()


def tv_vit(seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's VisionTransformer, tiny: 32x32 inputs, 8x8 patches, 2 layers of width 32."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes
    )


class Wrapper(nn.Module):
    """Mimics a LightningModule holding the network as ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def timm_resnet(name: str = "resnet10t", seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)


def tv_resnet18(seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def tiny_mlp(seed: int = 0) -> nn.Module:
    """An architecture no preset recognises."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


class Nest(nn.Module):
    """``self.backbone`` holder, so a LightningModule can keep its model at ``net.backbone``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


# --------------------------------------------------------------------------- threads
def one_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore (tiny models on a busy 2-core box are much faster so).

    ``tests/conftest.py`` applies it to the whole session; a module may still ``yield from`` it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- hooks
def hook_count(*modules: nn.Module) -> int:
    """Forward and forward-pre hooks registered anywhere in ``modules``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for root in modules for m in root.modules())


# --------------------------------------------------------------------------- LightningModule
class LitClassifier(pl.LightningModule):
    """A classifier around ``model`` (at ``self.model``, or ``self.net.backbone`` when ``nested``).

    Records what the tests look at: how many training steps ran, the hook count seen inside
    each training/validation step, and ``trainer.global_step`` at each (non-sanity) validation.
    """

    def __init__(self, model: nn.Module, nested: bool = False, lr: float = 0.05, fail_val_batch: int | None = None):
        super().__init__()
        if nested:
            self.net = Nest(model)
        else:
            self.model = model
        self.nested = nested
        self.lr = lr
        self.fail_val_batch = fail_val_batch
        self.training_steps = 0
        self.train_hooks: list[int] = []
        self.val_hooks: list[int] = []
        self.val_global_steps: list[int] = []
        self.val_epochs: list[int] = []
        self.val_batch_indices: list[int] = []

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone if self.nested else self.model

    @property
    def prefix(self) -> str:
        return "net.backbone" if self.nested else "model"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        self.train_hooks.append(hook_count(self))
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.fail_val_batch is not None and batch_idx == self.fail_val_batch:
            raise RuntimeError("boom in validation_step")
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.val_hooks.append(hook_count(self))
            self.val_batch_indices.append(batch_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_global_steps.append(self.trainer.global_step)
            self.val_epochs.append(self.trainer.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def vit_module(**kwargs: Any) -> LitClassifier:
    """:class:`LitClassifier` around a depth-2 :func:`tiny_vit`; ``kwargs`` go to the module."""
    return LitClassifier(tiny_vit(depth=2), **kwargs)


def with_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` holding the weights ``state`` (e.g. from :class:`Snapshots`)."""
    probe = copy.deepcopy(module)
    probe.load_state_dict(state)
    return probe


# --------------------------------------------------------------------------- data
def image_dataset(n: int, seed: int = 0) -> TensorDataset:
    """``n`` random 3x32x32 images with labels (a little class signal so training moves weights)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, IMG, IMG, generator=g)
    x[:, 0] += y[:, None, None].float()
    return TensorDataset(x, y)


def loader(dataset: Any, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def val_data(n: int = 16, seed: int = 1) -> DataLoader:
    """Validation batches of 8 (seed 1: different images from :func:`train_data`)."""
    return loader(image_dataset(n, seed=seed))


def train_data(n: int = 32) -> DataLoader:
    return loader(image_dataset(n))


def random_images(seed: int, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Unlabelled 3x32x32 minibatches of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, IMG, IMG, generator=g) for n in sizes]


def random_layers(gen: torch.Generator, n: int, shift: float = 0.0, dtype: torch.dtype = torch.float32):
    """Three related layers of one minibatch: 2-D, tokens (n, T, C) and conv maps (n, C, H, W)."""
    a = torch.randn(n, 12, generator=gen, dtype=torch.float64) + shift
    tokens = (a @ torch.randn(12, 5 * 6, generator=gen, dtype=torch.float64)).reshape(n, 5, 6)
    tokens = tokens + 0.5 * torch.randn(n, 5, 6, generator=gen, dtype=torch.float64)
    conv = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64) + tokens.reshape(n, -1)[:, :1, None, None]
    return [a.to(dtype), tokens.to(dtype), conv.to(dtype)]


def random_cross(gen: torch.Generator, xs: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32):
    """Two column layers for the minibatch ``xs`` of :func:`random_layers` (one related, one not)."""
    n = xs[0].shape[0]
    flat = xs[0].double()
    return [
        (flat[:, :4] + 0.3 * torch.randn(n, 4, generator=gen, dtype=torch.float64)).to(dtype),
        torch.randn(n, 2, 3, generator=gen, dtype=dtype),
    ]


# --------------------------------------------------------------------------- Trainer
def trainer(root: Path | str, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer; ``kwargs`` override the defaults."""
    defaults: dict[str, Any] = {
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "limit_train_batches": 2,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "deterministic": True,
        "log_every_n_steps": 1,  # the runs are a few steps long: no "smaller than the logging interval"
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


# --------------------------------------------------------------------------- oracles
def cmp(model: nn.Module, data: Any, layers: Any, **kwargs: Any):
    """``lightning_cka.compare`` without a progress bar."""
    from lightning_cka import compare

    return compare(model, data, layers=layers, progress=False, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two same-shaped tensors, in float64."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def metric_over(batches_x: Sequence[Sequence[torch.Tensor]], batches_y=None, **kwargs: Any) -> torch.Tensor:
    """``MinibatchCKA(**kwargs)`` updated with every minibatch, then computed."""
    from lightning_cka import MinibatchCKA

    metric = MinibatchCKA(**kwargs)
    for i, xs in enumerate(batches_x):
        metric.update(xs, None if batches_y is None else batches_y[i])
    return metric.compute()


def pairwise_reference(batches_x, batches_y=None) -> np.ndarray:
    """Reference minibatch CKA of each pair over the minibatches in which both layers are finite."""
    import reference as ref

    batches_y = batches_x if batches_y is None else batches_y
    out = np.full((len(batches_x[0]), len(batches_y[0])), np.nan)
    for i, j in np.ndindex(out.shape):
        used = [
            ([bx[i]], [by[j]])
            for bx, by in zip(batches_x, batches_y, strict=True)
            if torch.isfinite(bx[i]).all() and torch.isfinite(by[j]).all() and len(bx[i]) >= 4
        ]
        if used:
            out[i, j] = ref.minibatch_cka(*map(list, zip(*used, strict=True)))[0, 0]
    return out


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """float64 Gram of the mean-centred, flattened activations ``x`` (what GramCapture collects)."""
    m = x.detach().double().flatten(1)
    m = m - m.mean(0)
    return m @ m.T


# torchmetrics warns when a test computes a metric it deliberately never updated
computes_before_update = pytest.mark.filterwarnings(
    "ignore:The ``compute`` method of metric .* was called before the ``update`` method:UserWarning"
)


@contextlib.contextmanager
def warns(*matches: str, category: type[Warning] = UserWarning) -> Iterator[None]:
    """``pytest.warns`` for several warnings of one block: each regex in ``matches`` must match a
    different warning raised inside; any warning none of them matches is re-emitted, as with
    ``pytest.warns``."""
    with contextlib.ExitStack() as stack:
        for match in matches:
            stack.enter_context(pytest.warns(category, match=match))
        yield


def strictly_increasing(steps: Sequence[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(steps))


# --------------------------------------------------------------------------- TensorBoard
def events(path: Path | str):
    """An ``EventAccumulator`` over a log folder or one event file, keeping every image and scalar.

    It purges events whose step goes back; read the files of a resumed run one by one
    (:func:`event_files`) or as raw events (:func:`tb_steps`).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def event_files(log_dir: Path | str) -> list[Path]:
    """Event files in the order they were created: ``events.out.tfevents.<time>.<host>.<pid>.<counter>``."""
    files = Path(log_dir).glob("events.out.tfevents.*")
    return sorted(files, key=lambda p: (int(p.name.split(".")[3]), int(p.name.split(".")[-1])))


def _raw_events(log_dir: Path | str) -> Iterator[Any]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in event_files(log_dir):
        yield from EventFileLoader(str(path)).Load()


def tb_steps(log_dir: Path | str, tag: str) -> list[int]:
    """Steps of every raw event with ``tag``, file by file in write order (no de-duplication or purging)."""
    return [event.step for event in _raw_events(log_dir) if any(v.tag == tag for v in event.summary.value)]


def tb_tags(log_dir: Path | str) -> Counter:
    """How many events carry each tag, over all event files of a run."""
    return Counter(value.tag for event in _raw_events(log_dir) for value in event.summary.value)


# --------------------------------------------------------------------------- callbacks
class Snapshots(pl.Callback):
    """Copies of the weights and ``global_step`` at every (non-sanity) validation."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.states.append(copy.deepcopy(pl_module.state_dict()))
            self.steps.append(trainer.global_step)


# --------------------------------------------------------------------------- torch.compile
def counting_backend(inner: str, calls: Counter) -> Callable[..., Any]:
    """A dynamo backend that compiles with ``inner`` and counts calls of the compiled graphs in
    ``calls`` (``"train"`` with grad enabled, ``"eval"`` without)."""
    compile_with = torch._dynamo.lookup_backend(inner)

    def backend(gm, example_inputs):
        compiled = compile_with(gm, example_inputs)

        def run(*args):
            calls["train" if torch.is_grad_enabled() else "eval"] += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # keep dynamo's calling convention
        return run

    return backend


class PlainLit(LitClassifier):
    """Steps without Python side effects, so ``torch.compile(lit_module)`` compiles them without recompiling."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])
