"""Batch-1 latency on a mobile runtime: LiteRT (XNNPACK), the paper's latency claims.

    python -m mvit2_jax.benchmarks.litert --out mvit2_jax/benchmarks/results
    python -m mvit2_jax.benchmarks.litert --out /tmp/litert --tiny   # seconds

Each model is exported exactly as `python -m mvit2_jax.export` exports it (portable path,
jax2tf, the TFLite converter, builtin ops), with random weights, in float32 and int8
(weights and activations, calibrated on random images: the latency does not depend on the
values), and run by ai-edge-litert's interpreter with its default XNNPACK delegate on 1 and
2 threads: median batch-1 latency with the 10th-90th percentile spread. The models:
MobileViTv2 at every width (separable attention) at 256x256, MobileViTv1 XXS / XS / S at
256x256, and at alpha 1.0 multi-head and Linformer attention at 256x256 and 512x512 beside
separable (the paper's separable-vs-MHA claim, for the whole model). Writes
litert.{md,csv,json} and litert.png to --out.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from mvit2_jax import allocator
from mvit2_jax.benchmarks import common
from mvit2_jax.models import V1_VARIANTS, VARIANTS


def default_specs() -> List[Dict[str, Any]]:
    specs = [dict(family="v2", alpha=a, attention="separable", size=256) for a in VARIANTS]
    specs += [dict(family="v1", variant=v, attention="mha", size=256) for v in V1_VARIANTS]
    for size in (256, 512):
        for attention in ("mha", "linformer") + (("separable",) if size == 512 else ()):
            specs.append(dict(family="v2", alpha=1.0, attention=attention, size=size))
    return specs


def label(spec: Dict[str, Any]) -> str:
    if spec["family"] == "v1":
        return f"MobileViTv1-{spec['variant'].upper()}"
    return f"MobileViTv2-{spec['alpha']} {spec['attention']}"


def build(spec: Dict[str, Any], size: int):
    """(model on the portable path, random variables) of one spec."""
    import jax
    import jax.numpy as jnp

    from mvit2_jax.benchmarks import train_step
    from mvit2_jax.models import MobileViT, MobileViTv2

    if spec["family"] == "v1":
        model = MobileViT(variant=spec["variant"], attention=spec["attention"], kernels="portable")
    else:
        model = MobileViTv2(alpha=spec["alpha"], attention=spec["attention"], kernels="portable")
    variables = train_step.random_like(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return model, variables


def tflite_model(spec: Dict[str, Any], quantize: str) -> bytes:
    from mvit2_jax import export as export_lib

    size = spec["size"]
    model, variables = build(spec, size)
    fn = export_lib.inference_function(model, variables, "classification")
    calibration = np.random.default_rng(0).random((4, size, size, 3), np.float32) if quantize == "int8" else None
    with tempfile.TemporaryDirectory() as scratch:
        saved = export_lib.to_savedmodel(fn, (1, size, size, 3), "float32", scratch + "/savedmodel")
        return export_lib.to_tflite(saved, quantize, calibration)


def time_tflite(flatbuffer: bytes, size: int, threads: int, min_repeats: int, min_time: float) -> Dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    interpreter.set_tensor(index, np.random.default_rng(1).random((1, size, size, 3), np.float32))
    interpreter.invoke()  # warm-up (XNNPACK packs the weights on the first call)
    times: List[float] = []
    while len(times) < min_repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"latency_ms": 1000 * statistics.median(times), "p10_ms": 1000 * q[0], "p90_ms": 1000 * q[-1], "repeats": len(times)}


def plot(rows: Sequence[Dict[str, Any]], path: str, title: str) -> None:
    plt = common.pyplot()
    fig, (ax_w, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (quantize, threads), style in zip([("none", 1), ("none", 2), ("int8", 1), ("int8", 2)], ["o-", "o--", "s-", "s--"]):
        sel = [r for r in rows if r["quantize"] == quantize and r["threads"] == threads and r["attention"] == "separable"
               and r["size"] == 256 and r["family"] == "v2"]
        if sel:
            ax_w.plot([r["alpha"] for r in sel], [r["latency_ms"] for r in sel], style, label=f"v2 {quantize}, {threads} thread(s)")
        v1 = [r for r in rows if r["quantize"] == quantize and r["threads"] == threads and r["family"] == "v1"]
        if v1:
            ax_w.scatter([0.5, 0.75, 1.0][: len(v1)], [r["latency_ms"] for r in v1], marker="x", label=f"v1 XXS/XS/S {quantize}, {threads}t")
    ax_w.set(xlabel="MobileViTv2 width (v1 sizes at their accuracy-matched widths)", ylabel="batch-1 latency (ms)", title="256x256")
    attentions = ["separable", "linformer", "mha"]
    xs = np.arange(len(attentions))
    for offset, size in ((-0.2, 256), (0.2, 512)):
        vals = []
        for attention in attentions:
            r = [x for x in rows if x["family"] == "v2" and x["alpha"] == 1.0 and x["attention"] == attention and x["size"] == size
                 and x["quantize"] == "none" and x["threads"] == 2]
            vals.append(r[0]["latency_ms"] if r else 0.0)
        bars = ax_a.bar(xs + offset, vals, width=0.4, label=f"{size}x{size}")
        ax_a.bar_label(bars, fmt="%.0f", fontsize=7)
    ax_a.set_xticks(xs, attentions)
    ax_a.set(ylabel="batch-1 latency (ms), float32, 2 threads", title="MobileViTv2-1.0: the attention unit")
    for ax in (ax_w, ax_a):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for litert.{md,csv,json,png}")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quantize", nargs="+", default=["none", "int8"], choices=("none", "int8"))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls at least")
    parser.add_argument("--min-time", type=float, default=2.0, help="timed seconds at least, per measurement")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run: two small models at 64x64")
    args = parser.parse_args(argv)
    specs = default_specs()
    if args.tiny:
        specs = [dict(family="v2", alpha=0.5, attention="separable", size=64), dict(family="v2", alpha=0.5, attention="mha", size=64)]
        args.threads, args.repeats, args.min_time = [1], 3, 0.0
    info = common.machine_info()
    print(f"LiteRT benchmark: {info}", flush=True)
    rows = []
    for spec in specs:
        for quantize in args.quantize:
            t0 = time.perf_counter()
            flatbuffer = tflite_model(spec, quantize)
            export_s = time.perf_counter() - t0
            for threads in args.threads:
                row = {"model": label(spec), "family": spec["family"], "alpha": spec.get("alpha"), "variant": spec.get("variant"),
                       "attention": spec["attention"], "size": spec["size"], "quantize": quantize, "threads": threads,
                       "file_MB": len(flatbuffer) / 1e6, "export_s": export_s}
                row.update(time_tflite(flatbuffer, spec["size"], threads, args.repeats, args.min_time))
                row["load"] = common.load_average()
                rows.append(row)
                print(f"  {row['model']} {spec['size']} {quantize} {threads}t: {row['latency_ms']:.1f} ms", flush=True)
    notes = [
        "ai-edge-litert interpreter, default XNNPACK delegate, batch 1, float32 input; random weights; "
        "int8: weights and activations, calibrated on 4 random images (latency only)",
        "latency_ms: median of the timed calls after one warm-up call; p10 / p90: their 10th / 90th percentiles",
    ]
    columns = ["model", "size", "quantize", "threads", "latency_ms", "p10_ms", "p90_ms", "repeats", "file_MB", "export_s", "load"]
    common.write_table(rows, columns, args.out, "litert", "Batch-1 latency in LiteRT (XNNPACK)", notes, info)
    plot(rows, f"{args.out}/litert.png", f"LiteRT (XNNPACK), batch 1, {info['cpu_cores']} cores ({info['cpu']})")
    return rows


if __name__ == "__main__":
    allocator.maybe_reexec()
    main()
