"""Shared helpers of the benchmarks: timing, machine facts, memory, tables and plots.

Every measurement records the 1-minute load average before and after it: on a shared
machine a load above the core count means other processes took CPU time from ours.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from mvit2_jax import allocator
from mvit2_jax.errors import ConfigError


def load_config(path: str, **kwargs: Any):
    """`get_config(**kwargs)` of the experiment config file at `path`, passing only the
    arguments it takes (run from the repository root, so that the file's `from experiments
    import base` resolves)."""
    import importlib.util
    import inspect

    if not os.path.isfile(path):
        raise ConfigError(f"no experiment config file {path}: run from the repository root or pass --config=FILE")
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accepted = inspect.signature(module.get_config).parameters
    return module.get_config(**{k: v for k, v in kwargs.items() if k in accepted})


def load_average() -> float:
    """The 1-minute load average (runnable processes, all users)."""
    return round(os.getloadavg()[0], 2)


def cpu_count() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> Dict[str, Any]:
    """Facts about this machine and JAX backend, written beside every table."""
    import jax

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "cpu_cores": cpu_count(),
        "cpu": _cpu_model(),
        "cpu_features": " ".join(cpu_features()) or "unknown",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "allocator": allocator.describe(),
        "load_average_at_start": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> List[str]:
    """Which of CPU_FEATURES this CPU has (Linux `cpuinfo`; [] where unknown): the vector
    units XLA:CPU and PyTorch pick their kernels by (AVX2 or AVX-512; native bfloat16)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in CPU_FEATURES if name in flags]
    except OSError:
        pass
    return []


def matmul_peak(dtype: str, n: int = 2048, min_time: float = 2.0) -> float:
    """GFLOP/s of one n x n matrix product in `dtype` ("float32" or "bfloat16") through XLA on
    the default device: the machine's own ceiling for the model's matrix work, measured in
    the same run as the model because machines of one kind differ (AVX2 or AVX-512)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), np.float32), dtype) for _ in range(2))
    # Products accumulate in float32 (the bfloat16 units' own form: a bfloat16 result takes
    # XLA:CPU a slower path, 148 against 332 GFLOP/s at n 2048 on an AVX512_BF16 EPYC).
    product = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    t = time_call(lambda: product(a, b).block_until_ready(), warmup=2, min_repeats=3, max_repeats=50, min_total_s=min_time)
    return 2 * n**3 / t["median_s"] / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 20,
    min_total_s: float = 1.0,
) -> Dict[str, Any]:
    """Median wall time of `fn()` (which must block until its result is ready).

    Also returns `cpu_s`, the process CPU time (all threads) per call: on a loaded machine
    it is a steadier measure of the work done than the wall time.

    Runs `warmup` untimed calls, then repeats until both `min_repeats` calls and
    `min_total_s` seconds are done (at most `max_repeats` calls).
    """
    for _ in range(warmup):
        fn()
    load_before = load_average()
    times: List[float] = []
    cpu0 = time.process_time()
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_total_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_s": (time.process_time() - cpu0) / len(times),
        "repeats": len(times),
        "load": max(load_before, load_average()),
    }


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MiB.

    Reads VmHWM (Linux), which starts afresh in a new program; ru_maxrss, the fallback,
    carries the parent's peak over into a child started by fork + exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def device_peak_mb() -> Optional[float]:
    """Peak bytes in use on the first accelerator in MiB, where the backend reports it (GPU, TPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**20, 1)


def write_table(
    rows: Sequence[Dict[str, Any]],
    columns: Sequence[str],
    out_dir: str,
    name: str,
    title: str,
    notes: Sequence[str] = (),
    info: Optional[Dict[str, Any]] = None,
) -> str:
    """Write `name`.csv, `name`.md (and `name`.json with `info`); print the markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    lines = [f"## {title}", ""]
    if info:
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        lines.append("")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({"info": info or {}, "rows": list(rows), "notes": list(notes)}, f, indent=1, default=str)
    print(text, flush=True)
    return text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lay out, write (PNG at 120 dpi) and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
