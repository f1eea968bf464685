#!/usr/bin/env python
"""Speed, accuracy and memory of lightning_cka against a plain forward pass and other CKA libraries.

Workload (REFERENCE.md section 7): self-CKA over the 24 sublayers (``blocks.i.attn``,
``blocks.i.mlp``) of a randomly initialised timm ``vit_tiny_patch16_224`` built with
``img_size=32, patch_size=4`` (65 tokens x 192 channels), 512 random images, minibatches of
256, eval mode, ``torch.no_grad``.

Everything is measured side by side in one process: each timed entry gets one warm-up run
and then ``--repeats`` timed runs; the entries of a group are run round-robin (so slow drift
of a shared machine hits all of them alike) and the minimum is reported, with the median and
the max/min spread as a noise indicator. Accuracy is the max abs difference of each CKA matrix
from an independent float64 reference (literal Song et al. 2012 unbiased HSIC formula on the
layer outputs captured with this script's own hooks and upcast to float64).

Examples::

    python benchmarks/bench_cka.py --quick                 # smoke run, seconds
    python benchmarks/bench_cka.py                         # CPU table (~3-4 minutes)
    python benchmarks/bench_cka.py --scaling --write-docs  # + scaling sweep, update docs
    python benchmarks/bench_cka.py --device cuda --gpu-suite --json-out $OUT/gpu.json

Peers are taken from the optional extra ``peers`` (``pip install -c constraints.txt torch-cka
cka-pytorch ckatorch``); a peer that is missing or fails is reported as ``n/a (reason)``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import lightning_cka  # noqa: E402
from lightning_cka.functional import gram, gram_workspace  # noqa: E402
from lightning_cka.metric import MinibatchCKA  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "img" / "scaling.png"
SEED = 0

TARGETS = {
    "compare/forward fp32": ("<=", 1.15),
    "compare/forward bf16": ("<=", 1.05),
    "CKA part fp32 / Gram fp32": ("<=", 1.5),
    "CKA part bf16 / Gram fp32": ("<=", 0.4),
    "max err fp32": ("<=", 1e-5),
    "max err bf16": ("<=", 1e-4),
    "cka-pytorch time / lightning_cka fp32 time": (">=", 2.0),
}


# --------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


class CpuMonitor:
    """How many cores other processes kept busy meanwhile (``/proc/stat`` busy time minus our own)."""

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        busy = math.nan
        with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            own += r.ru_utime + r.ru_stime
        return time.monotonic(), busy, own

    def others_cores(self) -> float:
        t1, b1, o1 = self._snapshot()
        t0, b0, o0 = self.start
        return max(0.0, ((b1 - b0) - (o1 - o0)) / max(t1 - t0, 1e-9))


def settle(args: argparse.Namespace, results: dict[str, Any], label: str) -> None:
    """With ``--wait-idle``, wait for a quiet machine before a timed group and record what was found."""
    if args.wait_idle > 0 and args.device == "cpu":
        t0 = time.monotonic()
        others = wait_idle(args.wait_idle)
        results.setdefault("waits", {})[label] = {"waited_s": time.monotonic() - t0, "others_cores": others}


def wait_idle(max_wait: float, threshold: float = 0.2, window: float = 5.0) -> float:
    """Wait (at most ``max_wait`` s) for a ``window`` in which other processes use < ``threshold`` cores."""
    start = time.monotonic()
    while True:
        mon = CpuMonitor()
        time.sleep(window)
        others = mon.others_cores()
        if others < threshold or time.monotonic() - start + window > max_wait:
            return others


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    note: str = ""
    minor_faults: list[int] = field(default_factory=list)  # per timed run (round_robin only)

    @property
    def min(self) -> float:
        return min(self.times) if self.times else math.nan

    @property
    def median(self) -> float:
        if not self.times:
            return math.nan
        s = sorted(self.times)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])

    @property
    def spread(self) -> float:
        return max(self.times) / min(self.times) if self.times else math.nan

    @property
    def faults(self) -> str:
        """Median minor page faults per run, e.g. ``"1,012k page faults"`` (empty if not counted)."""
        if not self.minor_faults:
            return ""
        return f"{sorted(self.minor_faults)[len(self.minor_faults) // 2] / 1000:,.0f}k page faults per run"

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_s": self.min,
            "median_s": self.median,
            "spread": self.spread,
            "times_s": self.times,
            "minor_page_faults": self.minor_faults,
        }


def round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Warm up every entry, then run the entries in rotating order ``repeats`` times."""
    outs: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            _, outs[name] = timed(fn, device)
    timings = {name: Timing() for name in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, outs[name] = timed(fns[name], device)
            timings[name].minor_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
            timings[name].times.append(t)
    return timings, outs


# ------------------------------------------------------------------------------ models and data
def make_vit_tiny(depth: int = 12) -> nn.Module:
    import timm

    torch.manual_seed(SEED)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=depth, num_classes=10
    ).eval()


def sublayer_names(model: nn.Module) -> list[str]:
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in ("attn", "mlp")]  # type: ignore[arg-type]


def make_batches(images: int, batch_size: int, size: int, device: torch.device) -> list[Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(images, 3, size, size, generator=gen)
    return [b.contiguous().to(device) for b in x.split(batch_size)]


def forward_only(models: Sequence[nn.Module], batches: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for b in batches:
            for m in models:
                m(b)


def modules_of(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    named = dict(model.named_modules())
    return [named[n] for n in names]


def capture_outputs(model: nn.Module, names: Sequence[str], batch: Tensor, fn: Callable[[Tensor], Tensor]) -> list:
    """Run ``model`` on ``batch`` and return ``fn(output)`` of each named module (own hooks)."""
    results: list[Any] = [None] * len(names)
    handles = []
    for i, mod in enumerate(modules_of(model, names)):

        def hook(module: nn.Module, args: Any, output: Any, i: int = i) -> None:
            out = output[0] if isinstance(output, tuple | list) else output
            if results[i] is None:
                results[i] = fn(out.detach())

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return results


# ------------------------------------------------------------------------- float64 reference
def _gram64(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1).double()
    return x @ x.T  # raw (uncentred) Gram, as in the literal formula


def song_hsic1(k: Tensor, l: Tensor) -> Tensor:
    """Literal unbiased HSIC_1 (Song et al. 2012, eq. 5) for every pair of ``(L, n, n)`` x ``(M, n, n)``."""
    n = k.shape[-1]
    kt = k.clone()
    lt = l.clone()
    kt.diagonal(dim1=-2, dim2=-1).zero_()
    lt.diagonal(dim1=-2, dim2=-1).zero_()
    out = torch.empty(k.shape[0], l.shape[0], dtype=torch.float64, device=k.device)
    sum_l = lt.sum(dim=(-2, -1))
    for i in range(k.shape[0]):
        kl = kt[i] @ lt  # (M, n, n): the full product K~ L~, as written in the formula
        trace = kl.diagonal(dim1=-2, dim2=-1).sum(-1)
        ones_kl_ones = kl.sum(dim=(-2, -1))
        out[i] = (trace + kt[i].sum() * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_kl_ones) / (n * (n - 3))
    return out


def reference_cka(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Tensor],
    other: nn.Module | None = None,
    other_names: Sequence[str] | None = None,
) -> Tensor:
    """Minibatch CKA in float64 (sum of per-batch HSIC_1, Nguyen et al. 2021), on the CPU."""
    s_xy = s_xx = s_yy = None
    for b in batches:
        k = torch.stack(capture_outputs(model, names, b, _gram64))
        l = k if other is None else torch.stack(capture_outputs(other, other_names or names, b, _gram64))
        xy = song_hsic1(k, l)
        if other is None:
            xx = yy = xy.diagonal().clone()
        else:
            xx = torch.cat([song_hsic1(k[i : i + 1], k[i : i + 1])[0] for i in range(k.shape[0])])
            yy = torch.cat([song_hsic1(l[j : j + 1], l[j : j + 1])[0] for j in range(l.shape[0])])
        if s_xy is None:
            s_xy, s_xx, s_yy = xy, xx, yy
        else:
            s_xy, s_xx, s_yy = s_xy + xy, s_xx + xx, s_yy + yy
    assert s_xy is not None and s_xx is not None and s_yy is not None
    return (s_xy / torch.sqrt(s_xx[:, None] * s_yy[None, :])).cpu()


def max_err(matrix: Tensor | None, ref: Tensor) -> float:
    if matrix is None:
        return math.nan
    m = torch.as_tensor(matrix).detach().double().cpu()
    if m.shape != ref.shape:
        return math.nan
    return float((m - ref).abs().max())


# --------------------------------------------------------------------------------- the library
def lib_compare(
    model: nn.Module, batches: Sequence[Tensor], layers: Any, precision: str, **kw: Any
) -> lightning_cka.CKAResult:
    return lightning_cka.compare(model, batches, layers=layers, progress=False, precision=precision, **kw)


def replay_cka(acts_per_batch: Sequence[Sequence[Tensor]], precision: torch.dtype | None) -> Tensor:
    """The library's CKA work alone (Grams + HSIC sums + compute) on already captured activations."""
    metric = MinibatchCKA(precision=precision).to(acts_per_batch[0][0].device)
    for acts in acts_per_batch:
        metric.update_grams(torch.stack(grams_as_captured(acts, precision)))
    return metric.compute()


def grams_as_captured(acts: Sequence[Tensor], precision: torch.dtype | None = None) -> list[Tensor]:
    """``gram`` of each activation as GramCapture forms them: on CPU one scratch buffer per batch."""
    ws = gram_workspace(max(acts, key=Tensor.numel), precision) if acts[0].device.type == "cpu" else None
    return [gram(a, precision, ws) for a in acts]


# --------------------------------------------------------------------------------------- peers
PEERS = ("cka-pytorch", "torch-cka", "ckatorch")
#: lightning_cka itself, timed through the same subprocess harness right before the peers
SELF_IN_HARNESS = "lightning-cka"


class _BatchList(torch.utils.data.Dataset):
    """Pre-made minibatches served by a ``DataLoader(batch_size=None)``, as ``(x,)`` or ``(x, y)``."""

    def __init__(self, batches: Sequence[Tensor], with_label: bool) -> None:
        self.batches = list(batches)
        self.with_label = with_label

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        x = self.batches[i]
        if self.with_label:
            return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return (x,)


def _loader(batches: Sequence[Tensor], with_label: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_BatchList(batches, with_label), batch_size=None, shuffle=False)


def peer_runner(name: str, model: nn.Module, layers: list[str], device: torch.device) -> Callable[[Sequence], Tensor]:
    """A closure running one peer's self-comparison of ``layers`` on a list of batches.

    All three peers take two models and run both on every batch; they get two deep copies of
    ``model`` (torch-cka and ckatorch never remove their hooks, so the caller's model stays clean).
    Each run builds the peer object anew (hook registration is part of their cost).
    """
    if name == SELF_IN_HARNESS:

        def run(batches: Sequence[Tensor]) -> Tensor:
            return lib_compare(copies[0], batches, "sublayers", "float32").matrix

    elif name == "cka-pytorch":
        from cka_pytorch import CKACalculator

        def run(batches: Sequence[Tensor]) -> Tensor:
            m1, m2 = copies
            calc = CKACalculator(m1, m2, model1_layers=list(layers), model2_layers=list(layers), verbose=False)
            try:
                # defaults kept except num_epochs (default 10 passes over the data)
                return calc.calculate_cka_matrix(_loader(batches, True), num_epochs=1)
            finally:
                calc.hook_manager1.clear_all()
                calc.hook_manager2.clear_all()

    elif name == "torch-cka":
        from torch_cka import CKA

        def run(batches: Sequence[Tensor]) -> Tensor:
            m1, m2 = (copy.deepcopy(m) for m in copies)  # its hooks cannot be removed
            cka = CKA(m1, m2, model1_layers=list(layers), model2_layers=list(layers), device=str(device))
            cka.compare(_loader(batches, False))
            return cka.export()["CKA"]

    elif name == "ckatorch":
        from ckatorch import CKA

        def run(batches: Sequence[Tensor]) -> Tensor:
            m1, m2 = (copy.deepcopy(m) for m in copies)  # its hooks cannot be removed
            cka = CKA(m1, m2, layers=list(layers), device=device)
            return cka(_loader(batches, False), epochs=1)  # default epochs=10

    else:
        raise ValueError(name)
    copies = (copy.deepcopy(model).eval(), copy.deepcopy(model).eval())

    def quiet(batches: Sequence[Tensor]) -> Tensor:
        # the peers print progress bars and warnings; no_grad for all (torch-cka lacks it)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            return run(batches)

    return quiet


def peer_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------- formatting
def fmt_s(t: float) -> str:
    if not math.isfinite(t):
        return "n/a"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def fmt_e(e: float | None) -> str:
    if e is None:
        return "-"
    if not math.isfinite(e):
        return "nan"
    return f"{e:.1e}"


def fmt_x(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "n/a"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": peer_version("timm"),
        "lightning_cka": getattr(lightning_cka, "__version__", "?"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["lscpu_head"] = "\n".join(lscpu.splitlines()[:10])
        model = re.search(r"Model name:\s*(.+)", lscpu)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
        info["bf16_cpu"] = "avx512_bf16" in lscpu or "amx_bf16" in lscpu
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "lightning_cka"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            suffix = " + uncommitted library changes" if dirty.stdout.strip() else ""
            info["git_commit"] = head.stdout.strip() + suffix
    with contextlib.suppress(OSError):
        info["load_avg_at_start"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def check(name: str, value: float) -> tuple[str, str, str]:
    op, limit = TARGETS[name]
    if not math.isfinite(value):
        verdict = "n/a"
    elif (name.startswith("CKA part") and value <= 0) or (name.startswith("compare/forward") and value < 1):
        verdict = "n/a (noise: compare ran faster than forward)"
    else:
        ok = value <= limit if op == "<=" else value >= limit
        verdict = "PASS" if ok else "FAIL"
    shown = f"{value:.1e}" if limit < 0.01 else fmt_x(value)
    return shown, f"{op} {limit:g}", verdict


# ------------------------------------------------------------------------------ main workload
def run_main(args: argparse.Namespace, device: torch.device, results: dict[str, Any], deadline: float) -> str:
    model = make_vit_tiny().to(device)
    layers = sublayer_names(model)
    batches = make_batches(args.images, args.batch_size, 32, device)
    n_batches = len(batches)
    wl = f"{len(layers)} sublayers, {args.images} images, batch {args.batch_size}, {device.type}"
    print(f"# workload: vit_tiny img 32 patch 4, {wl}", flush=True)

    # 1-2. forward vs compare, round-robin
    fns = {
        "forward": lambda: forward_only([model], batches),
        "compare fp32": lambda: lib_compare(model, batches, "sublayers", "float32").matrix,
        "compare bf16": lambda: lib_compare(model, batches, "sublayers", "bfloat16").matrix,
    }
    settle(args, results, "forward/compare")
    mon = CpuMonitor()
    timings, outs = round_robin(fns, args.repeats, device)
    results["machine"]["others_cores_during_main_timing"] = mon.others_cores()
    fwd, c32, c16 = timings["forward"], timings["compare fp32"], timings["compare bf16"]
    print(f"  forward {fmt_s(fwd.min)} s, compare fp32 {fmt_s(c32.min)} s, bf16 {fmt_s(c16.min)} s", flush=True)

    # 3. bare Gram products on the captured activations, and the library's CKA work replayed on them
    acts = [capture_outputs(model, layers, b, lambda t: t) for b in batches]
    centred = [a.reshape(a.shape[0], -1) - a.reshape(a.shape[0], -1).mean(0, keepdim=True) for bs in acts for a in bs]
    centred16 = [c.bfloat16() for c in centred]
    p = centred[0].shape[1]

    def products(xs: list[Tensor]) -> None:
        for c in xs:
            c @ c.T

    settle(args, results, "gram/replay")
    mon = CpuMonitor()
    group = {
        "gram fp32": lambda: products(centred),
        "gram bf16": lambda: products(centred16),
        "replay fp32": lambda: replay_cka(acts, None),
        "replay bf16": lambda: replay_cka(acts, torch.bfloat16),
    }
    try:
        gram_t, _ = round_robin(group, max(args.repeats, 3), device)
    except Exception as exc:  # keep the bare products if the replay fails
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:150]
        print(f"  CKA-work replay failed ({msg}); timing the Gram products alone", file=sys.stderr, flush=True)
        traceback.print_exc()
        results["replay_error"] = msg
        gram_t, _ = round_robin({k: group[k] for k in ("gram fp32", "gram bf16")}, max(args.repeats, 3), device)
        gram_t["replay fp32"] = Timing(note=msg)
        gram_t["replay bf16"] = Timing(note=msg)
    centred.clear()  # free ~0.9 GB before the reference and the peers
    centred16.clear()
    acts.clear()
    results["machine"]["others_cores_during_gram_timing"] = mon.others_cores()
    g32, g16 = gram_t["gram fp32"], gram_t["gram bf16"]
    print(f"  {len(layers) * n_batches} Gram products fp32 {fmt_s(g32.min)} s, bf16 {fmt_s(g16.min)} s", flush=True)

    # 5. float64 reference
    t_ref, ref = timed(lambda: reference_cka(model, layers, batches), device)
    err32 = max_err(outs["compare fp32"], ref)
    err16 = max_err(outs["compare bf16"], ref)
    print(f"  fp64 reference {fmt_s(t_ref)} s; max err fp32 {fmt_e(err32)}, bf16 {fmt_e(err16)}", flush=True)

    # 6. peers
    peers: dict[str, dict[str, Any]] = {}
    if args.peers:
        for name in (SELF_IN_HARNESS, *PEERS):
            settle(args, results, name)
            peers[name] = run_peer(name, model, ref, device, args, deadline)
            shown = {k: v for k, v in peers[name].items() if k not in ("times_s", "traceback")}
            print(f"  {name}: {shown}", flush=True)

    # 8. memory
    memory: dict[str, Any] = {}
    if args.memory:
        settle(args, results, "memory")
        memory = run_memory(args, device, deadline)
        print(f"  memory: {memory}", flush=True)

    # 4. derived numbers
    part32 = c32.min - fwd.min
    part16 = c16.min - fwd.min
    paired32 = Timing([c - f for c, f in zip(c32.times, fwd.times, strict=True)])
    paired16 = Timing([c - f for c, f in zip(c16.times, fwd.times, strict=True)])
    flops = 2 * args.batch_size**2 * p * len(layers) * n_batches
    cp = peers.get("cka-pytorch", {}).get("time_s", math.nan)
    # the ratio uses lightning_cka timed in the same harness, next to the peers in time
    own = peers.get(SELF_IN_HARNESS, {}).get("time_s", c32.min)
    derived = {
        "compare/forward fp32": c32.min / fwd.min,
        "compare/forward bf16": c16.min / fwd.min,
        "CKA part fp32 / Gram fp32": part32 / g32.min,
        "CKA part bf16 / Gram fp32": part16 / g32.min,
        "max err fp32": err32,
        "max err bf16": err16,
        "cka-pytorch time / lightning_cka fp32 time": cp / own,
    }
    # the same from medians of same-round pairs: less sensitive to one lucky or unlucky run
    cpm = peers.get("cka-pytorch", {}).get("median_s", math.nan)
    ownm = peers.get(SELF_IN_HARNESS, {}).get("median_s", c32.median)
    derived_median = {
        "compare/forward fp32": Timing([c / f for c, f in zip(c32.times, fwd.times, strict=True)]).median,
        "compare/forward bf16": Timing([c / f for c, f in zip(c16.times, fwd.times, strict=True)]).median,
        "CKA part fp32 / Gram fp32": paired32.median / g32.median,
        "CKA part bf16 / Gram fp32": paired16.median / g32.median,
        "cka-pytorch time / lightning_cka fp32 time": cpm / ownm,
    }
    results["main"] = {
        "workload": wl,
        "timings": {k: v.as_dict() for k, v in {**timings, **gram_t}.items()},
        "cka_part_s": {"fp32": part32, "bf16": part16},
        "cka_part_paired_median_s": {"fp32": paired32.median, "bf16": paired16.median},
        "gram_gflops": {"fp32": flops / g32.min / 1e9, "bf16": flops / g16.min / 1e9},
        "reference_s": t_ref,
        "max_err": {"fp32": err32, "bf16": err16},
        "peers": peers,
        "memory": memory,
        "derived": derived,
        "derived_paired_median": derived_median,
        "targets": {k: check(k, v) for k, v in derived.items()},
        "targets_paired_median": {k: check(k, v) for k, v in derived_median.items()},
    }

    # table
    rows = [
        [
            "plain forward",
            fmt_s(fwd.min),
            fmt_s(fwd.median),
            fmt_x(fwd.spread),
            "-",
            f"1 model, 2 batches; {fwd.faults}",
        ],
        [
            "lightning_cka `compare` fp32",
            fmt_s(c32.min),
            fmt_s(c32.median),
            fmt_x(c32.spread),
            fmt_e(err32),
            c32.faults,
        ],
        [
            "lightning_cka `compare` bf16",
            fmt_s(c16.min),
            fmt_s(c16.median),
            fmt_x(c16.spread),
            fmt_e(err16),
            c16.faults,
        ],
        [
            "CKA part fp32 (compare - forward)",
            fmt_s(part32),
            fmt_s(paired32.median),
            "-",
            "-",
            "median column: median of same-round differences",
        ],
        ["CKA part bf16 (compare - forward)", fmt_s(part16), fmt_s(paired16.median), "-", "-", ""],
    ]
    for key, label in (("replay fp32", "fp32"), ("replay bf16", "bf16")):
        t = gram_t[key]
        rows.append(
            [
                f"CKA work alone {label} (replayed on captured activations)",
                fmt_s(t.min),
                fmt_s(t.median),
                fmt_x(t.spread),
                "-",
                "`gram` + `MinibatchCKA.update_grams` + `compute`, no forward",
            ]
        )
    for t, label in ((g32, "fp32"), (g16, "bf16")):
        gf = flops / t.min / 1e9
        rows.append(
            [
                f"{len(layers) * n_batches} bare Gram products {label}",
                fmt_s(t.min),
                fmt_s(t.median),
                fmt_x(t.spread),
                "-",
                f"({args.batch_size}, {p}) centred; {gf:.0f} GFLOP/s",
            ]
        )
    for name, r in peers.items():
        if "error" in r:
            rows.append([f"{name} {r.get('version') or ''}".strip(), f"n/a ({r['error']})", "", "", "", ""])
        else:
            rows.append(
                [
                    "lightning_cka `compare` fp32, peers' harness"
                    if name == SELF_IN_HARNESS
                    else f"{name} {r['version']}",
                    fmt_s(r["time_s"]),
                    fmt_s(r["median_s"]),
                    fmt_x(r["spread"]),
                    fmt_e(r["max_err"]),
                    r["note"],
                ]
            )
    rows.append(["float64 reference (this script)", fmt_s(t_ref), "-", "-", "0", "literal Song formula, 1 run"])
    table = md_table(["measurement", "min (s)", "median (s)", "max/min", "max abs err vs fp64", "notes"], rows)
    trows = []
    for k, v in derived.items():
        shown, goal, verdict = check(k, v)
        if k in derived_median:
            m_shown, _, m_verdict = check(k, derived_median[k])
        else:
            m_shown, m_verdict = "-", "-"
        trows.append([k, goal, shown, verdict, m_shown, m_verdict])
    targets = md_table(
        ["target", "goal", "from minima", "verdict", "from same-round medians", "verdict (medians)"], trows
    )
    out = [table, "", targets]
    corrected = fault_corrected(
        {k: (timings[k].times, timings[k].minor_faults) for k in ("forward", "compare fp32", "compare bf16")}
    )
    if corrected is not None:
        results["main"]["fault_corrected"] = corrected
        out += ["", fault_corrected_table(corrected)]
    if memory:
        out += ["", memory_table(memory)]
    return "\n".join(out)


def fault_corrected(runs: dict[str, tuple[Sequence[float], Sequence[int]]]) -> dict[str, Any] | None:
    """Times at zero page faults: least squares of every run's time on its minor-fault count,
    one intercept per entry and one shared slope (seconds per fault).

    ``runs`` maps an entry to its run times and fault counts; the first entry is the baseline
    of the ratios. On glibc, tensors above the malloc mmap threshold are returned to the OS when
    freed and page-faulted in again when reallocated; how many of a run's allocations do that
    varies from run to run, and it is the largest source of noise in forward-pass timings on CPU.
    """
    names = list(runs)
    rows, ys = [], []
    for i, name in enumerate(names):
        times, faults = runs[name]
        for t, f in zip(times, faults, strict=True):
            rows.append([float(j == i) for j in range(len(names))] + [f / 1e6])
            ys.append(t)
    a, y = np.array(rows), np.array(ys)
    faults = a[:, -1]
    if len(ys) <= len(names) + 1 or faults.max() < 0.01 or np.ptp(faults) < 0.1 * faults.max():
        return None  # too few runs, or too few faults (< 10k) or too little variation to fit a slope
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    intercepts = dict(zip(names, coef[:-1].tolist(), strict=True))
    return {
        "seconds": intercepts,
        "seconds_per_million_faults": float(coef[-1]),
        "residual_std_s": float(np.std(y - a @ coef)),
        "ratio": {k: intercepts[k] / intercepts[names[0]] for k in names[1:]},
    }


def fault_corrected_table(c: dict[str, Any]) -> str:
    s, r = c["seconds"], c["ratio"]
    rows = [
        [
            fmt_s(s["forward"]),
            fmt_s(s["compare fp32"]),
            fmt_s(s["compare bf16"]),
            f"{r['compare fp32']:.2f} ({check('compare/forward fp32', r['compare fp32'])[2]})",
            f"{r['compare bf16']:.2f} ({check('compare/forward bf16', r['compare bf16'])[2]})",
            f"{c['seconds_per_million_faults']:.2f}",
            fmt_s(c["residual_std_s"]),
        ]
    ]
    head = [
        "forward at 0 faults (s)",
        "compare fp32 (s)",
        "compare bf16 (s)",
        "compare/forward fp32",
        "compare/forward bf16",
        "s per 1M page faults",
        "residual std (s)",
    ]
    return "Page-fault-corrected times (every run's time regressed on its minor page faults):\n\n" + md_table(
        head, rows
    )


def _param_checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def peer_worker(args: argparse.Namespace) -> None:
    """Hidden entry point: one peer on the main workload in a fresh process, JSON on the last stdout line."""
    device = torch.device(args.device)
    model = make_vit_tiny().to(device)
    layers = sublayer_names(model)
    batches = make_batches(args.images, args.batch_size, 32, device)
    run = peer_runner(args.peer_worker, model, layers, device)
    if not args.quick:
        run([b[:16] for b in batches[:1]])  # warm-up on a small input
    times: list[float] = []
    out = None
    for _ in range(args.peer_repeats):
        t, out = timed(lambda: run(batches), device)
        times.append(t)
        if t > args.slow_peer_s:
            break  # a single run of a slow peer: the noise is small relative to its time
    matrix = torch.as_tensor(out).detach().double().cpu().tolist()
    print(json.dumps({"times_s": times, "matrix": matrix, "checksum": _param_checksum(model)}))


def run_peer(
    name: str, model: nn.Module, ref: Tensor, device: torch.device, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    """Time one peer in a subprocess (a timeout cannot hang the run; a crash cannot take it down)."""
    version = peer_version(name.replace("lightning-cka", "lightning_cka"))
    if version is None:
        return {"version": None, "error": f"not installed; pip install -c constraints.txt {name}"}
    timeout = min(args.peer_timeout, deadline - time.monotonic())
    if timeout < 5:
        return {"version": version, "error": "skipped: --max-seconds budget spent"}
    cmd = [
        *_self_cmd(args, device),
        "--peer-worker",
        name,
        "--peer-repeats",
        str(args.peer_repeats),
        "--slow-peer-s",
        str(args.slow_peer_s),
    ]
    mon = CpuMonitor()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"version": version, "error": f"timed out after {timeout:.0f} s", "others_cores": mon.others_cores()}
    others = mon.others_cores()
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"version": version, "error": (lines[-1] if lines else f"exit {proc.returncode}")[:150]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    timing = Timing(res["times_s"])
    notes = {
        SELF_IN_HARNESS: "fresh subprocess, timed right before the peers; used for the ratio",
        "cka-pytorch": "runs 2 model copies; fp32 Grams, no centring; eps=1e-4 inside sqrt",
        "torch-cka": "runs 2 model copies; Python double loop, 3 host syncs per HSIC",
        "ckatorch": "runs 2 model copies; token x token Grams per example; only last batch counts",
    }
    note = notes[name]
    if len(timing.times) < args.peer_repeats:
        note += f"; {len(timing.times)} timed run"
    if device.type == "cpu":
        note += f"; other jobs busy on {others:.1f} cores meanwhile"
    if abs(res["checksum"] - _param_checksum(model)) > 1e-6 * max(1.0, abs(res["checksum"])):
        note += "; WARNING: subprocess built different weights"
    return {
        "version": version,
        "time_s": timing.min,
        "median_s": timing.median,
        "spread": timing.spread,
        "times_s": timing.times,
        "max_err": max_err(torch.tensor(res["matrix"], dtype=torch.float64), ref),
        "note": note,
        "others_cores": others,
    }


def _self_cmd(args: argparse.Namespace, device: torch.device) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device.type]
    if args.quick:
        cmd.append("--quick")
    cmd += ["--images", str(args.images), "--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


# -------------------------------------------------------------------------------------- memory
def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux). ``ru_maxrss`` is not used: Linux carries it
    over ``fork`` + ``exec``, so a child would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if math.isfinite(peak) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(args: argparse.Namespace) -> None:
    """Hidden entry point: one measured run in a fresh process, JSON on the last stdout line."""
    device = torch.device(args.device)
    model = make_vit_tiny().to(device)
    batches = make_batches(args.images, args.batch_size, 32, device)
    sync(device)
    setup = _status_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    mode = args.memory_worker
    if mode == "forward":
        forward_only([model], batches)
    else:
        lib_compare(model, batches, "sublayers", "bfloat16" if mode == "compare-bf16" else "float32")
    sync(device)
    res = {"setup_rss_mb": setup, "peak_rss_mb": _peak_rss_mb()}
    if device.type == "cuda":
        res["cuda_base_mb"] = base_cuda / 2**20
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(res))


def run_memory(args: argparse.Namespace, device: torch.device, deadline: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("forward", "compare-fp32", "compare-bf16"):
        cmd = [*_self_cmd(args, device), "--memory-worker", mode]
        try:
            timeout = min(300.0, deadline - time.monotonic())
            if timeout < 10:
                out[mode] = {"error": "skipped: --max-seconds budget spent"}
                continue
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        except Exception as exc:
            out[mode] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return out


def memory_table(mem: dict[str, Any]) -> str:
    rows = []
    base = mem.get("forward", {})
    for mode, r in mem.items():
        if "error" in r:
            rows.append([mode, f"n/a ({r['error']})", "", "", ""])
            continue
        run_rss = r["peak_rss_mb"] - r["setup_rss_mb"]
        extra = "-"
        if mode != "forward" and "peak_rss_mb" in base:
            extra = f"{r['peak_rss_mb'] - base['peak_rss_mb']:+.0f}"
        cuda = f"{r['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in r else "-"
        rows.append([mode, f"{r['peak_rss_mb']:.0f}", f"{run_rss:.0f}", extra, cuda])
    return md_table(
        [
            "process (fresh, same data)",
            "peak RSS (MB)",
            "peak - RSS after setup (MB)",
            "peak vs forward (MB)",
            "CUDA max allocated (MB)",
        ],
        rows,
    )


# ------------------------------------------------------------------------------------- scaling
def run_scaling(args: argparse.Namespace, device: torch.device, results: dict[str, Any]) -> str:
    """CKA part vs number of layers and minibatch size, next to c * (L n^2 p + L^2 n^2)."""
    quick = args.quick
    reps = 2 if quick else max(3, min(args.repeats, 3))
    depths = (2, 4) if quick else (6, 12, 24)
    sizes = (16, 32, 64) if quick else (64, 128, 256, 512, 1024)
    base_images = 64 if quick else 512
    size_images = 128 if quick else 1024
    configs = [("layers", d, args.batch_size if not quick else 32, base_images) for d in depths]
    configs += [("batch", 12 if not quick else 2, n, size_images) for n in sizes]
    points = []
    for sweep, depth, n, images in configs:
        model = make_vit_tiny(depth).to(device)
        batches = make_batches(images, n, 32, device)
        tries = 3 if args.wait_idle > 0 and device.type == "cpu" else 1
        for attempt in range(tries):  # with --wait-idle: redo a point that another job disturbed
            settle(args, results, f"scaling {sweep} L={2 * depth} n={n}")
            point = scaling_point(model, batches, reps, device)
            point.update(sweep=sweep, depth=depth, images=images, attempts=attempt + 1)
            if point["others_cores"] < 0.25:
                break
        points.append(point)
        print(
            f"  scaling {sweep}: L={point['L']} n={n}: forward {fmt_s(point['forward_s'])} s, CKA part "
            f"{fmt_s(point['cka_part_s'])} s, CKA work {fmt_s(point['cka_work_s'])} s",
            flush=True,
        )
    # one constant c fitted to the CKA work: median of measured/units (robust to a disturbed point)
    units = [pt["model_units"] for pt in points]
    c = Timing([pt["cka_work_s"] / u for pt, u in zip(points, units, strict=True)]).median
    for pt in points:
        pt["predicted_s"] = c * pt["model_units"]
    results["scaling"] = {"c_seconds_per_unit": c, "points": points, "gflops_equiv": 2 / c / 1e9}
    rows = []
    for pt in points:
        rows.append(
            [
                pt["sweep"],
                str(pt["L"]),
                str(pt["n"]),
                f"{pt['images']} / {pt['batches']}",
                fmt_s(pt["forward_s"]),
                fmt_s(pt["cka_part_s"]),
                fmt_s(pt["cka_work_s"]),
                fmt_s(pt["predicted_s"]),
                fmt_x(pt["cka_work_s"] / pt["predicted_s"]),
                f"{pt.get('others_cores', math.nan):.2f}",
            ]
        )
    table = md_table(
        [
            "sweep",
            "L",
            "n",
            "images / batches",
            "forward (s)",
            "CKA part = compare - forward (s)",
            "CKA work alone (s)",
            "model c(L n²p + L²n²) (s)",
            "work / model",
            "other jobs (cores)",
        ],
        rows,
    )
    note = (
        f"Fitted c = {c:.3e} s per unit (one constant for both terms: the median of CKA work / units; "
        f"= {2 / c / 1e9:.0f} GFLOP/s if every unit were one multiply-add)."
    )
    if args.plot:
        try:
            plot_scaling(points, Path(args.plot))
            shown = Path(args.plot).resolve()
            note += f" Plot: `{shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown}`."
        except Exception as exc:
            note += f" (plot failed: {exc})"
    return table + "\n\n" + note


def scaling_point(model: nn.Module, batches: list[Tensor], reps: int, device: torch.device) -> dict[str, Any]:
    """Forward vs compare (round-robin) and the library's CKA work alone, for one configuration."""
    layers = sublayer_names(model)
    mon = CpuMonitor()
    timings, _ = round_robin(
        {
            "forward": lambda: forward_only([model], batches),
            "compare": lambda: lib_compare(model, batches, "sublayers", "float32"),
        },
        reps,
        device,
    )
    # library CKA work alone, batch by batch (activations of one batch held at a time)
    work = Timing()
    for _ in range(reps):
        total = 0.0
        metric = MinibatchCKA().to(device)
        for b in batches:
            acts = capture_outputs(model, layers, b, lambda t: t)
            t, _ = timed(lambda a=acts, m=metric: m.update_grams(torch.stack(grams_as_captured(a))), device)
            total += t
        t, _ = timed(metric.compute, device)
        work.times.append(total + t)
    p = 65 * 192  # tokens x channels of every sublayer output (img 32, patch 4)
    L, n, nb = len(layers), batches[0].shape[0], len(batches)
    return {
        "L": L,
        "n": n,
        "batches": nb,
        "forward_s": timings["forward"].min,
        "compare_s": timings["compare"].min,
        "cka_part_s": timings["compare"].min - timings["forward"].min,
        "cka_work_s": work.min,
        "model_units": nb * (L * n * n * p + L * L * n * n),
        "others_cores": mon.others_cores(),
    }


def plot_scaling(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "layers", "L", "layers L (n fixed)"), (axes[1], "batch", "n", "minibatch n"))
    for ax, sweep, key, label in panels:
        pts = [p for p in points if p["sweep"] == sweep]
        if not pts:
            continue
        xs = [p[key] for p in pts]
        per = [p["batches"] for p in pts] if sweep == "batch" else [1] * len(pts)
        ax.plot(xs, [p["cka_work_s"] / b for p, b in zip(pts, per, strict=True)], "o-", label="CKA work alone")
        ax.plot(
            xs,
            [max(p["cka_part_s"], 1e-4) / b for p, b in zip(pts, per, strict=True)],
            "s--",
            label="compare - forward",
        )
        ax.plot(xs, [p["predicted_s"] / b for p, b in zip(pts, per, strict=True)], "k:", label="c(Ln²p + L²n²)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per minibatch" if sweep == "batch" else f"seconds ({pts[0]['images']} images)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("CKA time vs number of layers")
    axes[1].set_title("CKA time per minibatch vs minibatch size (L=24)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- GPU suite
def run_gpu_suite(args: argparse.Namespace, device: torch.device, results: dict[str, Any], deadline: float) -> str:
    """ViT-B/16 at 224 and ResNet-50 at batch 256: self and cross heatmaps over block outputs."""
    try:
        return _gpu_suite(args, device, results, deadline)
    finally:  # the models and data are gone with the frame; give the memory back for what follows
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _gpu_suite(args: argparse.Namespace, device: torch.device, results: dict[str, Any], deadline: float) -> str:
    import timm

    quick = args.quick
    images = 2 * args.gpu_batch_size if not quick else 8
    bs = args.gpu_batch_size if not quick else 4
    size = 224 if not quick else 64
    torch.manual_seed(SEED)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size).eval().to(device)
    torch.manual_seed(SEED)
    resnet = timm.create_model("resnet50", pretrained=False).eval().to(device)
    batches = make_batches(images, bs, size, device)
    cases = {
        "ViT-B/16 self (blocks)": ([vit], dict(model=vit, layers="auto")),
        "ResNet-50 self (blocks)": ([resnet], dict(model=resnet, layers="auto")),
        "ViT-B/16 x ResNet-50 (blocks)": ([vit, resnet], dict(model=vit, layers="auto", other=resnet)),
    }
    rows = []
    out_dir = Path(args.json_out).parent if args.json_out else None
    suite: dict[str, Any] = {"images": images, "batch_size": bs, "img_size": size, "cases": {}}
    results["gpu_suite"] = suite
    for label, (models, kw) in cases.items():
        if time.monotonic() > deadline:
            rows.append([label, "n/a (skipped: --max-seconds budget spent)", "", "", "", "", ""])
            continue
        try:
            fns = {
                "forward": lambda ms=models: forward_only(ms, batches),
                "fp32": lambda kw=kw: lightning_cka.compare(dataloader=batches, progress=False, **kw),
                "bf16": lambda kw=kw: lightning_cka.compare(
                    dataloader=batches, progress=False, precision="bfloat16", **kw
                ),
            }
            timings, outs = round_robin(fns, max(args.repeats, 3) if not quick else 2, device)
            res32 = outs["fp32"]
            peak = {}
            for key in ("forward", "fp32"):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timed(fns[key], device)
                peak[key] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
            ref = reference_cka(
                kw["model"],
                res32.rows,
                batches,
                kw.get("other"),
                res32.cols if kw.get("other") is not None else None,
            )
            e32, e16 = max_err(res32.matrix, ref), max_err(outs["bf16"].matrix, ref)
            f, c32, c16 = timings["forward"].min, timings["fp32"].min, timings["bf16"].min
            suite["cases"][label] = {
                "shape": list(res32.matrix.shape),
                "timings": {k: v.as_dict() for k, v in timings.items()},
                "max_err": {"fp32": e32, "bf16": e16},
                "cuda_peak_mb": peak,
            }
            if out_dir is not None:
                with contextlib.suppress(Exception):
                    import matplotlib

                    matplotlib.use("Agg")
                    import matplotlib.pyplot as plt

                    fig, _ = res32.plot(title=label)
                    slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()
                    fig.savefig(out_dir / f"heatmap_{slug}.png", dpi=90)
                    plt.close(fig)
            rows.append(
                [
                    f"{label} {tuple(res32.matrix.shape)}",
                    fmt_s(f),
                    f"{fmt_s(c32)} ({fmt_x(c32 / f)}x)",
                    f"{fmt_s(c16)} ({fmt_x(c16 / f)}x)",
                    f"{fmt_e(e32)} / {fmt_e(e16)}",
                    f"{peak['forward']:.0f} / {peak['fp32']:.0f}",
                ]
            )
            print(f"  gpu suite {label}: {rows[-1][1:]}", flush=True)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:150]
            suite["cases"][label] = {"error": msg, "traceback": traceback.format_exc(limit=4)}
            rows.append([label, f"n/a ({msg})", "", "", "", ""])
            print(f"  gpu suite {label}: FAILED {msg}", flush=True)
    header = [
        f"case ({images} images, batch {bs}, {size}x{size})",
        "forward (s)",
        "forward+CKA fp32 (s)",
        "forward+CKA bf16 (s)",
        "max err fp32 / bf16",
        "CUDA peak MB fwd / fp32",
    ]
    return md_table(header, rows)


# ------------------------------------------------------------------------------------- docs
def update_docs(key: str, body: str) -> None:
    begin, end = f"<!-- BENCH:{key}:BEGIN -->", f"<!-- BENCH:{key}:END -->"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
    print(f"updated {DOCS} [{key}]", file=sys.stderr)


def header_block(info: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    dev = info.get("gpu") or f"{info.get('cpu')} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads)"
    load = info.get("load_avg_at_start")
    parts = [
        f"Measured {time.strftime('%Y-%m-%d')} on {dev}; torch {info['torch']}, timm {info['timm']}, "
        f"Python {info['python']}; lightning_cka at commit {info.get('git_commit', '?')}; "
        f"`{' '.join(['python', 'benchmarks/bench_cka.py', *sys.argv[1:]])}` "
        f"({elapsed:.0f} s in all). Repeats: {args.repeats} after one warm-up, min reported.",
    ]
    allocator_env = {k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")}
    if allocator_env:
        parts.append("Allocator settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(allocator_env.items())) + ".")
    if load:
        end = info.get("load_avg_at_end", (math.nan,))[0]
        parts.append(
            f"1-minute load average at start / end: {load[0]:.1f} / {end:.1f} "
            f"({info['cpu_count']} CPUs; above that, other jobs were competing for the cores)."
        )
    if "others_cores_during_run" in info:
        main_t = info.get("others_cores_during_main_timing")
        during = f" ({main_t:.2f} during the forward/compare timings)" if main_t is not None else ""
        parts.append(
            f"Other processes kept {info['others_cores_during_run']:.2f} of the {info['cpu_count']} cores busy "
            f"on average during the run{during}."
        )
    if "lscpu_head" in info and args.device == "cpu":
        parts.append("\n```text\n" + info["lscpu_head"] + "\n```")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (32 images, batch 16), seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per entry (default 7; 2 with --quick)")
    parser.add_argument("--images", type=int, default=None, help="number of random images (default 512)")
    parser.add_argument("--batch-size", type=int, default=None, help="minibatch size (default 256)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip torch-cka/cka-pytorch/ckatorch")
    parser.add_argument("--memory", dest="memory", action="store_true", default=None, help="measure peak memory")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    parser.add_argument(
        "--slow-peer-s",
        type=float,
        default=10.0,
        help="a peer whose timed run takes longer than this is timed once (default 10 s)",
    )
    parser.add_argument("--scaling", action="store_true", help="also run the (slow) layers / batch-size sweep")
    parser.add_argument("--plot", default=str(PLOT), help="PNG of the scaling sweep ('' to skip)")
    parser.add_argument("--gpu-suite", action="store_true", help="ViT-B/16 and ResNet-50 at batch 256 (for CUDA)")
    parser.add_argument("--gpu-batch-size", type=int, default=256, help="minibatch of the GPU suite (default 256)")
    parser.add_argument("--max-seconds", type=float, default=None, help="skip remaining optional parts after this")
    parser.add_argument("--json-out", default=None, help="write all results as JSON here")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md between its markers")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each timed group, wait up to S seconds for 5 s in which other processes use < 0.2 cores",
    )
    parser.add_argument("--skip-main", action="store_true", help="skip the main table (e.g. only --scaling)")
    parser.add_argument(
        "--peer-repeats", type=int, default=None, help="timed runs per peer (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--peer-timeout", type=float, default=None, help="seconds allowed per peer (default 240; 60 with --quick)"
    )
    parser.add_argument(
        "--from-json", default=None, metavar="PATH", help="print (and with --write-docs, write) a saved --json-out"
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.peer_repeats is None:
        args.peer_repeats = 1 if args.quick else 3
    if args.images is None:
        args.images = 32 if args.quick else 512
    if args.batch_size is None:
        args.batch_size = 16 if args.quick else 256
    if args.memory is None:
        args.memory = not args.quick
    if args.peer_timeout is None:
        args.peer_timeout = 60.0 if args.quick else 240.0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.write_docs and args.quick:
        parser.error("--write-docs is refused with --quick (it would overwrite real numbers)")
    if args.max_seconds is None and args.gpu_suite:
        args.max_seconds = 240.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return 0
    if args.peer_worker:
        peer_worker(args)
        return 0
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        md = dict(saved["markdown"])
        head = md.pop("header")
        print(head)
        for name, body in md.items():
            print(f"\n### {name}\n\n{body}")
        if args.write_docs:
            write_docs(saved["args"]["device"], head, md)
            if "scaling" in saved and args.plot:
                plot_scaling(saved["scaling"]["points"], Path(args.plot))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine.", file=sys.stderr)
        return 2
    info = machine_description(device)
    if args.wait_idle > 0:
        others = wait_idle(args.wait_idle)
        info["others_cores_before_start"] = others
        print(f"# waited for a quiet machine: other processes use {others:.2f} cores", file=sys.stderr)
    start = time.monotonic()
    monitor = CpuMonitor()
    deadline = start + (args.max_seconds or math.inf)
    results: dict[str, Any] = {"machine": info, "args": vars(args)}

    def dump() -> None:
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))

    sections: dict[str, str] = {}
    parts: list[tuple[str, Callable[[], str]]] = []
    if args.gpu_suite:  # first: on a lent GPU it is the part that matters most
        parts.append(("gpu_suite", lambda: run_gpu_suite(args, device, results, deadline)))
    if not args.skip_main:
        parts.append(("main", lambda: run_main(args, device, results, deadline)))
    if args.scaling:
        parts.append(("scaling", lambda: run_scaling(args, device, results)))
    for name, part in parts:
        try:
            sections[name] = part()
        except Exception as exc:  # report and go on with the other parts
            traceback.print_exc()
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            sections[name] = f"n/a ({msg})"
            results[f"{name}_error"] = traceback.format_exc()
        dump()
    elapsed = time.monotonic() - start
    results["elapsed_s"] = elapsed
    info["others_cores_during_run"] = monitor.others_cores()
    with contextlib.suppress(OSError):
        info["load_avg_at_end"] = os.getloadavg()
    dump()
    head = header_block(info, args, elapsed)
    results["markdown"] = {"header": head, **sections}
    dump()
    print()
    print(head)
    for name, body in sections.items():
        print(f"\n### {name}\n\n{body}")
    if args.write_docs:
        write_docs(device.type, head, sections)
    return 0


def write_docs(device_type: str, head: str, sections: dict[str, str]) -> None:
    """Replace the ``MAIN-<DEVICE>`` / ``SCALING-<DEVICE>`` blocks of docs/benchmarks.md."""
    tag = device_type.upper()
    if "main" in sections or "gpu_suite" in sections:
        body = head
        if "main" in sections:
            body += "\n\n" + sections["main"]
        if "gpu_suite" in sections:
            body += "\n\nViT-B/16 and ResNet-50 (block outputs, `layers='auto'`):\n\n" + sections["gpu_suite"]
        update_docs(f"MAIN-{tag}", body)
    if "scaling" in sections:
        update_docs(f"SCALING-{tag}", head + "\n\n" + sections["scaling"])


if __name__ == "__main__":
    sys.exit(main())
