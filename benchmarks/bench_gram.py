"""Where the time of one ``gram`` call goes on this machine (CPU by default).

For activations of shape (n, p) (the benchmark workload: n = 256, p = 65 x 192 = 12 480) and each
product dtype, times the pieces of ``lightning_cka.functional.gram`` and the alternatives it was
chosen over: the full product ``X @ X.T``, the lower block triangle by row blocks (the previous
version) and by column blocks (the current ``_symmetric_product``), the centring alone, and the
whole ``gram`` call with and without a reusable workspace. Minimum of ``--repeats`` runs of
``--layers`` different activations each (so the inputs are not all in cache), in ms per call.

    python benchmarks/bench_gram.py                 # about 30 s
    python benchmarks/bench_gram.py --n 512 --json-out gram512.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from lightning_cka import functional  # noqa: E402


def row_block_product(f: Tensor, blocks: int = 4) -> Tensor:
    """The previous CPU product: row block i against the rows up to it, then mirrored."""
    n = f.shape[0]
    k = torch.empty(n, n, dtype=f.dtype, device=f.device)
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for start, stop in itertools.pairwise(edges):
        torch.mm(f[start:stop], f[:stop].T, out=k[start:stop, :stop])
    lower = k.tril()
    return lower + lower.tril(-1).T


def per_call_ms(fn: Callable[[Tensor], object], inputs: list[Tensor], repeats: int) -> float:
    for x in inputs[:2]:
        fn(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        best = min(best, time.perf_counter() - start)
    return best / len(inputs) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--p", type=int, default=65 * 192)
    parser.add_argument("--layers", type=int, default=24, help="different activations per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    acts = [torch.randn(args.n, args.p) + 0.5 for _ in range(args.layers)]
    rows: list[dict[str, object]] = []
    print(f"# gram pieces, n = {args.n}, p = {args.p}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| product dtype | piece | ms per call |\n|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        centred = [(a - a.mean(0, keepdim=True)).to(dtype) for a in acts]
        ws = functional.gram_workspace(acts[0], dtype)
        pieces: dict[str, tuple[Callable[[Tensor], object], list[Tensor]]] = {
            "full product X @ X.T": (lambda c: c @ c.T, centred),
            "lower triangle, 4 row blocks (before b46f337)": (row_block_product, centred),
            "lower triangle, 4 column blocks (current)": (functional._symmetric_product, centred),
            "centring alone (mean + centred copy into the workspace)": (
                lambda a, ws=ws, dtype=dtype: functional._centred(a, ws[: a.numel()].view(a.shape)),
                acts,
            ),
            "whole gram(), workspace": (lambda a, ws=ws, dtype=dtype: functional.gram(a, dtype, ws), acts),
            "whole gram(), no workspace": (lambda a, dtype=dtype: functional.gram(a, dtype), acts),
        }
        for name, (fn, inputs) in pieces.items():
            ms = per_call_ms(fn, inputs, args.repeats)
            label = str(dtype).removeprefix("torch.")
            rows.append({"dtype": label, "piece": name, "ms": ms})
            print(f"| {label} | {name} | {ms:.2f} |", flush=True)
    if args.json_out:
        info = {"n": args.n, "p": args.p, "torch": torch.__version__, "threads": torch.get_num_threads()}
        Path(args.json_out).write_text(json.dumps({**info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
