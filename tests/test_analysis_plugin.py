"""A new signal is one Analysis subclass: this one, the mean activation norm of each layer."""

from __future__ import annotations

import helpers as H
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_cka import CKACallback
from lightning_cka.analyses import Analysis, MeasuredBatch, Report, SetupContext
from lightning_cka.layers import module_map
from lightning_cka.running_mean import RunningMean


class MeanNorm(Analysis):
    key = "mean_norm"

    def setup(self, context: SetupContext) -> bool:
        self.layers, self.metric = context.layers, RunningMean(len(context.layers))
        self.modules = module_map(context.module)
        return True

    def attach(self, hooks) -> None:
        for i, name in enumerate(self.layers):
            hooks.forward(self.modules[name], lambda m, a, out, i=i: self._record(i, out))

    def _record(self, i: int, out: torch.Tensor) -> None:
        norms = out.detach().flatten(1).norm(dim=1)
        self.metric.update(norms.sum().reshape(1), len(norms), index=slice(i, i + 1))

    def reset(self, device: torch.device) -> None:
        self.metric.to(device).reset()

    def update(self, batch: MeasuredBatch) -> None:
        """The hooks did the work."""

    def compute(self) -> dict[str, float]:
        return dict(zip(self.layers, self.metric.compute().tolist(), strict=True))

    def report(self, value: dict[str, float], epoch: int, step: int) -> Report:
        return Report(scalars={f"mean_norm/{k}": v for k, v in value.items()})


def test_dummy_analysis_runs_in_the_callback_loop(tmp_path):
    module = H.vit_module()
    logger = TensorBoardLogger(str(tmp_path))
    cb = CKACallback(layers="sublayers", analyses=[MeanNorm()])
    val = H.val_data()
    H.trainer(tmp_path, callbacks=[cb], logger=logger).validate(module, val, verbose=False)
    layer = module.model.blocks[1].mlp
    with torch.no_grad():
        x = torch.cat([b[0] for b in val])
        out = []
        handle = layer.register_forward_hook(lambda m, a, o: out.append(o))
        module.eval()(x)
        handle.remove()
    expected = out[0].flatten(1).norm(dim=1).mean().item()
    assert abs(cb.history[0]["mean_norm"]["model.blocks.1.mlp"] - expected) < 1e-4
    assert "mean_norm/blocks.1.mlp" in H.events(logger.log_dir).Tags()["scalars"]  # tags drop `model.`
    assert H.hook_count(module) == 0
