#!/usr/bin/env python
"""Cost of CKACallback and each of its analyses on a validation epoch.

Times ``Trainer.validate`` of a LightningModule around the benchmark workload's ViT (512 random
images in batches of 256, CPU) with the callback off, with CKA alone, with the callback's defaults
(``CKACallback(layers="sublayers")``), with each other analysis added alone to CKA, and with every
analysis on. All configurations run in one process, a warm-up round first, then ``--repeats``
rounds in rotating order; ratios and extra times are same-round medians (with the quartiles of
the per-round values, a measure of the noise). The callbacks are kept across rounds, so analyses
that compare with a previous validation (convergence) have one from the warm-up round on. Every
run also records its CPU time, minor page faults and how many cores other processes used.

The whole timing runs once per allocator setting, each in a fresh subprocess: glibc's defaults,
and ``GLIBC_TUNABLES`` that keep freed memory in the process (see ``common.KEEP_FREED_MEMORY``;
no page faults from reallocating large tensors). Peak RSS is measured per configuration in fresh
processes (two validations each, so convergence runs its full update; median of
``--memory-samples``); the time each analysis spends in its own methods (outside the forward pass)
is measured over three more validations with everything on. The memory convergence keeps between
validations (its past Grams) is read from the analysis after the timing rounds.

The probe target is stated for the analysis's default of 4,096 examples, 8 times the workload's
512 images: ``--probe-images 4096`` (the default on CPU) also times no callback, CKA alone and
CKA with probes on 4,096 images, per allocator, in subprocesses of their own.

Analyses whose module is missing from this checkout are skipped (and said so). No logger is
attached: the cost of rendering figures and writing files is not part of these numbers.

    python benchmarks/bench_analyses.py --small                  # smoke run, seconds
    python benchmarks/bench_analyses.py --json-out benchmarks/results/cpu_analyses.json --write-docs
    python benchmarks/bench_analyses.py --from-json benchmarks/results/cpu_analyses.json --write-docs
    python benchmarks/bench_analyses.py --profile probe default  # operators each configuration adds (profiler)
    python benchmarks/bench_analyses.py --method-times all       # time in each analysis's own methods
    python benchmarks/bench_analyses.py --device cuda --json-out $OUT/gpu_analyses.json
                                                                 # ViT-B/16 and ResNet-50, 224 px, batch 256
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import math
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch
from common import fmt_pct, fmt_s, fmt_x, md_table
from torch import nn

#: analysis -> (what it computes, cost model). L layers, n examples per batch, p features per layer,
#: D blocks, T tokens, C channels, m examples per batch used for attention, N examples per fit,
#: d probe features, k folds, U residual units.
ANALYSES: dict[str, tuple[str, str]] = {
    "gram_floor": (
        "floor of any CKA: only the centred copies and Gram products of the 24 sublayers, nothing kept",
        "O(L n² p) per batch",
    ),
    "cka": ("layer x layer minibatch CKA (Grams of the 24 sublayers)", "O(L n² p) Grams + O(L² n²) pairs per batch"),
    "norm_ratio": ("skip-connection norm ratios ‖z‖ / ‖f(z)‖ per residual unit", "O(U n T C) per batch"),
    "attention_distance": (
        "mean attention distance per head (attention recomputed from `qkv`)",
        "O(D m (T C² + T² C)) per batch, m ≤ 32",
    ),
    "convergence": (
        "CKA of every layer with itself at the previous and first validation (reuses the captured Grams)",
        "O(L n²) per batch kept; memory 2 x L n(n+1)/2 floats per kept batch",
    ),
    "probe": (
        "closed-form ridge linear probe per layer and pool (CLS, token mean), k-fold held-out accuracy",
        "O(n T C) pooling per batch; O(N d² + d³) per probe fit (x k folds x 2 pools x L)",
    ),
    "localization": (
        "CKA of each token position of the last block with each input patch",
        "O(T n² C) token Grams + O(T² n²) pairs per batch",
    ),
}
#: analyses written as plug-ins: name -> (module, class)
PLUGINS = {
    "convergence": ("lightning_cka.analyses.convergence", "Convergence"),
    "probe": ("lightning_cka.analyses.probe", "LinearProbe"),
    "localization": ("lightning_cka.analyses.localization", "Localization"),
}
#: configurations in timing order: "none" (no callback), CKA alone, default callback, CKA + each
#: other analysis, everything
CONFIGS = ["none", "cka", "default", "norm_ratio", "attention_distance", *PLUGINS, "all"]
#: configurations run only when asked for (``--configs``): ``gram_floor`` is the floor of any CKA
#: callback on the ViT workloads (:class:`GramFloor`)
OPTIONAL_CONFIGS = ["gram_floor"]
#: configurations that are CKA plus one analysis: their extra time and memory are over CKA alone
ADDED_TO_CKA = ("norm_ratio", "attention_distance", *PLUGINS)
#: configurations of the separate probe timing with more images (``--probe-images``): the probe
#: target is stated for the analysis's default of 4,096 examples, 8 times the main workload's
PROBE_CONFIGS = ["none", "cka", "probe"]

#: targets on two CPU cores, from same-round medians, each with what it guards
TARGETS = [
    ("default", "<=", 1.15, "validate with / without the default callback", "the always-on default analyses"),
    ("all", "<=", 1.35, "validate with every analysis / without", "the cost of switching everything on"),
    (
        "convergence",
        "<=",
        0.05,
        "convergence: extra time / validate without callback",
        "convergence reusing the captured Grams (no extra forward, hooks or products)",
    ),
    ("probe", "<=", 0.10, "linear probes: extra time / validate without callback", "closed-form probe fits"),
]


# ----------------------------------------------------------------------------------- workload
def lightning_module(model: nn.Module) -> Any:
    import lightning.pytorch as pl  # here, so that --help does not import Lightning

    class Classifier(pl.LightningModule):
        """Validation is one forward pass and a cross-entropy per batch."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            nn.functional.cross_entropy(self.model(x), y)

    return Classifier(model)


def workloads(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The models to time: ViT-Tiny on CPU (or a 2-block one with ``--small``); ViT-B/16 and
    ResNet-50 at 224 px on CUDA."""
    if args.device == "cuda" and not args.small:
        return [
            {"name": "vit_base_patch16_224", "size": 224, "layers": "sublayers", "classes": 1000},
            {"name": "resnet50", "size": 224, "layers": "auto", "classes": 1000},
        ]
    depth = 2 if args.small else 12
    return [{"name": f"vit_tiny_32_depth{depth}", "size": common.IMG_SIZE, "layers": "sublayers", "depth": depth}]


def make_model(spec: dict[str, Any]) -> nn.Module:
    if spec["name"].startswith("vit_tiny_32"):
        return common.make_vit_tiny(spec["depth"])
    import timm

    torch.manual_seed(common.SEED)
    return timm.create_model(spec["name"], pretrained=False, num_classes=spec["classes"]).eval()


def make_loader(args: argparse.Namespace, spec: dict[str, Any]) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.cat(common.make_batches(args.images, args.images, spec["size"]))
    y = common.make_labels(args.images, spec.get("classes", common.NUM_CLASSES))
    return DataLoader(TensorDataset(x, y), batch_size=args.batch_size)


def plugin(name: str) -> tuple[Any, str | None]:
    """An instance of a plug-in analysis, or ``(None, reason)`` when it is not available."""
    module_name, cls_name = PLUGINS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        return None, f"module {err.name} not found"
    cls = getattr(module, cls_name, None)
    if cls is None:
        return None, f"{module_name} has no {cls_name}"
    try:
        return cls(), None
    except Exception as err:  # a constructor that needs arguments this script does not know
        return None, f"{cls_name}() failed: {type(err).__name__}: {err}"[:200]


def available_configs(configs: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The configurations whose analyses exist here, and the reason for each one skipped."""
    skipped = {}
    for name in PLUGINS:
        _, reason = plugin(name)
        if reason is not None:
            skipped[name] = reason
    kept = [c for c in configs if c not in skipped]
    return kept, skipped


#: CKACallback switches of the analyses (those this version of the callback has are used)
SWITCHES = {
    "norm_ratio": "norm_ratio",
    "attention_distance": "attention_distance",
    "convergence": "convergence",
    "probe": "probes",
    "localization": "localization",
}


def make_callback(config: str, layers: str) -> Any:
    """A fresh CKACallback for ``config`` (``None`` for ``"none"``): the callback's defaults for
    ``"default"``; otherwise every analysis switched off except CKA and the one named (or all of
    them for ``"all"``). A plug-in analysis the callback has no switch for is passed as an instance
    with ``analyses=[...]``."""
    import inspect

    from lightning_cka import CKACallback

    if config == "none":
        return None
    if config == "gram_floor":
        return gram_floor()
    if config == "default":
        return CKACallback(layers=layers)
    params = inspect.signature(CKACallback).parameters
    wanted = set(SWITCHES) if config == "all" else {config}
    kwargs: dict[str, Any] = {"layers": layers}
    extra = []
    for name, switch in SWITCHES.items():
        if switch in params:
            kwargs[switch] = name in wanted
        elif name in wanted and name in PLUGINS:
            instance, _ = plugin(name)
            if instance is not None:
                extra.append(instance)
    return CKACallback(**kwargs, analyses=extra)


def gram_floor() -> Any:
    """A callback that does only what no CKA of the workload's 24 sublayers can skip: in a forward
    hook per sublayer, the mean-centred copy of its activation (into one reused buffer, as the
    library does) and its Gram product (the library's symmetric CPU product, or one GEMM on a
    GPU), nothing kept. Its extra time over no callback is the floor of every CKA configuration."""
    import lightning.pytorch as pl

    from lightning_cka.functional import _symmetric_product

    class GramFloor(pl.Callback):
        def __init__(self) -> None:
            self.handles: list[Any] = []
            self.buffer: torch.Tensor | None = None
            self.history: list[dict[str, Any]] = []  # as CKACallback's, always empty

        def hook(self, module: nn.Module, args: Any, output: Any) -> None:
            x = (output[0] if isinstance(output, tuple) else output).detach().flatten(1)
            if self.buffer is None or self.buffer.numel() < x.numel() or self.buffer.device != x.device:
                self.buffer = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
            centred = torch.sub(x, x.mean(dim=0, dtype=torch.float32), out=self.buffer[: x.numel()].view(x.shape))
            _symmetric_product(centred) if centred.device.type == "cpu" else centred @ centred.T

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            modules = dict(pl_module.model.named_modules())
            for name in common.sublayer_names(pl_module.model):
                self.handles.append(modules[name].register_forward_hook(self.hook))

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            for handle in self.handles:
                handle.remove()
            self.handles, self.buffer = [], None

    return GramFloor()


def make_trainer(callback: Any, device: str) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        callbacks=[] if callback is None else [callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        inference_mode=True,
    )


def quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------ workers
def time_worker(args: argparse.Namespace, configs: Sequence[str]) -> dict[str, Any]:
    """Round-robin timing of ``configs`` on every workload, in this process."""
    quiet()
    out: dict[str, Any] = {"machine": common.machine_description(args.device), "workloads": {}}
    monitor = common.CpuMonitor()
    for spec in workloads(args):
        module = lightning_module(make_model(spec))
        loader = make_loader(args, spec)
        callbacks = {c: make_callback(c, spec["layers"]) for c in configs}
        trainers: dict[str, Any] = {}

        def before(config: str, callbacks: dict[str, Any] = callbacks, trainers: dict[str, Any] = trainers) -> None:
            trainers[config] = make_trainer(callbacks[config], args.device)

        fns = {c: (lambda c=c, m=module, ld=loader, t=trainers: t[c].validate(m, ld, verbose=False)) for c in configs}
        timings, _ = common.round_robin(
            fns, args.repeats, args.device, before=before, progress=True, wait_idle_s=args.wait_idle
        )
        entry: dict[str, Any] = {"timings": {c: t.as_dict() for c, t in timings.items()}}
        corrected = common.fault_corrected({c: (t.times, t.minor_faults) for c, t in timings.items()})
        if corrected is not None:
            entry["fault_corrected"] = corrected
        if args.device == "cuda":
            entry["cuda_peak_mb"] = cuda_peaks(args, module, loader, callbacks)
        entry["history_keys"] = {
            c: sorted(k for k in cb.history[-1] if k not in ("epoch", "step")) if cb is not None and cb.history else []
            for c, cb in callbacks.items()
        }
        entry["kept_mb"] = {c: kept_mb(cb) for c, cb in callbacks.items() if kept_mb(cb)}
        out["workloads"][spec["name"]] = entry
        del module, loader, callbacks, trainers
        gc.collect()
    out["machine"]["others_cores"] = monitor.others_cores()
    return out


def kept_mb(callback: Any) -> dict[str, float]:
    """MB each analysis of ``callback`` keeps between validations (those that report it:
    convergence's past Grams), measured after the timing rounds."""
    return {a.key: a.kept_memory() / 1e6 for a in getattr(callback, "_analyses", []) if hasattr(a, "kept_memory")}


def cuda_peaks(args: argparse.Namespace, module: Any, loader: Any, callbacks: dict[str, Any]) -> dict[str, float]:
    """``torch.cuda.max_memory_allocated`` of one more validation per configuration (MB)."""
    peaks = {}
    for config, callback in callbacks.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        make_trainer(callback, args.device).validate(module, loader, verbose=False)
        torch.cuda.synchronize()
        peaks[config] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def memory_worker(args: argparse.Namespace, config: str) -> dict[str, Any]:
    """Peak RSS of a fresh process that builds the workload and validates twice with ``config``."""
    quiet()
    spec = workloads(args)[0]
    module = lightning_module(make_model(spec))
    loader = make_loader(args, spec)
    callback = make_callback(config, spec["layers"])
    setup = common.status_mb("VmRSS")
    for _ in range(2):
        make_trainer(callback, args.device).validate(module, loader, verbose=False)
    return {"setup_rss_mb": setup, "peak_rss_mb": common.peak_rss_mb(), "faults": common.minor_faults()}


def profile_ops(args: argparse.Namespace, config: str) -> dict[str, tuple[float, int]]:
    """Self CPU time (ms) and calls per operator of one validation with ``config``, after a warm-up one."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    quiet()
    spec = workloads(args)[0]
    module = lightning_module(make_model(spec))
    loader = make_loader(args, spec)
    callback = make_callback(config, spec["layers"])
    make_trainer(callback, args.device).validate(module, loader, verbose=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    trainer = make_trainer(callback, args.device)
    options: dict[str, Any] = {}
    # worker threads too (the probe fits run in a thread pool); a torch without the option: this thread only
    with contextlib.suppress(AttributeError, TypeError):
        options["experimental_config"] = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with torch_profile(activities=activities, **options) as prof:
        trainer.validate(module, loader, verbose=False)
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def profile(args: argparse.Namespace, config: str, rows: int = 12) -> str:
    """Operators that ``config`` adds to its base (CKA alone for an analysis added to CKA, else no
    callback): self CPU time of each in one profiled validation of each (after a warm-up one),
    largest additions first, summed over all threads. Under load the profiler's times are wall
    times of each operator."""
    base_config = "cka" if config in ADDED_TO_CKA else "none"
    base, ops = profile_ops(args, base_config), profile_ops(args, config)
    total_base = sum(v[0] for v in base.values())
    total = sum(v[0] for v in ops.values())
    added = {k: v[0] - base.get(k, (0.0, 0))[0] for k, v in ops.items()}
    table = []
    for key in sorted(added, key=added.get, reverse=True)[:rows]:  # type: ignore[arg-type]
        ms, calls = ops[key]
        b_ms, b_calls = base.get(key, (0.0, 0))
        table.append([f"`{key}`", f"{b_ms:.0f}", f"{ms:.0f}", f"{added[key]:+.0f}", f"{b_calls} -> {calls}"])
    head = ["operator", f"{base_config} (ms)", f"{config} (ms)", "added (ms)", "calls"]
    summary = (
        f"Self CPU time of one profiled validation: {total_base:.0f} ms with `{base_config}`, {total:.0f} ms with "
        f"`{config}` ({total / total_base:.2f}x)."
    )
    return summary + "\n\n" + md_table(head, table)


def method_times(args: argparse.Namespace, config: str, validations: int = 3) -> dict[str, dict[str, float]]:
    """Seconds each analysis of ``config`` spends in its own methods (``reset``, ``attach``, ``update``,
    ``clear``, ``compute``) per validation, median over ``validations`` after a warm-up one, with the
    validation's own time under ``"validate"``. Work done inside forward hooks during the model's
    forward pass (norm ratios, attention distances, probe features) is not in these methods."""
    quiet()
    spec = workloads(args)[0]
    module = lightning_module(make_model(spec))
    loader = make_loader(args, spec)
    callback = make_callback(config, spec["layers"])
    spent: dict[str, dict[str, float]] = {}
    for analysis in getattr(callback, "_analyses", []):
        for method in ("reset", "attach", "update", "clear", "compute"):
            original = getattr(analysis, method)

            def timed_method(*a: Any, _f: Any = original, _k: str = analysis.key, _m: str = method) -> Any:
                start = time.perf_counter()
                try:
                    return _f(*a)
                finally:
                    bucket = spent.setdefault(_k, {})
                    bucket[_m] = bucket.get(_m, 0.0) + time.perf_counter() - start

            setattr(analysis, method, timed_method)
    make_trainer(callback, args.device).validate(module, loader, verbose=False)
    per_run: list[dict[str, dict[str, float]]] = []
    for _ in range(validations):
        if args.wait_idle:
            common.wait_idle(args.wait_idle)
        spent.clear()
        wall, _ = common.timed(lambda: make_trainer(callback, args.device).validate(module, loader, verbose=False))
        per_run.append({**{k: dict(v) for k, v in spent.items()}, "validate": {"total": wall}})
    keys = {(k, m) for run in per_run for k, v in run.items() for m in v}
    out: dict[str, dict[str, float]] = {}
    for key, method in sorted(keys):
        out.setdefault(key, {})[method] = common.median([run.get(key, {}).get(method, 0.0) for run in per_run])
    return out


def method_table(args: argparse.Namespace, configs: Sequence[str]) -> str:
    rows = []
    for config in configs:
        times = method_times(args, config)
        total = times.pop("validate")["total"]
        for key, methods in times.items():
            own = sum(methods.values())
            shown = ", ".join(
                f"{m} {v * 1e3:.0f}" for m, v in sorted(methods.items(), key=lambda kv: -kv[1]) if v > 5e-4
            )
            rows.append([config, f"`{key}`", f"{own * 1e3:.0f}", f"{own / total:.1%}", shown, f"{total:.2f}"])
    head = ["configuration", "analysis", "own methods (ms)", "of validate", "by method (ms)", "validate (s)"]
    return md_table(head, rows)


# --------------------------------------------------------------------------------------- main
def worker_cmd(
    args: argparse.Namespace, *extra: str, images: int | None = None, repeats: int | None = None
) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device]
    cmd += ["--images", str(images or args.images), "--batch-size", str(args.batch_size)]
    cmd += ["--repeats", str(repeats or args.repeats)]
    if args.small:
        cmd.append("--small")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.wait_idle:
        cmd += ["--wait-idle", str(args.wait_idle)]
    return [*cmd, *extra]


#: a round counts as quiet when other processes used fewer cores than this during each of its runs
QUIET_CORES = 0.5


def summarise(timing_run: dict[str, Any], configs: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per workload and configuration: min / median seconds, same-round median ratio to "none", and
    same-round median extra time over its base, as a fraction of "none": from wall times, from CPU
    times (``_cpu``) and from the quiet rounds' wall times (``_quiet``, when there are 3 or more)."""
    out = {}
    for name, entry in timing_run["workloads"].items():
        t = {c: common.Timing.from_dict(v) for c, v in entry["timings"].items()}
        rounds = len(t["none"].times)
        recorded = all(len(t[c].others_cores) == rounds for c in t)  # older results lack them
        busy = [max(t[c].others_cores[r] for c in t) if recorded else math.inf for r in range(rounds)]
        quiet = [r for r in range(rounds) if busy[r] < QUIET_CORES]
        rows = {}
        for c in configs:
            if c not in t:
                continue
            # an analysis added to CKA: its time over CKA alone; the others: over no callback
            base = "cka" if c in ADDED_TO_CKA and "cka" in t else "none"
            row = {"min_s": t[c].min, "median_s": t[c].median, "base": base, "quiet_rounds": len(quiet)}
            row["others_cores"] = common.median(t[c].others_cores) if t[c].others_cores else math.nan
            variants = [("", "times", range(rounds)), ("_cpu", "cpu_times", range(rounds))]
            if len(quiet) >= 3:
                variants.append(("_quiet", "times", quiet))
            for suffix, key, use in variants:
                a, b, z = getattr(t[c], key), getattr(t[base], key), getattr(t["none"], key)
                if not a:
                    continue
                row["ratio" + suffix] = common.median([a[r] / z[r] for r in use])
                extras = [(a[r] - b[r]) / z[r] for r in use]
                row["extra" + suffix] = common.median(extras)
                if len(extras) >= 3:  # quartiles of the per-round values: the noise
                    q1, _, q3 = statistics.quantiles(extras, n=4, method="inclusive")
                    row["extra_q1" + suffix], row["extra_q3" + suffix] = q1, q3
            fc = entry.get("fault_corrected")
            if fc is not None and c in fc["seconds"]:
                row["fault_corrected_ratio"] = fc["ratio"][c]
            rows[c] = row
        out[name] = rows
    return out


def main_table(result: dict[str, Any], workload: str) -> str:
    """The table of docs/benchmarks.md for one workload: one row per analysis, then the default
    callback and everything on. Extra time: same-round median of (t - t_base) / t_none over rounds,
    with the quartiles of the per-round values in brackets, where the base is CKA alone for an
    analysis added to CKA and no callback otherwise."""
    allocs = [a for a in common.ALLOCATORS if a in result["summary"]]
    own = result.get("method_times", {})
    head = ["analysis", "what it computes", "cost model"]
    for a in allocs:
        rounds = quiet_label(result["summary"][a][workload]["none"])
        head.append(f"extra time, {a} allocator [quartiles] ({threads_label(result, a)}{rounds})")
    if own:
        head.append("own methods per validation (ms)")
    head += [f"extra peak RSS, MB ({a} allocator)" for a in allocs]
    labels = {"default": "default callback", "all": "every analysis on", "gram_floor": "floor: Gram products alone"}
    ran = next(iter(result["timing"][allocs[0]]["workloads"].values())).get("history_keys", {})
    described = {
        "default": (
            f'`CKACallback(layers="sublayers")`: {", ".join(sorted(ran.get("default", []))) or "?"}',
            "sum of its rows",
        ),
        "all": (f"{', '.join(sorted(ran.get('all', []))) or '?'}", "sum of all rows"),
    }
    rows = []
    for c in ["gram_floor", "cka", *ADDED_TO_CKA, "default", "all"]:
        if c == "gram_floor" and c not in result["summary"][allocs[0]][workload]:
            continue  # only measured when asked for
        what, cost = ANALYSES.get(c) or described[c]
        row = [labels.get(c, f"`{c}`"), what, cost]
        summary = result["summary"][allocs[0]][workload]
        if c not in summary:
            reason = result["skipped"].get(c, "not measured")
            rows.append([*row, *[f"skipped ({reason})"] * len(allocs), *["-"] * (len(head) - len(row) - len(allocs))])
            continue
        row += [extra_cell(result["summary"][a][workload][c], c) for a in allocs]
        if own:  # hook-based analyses do their work inside the forward pass: not in their methods
            spent = own.get(c) if c in PLUGINS else None
            if c == "all":
                spent = {f"{k}.{m}": v for k, ms in own.items() if k != "validate" for m, v in ms.items()}
            row.append("-" if spent is None else f"{1e3 * sum(spent.values()):.0f}")
        for a in allocs:
            row.append(extra_mb(result.get("memory", {}).get(a, {}), c))
        rows.append(row)
        probe = result.get("probe_summary", {})
        if c == "probe" and all(workload in probe.get(a, {}) for a in allocs):
            label = f"`probe`, {result.get('probe_images', 0):,} examples"
            what = f"the same with {result.get('probe_images', 0):,} validation images (its default `max_examples`)"
            cells = [extra_cell(probe[a][workload]["probe"], "probe") for a in allocs]
            rows.append([label, what, cost, *cells, *["-"] * (len(head) - 3 - len(allocs))])
    return md_table(head, rows)


def extra_cell(s: dict[str, Any], config: str) -> str:
    """Extra time of one summary row: the quiet rounds' median when there are 3 or more, else all
    rounds', with the quartiles of the per-round values and, for whole configurations, the ratio."""
    v = "_quiet" if "extra_quiet" in s else ""
    shown = fmt_pct(s["extra" + v])
    if "extra_q1" + v in s:
        shown += f" [{100 * s['extra_q1' + v]:+.0f}, {100 * s['extra_q3' + v]:+.0f}]"
    if config in ("gram_floor", "cka", "default", "all"):
        shown += f", {fmt_x(s['ratio' + v], 2)}x"
    return shown


def threads_label(result: dict[str, Any], alloc: str) -> str:
    threads = result["timing"][alloc].get("machine", {}).get("torch_threads")
    return "" if threads is None else f"{threads} torch thread{'s' if threads != 1 else ''}, "


def quiet_label(none_row: dict[str, Any]) -> str:
    k = none_row.get("quiet_rounds", 0)
    return f"{k} quiet rounds" if k >= 3 else "all rounds, machine busy"


def extra_mb(mem: dict[str, Any], config: str) -> str:
    """Median peak RSS of ``config`` minus that of its base (fresh processes): CKA alone for an analysis
    added to it, no callback otherwise."""
    base = "cka" if config in ADDED_TO_CKA else "none"
    a, b = mem.get(config, {}), mem.get(base, {})
    if "peak_rss_mb" not in a or "peak_rss_mb" not in b:
        return "n/a" if not a else a.get("error", "n/a")[:60]
    return f"{a['peak_rss_mb'] - b['peak_rss_mb']:+.0f}"


def detail_table(result: dict[str, Any], alloc: str) -> str:
    rows = []
    timing = result["timing"][alloc]
    for workload, summary in result["summary"][alloc].items():
        faults = timing["workloads"][workload]["timings"]
        for c, s in summary.items():
            mem = result.get("memory", {}).get(alloc, {}).get(c, {})
            fc = s.get("fault_corrected_ratio", math.nan)
            cuda = timing["workloads"][workload].get("cuda_peak_mb", {}).get(c)
            rows.append(
                [
                    workload,
                    c,
                    fmt_s(s["min_s"]),
                    fmt_s(s["median_s"]),
                    fmt_x(s["ratio"], 3),
                    fmt_x(s.get("ratio_cpu", math.nan), 3),
                    f"{fmt_x(s.get('ratio_quiet', math.nan), 3)} ({s['quiet_rounds']})",
                    fmt_x(fc, 3),
                    f"{common.median(faults[c]['minor_page_faults']) / 1000:,.0f}k",
                    fmt_x(s["others_cores"]),
                    f"{mem['peak_rss_mb']:.0f}" if "peak_rss_mb" in mem else "-",
                    f"{cuda:.0f}" if cuda is not None else "-",
                ]
            )
    head = [
        "model",
        "configuration",
        "validate min (s)",
        "median (s)",
        "same-round median ratio",
        "same, CPU time",
        "same, quiet rounds (how many)",
        "page-fault-corrected ratio",
        "page faults per validate",
        "other jobs (cores)",
        "peak RSS (MB)",
        "CUDA peak (MB)",
    ]
    return md_table(head, rows)


def targets_table(result: dict[str, Any], alloc: str) -> str:
    """PASS / FAIL of each timing target (the probe's from the ``--probe-images`` run when there is
    one, its stated size), then the memory targets."""
    rows = []
    for config, op, limit, what, guards in TARGETS:
        summary = next(iter(result["summary"][alloc].values()))
        probe = next(iter(result.get("probe_summary", {}).get(alloc, {}).values()), {})
        if config == "probe" and "probe" in probe:
            summary, what = probe, f"{what} ({result.get('probe_images', 0):,} examples)"
        elif config == "probe":
            what = f"{what} ({result['args'].get('images', '?')} examples)"
        if config not in summary:
            rows.append([what, f"{op} {limit:g}", "n/a", "n/a (skipped)", "", "", "", "", guards])
            continue
        if config in ("default", "all") and "gram_floor" in summary:
            floor = summary["gram_floor"]
            shown = fmt_x(floor.get("ratio_quiet", floor["ratio"]), 3)
            what += f" (floor, the Gram products alone: {shown})"
        key = "ratio" if config in ("default", "all") else "extra"
        quiet = summary[config].get(key + "_quiet", math.nan)
        wall, cpu = summary[config][key], summary[config].get(key + "_cpu", math.nan)
        rows.append(
            [
                what,
                f"{op} {limit:g}",
                fmt_x(quiet, 3),
                common.verdict(quiet, op, limit),
                fmt_x(wall, 3),
                common.verdict(wall, op, limit),
                fmt_x(cpu, 3),
                common.verdict(cpu, op, limit),
                guards,
            ]
        )
    head = [
        "target (same-round medians)",
        "goal",
        "quiet rounds",
        "verdict",
        "all rounds",
        "verdict",
        "CPU time, all rounds",
        "verdict",
        "guards",
    ]
    return md_table(head, rows) + "\n\n" + memory_targets_table(result, alloc)


#: the convergence memory target: kept Grams for 12 layers and 1,024 examples in batches of 256 (MB)
CONVERGENCE_MB = 13.0


def memory_targets_table(result: dict[str, Any], alloc: str) -> str:
    """The past Grams convergence keeps: measured on the workload after the timing rounds, and
    ``Convergence.kept_bytes`` of the target's case (12 layers, 1,024 examples in batches of 256)."""
    rows = []
    entry = next(iter(result["timing"][alloc]["workloads"].values()))
    measured = {c: v["convergence"] for c, v in entry.get("kept_mb", {}).items() if "convergence" in v}
    args = result.get("args", {})
    for c, mb in measured.items():
        rows.append(
            [
                f"convergence: kept Grams after the timing rounds (`{c}`; the workload's 24 layers, "
                f"{args.get('images', '?')} examples in batches of {args.get('batch_size', '?')})",
                "-",
                f"{mb:.2f} MB",
                "(measurement)",
            ]
        )
    try:
        from lightning_cka.analyses.convergence import Convergence
    except ImportError:  # pragma: no cover - a checkout without the analysis
        return md_table(["memory", "goal", "value", "verdict"], rows)
    target = Convergence.kept_bytes(num_layers=12, max_examples=1024, batch_size=256) / 1e6
    rows.append(
        [
            "convergence: kept Grams, 12 layers, 1,024 examples in batches of 256 (`Convergence.kept_bytes`, "
            "first + previous validation)",
            f"< {CONVERGENCE_MB:g} MB",
            f"{target:.2f} MB",
            common.verdict(target, "<=", CONVERGENCE_MB),
        ]
    )
    return md_table(["memory", "goal", "value", "verdict"], rows)


def report(result: dict[str, Any], command: str) -> str:
    parts = []
    for alloc in result["timing"]:
        info = result["timing"][alloc].get("machine", {})
        if "error" in result["timing"][alloc]:
            parts.append(f"{alloc} allocator: n/a ({result['timing'][alloc]['error']})")
            continue
        parts.append(f"**{alloc} allocator.** " + common.header_line(info, command))
        parts.append(detail_table(result, alloc))
        parts.append(targets_table(result, alloc))
    for name, reason in result["skipped"].items():
        parts.append(f"Skipped `{name}`: {reason}.")
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--small", action="store_true", help="2-block ViT, 32 images, batch 16, in-process: seconds")
    parser.add_argument("--images", type=int, default=None, help="default 512 (32 with --small)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (16 with --small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds after a warm-up (default 5; 2 --small)")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=CONFIGS + OPTIONAL_CONFIGS,
        help="subset of configurations (gram_floor: the bare Gram products, the floor of any CKA; only when named)",
    )
    parser.add_argument(
        "--allocators", nargs="+", default=None, choices=list(common.ALLOCATORS), help="default: both (cpu)"
    )
    parser.add_argument("--in-process", action="store_true", help="time here, without allocator subprocesses")
    parser.add_argument("--no-memory", dest="memory", action="store_false", default=None, help="skip peak RSS runs")
    parser.add_argument("--memory", dest="memory", action="store_true", help="measure peak RSS per configuration")
    parser.add_argument(
        "--profile",
        nargs="+",
        default=None,
        choices=CONFIGS + OPTIONAL_CONFIGS,
        help="print what each configuration adds, by operator",
    )
    parser.add_argument(
        "--method-times",
        nargs="+",
        default=None,
        choices=CONFIGS,
        help="print the time each analysis spends in its own methods, per configuration, and exit",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each round, wait up to S seconds for 5 s in which other processes use < 0.2 cores",
    )
    parser.add_argument("--memory-samples", type=int, default=1, help="fresh processes per configuration (median)")
    parser.add_argument(
        "--probe-images",
        type=int,
        default=None,
        metavar="N",
        help="also time none / cka / probe with N images, in subprocesses per allocator (the probe target's "
        "4,096 examples; default 4096 on CPU, 0 = skip; never with --small or --in-process)",
    )
    parser.add_argument("--probe-repeats", type=int, default=None, help="rounds of the --probe-images timing")
    parser.add_argument(
        "--reuse",
        default=None,
        metavar="JSON",
        help="complete a saved result: keep its timing of the allocators not measured now (and its peak RSS "
        "with --no-memory)",
    )
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--from-json", default=None, help="report (and with --write-docs, write) a saved --json-out")
    parser.add_argument("--write-docs", action="store_true", help="update the ANALYSES blocks of docs/benchmarks.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = 32 if args.small else common.IMAGES
    if args.batch_size is None:
        args.batch_size = 16 if args.small else common.BATCH_SIZE
    if args.repeats is None:
        args.repeats = 2 if args.small else 5
    if args.small and not args.worker:
        args.in_process = True
    if args.memory is None:
        args.memory = not args.small and args.device == "cpu"
    if args.probe_images is None:
        args.probe_images = 4096 if args.device == "cpu" and not args.small else 0
    if args.small or args.in_process:
        args.probe_images = 0
    if args.allocators is None:
        args.allocators = ["default"] if args.device == "cuda" or args.in_process else list(common.ALLOCATORS)
    if args.write_docs and args.small:
        parser.error("--write-docs is refused with --small (it would overwrite real numbers)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine.", file=sys.stderr)
        return 2
    configs, skipped = available_configs(args.configs or CONFIGS)
    for name, reason in skipped.items():
        print(f"skipped analysis {name!r}: {reason}", file=sys.stderr, flush=True)
    if args.worker:
        import json

        kind, _, config = args.worker.partition(":")
        res = time_worker(args, configs) if kind == "time" else memory_worker(args, config)
        print(json.dumps(res, default=str))
        return 0
    if args.method_times:
        print(method_table(args, args.method_times))
        return 0
    if args.profile:
        for config in args.profile:
            print(f"`{config}`: " + profile(args, config) + "\n", flush=True)
        return 0
    if args.from_json:
        import json

        result = json.loads(Path(args.from_json).read_text())
    else:
        result = measure(args, configs, skipped)
        result["command"] = common.command_line("bench_analyses.py", argv)
        result["summary"] = summaries(result)
        result["probe_summary"] = summaries(result, "probe_timing")
        common.write_json(args.json_out, result)
    return render(result, args.write_docs)


def summaries(result: dict[str, Any], key: str = "timing") -> dict[str, Any]:
    """:func:`summarise` of every allocator's timing that did not fail (``key="probe_timing"``: of the
    separate probe timing with ``--probe-images``)."""
    configs = PROBE_CONFIGS if key == "probe_timing" else result["configs"]
    return {a: summarise(r, configs) for a, r in result.get(key, {}).items() if "error" not in r}


def measure(args: argparse.Namespace, configs: list[str], skipped: dict[str, str]) -> dict[str, Any]:
    """Timing per allocator (subprocesses unless ``--in-process``), then peak RSS per configuration."""
    for needed in ("none", "cka"):
        if needed not in configs:
            configs.insert(0 if needed == "none" else 1, needed)
    start = time.monotonic()
    result: dict[str, Any] = {"configs": configs, "skipped": skipped, "args": vars(args), "timing": {}, "memory": {}}
    result["probe_timing"] = {}
    for alloc in args.allocators:
        print(f"# timing, {alloc} allocator: {', '.join(configs)}", file=sys.stderr, flush=True)
        if args.in_process:
            result["timing"][alloc] = time_worker(args, configs)
        else:
            cmd = worker_cmd(args, "--worker", "time", "--configs", *configs)
            env = common.allocator_env(alloc)
            result["timing"][alloc] = common.run_json(cmd, timeout=4 * 3600, env=env, stream_stderr=True)
        common.write_json(args.json_out, result)
    if args.probe_images and "probe" in configs:
        result["probe_images"] = args.probe_images
        for alloc in args.allocators:
            shown = f"{alloc} allocator, {args.probe_images} images: {', '.join(PROBE_CONFIGS)}"
            print(f"# timing, {shown}", file=sys.stderr, flush=True)
            extra = ["--worker", "time", "--configs", *PROBE_CONFIGS]
            cmd = worker_cmd(args, *extra, images=args.probe_images, repeats=args.probe_repeats)
            env = common.allocator_env(alloc)
            result["probe_timing"][alloc] = common.run_json(cmd, timeout=4 * 3600, env=env, stream_stderr=True)
            common.write_json(args.json_out, result)
    saved: dict[str, Any] = {}
    if args.reuse:
        import json

        saved = json.loads(Path(args.reuse).read_text())
        for alloc, timing in saved.get("timing", {}).items():
            result["timing"].setdefault(alloc, timing)
        for alloc, timing in saved.get("probe_timing", {}).items():
            result["probe_timing"].setdefault(alloc, timing)
        if "probe_images" in saved:
            result.setdefault("probe_images", saved["probe_images"])
        if not args.memory:
            result["memory"] = saved.get("memory", {})
    if "all" in configs and not args.small and args.device == "cpu":  # on CUDA they would time kernel launches
        print("# time in each analysis's own methods ('all')", file=sys.stderr, flush=True)
        result["method_times"] = method_times(args, "all")
        common.write_json(args.json_out, result)
    for alloc in args.allocators if args.memory else []:
        result["memory"][alloc] = {}
        samples: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        for _ in range(args.memory_samples):  # configurations in turn, so slow drift hits all alike
            for c in configs:
                cmd = worker_cmd(args, "--worker", f"memory:{c}", "--configs", c)
                samples[c].append(common.run_json(cmd, timeout=900, env=common.allocator_env(alloc)))
                print(f"# memory {alloc} {c}: {samples[c][-1]}", file=sys.stderr, flush=True)
        for c, runs in samples.items():
            good = [r for r in runs if "peak_rss_mb" in r]
            if not good:
                result["memory"][alloc][c] = runs[-1]
                continue
            result["memory"][alloc][c] = {
                "peak_rss_mb": common.median([r["peak_rss_mb"] for r in good]),
                "setup_rss_mb": common.median([r["setup_rss_mb"] for r in good]),
                "samples": runs,
            }
        common.write_json(args.json_out, result)
    result["elapsed_s"] = time.monotonic() - start
    return result


def render(result: dict[str, Any], write_docs: bool) -> int:
    """Print (and with ``write_docs``, write into docs/benchmarks.md) the tables of a result."""
    failed = {a: r["error"] for a, r in result["timing"].items() if "error" in r}
    if failed:
        print(f"timing failed: {failed}", file=sys.stderr)
    timing = {a: r for a, r in result["timing"].items() if "error" not in r}
    if not timing:
        return 1
    result = {**result, "timing": timing}
    result["summary"] = summaries(result)
    result["probe_summary"] = summaries(result, "probe_timing")
    for alloc, r in result.get("probe_timing", {}).items():
        if "error" in r:
            print(f"probe timing ({alloc} allocator) failed: {r['error']}", file=sys.stderr)
    first = next(iter(result["summary"].values()))
    table = "\n\n".join((f"{w}:\n\n" if len(first) > 1 else "") + main_table(result, w) for w in first)
    details = report(result, result.get("command", "?"))
    print(table + "\n\n" + details)
    if write_docs:
        device = "CUDA" if next(iter(timing.values())).get("machine", {}).get("gpu") else "CPU"
        common.update_docs("ANALYSES-" + device, table)
        common.update_docs("ANALYSES-DETAILS-" + device, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
