"""The paper's MobileViTv1-vs-v2 comparison on the current backend, in one run.

    python -m mvit2_jax.benchmarks.v1_vs_v2 --out mvit2_jax/benchmarks/results
    python -m mvit2_jax.benchmarks.v1_vs_v2 --out /tmp/v1v2 --tiny   # seconds

For MobileViTv1 XXS, XS, S and MobileViTv2 at 0.5, 0.75, 1.0 (each v2 width beside the v1
size of about its accuracy): trainable parameters, GMACs (conv and linear, plus the attention
units' own products: mvit2_jax.stats), the paper's ImageNet top-1, batch-1 latency (median
and the 10th-90th percentile spread over the timed calls) and batch-16 throughput, inference
in float32 at 256x256 with random weights, one model after another in this process. Writes
v1_vs_v2.{md,csv,json} and v1_vs_v2.png (top-1 against batch-1 latency, as the paper plots
it) to --out; every row records the load average while it ran. Like the other command-line
programs it runs under the fast host allocator (mvit2_jax.allocator, MVIT2_ALLOCATOR).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

from mvit2_jax import allocator
from mvit2_jax.benchmarks import common
from mvit2_jax.models import V1_VARIANTS, VARIANTS

V1_SIZES = tuple(V1_VARIANTS)
V2_ALPHAS = (0.5, 0.75, 1.0)


def _latencies(fn, min_repeats: int, min_time: float) -> List[float]:
    fn()  # warm-up
    times: List[float] = []
    while len(times) < min_repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(family: str, name: Any, size: int, batch: int, min_repeats: int, min_time: float) -> Dict[str, Any]:
    """One model's row: stats, batch-1 latency and batch-`batch` throughput (inference)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mvit2_jax.benchmarks import train_step
    from mvit2_jax.models import MobileViT, MobileViTv2
    from mvit2_jax.stats import model_stats

    if family == "v1":
        model, label, top1 = MobileViT(variant=name), f"MobileViTv1-{name.upper()}", V1_VARIANTS[name].top1
    else:
        model, label, top1 = MobileViTv2(alpha=name), f"MobileViTv2-{name}", VARIANTS[name].top1
    stats = model_stats(model, size)
    row: Dict[str, Any] = {
        "model": label, "params_M": stats["params"] / 1e6, "gmacs": stats["macs"] / 1e9,
        "attn_gmacs": stats["attn_macs"] / 1e9, "top1_paper": top1, "size": size,
    }
    rng = np.random.default_rng(0)
    variables = train_step.random_like(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    load_before = common.load_average()
    for b, prefix in ((1, "b1"), (batch, "bN")):
        images = jnp.asarray(rng.random((b, size, size, 3), np.float32))
        t0 = time.perf_counter()
        jax.block_until_ready(forward(variables, images))
        row[f"{prefix}_first_call_s"] = time.perf_counter() - t0
        times = _latencies(lambda: jax.block_until_ready(forward(variables, images)), min_repeats, min_time)
        if b == 1:
            q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
            row.update(latency_ms=1000 * statistics.median(times), latency_p10_ms=1000 * q[0], latency_p90_ms=1000 * q[-1],
                       latency_repeats=len(times))
        else:
            row.update(batch=b, images_per_s=b / statistics.median(times), throughput_repeats=len(times))
    row["load"] = max(load_before, common.load_average())
    return row


def plot(rows: Sequence[Dict[str, Any]], path: str, title: str) -> None:
    plt = common.pyplot()
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for family, color, marker in (("MobileViTv1", "tab:orange", "s"), ("MobileViTv2", "tab:blue", "o")):
        sel = [r for r in rows if r["model"].startswith(family + "-")]
        if not sel:
            continue
        ax_lat.plot([r["latency_ms"] for r in sel], [r["top1_paper"] for r in sel], marker=marker, color=color, label=family)
        ax_lat.errorbar([r["latency_ms"] for r in sel], [r["top1_paper"] for r in sel], fmt="none", ecolor=color,
                        xerr=[[r["latency_ms"] - r["latency_p10_ms"] for r in sel], [r["latency_p90_ms"] - r["latency_ms"] for r in sel]])
        ax_thr.plot([r["images_per_s"] for r in sel], [r["top1_paper"] for r in sel], marker=marker, color=color, label=family)
        for r in sel:
            name = r["model"].split("-", 1)[1]
            ax_lat.annotate(name, (r["latency_ms"], r["top1_paper"]), fontsize=7, textcoords="offset points", xytext=(4, -8))
            ax_thr.annotate(name, (r["images_per_s"], r["top1_paper"]), fontsize=7, textcoords="offset points", xytext=(4, -8))
    ax_lat.set(xlabel="batch-1 latency (ms, median; bars: 10th-90th percentile)", ylabel="ImageNet-1k top-1 (paper, %)")
    ax_thr.set(xlabel=f"images / s at batch {rows[0].get('batch', '')}" if rows else "images / s", ylabel="ImageNet-1k top-1 (paper, %)")
    for ax in (ax_lat, ax_thr):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for v1_vs_v2.{md,csv,json,png}")
    parser.add_argument("--v1", nargs="*", default=list(V1_SIZES), choices=V1_SIZES)
    parser.add_argument("--alphas", type=float, nargs="*", default=list(V2_ALPHAS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="the throughput batch")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls at least, per measurement")
    parser.add_argument("--min-time", type=float, default=5.0, help="timed seconds at least, per measurement")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run: XXS and 0.5 at 64x64, batch 2")
    args = parser.parse_args(argv)
    if args.tiny:
        args.v1, args.alphas, args.size, args.batch, args.repeats, args.min_time = ["xxs"], [0.5], 64, 2, 3, 0.0
    if any(a not in VARIANTS for a in args.alphas):
        parser.error(f"--alphas takes the paper's widths {tuple(VARIANTS)} (their top-1 is plotted), got {args.alphas}")
    info = common.machine_info()
    info.update(size=args.size, batch=args.batch, dtype="float32")
    print(f"v1 vs v2 benchmark: {info}", flush=True)
    rows = []
    for family, names in (("v1", args.v1), ("v2", args.alphas)):
        for name in names:
            row = measure(family, name, args.size, args.batch, args.repeats, args.min_time)
            rows.append(row)
            print(f"  {row['model']}: {row['latency_ms']:.1f} ms at batch 1, {row['images_per_s']:.1f} img/s at batch {args.batch}", flush=True)
    notes = [
        "inference, float32, random weights, one jit per batch size; latency: median of the timed batch-1 calls "
        "(p10 / p90 their 10th / 90th percentiles); first_call_s: compile + first call",
        "gmacs: conv and linear multiply-accumulates (the paper's count); attn_gmacs: the attention units' own products",
        "top1_paper: ImageNet-1k top-1 at 256x256 from the papers (MobileViTv1, MobileViTv2)",
    ]
    columns = ["model", "params_M", "gmacs", "attn_gmacs", "top1_paper", "latency_ms", "latency_p10_ms", "latency_p90_ms",
               "batch", "images_per_s", "b1_first_call_s", "bN_first_call_s", "latency_repeats", "throughput_repeats", "load"]
    common.write_table(rows, columns, args.out, "v1_vs_v2", f"MobileViTv1 vs MobileViTv2 at {args.size}x{args.size}, inference", notes, info)
    plot(rows, f"{args.out}/v1_vs_v2.png",
         f"MobileViTv1 vs v2, {args.size}x{args.size} float32, {info['backend']} ({info['cpu_cores']} cores)")
    return rows


if __name__ == "__main__":
    allocator.maybe_reexec()
    main()
