"""Offline compare() and its GramCapture on tiny timm/torchvision models, checked against
activations captured by this test's own forward hooks (independent of lightning_cka.capture)."""

import copy

import helpers as H
import numpy as np
import pytest
import reference as ref
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from lightning_cka import CKAResult, compare
from lightning_cka.capture import GramCapture, HookSet
from lightning_cka.functional import gram

VIT_SUBLAYERS = ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
RESNET_BLOCKS = ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return H.timm_vit_tiny()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(1)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    # Non-trivial batch-norm statistics so train/eval mode would change the activations.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return H.random_images(7, (8, 6, 5))


def own_capture(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per batch, the outputs of the named modules, via plain forward hooks (eval, no_grad)."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_m, _args, out, name=name):
            out = out[0] if isinstance(out, tuple | list) else out
            store[name] = out.detach().clone()

        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    result = []
    try:
        with torch.no_grad():
            for x in batches:
                store.clear()
                model(x)
                result.append([store[n] for n in names])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return result


class CountCalls:
    """Forward pre-hook on a root module: counts calls and records mode/grad state."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.training: list[bool] = []
        self.grad_enabled: list[bool] = []
        self.hooks_seen: list[int] = []
        self._model = model
        self._handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.training.append(module.training)
        self.grad_enabled.append(torch.is_grad_enabled())
        self.hooks_seen.append(H.hook_count(self._model))

    def remove(self) -> None:
        self._handle.remove()


class Exploding:
    """An iterable that must never be iterated."""

    def __iter__(self):
        raise RuntimeError("the dataloader was iterated")

    def __len__(self):
        return 3


# -------------------------------------------------------------------------------- values
def test_vit_self_comparison_matches_own_hooks(vit, images):
    counter = CountCalls(vit)
    try:
        result = compare(vit, images, layers="sublayers", progress=False)
    finally:
        counter.remove()
    assert counter.calls == len(images)  # the model runs once per batch in self-comparison
    assert result.rows == VIT_SUBLAYERS and result.cols == VIT_SUBLAYERS
    assert result.matrix.shape == (4, 4) and result.matrix.dtype == torch.float64
    assert result.meta["batches"] == len(images)

    acts = own_capture(vit, VIT_SUBLAYERS, images)
    assert acts[0][0].shape == (8, 65, 192)  # full tokens x channels are flattened
    assert ref.max_abs_err(result.matrix, H.metric_over(acts)) < H.TOL32
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_resnet_self_comparison_matches_own_hooks(resnet, images, kind):
    if kind == "timm":
        from timm.models.resnet import BasicBlock as TimmBlock
        from timm.models.resnet import ResNet as TimmResNet

        torch.manual_seed(2)
        model = TimmResNet(TimmBlock, [1, 1, 1, 1], num_classes=10)
    else:
        model = resnet
    counter = CountCalls(model)
    try:
        result = compare(model, images, layers="auto", progress=False)
    finally:
        counter.remove()
    assert counter.calls == len(images)
    assert result.rows == RESNET_BLOCKS
    acts = own_capture(model, RESNET_BLOCKS, images)
    assert ref.max_abs_err(result.matrix, H.metric_over(acts)) < H.TOL32
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32


def test_float64_precision_matches_reference_tightly(resnet, images):
    result = compare(resnet, images, layers=RESNET_BLOCKS[:3], progress=False, precision="float64")
    acts = own_capture(resnet, RESNET_BLOCKS[:3], images)
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL64


def test_cross_comparison_returns_l_by_m(vit, resnet, images):
    vit_counter, rn_counter = CountCalls(vit), CountCalls(resnet)
    try:
        result = compare(
            vit, images, layers=["blocks.0", "blocks.1"], other=resnet, other_layers="auto", progress=False
        )
    finally:
        vit_counter.remove()
        rn_counter.remove()
    assert vit_counter.calls == rn_counter.calls == len(images)
    assert result.matrix.shape == (2, 4)
    assert result.rows == ["blocks.0", "blocks.1"] and result.cols == RESNET_BLOCKS
    xs = own_capture(vit, result.rows, images)
    ys = own_capture(resnet, RESNET_BLOCKS, images)
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(xs, ys)) < H.TOL32


def test_cross_comparison_of_a_model_with_its_copy_is_self_matrix(resnet, images):
    twin = copy.deepcopy(resnet)
    cross = compare(resnet, images, layers=RESNET_BLOCKS, other=twin, progress=False)
    self_ = compare(resnet, images, layers=RESNET_BLOCKS, progress=False)
    assert cross.matrix.shape == (4, 4)
    assert ref.max_abs_err(cross.matrix, self_.matrix) < 1e-12


# ------------------------------------------------------------------------- layer errors
def test_unknown_layer_lists_close_names_before_iterating(vit):
    with pytest.raises(ValueError, match=r"blocks\.0\.attn"):
        compare(vit, Exploding(), layers=["blocks.0.atn"], progress=False)
    assert H.hook_count(vit) == 0


def test_unknown_other_layer_raises_before_iterating(vit, resnet):
    before = H.hook_count(vit), H.hook_count(resnet)
    with pytest.raises(ValueError, match=r"layer1\.0"):
        compare(vit, Exploding(), layers=["blocks.0"], other=resnet, other_layers=["layer1.O"], progress=False)
    assert (H.hook_count(vit), H.hook_count(resnet)) == before


# ---------------------------------------------------------------------- batch handling
@pytest.mark.parametrize("fmt", ["tensor", "tuple", "list", "dict", "tuple_key"])
def test_batch_formats(resnet, images, fmt):
    labels = [torch.zeros(len(x), dtype=torch.long) for x in images]
    kwargs = {}
    if fmt == "tensor":
        loader = images
    elif fmt == "tuple":
        loader = [(x, y) for x, y in zip(images, labels, strict=True)]
    elif fmt == "list":
        loader = [[x, y] for x, y in zip(images, labels, strict=True)]
    elif fmt == "dict":
        loader = [{"label": y, "image": x} for x, y in zip(images, labels, strict=True)]
        kwargs["input_key"] = "image"
    else:
        loader = [(y, x) for x, y in zip(images, labels, strict=True)]
        kwargs["input_key"] = 1
    result = compare(resnet, loader, layers=RESNET_BLOCKS[:2], progress=False, **kwargs)
    acts = own_capture(resnet, RESNET_BLOCKS[:2], images)
    assert result.meta["batches"] == len(images)
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32


def test_dict_batch_without_input_key_raises(resnet, images):
    with pytest.raises(KeyError, match="input_key"):
        compare(resnet, [{"image": images[0]}], layers=RESNET_BLOCKS[:2], progress=False)
    assert H.hook_count(resnet) == 0


def test_generator_dataloader_without_len(resnet, images):
    result = compare(resnet, (x for x in images), layers=RESNET_BLOCKS[:2], progress=False)
    assert result.meta["batches"] == len(images)


def test_max_batches(resnet, images):
    loader = images + [x.flip(0) for x in images]
    counter = CountCalls(resnet)
    try:
        result = compare(resnet, loader, layers=RESNET_BLOCKS[:2], max_batches=2, progress=False)
    finally:
        counter.remove()
    assert counter.calls == 2
    assert result.meta["batches"] == 2
    acts = own_capture(resnet, RESNET_BLOCKS[:2], images[:2])
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32
    full = ref.minibatch_cka(own_capture(resnet, RESNET_BLOCKS[:2], loader))
    assert ref.max_abs_err(full, ref.minibatch_cka(acts)) > 1e-6  # max_batches changes the answer


def test_small_tail_batch_skipped_with_warning(resnet, images):
    loader = [images[0], images[1], images[2][:3]]
    with pytest.warns(UserWarning, match="at least 4"):
        result = compare(resnet, loader, layers=RESNET_BLOCKS[:2], progress=False)
    acts = own_capture(resnet, RESNET_BLOCKS[:2], images[:2])
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32


def test_empty_dataloader_raises(resnet):
    with pytest.raises(ValueError, match="no usable batch"):
        compare(resnet, [], layers=RESNET_BLOCKS[:2], progress=False)
    assert H.hook_count(resnet) == 0


def test_progress_bar(resnet, images, capsys):
    quiet = compare(resnet, images, layers=RESNET_BLOCKS[:2], progress=False)
    assert "CKA" not in capsys.readouterr().err
    loud = compare(resnet, images, layers=RESNET_BLOCKS[:2], progress=True)
    assert "CKA" in capsys.readouterr().err
    assert torch.equal(quiet.matrix, loud.matrix)


# ------------------------------------------------------------- mode and hook hygiene
@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_and_hooks_removed(resnet, images, training):
    resnet.train(training)
    bn = resnet.bn1
    stats = bn.running_mean.clone()
    before = H.hook_count(resnet)
    counter = CountCalls(resnet)
    try:
        compare(resnet, images, layers=RESNET_BLOCKS, progress=False)
    finally:
        counter.remove()
    assert counter.training == [False] * len(images)  # ran in eval mode
    assert counter.grad_enabled == [False] * len(images)  # under no_grad
    assert all(seen >= before + 1 + len(RESNET_BLOCKS) for seen in counter.hooks_seen)  # hooks were live
    assert resnet.training is training
    assert all(m.training is training for m in resnet.modules())
    assert H.hook_count(resnet) == before
    assert torch.equal(bn.running_mean, stats)  # eval mode: batch-norm statistics untouched
    assert all(p.grad is None for p in resnet.parameters())
    resnet.eval()


def _failing_loader(images):
    yield images[0]
    yield torch.randn(4, 5, 32, 32)  # wrong channel count: the first conv raises


def _raising_loader(images):
    yield images[0]
    raise OSError("disk gone")


@pytest.mark.parametrize("where", ["forward", "dataloader"])
@pytest.mark.parametrize("cross", [False, True])
def test_mode_and_hooks_restored_after_exception(vit, resnet, images, where, cross):
    vit.train()
    resnet.train()
    before = H.hook_count(vit), H.hook_count(resnet)
    loader = _failing_loader(images) if where == "forward" else _raising_loader(images)
    error = RuntimeError if where == "forward" else OSError
    kwargs = {"other": vit, "other_layers": ["blocks.0"]} if cross else {}
    with pytest.raises(error):
        compare(resnet, loader, layers=RESNET_BLOCKS, progress=False, **kwargs)
    assert resnet.training and all(m.training for m in resnet.modules())
    assert vit.training and all(m.training for m in vit.modules())
    assert (H.hook_count(vit), H.hook_count(resnet)) == before
    vit.eval()
    resnet.eval()


# -------------------------------------------------------------------------- CKAResult
def test_result_save_load_round_trip(resnet, images, tmp_path):
    result = compare(resnet, images, layers=RESNET_BLOCKS, progress=False)
    path = result.save(tmp_path / "cka.npz")
    assert path == tmp_path / "cka.npz" and path.exists()
    np.testing.assert_array_equal(np.load(path)["matrix"], result.matrix.numpy())
    loaded = CKAResult.load(path)
    assert torch.equal(loaded.matrix, result.matrix)
    assert loaded.rows == result.rows and loaded.cols == result.cols
    assert loaded.meta["batches"] == len(images)

    other = result.save(tmp_path / "nested" / "run")  # suffix added, folders created
    assert other.suffix == ".npz" and other.exists()
    assert torch.equal(CKAResult.load(other).matrix, result.matrix)


def test_result_with_nan_round_trips(tmp_path):
    matrix = torch.tensor([[1.0, float("nan")], [0.5, 1.0]], dtype=torch.float64)
    result = CKAResult(matrix, ["a", "b"], ["c", "d"], {"epoch": 3})
    loaded = CKAResult.load(result.save(tmp_path / "r.npz"))
    assert torch.equal(torch.isnan(loaded.matrix), torch.isnan(matrix))
    assert loaded.matrix[1, 0] == 0.5
    assert loaded.meta == {"epoch": 3}


def test_result_plot_labels(resnet, images):
    result = compare(resnet, images, layers=RESNET_BLOCKS, progress=False)
    fig, ax = result.plot(title="t")
    assert fig is ax.get_figure()
    assert [t.get_text() for t in ax.get_yticklabels()] == RESNET_BLOCKS
    assert [t.get_text() for t in ax.get_xticklabels()] == RESNET_BLOCKS


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_gram_capture_shares_one_scratch_per_forward_and_releases_it(precision):
    # Layers growing in width make the shared CPU scratch buffer grow mid-forward.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 50), nn.Linear(50, 8)).eval()
    names = ["0", "2", "3"]
    capture = GramCapture({n: model.get_submodule(n) for n in names}, precision=precision)
    x = torch.randn(32, 5) + 4.0
    with HookSet() as hooks, torch.no_grad():
        capture.attach(hooks)
        model(x)
        assert capture._workspace is not None and capture._workspace.numel() == 32 * 50
        grams = capture.collect()
    assert capture._workspace is None  # nothing of the batch outlives collect()
    acts = own_capture(model, names, [x])[0]
    for k, act in zip(grams, acts, strict=True):
        assert torch.equal(k, gram(act, precision))


# ------------------------------------------------------------- per-submodule train/eval state
def test_mixed_train_eval_state_restored(resnet, images):
    resnet.train()
    resnet.bn1.eval()  # e.g. a frozen stem
    resnet.layer2.eval()
    before = {name: m.training for name, m in resnet.named_modules()}
    assert any(before.values()) and not all(before.values())
    counter = CountCalls(resnet)
    try:
        compare(resnet, images, layers=RESNET_BLOCKS, progress=False)
    finally:
        counter.remove()
    assert counter.training == [False] * len(images)
    assert {name: m.training for name, m in resnet.named_modules()} == before
    resnet.eval()


def test_mixed_state_restored_after_exception(resnet, images):
    resnet.train()
    resnet.layer1.eval()
    before = {name: m.training for name, m in resnet.named_modules()}
    with pytest.raises(OSError):
        compare(resnet, _raising_loader(images), layers=RESNET_BLOCKS, progress=False)
    assert {name: m.training for name, m in resnet.named_modules()} == before
    resnet.eval()


# ------------------------------------------------------------------- argument validation
BAD_ARGUMENTS = {
    "max_batches_zero": ({"max_batches": 0}, ValueError, ["max_batches", "0"]),
    "max_batches_negative": ({"max_batches": -2}, ValueError, ["max_batches", "-2"]),
    "max_batches_float": ({"max_batches": 1.5}, TypeError, ["max_batches", "1.5"]),
    "max_batches_bool": ({"max_batches": True}, TypeError, ["max_batches", "True"]),
    "reduction": ({"reduction": "max"}, ValueError, ["reduction", "'max'"]),
    "precision_name": ({"precision": "float16"}, ValueError, ["precision", "'float16'"]),
    "precision_dtype": ({"precision": torch.int8}, ValueError, ["precision", "torch.int8"]),
    "precision_unhashable": ({"precision": ["float32"]}, ValueError, ["precision", "['float32']"]),
    "reference_not_module": ({"reference": "resnet18"}, TypeError, ["reference", "str"]),
    "input_key": ({"input_key": 1.0}, TypeError, ["input_key", "1.0"]),
    "output": ({"output": None}, TypeError, ["output", "None"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_fail_before_iterating(resnet, case):
    kwargs, exc, fragments = BAD_ARGUMENTS[case]
    before = H.hook_count(resnet)
    with pytest.raises(exc) as info:
        compare(resnet, Exploding(), layers=RESNET_BLOCKS[:2], progress=False, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert H.hook_count(resnet) == before


@pytest.mark.parametrize("loader", [3, None, torch.randn(8, 3, 32, 32)], ids=["int", "none", "tensor"])
def test_non_iterable_dataloader(resnet, loader):
    with pytest.raises(TypeError, match="dataloader"):
        compare(resnet, loader, layers=RESNET_BLOCKS[:2], progress=False)


def test_model_not_module(images):
    with pytest.raises(TypeError, match="model"):
        compare("vit", images, progress=False)  # type: ignore[arg-type]


# ----------------------------------------------------------------- order, reductions, sharing
def test_cross_comparison_keeps_the_given_order(vit, resnet, images):
    rows = ["blocks.1", "blocks.0.mlp", "blocks.0"]
    cols = ["layer3.0", "layer1.0", "layer4.0"]
    result = compare(vit, images, layers=rows, other=resnet, other_layers=cols, progress=False)
    assert result.rows == rows and result.cols == cols
    expected = ref.minibatch_cka(own_capture(vit, rows, images), own_capture(resnet, cols, images))
    assert ref.max_abs_err(result.matrix, expected) < H.TOL32
    # the same entries as the sorted comparison, permuted
    sorted_ = compare(vit, images, layers=sorted(rows), other=resnet, other_layers=sorted(cols), progress=False)
    r = [sorted(rows).index(n) for n in rows]
    c = [sorted(cols).index(n) for n in cols]
    assert ref.max_abs_err(result.matrix, sorted_.matrix[r][:, c]) < 1e-12


@pytest.mark.parametrize(("reduction", "reduce"), [("mean", lambda x: x.mean(1)), ("cls", lambda x: x[:, 0])])
def test_token_reductions_against_hand_reduced_activations(vit, images, reduction, reduce):
    names = ["blocks.0", "blocks.1"]
    result = compare(vit, images, layers=names, reduction=reduction, progress=False)
    acts = [[reduce(a) for a in batch] for batch in own_capture(vit, names, images)]
    assert acts[0][0].shape == (8, 192)
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL32
    flat = compare(vit, images, layers=names, progress=False)
    assert ref.max_abs_err(result.matrix, flat.matrix) > 1e-4  # the reduction matters


def test_shared_block_is_measured_at_its_first_call(images):
    torch.manual_seed(3)
    block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    head = nn.Linear(16, 5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), block, block, head).eval()
    names = [n for n, _ in model.named_modules()]
    assert "3" not in names  # named_modules lists the shared block once, as "2"
    result = compare(model, images, layers=["2", "4"], progress=False, precision="float64")
    acts = []
    with torch.no_grad():
        for x in images:
            first = block(model[1](model[0](x)))
            acts.append([first, head(block(first))])
    assert ref.max_abs_err(result.matrix, ref.minibatch_cka(acts)) < H.TOL64
