"""Shared parts of the benchmark scripts: the workload, timing, the float64 reference, memory, output.

The benchmark workload: self-CKA over the 24 sublayers (``blocks.i.attn``, ``blocks.i.mlp``) of a
randomly initialised timm ``vit_tiny_patch16_224`` built with ``img_size=32, patch_size=4`` (65 tokens
x 192 channels = 12 480 features per layer), 512 random images in minibatches of 256, eval mode,
CPU.

Timing: every entry of a group gets a warm-up run, then the group runs ``repeats`` rounds in
rotating order (round r starts at entry r mod k), so slow drift of a shared machine hits all
entries alike. Ratios between entries are taken per round and the median over rounds is
reported ("same-round median"); every timed run also records its minor page faults.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (REPO, BENCH):  # run from a checkout without installing
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

DOCS = REPO / "docs" / "benchmarks.md"
RESULTS = BENCH / "results"
SEED = 0

#: The workload's defaults (see the module docstring).
IMG_SIZE, PATCH_SIZE, IMAGES, BATCH_SIZE, NUM_CLASSES = 32, 4, 512, 256, 10

#: glibc settings that keep freed memory in the process (no ``munmap`` / trim, hence no page
#: faults when PyTorch reallocates a large tensor). glibc reads them at process start, so they
#: are applied by running a measurement in a subprocess with this in its environment.
KEEP_FREED_MEMORY = "glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=4294967296"
ALLOCATORS = {"default": None, "keep-freed": KEEP_FREED_MEMORY}


# ------------------------------------------------------------------------------------ workload
def make_vit_tiny(depth: int = 12, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The workload's model: timm ViT-Tiny at 32 x 32 with 4 x 4 patches, seed ``SEED``, eval mode."""
    import timm

    torch.manual_seed(SEED)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=IMG_SIZE,
        patch_size=PATCH_SIZE,
        depth=depth,
        num_classes=num_classes,
    ).eval()


def sublayer_names(model: nn.Module) -> list[str]:
    """``blocks.i.attn`` and ``blocks.i.mlp`` of every block (24 for depth 12)."""
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in ("attn", "mlp")]  # type: ignore[arg-type]


def make_batches(images: int, batch_size: int, size: int, device: torch.device | str = "cpu") -> list[Tensor]:
    """``images`` seeded random images of ``size`` x ``size`` in minibatches of ``batch_size``."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(images, 3, size, size, generator=gen)
    return [b.contiguous().to(device) for b in x.split(batch_size)]


def make_labels(images: int, num_classes: int = NUM_CLASSES) -> Tensor:
    """Seeded random class labels for ``images`` examples."""
    return torch.randint(0, num_classes, (images,), generator=torch.Generator().manual_seed(SEED + 1))


def forward_only(models: Sequence[nn.Module], batches: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for b in batches:
            for m in models:
                m(b)


def capture_outputs(model: nn.Module, names: Sequence[str], batch: Tensor, fn: Callable[[Tensor], Any]) -> list:
    """Run ``model`` on ``batch`` and return ``fn(output)`` of each named module (own hooks, not the
    library's; the first tensor of a tuple output)."""
    named = dict(model.named_modules())
    results: list[Any] = [None] * len(names)
    handles = []
    for i, name in enumerate(names):

        def hook(module: nn.Module, args: Any, output: Any, i: int = i) -> None:
            out = output[0] if isinstance(output, tuple | list) else output
            if results[i] is None:
                results[i] = fn(out.detach())

        handles.append(named[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return results


# ----------------------------------------------------------------------- float64 reference
@functools.cache
def load_reference() -> ModuleType:
    """``tests/reference.py`` (the independent float64 implementation the tests use), by path."""
    path = REPO / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("_lightning_cka_tests_reference", path)
    if spec is None or spec.loader is None:  # pragma: no cover
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gram64(x: Tensor) -> np.ndarray:
    """Raw (uncentred) float64 Gram ``X Xᵀ`` of an activation, as ``reference.gram`` forms it; on a GPU
    the same product is formed on the device in float64 (the activations of the large models would
    take minutes on the host), then copied to the host."""
    if x.device.type == "cpu":
        return load_reference().gram(x)
    f = x.reshape(x.shape[0], -1).double()
    return (f @ f.T).cpu().numpy()


def reference_cka(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Tensor],
    reference: nn.Module | None = None,
    reference_names: Sequence[str] | None = None,
) -> Tensor:
    """Minibatch CKA (Nguyen et al. 2021) in float64 with ``tests/reference.py``: the literal unbiased
    HSIC_1 of Song et al. (2012) per minibatch, on Grams of activations captured with this module's
    own hooks, summed over minibatches. Rows: ``names`` of ``model``; columns: the same, or
    ``reference_names`` of ``reference``."""
    ref = load_reference()
    s_xy = s_xx = s_yy = None
    for b in batches:
        ks = capture_outputs(model, names, b, gram64)
        ls = ks if reference is None else capture_outputs(reference, reference_names or names, b, gram64)
        xy = np.array([[ref.hsic1(k, l) for l in ls] for k in ks])
        xx = np.diag(xy).copy() if reference is None else np.array([ref.hsic1(k, k) for k in ks])
        yy = xx if reference is None else np.array([ref.hsic1(l, l) for l in ls])
        s_xy, s_xx, s_yy = (xy, xx, yy) if s_xy is None else (s_xy + xy, s_xx + xx, s_yy + yy)
    assert s_xy is not None and s_xx is not None and s_yy is not None
    return torch.from_numpy(s_xy / np.sqrt(s_xx[:, None] * s_yy[None, :]))


def max_err(matrix: Any, ref: Tensor) -> float:
    """Max abs difference of ``matrix`` from ``ref`` (NaN when missing or of another shape)."""
    if matrix is None:
        return math.nan
    m = torch.as_tensor(matrix).detach().double().cpu()
    if m.shape != ref.shape:
        return math.nan
    return float((m - ref).abs().max())


# ------------------------------------------------------------------------------------ timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """Wall time of ``fn()`` and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def timed_cpu(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float, Any]:
    """Wall time, CPU time of this process (all its threads) and the result of ``fn()``."""
    cpu = time.process_time()
    wall, out = timed(fn, device)
    return wall, time.process_time() - cpu, out


def median(values: Sequence[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


@dataclass
class Timing:
    """Run times (s) of one entry, and of each run its minor page faults and CPU time (s, all
    threads of this process: far less sensitive than wall time to other jobs on the machine)."""

    times: list[float] = field(default_factory=list)
    minor_faults: list[int] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    others_cores: list[float] = field(default_factory=list)  # cores other processes used during each run
    note: str = ""

    @property
    def min(self) -> float:
        return min(self.times) if self.times else math.nan

    @property
    def median(self) -> float:
        return median(self.times)

    @property
    def spread(self) -> float:
        return max(self.times) / min(self.times) if self.times else math.nan

    @property
    def faults(self) -> str:
        """Median minor page faults per run, e.g. ``"1,012k page faults per run"`` (empty if not counted)."""
        if not self.minor_faults:
            return ""
        return f"{median(self.minor_faults) / 1000:,.0f}k page faults per run"

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_s": self.min,
            "median_s": self.median,
            "spread": self.spread,
            "times_s": self.times,
            "minor_page_faults": self.minor_faults,
            "cpu_times_s": self.cpu_times,
            "others_cores": self.others_cores,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timing:
        return cls(
            list(d["times_s"]),
            list(d.get("minor_page_faults", [])),
            list(d.get("cpu_times_s", [])),
            list(d.get("others_cores", [])),
        )


def rotation(names: Sequence[str], r: int) -> list[str]:
    """``names`` rotated to start at entry ``r mod len(names)``."""
    k = r % len(names)
    return [*names[k:], *names[:k]]


def round_robin(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    before: Callable[[str], Any] | None = None,
    progress: bool = False,
    wait_idle_s: float = 0.0,
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Warm up every entry, then run all entries ``repeats`` times in rotating order. ``before(name)``
    (untimed) runs before each call, e.g. to build a fresh Trainer. With ``wait_idle_s``, each round
    first waits (up to that long) for a quiet machine (:func:`wait_idle`). With ``progress``, each
    round's times go to stderr. Returns timings and last outputs."""
    outs: dict[str, Any] = {}
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            if before is not None:
                before(name)
            _, outs[name] = timed(fns[name], device)
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        if wait_idle_s > 0:
            wait_idle(wait_idle_s)
        for name in rotation(names, r):
            if before is not None:
                before(name)
            monitor = CpuMonitor()
            faults = minor_faults()
            t, cpu, outs[name] = timed_cpu(fns[name], device)
            timings[name].minor_faults.append(minor_faults() - faults)
            timings[name].times.append(t)
            timings[name].cpu_times.append(cpu)
            timings[name].others_cores.append(monitor.others_cores())
        if progress:
            shown = ", ".join(f"{name} {timings[name].times[-1]:.2f}" for name in names)
            others = max(timings[name].others_cores[-1] for name in names)
            print(f"# round {r + 1}/{repeats} (others <= {others:.2f} cores): {shown}", file=sys.stderr, flush=True)
    return timings, outs


def same_round_ratio(a: Timing, b: Timing, cpu: bool = False) -> float:
    """Median over rounds of ``a / b`` (both timed in the same rounds); of CPU times with ``cpu``."""
    xs, ys = (a.cpu_times, b.cpu_times) if cpu else (a.times, b.times)
    return median([x / y for x, y in zip(xs, ys, strict=True)])


def same_round_diff(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a - b``."""
    return median([x - y for x, y in zip(a.times, b.times, strict=True)])


def fault_corrected(runs: Mapping[str, tuple[Sequence[float], Sequence[int]]]) -> dict[str, Any] | None:
    """Times at zero page faults: least squares of every run's time on its minor-fault count, one
    intercept per entry and one shared slope (seconds per fault).

    ``runs`` maps an entry to its run times and fault counts; the first entry is the baseline of
    the ratios. With glibc's default settings, tensors above the malloc mmap threshold go back to
    the OS when freed and are page-faulted in again when reallocated; how many of a run's
    allocations do that varies from run to run, the largest source of noise in CPU forward
    timings. ``None`` when there are too few runs or too few / too uniform faults to fit a slope.
    """
    names = list(runs)
    rows, ys = [], []
    for i, name in enumerate(names):
        times, faults = runs[name]
        for t, f in zip(times, faults, strict=True):
            rows.append([float(j == i) for j in range(len(names))] + [f / 1e6])
            ys.append(t)
    if not ys:
        return None
    a, y = np.array(rows), np.array(ys)
    faults = a[:, -1]
    if len(ys) <= len(names) + 1 or np.median(faults) < 0.05 or np.ptp(faults) < 0.1 * faults.max():
        return None  # too few runs, too few faults (median < 50k) or too little variation for a slope
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    intercepts = dict(zip(names, coef[:-1].tolist(), strict=True))
    return {
        "seconds": intercepts,
        "seconds_per_million_faults": float(coef[-1]),
        "residual_std_s": float(np.std(y - a @ coef)),
        "ratio": {k: intercepts[k] / intercepts[names[0]] for k in names},
    }


class CpuMonitor:
    """How many cores other processes kept busy since construction (``/proc/stat`` busy time minus
    this process's and its children's)."""

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


def wait_idle(max_wait: float, threshold: float = 0.2, window: float = 5.0) -> float:
    """Wait (at most ``max_wait`` s) for a ``window`` in which other processes use < ``threshold``
    cores; returns what they used in the last window."""
    start = time.monotonic()
    while True:
        mon = CpuMonitor()
        time.sleep(window)
        others = mon.others_cores()
        if others < threshold or time.monotonic() - start + window > max_wait:
            return others


# ------------------------------------------------------------------------------------ memory
def status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux). ``ru_maxrss`` is not used: Linux carries
    it over ``fork`` + ``exec``, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def peak_rss_mb() -> float:
    peak = status_mb("VmHWM")
    return peak if math.isfinite(peak) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------- machine
def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_description(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": package_version("timm"),
        "lightning": package_version("lightning"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "lightning_cka"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    with contextlib.suppress(OSError):
        info["load_avg_at_start"] = os.getloadavg()
    allocator = {k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")}
    if allocator:
        info["allocator_env"] = allocator
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def header_line(info: Mapping[str, Any], command: str) -> str:
    """One paragraph saying where, with what and how a table was measured."""
    where = info.get("gpu") or f"{info.get('cpu')} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads)"
    parts = [
        f"Measured {info.get('date', '?')} on {where}; torch {info['torch']}, timm {info['timm']}, "
        f"Python {info['python']}; lightning_cka at commit {info.get('git_commit', '?')}; `{command}`."
    ]
    if info.get("allocator_env"):
        parts.append("Allocator: " + ", ".join(f"`{k}={v}`" for k, v in sorted(info["allocator_env"].items())) + ".")
    if "others_cores" in info:
        parts.append(
            f"Other processes kept {info['others_cores']:.2f} of the {info['cpu_count']} cores busy on average "
            "while it ran."
        )
    return " ".join(parts)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{script}", *args])


# ------------------------------------------------------------------------------------ output
def fmt_s(t: float) -> str:
    if not math.isfinite(t):
        return "n/a"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def fmt_e(e: float | None) -> str:
    if e is None:
        return "-"
    return f"{e:.1e}" if math.isfinite(e) else "nan"


def fmt_x(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"


def fmt_pct(v: float) -> str:
    return f"{100 * v:+.1f} %" if math.isfinite(v) else "n/a"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(value: float, op: str, limit: float) -> str:
    """``PASS`` / ``FAIL`` of ``value op limit`` (``n/a`` when not measured)."""
    if not math.isfinite(value):
        return "n/a"
    return "PASS" if (value <= limit if op == "<=" else value >= limit) else "FAIL"


def write_json(path: str | Path | None, data: Any) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def update_docs(key: str, body: str, docs: Path = DOCS, prefix: str = "BENCH") -> None:
    """Replace the text between ``<!-- {prefix}:key:BEGIN -->`` and ``<!-- {prefix}:key:END -->`` in
    ``docs`` (default docs/benchmarks.md; appended at the end when the markers are missing)."""
    begin, end = f"<!-- {prefix}:{key}:BEGIN -->", f"<!-- {prefix}:{key}:END -->"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)
    print(f"updated {docs} [{key}]", file=sys.stderr)


def run_json(
    cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None, stream_stderr: bool = False
) -> dict[str, Any]:
    """Run ``cmd`` (a worker printing JSON on its last stdout line) and return that JSON, or
    ``{"error": ...}``. ``env`` entries are added to this process's environment; with
    ``stream_stderr`` the worker's stderr (progress) goes straight to this process's stderr."""
    full_env = {**os.environ, **(env or {})}
    stderr = None if stream_stderr else subprocess.PIPE
    try:
        proc = subprocess.run(
            list(cmd), stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout, env=full_env, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    err = proc.stderr or ""
    if proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit status {proc.returncode}")[:200], "stderr": err[-4000:]}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": "no JSON result", "stdout": proc.stdout[-2000:], "stderr": err[-2000:]}


def allocator_env(name: str) -> dict[str, str]:
    """Environment additions for an entry of :data:`ALLOCATORS`."""
    setting = ALLOCATORS[name]
    return {} if setting is None else {"GLIBC_TUNABLES": setting}
