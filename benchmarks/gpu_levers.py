"""Ways to make the Gram products of wide layers cheaper on a GPU (ResNet-50 block outputs).

On an H200, CKA over the 16 ResNet-50 block outputs costs 15 % of a validation epoch (callback)
and 70 % of a forward pass (``compare``): ``layer1`` has 802 816 features per example, and the
Gram products run in IEEE float32 while cuDNN runs the convolutions in TF32. This script measures,
on the real block outputs of one minibatch, each candidate way of forming the 16 Grams and the
CKA error it causes, next to the forward pass it has to hide behind:

- ``fp32``: ``functional.gram`` as the library runs it today (IEEE float32 product);
- ``tf32``: the same with TF32 matmuls allowed (what ``torch.set_float32_matmul_precision("high")`` does);
- ``fp32 symmetric`` / ``tf32 symmetric``: the lower block triangle only (4 row blocks, 10/16 of
  the multiply-adds), as ``gram`` already does on CPU;
- ``bf16``: ``precision="bfloat16"`` (bf16 inputs, float32 accumulator on CUDA);
- ``centring only``: the mean and the centred copy without any product (memory traffic).

Errors are the max abs difference of the 16 x 16 minibatch-CKA matrix from the one of float64
Grams of the same activations. Nothing is downloaded; weights are random (seed 0).

    python benchmarks/gpu_levers.py --json-out $OUT/gpu_levers.json   # CUDA, about a minute
    python benchmarks/gpu_levers.py --device cpu --small               # smoke run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, str(BENCH))

from common import capture_outputs  # noqa: E402  (puts the checkout on sys.path)

from lightning_cka import MinibatchCKA, functional  # noqa: E402
from lightning_cka.layers import resolve_layers  # noqa: E402


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 matmuls on CUDA for the duration of the block."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def symmetric_gram(x: Tensor) -> Tensor:
    """Mean-centred Gram from the lower block triangle (4 row blocks), float32 result."""
    flat = x.reshape(x.shape[0], -1).float()
    centred = flat - flat.mean(dim=0, keepdim=True)
    return functional._symmetric_product(centred).float()


def centring_only(x: Tensor) -> Tensor:
    flat = x.reshape(x.shape[0], -1).float()
    centred = flat - flat.mean(dim=0, keepdim=True)
    return centred[:, :1] @ centred[:, :1].T  # (n, n), negligible work: keeps the shape contract


VARIANTS: dict[str, tuple[Callable[[Tensor], Tensor], bool]] = {
    "fp32 (library default)": (functional.gram, False),
    "tf32": (functional.gram, True),
    "fp32 symmetric": (symmetric_gram, False),
    "tf32 symmetric": (symmetric_gram, True),
    "bf16 (precision='bfloat16')": (lambda x: functional.gram(x, torch.bfloat16), False),
    "centring only (no product)": (centring_only, False),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (cuBLAS heuristics, allocator)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def cka_of(grams: list[Tensor]) -> Tensor:
    metric = MinibatchCKA(len(grams)).to(grams[0].device)
    metric.update_grams(torch.stack([g.double() for g in grams]))
    return metric.compute()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="resnet18 at 32 x 32, batch 16: a smoke run")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine.", file=sys.stderr)
        return 2
    import timm

    arch, size, n = ("resnet18", 32, 16) if args.small else ("resnet50", 224, args.batch_size)
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).to(device).eval()
    names = resolve_layers(model, "auto")
    x = torch.randn(n, 3, size, size, device=device)
    with torch.no_grad():
        forward_s = best_time(lambda: model(x), device, args.repeats)
    acts = capture_outputs(model, names, x, lambda t: t.clone())  # clone: later in-place ops
    widths = [a[0].numel() for a in acts]
    reference = cka_of([functional.gram(a.double()) for a in acts])

    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    print(f"# {arch}, {len(names)} block outputs, n = {n}, {size} x {size}, on {where}; torch {torch.__version__}")
    print(f"# features per example: {min(widths):,} to {max(widths):,}; forward of one batch {forward_s * 1e3:.1f} ms")
    print(f"\n| variant | {len(names)} Grams (ms) | / forward | max CKA err vs float64 |")
    print("|---|---|---|---|")
    rows = []
    for name, (fn, allow_tf32) in VARIANTS.items():
        with tf32(allow_tf32):
            seconds = best_time(lambda fn=fn: [fn(a) for a in acts], device, args.repeats)
            grams = [fn(a) for a in acts]
        err = None if name.startswith("centring") else float((cka_of(grams) - reference).abs().max())
        rows.append({"variant": name, "seconds": seconds, "per_forward": seconds / forward_s, "max_err": err})
        shown = "-" if err is None else f"{err:.1e}"
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / forward_s:.3f} | {shown} |", flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        info = {"arch": arch, "n": n, "size": size, "device": where, "torch": torch.__version__}
        Path(args.json_out).write_text(json.dumps({**info, "forward_s": forward_s, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
