"""Attention units side by side: separable (O(k)) vs multi-head (O(k^2)) vs Linformer.

    python -m mvit2_jax.benchmarks.attention --out /tmp/bench_attention
    python -m mvit2_jax.benchmarks.attention --out /tmp/bench_attention --tiny   # seconds

Times the forward pass and forward+backward (gradients of the parameters and the input)
of each unit of mvit2_jax.models.attention on tokens [B, P, k, d] (the MobileViTv2 block's
layout: P pixel positions per 2x2 patch, k patches), for k = 64 ... 16384, on the current
JAX backend: jit, warm-up, median of repeats. Writes attention.{md,csv,json} and a log-log
plot attention.png to --out. A configuration whose compiled program would need more memory
than --memory-budget-gb is skipped and the reason recorded in the table (multi-head
attention at large k: its k x k score matrices).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mvit2_jax import allocator
from mvit2_jax.benchmarks import common
from mvit2_jax.models.attention import ATTENTION_TYPES, attention_factory

UNITS = ATTENTION_TYPES
MODES = ("fwd", "fwd+bwd")


def default_memory_budget_gb() -> float:
    """Half of the memory available now (CPU) or of the accelerator's memory."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory stats)
        stats = {}
    if stats.get("bytes_limit"):
        return 0.5 * stats["bytes_limit"] / 2**30
    try:
        import psutil

        return 0.5 * psutil.virtual_memory().available / 2**30
    except ImportError:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30


def compiled_bytes(compiled) -> Optional[int]:
    """Arguments + outputs + temporaries of a compiled program, from XLA's memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def measure_unit(
    kind: str,
    k: int,
    *,
    dim: int,
    heads: int,
    proj_len: int,
    batch: int,
    positions: int,
    budget_bytes: float,
    timing: Dict[str, Any],
) -> List[Dict[str, Any]]:
    """Rows (one per mode) for one unit at token count k."""
    unit = attention_factory(kind, num_heads=heads, proj_len=proj_len)(dim)
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((batch, positions, k, dim), np.float32))
    cot = jnp.asarray(rng.standard_normal((batch, positions, k, dim), np.float32))
    # Parameter shapes do not depend on k, except Linformer's projections: initialize on a
    # few tokens (an eager multi-head init at k = 16384 would build 4 GiB score matrices).
    params = unit.init(jax.random.key(0), x[:1, :1] if kind == "linformer" else x[:1, :1, :16])

    def fwd(p, x):
        return unit.apply(p, x)

    def fwd_bwd(p, x, cot):
        return jax.grad(lambda p, x: jnp.vdot(unit.apply(p, x), cot), argnums=(0, 1))(p, x)

    rows = []
    for mode, fn, args in (("fwd", fwd, (params, x)), ("fwd+bwd", fwd_bwd, (params, x, cot))):
        row: Dict[str, Any] = {"unit": kind, "k": k, "mode": mode}
        compiled = jax.jit(fn).lower(*args).compile()
        need = compiled_bytes(compiled)
        row["mem_MiB"] = None if need is None else round(need / 2**20, 1)
        if need is not None and need > budget_bytes:
            row["skipped"] = f"needs {need / 2**30:.1f} GiB > budget {budget_bytes / 2**30:.1f} GiB"
            row["load"] = common.load_average()
            rows.append(row)
            continue
        t = common.time_call(lambda: jax.block_until_ready(compiled(*args)), **timing)
        row.update(ms=1000 * t["median_s"], min_ms=1000 * t["min_s"], repeats=t["repeats"], load=t["load"])
        rows.append(row)
        print(f"  {kind:9s} k={k:6d} {mode:7s} {row['ms']:10.2f} ms  (load {row['load']})", flush=True)
    return rows


def loglog_slope(rows: Sequence[Dict[str, Any]], unit: str, mode: str) -> Optional[float]:
    """Growth exponent of time in k (1: linear, 2: quadratic): least-squares slope in log-log
    over the larger half of the measured token counts (at least the two largest)."""
    pts = sorted((r["k"], r["ms"]) for r in rows if r["unit"] == unit and r["mode"] == mode and r.get("ms"))
    if len(pts) < 2:
        return None
    pts = pts[-max(2, (len(pts) + 1) // 2):]
    x = np.log([k for k, _ in pts])
    y = np.log([t for _, t in pts])
    return float(np.polyfit(x, y, 1)[0])


def plot(rows: Sequence[Dict[str, Any]], path: str, title: str) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = {"separable": "tab:blue", "mha": "tab:red", "linformer": "tab:green"}
    for unit in UNITS:
        for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
            pts = sorted((r["k"], r["ms"]) for r in rows if r["unit"] == unit and r["mode"] == mode and r.get("ms"))
            if pts:
                ks, ts = zip(*pts)
                ax.plot(ks, ts, style, color=colors[unit], label=f"{unit} {mode}", markersize=4)
            for r in rows:
                if r["unit"] == unit and r["mode"] == mode and r.get("skipped"):
                    y = (pts[-1][1] if pts else 1.0) * (2.0 if mode == "fwd" else 0.5)
                    ax.annotate(f"{mode}\nskipped\n(memory)", (r["k"], y), color=colors[unit], fontsize=6, ha="center")
    measured = [(r["k"], r["ms"]) for r in rows if r.get("ms")]
    if measured:
        kmin = min(k for k, _ in measured)
        kmax = max(k for k, _ in measured)
        anchor = min(t for k, t in measured if k == kmin)
        ks = np.array([kmin, kmax], float)
        ax.plot(ks, anchor * ks / kmin, ":", color="gray", label="slope 1 (O(k))")
        ax.plot(ks, anchor * (ks / kmin) ** 2, "-.", color="gray", label="slope 2 (O(k^2))")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens k")
    ax.set_ylabel("time per call (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for attention.{md,csv,json,png}")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4, help="heads of mha and linformer")
    parser.add_argument("--proj-len", type=int, default=64, help="linformer's projected length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--positions", type=int, default=4, help="P: pixel positions per patch (2x2 -> 4)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2**i for i in range(6, 15)])
    parser.add_argument("--units", nargs="+", choices=UNITS, default=list(UNITS))
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="default: half the available memory")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per point (at least 3 calls)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run: d=32, k in {16, 64}")
    args = parser.parse_args(argv)
    if args.tiny:
        args.dim, args.ks, args.min_time = 32, [16, 64], 0.0
    timing = dict(warmup=1, min_repeats=2 if args.tiny else 3, max_repeats=20, min_total_s=args.min_time)
    budget_gb = args.memory_budget_gb or default_memory_budget_gb()
    info = common.machine_info()
    info.update(d=args.dim, heads=args.heads, linformer_proj_len=args.proj_len, input=f"[{args.batch}, {args.positions}, k, {args.dim}]", memory_budget_GiB=round(budget_gb, 1))
    print(f"attention benchmark: {info}", flush=True)

    rows: List[Dict[str, Any]] = []
    for k in args.ks:
        for unit in args.units:
            rows.extend(
                measure_unit(
                    unit, k, dim=args.dim, heads=args.heads, proj_len=args.proj_len, batch=args.batch,
                    positions=args.positions, budget_bytes=budget_gb * 2**30, timing=timing,
                )
            )
    # Ratios to the separable unit at the same k and mode.
    sep = {(r["k"], r["mode"]): r.get("ms") for r in rows if r["unit"] == "separable"}
    for r in rows:
        base = sep.get((r["k"], r["mode"]))
        if base and r.get("ms"):
            r["x_separable"] = r["ms"] / base
    notes = []
    for unit in args.units:
        for mode in MODES:
            s = loglog_slope(rows, unit, mode)
            if s is not None:
                notes.append(f"{unit} {mode}: time grows as k^{s:.2f} (log-log fit over the larger half of the measured k)")
    for mode in MODES:
        for k in sorted({1024, max(args.ks)} & set(args.ks)):
            r = [x for x in rows if x["unit"] == "mha" and x["k"] == k and x["mode"] == mode]
            if r and r[0].get("x_separable"):
                notes.append(f"k={k} {mode}: separable is {r[0]['x_separable']:.1f}x faster than mha")
    for r in rows:
        if r.get("skipped"):
            notes.append(f"{r['unit']} k={r['k']} {r['mode']} skipped: {r['skipped']}")
    columns = ["unit", "k", "mode", "ms", "min_ms", "x_separable", "repeats", "mem_MiB", "load", "skipped"]
    common.write_table(rows, columns, args.out, "attention", "Attention units: time per call (ms) vs tokens k", notes, info)
    title = (
        f"attention units, d={args.dim}, input [{args.batch},{args.positions},k,{args.dim}], "
        f"{info['backend']} ({info['cpu_cores']} cores), median ms"
    )
    plot(rows, os.path.join(args.out, "attention.png"), title)
    print(f"wrote {args.out}/attention.{{md,csv,json,png}}")
    return rows


if __name__ == "__main__":
    allocator.maybe_reexec()
    main()
