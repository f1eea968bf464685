"""CKACallback on torch.compile'd models: every measured layer is captured eagerly, training and
unmeasured validations stay compiled, nothing recompiles and no hook is left behind."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import helpers as H
import pytest
import torch
from lightning.pytorch import Callback

from lightning_cka import CKACallback

SUBLAYERS = [f"blocks.{i}.{s}" for i in range(2) for s in ("attn", "mlp")]
ROWS = [f"model.{n}" for n in SUBLAYERS]


class CompileProbe(Callback):
    """Dynamo counters at the end of every training epoch, the compiled callables at fit start, hook counts.

    Put it after the CKACallback: its ``on_validation_batch_start`` then sees the hooks of that batch.
    """

    def __init__(self, get_compiled):
        self.get_compiled = get_compiled
        self.graphs: list[int] = []
        self.recompiles: list[int] = []
        self.at_start = None
        self.val_hooks: list[int] = []
        self.train_batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_batches += 1

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val_hooks.append(H.hook_count(pl_module))

    def on_fit_start(self, trainer, pl_module):
        self.at_start = self.get_compiled(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])
        self.recompiles.append(sum(counters["recompiles"].values()))


def _compiled_setup(how: str, backend):
    net = H.tiny_vit(depth=2)
    if how == "attribute":  # self.model = torch.compile(net)
        compiled = torch.compile(net, backend=backend)
        module = H.PlainLit(compiled)

        def get(pl_module):
            return compiled.__dict__["forward"]

        return net, module, module, get, "model (torch.compile)"
    if how == "in_place":  # net.compile()
        net.compile(backend=backend)
        module = H.PlainLit(net)

        def get(pl_module):
            return net.__dict__["_compiled_call_impl"]

        return net, module, module, get, "model (.compile())"
    # trainer.fit(torch.compile(lit_module))
    module = H.PlainLit(net)

    def get(pl_module):
        return (pl_module.__dict__["forward"], pl_module.__dict__["validation_step"])

    return net, module, torch.compile(module, backend=backend), get, "compiled LightningModule"


@pytest.mark.parametrize(
    ("how", "inner"),
    [("attribute", "inductor"), ("attribute", "aot_eager"), ("in_place", "aot_eager"), ("lightning", "aot_eager")],
)
def test_torch_compile(tmp_path, how, inner):
    torch._dynamo.reset()
    calls: Counter = Counter()
    net, module, fit_arg, get_compiled, label = _compiled_setup(how, H.counting_backend(inner, calls))
    probe = CompileProbe(get_compiled)
    snaps = H.Snapshots()
    val = H.val_data()
    # every other epoch is measured: the unmeasured validations run the compiled (eval) graph
    cb = CKACallback(layers="sublayers", every_n_epochs=2)
    tr = H.trainer(tmp_path, callbacks=[cb, probe, snaps], max_epochs=4, limit_train_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(fit_arg, H.train_data(16), val)
    compile_warnings = [str(w.message) for w in caught if "compiled" in str(w.message)]
    assert len(compile_warnings) == 1, compile_warnings
    assert label in compile_warnings[0]

    # every chosen layer was captured on the measured epochs, equal to compare() on the plain net
    assert cb.rows == ROWS
    assert [r["epoch"] for r in cb.history] == [0, 2]
    assert [h >= len(ROWS) for h in probe.val_hooks] == [True, True, False, False, True, True, False, False]
    for record, state, step in zip(cb.history, snaps.states[::2], snaps.steps[::2], strict=True):
        assert record["step"] == step
        plain = copy.deepcopy(net)
        plain.load_state_dict({k.removeprefix("model.").removeprefix("_orig_mod."): v for k, v in state.items()})
        expected = H.cmp(plain, val, SUBLAYERS)
        assert torch.isfinite(record["self"].matrix).all()
        assert H.max_diff(record["self"].matrix, expected.matrix) < H.TOL
    assert H.max_diff(cb.history[0]["self"].matrix, cb.history[1]["self"].matrix) > 1e-6  # training moved weights

    # no recompilation on later epochs; training (and unmeasured validation) still ran compiled
    assert probe.graphs[1] == probe.graphs[3], probe.graphs
    assert probe.recompiles[1] == probe.recompiles[3] == 0, probe.recompiles
    assert probe.train_batches == 8
    assert calls["train"] == 8  # one compiled graph call per training step
    assert calls["eval"] == 4  # unmeasured epochs 1 and 3 (2 batches each) ran compiled; measured ones eagerly
    # after fit the compiled callables are back in place, and no hook is left
    assert probe.at_start is not None
    after = get_compiled(module)
    if isinstance(after, tuple):
        assert all(a is b for a, b in zip(after, probe.at_start, strict=True))
    else:
        assert after is probe.at_start
    assert H.hook_count(module) == 0
    # and a training-mode forward pass after fit goes through the cached compiled graph again
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    module.train()
    module.training_step(next(iter(H.train_data(16))), 0)
    assert calls["train"] == 9
    assert counters["stats"]["unique_graphs"] == graphs


def test_two_callbacks_on_compiled_model_keep_training_compiled(tmp_path):
    torch._dynamo.reset()
    calls: Counter = Counter()
    net = H.tiny_vit(depth=2)
    compiled = torch.compile(net, backend=H.counting_backend("aot_eager", calls))
    compiled_forward = compiled.__dict__["forward"]
    module = H.PlainLit(compiled)
    val = H.val_data()
    a = CKACallback(layers="sublayers")
    b = CKACallback(layers="model.blocks.*.mlp", log_prefix="cka_mlp")
    with pytest.warns(UserWarning, match="compiled") as caught:
        H.trainer(tmp_path, callbacks=[a, b], max_epochs=2, limit_train_batches=2).fit(module, H.train_data(16), val)
    assert all("model (torch.compile)" in str(w.message) for w in caught if "compiled" in str(w.message))
    # both measured every layer on the plain net's weights
    assert len(a.history) == len(b.history) == 2
    assert H.max_diff(a.history[-1]["self"].matrix, H.cmp(net, val, SUBLAYERS).matrix) < H.TOL
    assert H.hook_count(module) == 0
    # ... and training stayed compiled after the first validation
    assert compiled.__dict__["forward"] is compiled_forward
    assert calls["train"] == 4
