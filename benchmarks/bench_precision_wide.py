"""CKA error of float32 and bfloat16 Grams against float64 on a very wide layer (p = 10^6).

Three layers of n = 128 examples x 10^6 features (a shared 64-dimensional signal, growing noise
and a constant offset of 3), as the first stage of a large ResNet at high resolution produces.
Prints the maximum CKA error of each precision and the time it took on this machine::

    python benchmarks/bench_precision_wide.py
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_cka.functional import cka_from_sums, gram, hsic1_pairwise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="examples per minibatch")
    parser.add_argument("--p", type=int, default=1_000_000, help="features per example")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = torch.randn(args.n, 64)
    layers = [base @ (torch.randn(64, args.p) / 8) + (0.5 + i) * torch.randn(args.n, args.p) + 3.0 for i in range(3)]

    def cka(dtype: torch.dtype) -> torch.Tensor:
        return cka_from_sums(*hsic1_pairwise(torch.stack([gram(x, dtype) for x in layers])))

    reference = cka(torch.float64)
    print(f"n = {args.n}, p = {args.p}, 3 layers; float64 CKA off the diagonal: {reference[0, 1:].tolist()}")
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        start = time.perf_counter()
        error = float((cka(dtype) - reference).abs().max())
        print(f"{name:9s} max CKA error {error:.1e}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
