"""Correctness checks that need a CUDA device (run on a machine with a GPU; prints PASS/FAIL lines).

1. MinibatchCKA on CUDA (float32, bfloat16, float64 Grams) against an independent float64
   reference of the unbiased HSIC formula computed on the CPU, also for large-mean activations.
2. The bf16 Gram keeps a float32 accumulator on CUDA (``torch.mm(..., out_dtype=float32)``).
3. A short Lightning fit on CUDA with ``precision="bf16-mixed"``: the callback's matrix is within
   1e-3 of ``compare()`` in float32 on the same weights, and hooks are gone afterwards.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import sys
import warnings

import torch

warnings.filterwarnings("ignore")
FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def reference_cka(batches: list[list[torch.Tensor]]) -> torch.Tensor:
    """Literal Song et al. (2012) unbiased HSIC in float64 on the CPU, summed over minibatches."""

    def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        k, l = k.clone(), l.clone()
        k.fill_diagonal_(0)
        l.fill_diagonal_(0)
        one = torch.ones(n, 1, dtype=torch.float64)
        term = torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
        return (term - 2 / (n - 2) * (one.T @ k @ l @ one)).squeeze() / (n * (n - 3))

    layers = len(batches[0])
    s_xy = torch.zeros(layers, layers, dtype=torch.float64)
    for xs in batches:
        flat = [x.reshape(x.shape[0], -1).double().cpu() for x in xs]
        flat = [f - f.mean(0) for f in flat]  # exact for HSIC_1; keeps float64 well conditioned
        grams = [f @ f.T for f in flat]
        for i in range(layers):
            for j in range(layers):
                s_xy[i, j] += hsic(grams[i], grams[j])
    d = s_xy.diagonal().sqrt()
    return s_xy / (d[:, None] * d[None, :])


def check_metric() -> None:
    from lightning_cka import MinibatchCKA

    gen = torch.Generator().manual_seed(0)
    for mean in (0.0, 100.0):
        batches = []
        for n in (256, 200, 64):
            base = torch.randn(n, 65, 192, generator=gen)
            batches.append(
                [
                    base + mean,
                    torch.tanh(base @ torch.randn(192, 96, generator=gen)) + mean,
                    torch.randn(n, 512, generator=gen),
                ]
            )
        expected = reference_cka(batches)
        for precision, tol in (("float64", 1e-10), ("float32", 1e-5), ("bfloat16", 1e-4)):
            metric = MinibatchCKA(precision=precision).cuda()
            for xs in batches:
                metric.update([x.cuda() for x in xs])
            err = (metric.compute().cpu() - expected).abs().max().item()
            report(f"metric cuda {precision} mean={mean}", err <= tol, f"max abs err {err:.2e} (tol {tol:.0e})")


def check_bf16_accumulator() -> None:
    from lightning_cka.functional import gram

    x = torch.randn(256, 4096, device="cuda")
    out = gram(x, torch.bfloat16)
    exact = gram(x.double(), torch.float64).float()
    rel = ((out - exact).norm() / exact.norm()).item()
    rounded = (x - x.mean(0)).bfloat16()
    bf16_out = (rounded @ rounded.T).float()
    rel_bf16_out = ((bf16_out - exact).norm() / exact.norm()).item()
    report("bf16 gram dtype", out.dtype == torch.float32, f"{out.dtype}")
    report("bf16 gram float32 accumulator", rel < rel_bf16_out, f"rel err {rel:.2e} vs bf16-output {rel_bf16_out:.2e}")


def check_callback() -> None:
    import lightning.pytorch as pl
    import timm
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_cka import CKACallback, compare

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            self.model(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,)))
    loader = DataLoader(data, batch_size=128)
    module = Lit()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    cb = CKACallback(layers="sublayers")
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader, loader)
    hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    expected = compare(module.model.cuda(), [x for x, _ in loader], "sublayers", progress=False).matrix
    err = (cb.history[-1]["self"].matrix - expected.cpu()).abs().max().item()
    report("callback bf16-mixed vs compare fp32", err <= 1e-3, f"max abs err {err:.2e}")
    report("hooks restored", hooks_before == hooks_after, f"{hooks_before} -> {hooks_after}")
    report(
        "norm ratios and attention distances",
        bool(cb.history[-1].get("norm_ratio")) and bool(cb.history[-1].get("attention_distance")),
        "present",
    )


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    check_metric()
    check_bf16_accumulator()
    check_callback()
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all GPU checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
