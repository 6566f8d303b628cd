"""Batch-1 latency on mobile runtimes, LiteRT (XNNPACK) and ONNX Runtime: the paper's latency claims.

    python -m mvit2_jax.benchmarks.mobile --out mvit2_jax/benchmarks/results --timm-python python
    python -m mvit2_jax.benchmarks.mobile --out /tmp/mobile --tiny   # seconds

Each model is exported exactly as `python -m mvit2_jax.export` exports it (portable path;
LiteRT: jax2tf and the TFLite converter, builtin ops; ONNX: jax2onnx), with random weights,
in float32 and int8 (weights and activations, calibrated on random images: the latency does
not depend on the values; ONNX: onnxruntime's static QDQ quantization, per-channel), and run
on 1 and 2 threads by ai-edge-litert's interpreter with its default XNNPACK delegate and by
onnxruntime's CPU provider with every graph optimization: median batch-1 latency with the
10th-90th percentile spread. The models: MobileViTv2 at every width (separable attention)
at 256x256, MobileViTv1 XXS / XS / S at 256x256, and at alpha 1.0 multi-head and Linformer
attention at 256x256 and 512x512 beside separable (the paper's separable-vs-MHA claim, for
the whole model).

With --timm-python (a Python that has torch and timm), timm's mobilevitv2_* and mobilevit_*
are exported to ONNX by timm_onnx.py (torch.onnx.export, as timm's own exporter) and timed
in the same onnxruntime, in this process, on the same threads, float32 and int8 (quantized by
the same onnxruntime quantizer), taking turns with our export of the same model in blocks of
about 0.25 s (`time_onnx_paired`): the ratio is the median of the rounds' ratios with a 95%
bootstrap interval, so that the VM's drifts in speed (10-70% within minutes here) fall on
both alike. Writes mobile.{md,csv,json}, mobile_vs_timm.{md,csv,json} and mobile.png to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mvit2_jax import allocator
from mvit2_jax.benchmarks import common
from mvit2_jax.models import V1_VARIANTS, VARIANTS

RUNTIMES = ("litert", "onnxruntime")
TIMM_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_onnx.py")


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


def timm_name(spec: Dict[str, Any]) -> Optional[str]:
    """timm's name for the same architecture (None: timm has no such model)."""
    if spec["family"] == "v1":
        return V1_VARIANTS[spec["variant"]].timm_name
    return VARIANTS[spec["alpha"]].timm_name if spec["attention"] == "separable" and spec["alpha"] in VARIANTS else None


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


def calibration(shape: Sequence[int]) -> np.ndarray:
    """Four random images to calibrate int8 activations on (latency only)."""
    return np.random.default_rng(0).random((4, *shape[1:]), np.float32)


def our_exports(spec: Dict[str, Any], quantize: str, runtimes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """{runtime: {"model": bytes, "export_s"}} of one spec, exported as `mvit2_jax.export` does."""
    from mvit2_jax import export as export_lib

    size = spec["size"]
    model, variables = build(spec, size)
    fn = export_lib.inference_function(model, variables, "classification")
    images = calibration((1, size, size, 3)) if quantize == "int8" else None
    out: Dict[str, Dict[str, Any]] = {}
    if "litert" in runtimes:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            saved = export_lib.to_savedmodel(fn, (1, size, size, 3), "float32", scratch + "/savedmodel")
            out["litert"] = {"model": export_lib.to_tflite(saved, quantize, images), "export_s": time.perf_counter() - t0}
    if "onnxruntime" in runtimes:
        t0 = time.perf_counter()
        proto = export_lib.quantize_onnx(export_lib.to_onnx(fn, (1, size, size, 3), "float32"), quantize, images)
        out["onnxruntime"] = {"model": proto.SerializeToString(), "export_s": time.perf_counter() - t0}
    return out


def _timed(invoke: Callable[[], Any], min_repeats: int, min_time: float) -> Dict[str, Any]:
    """Median latency and 10th / 90th percentiles of `invoke` after one warm-up call."""
    invoke()  # warm-up (XNNPACK packs the weights, onnxruntime plans its memory on the first call)
    times: List[float] = []
    while len(times) < min_repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        invoke()
        times.append(time.perf_counter() - t0)
    return _latency(times)


def _latency(times: Sequence[float]) -> Dict[str, Any]:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"latency_ms": 1000 * statistics.median(times), "p10_ms": 1000 * q[0], "p90_ms": 1000 * q[-1], "repeats": len(times)}


def time_litert(flatbuffer: bytes, threads: int, min_repeats: int, min_time: float) -> Dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.random.default_rng(1).random(detail["shape"], np.float32))
    return _timed(interpreter.invoke, min_repeats, min_time)


def _onnx_call(model: bytes, threads: int) -> Callable[[], Any]:
    """One batch-1 inference of an ONNX model on a fixed random input, as a call."""
    from mvit2_jax import export as export_lib

    session = export_lib.onnx_session(model, threads)
    (source,) = session.get_inputs()
    feed = {source.name: np.random.default_rng(1).random(source.shape, np.float32)}
    return functools.partial(session.run, None, feed)


def time_onnx(model: bytes, threads: int, min_repeats: int, min_time: float) -> Dict[str, Any]:
    return _timed(_onnx_call(model, threads), min_repeats, min_time)


TIMERS = {"litert": time_litert, "onnxruntime": time_onnx}


def time_onnx_paired(models: Sequence[bytes], threads: int, min_repeats: int, min_time: float,
                     block_time: float = 0.25, min_rounds: int = 1) -> Tuple[List[List[float]], List[List[float]]]:
    """(per-call seconds, per-round medians) of several ONNX models on one input shape, taking
    turns in short blocks (the order reversed every round) so that the machine's drifts in
    speed fall on all of them alike. Each block starts with an untimed call (the previous
    model's worker threads may still be spinning on the cores), then times calls for
    `block_time` s (at least 2). At least `min_repeats` timed calls, `min_rounds` rounds and
    `min_time` s per model."""
    runs = [_onnx_call(model, threads) for model in models]
    for run in runs:
        run()  # warm-up (onnxruntime plans its memory on the first call)
    calls: List[List[float]] = [[] for _ in models]
    rounds: List[List[float]] = [[] for _ in models]
    while len(calls[0]) < min_repeats or len(rounds[0]) < min_rounds or sum(map(sum, calls)) < min_time * len(models):
        order = range(len(models)) if len(rounds[0]) % 2 == 0 else reversed(range(len(models)))
        for i in order:
            runs[i]()
            block: List[float] = []
            while len(block) < 2 or sum(block) < block_time:
                t0 = time.perf_counter()
                runs[i]()
                block.append(time.perf_counter() - t0)
            calls[i] += block
            rounds[i].append(statistics.median(block))
    return calls, rounds


def paired_ratio(slow: Sequence[float], fast: Sequence[float], resamples: int = 2000, seed: int = 0) -> Dict[str, float]:
    """The median of the per-round ratios slow_i / fast_i (`time_onnx_paired`'s rounds), with a
    95% bootstrap interval of that median (rounds resampled with replacement)."""
    if len(slow) != len(fast) or not len(slow):
        raise ValueError(f"paired_ratio needs rounds of both, got {len(slow)} and {len(fast)} times")
    ratios = np.asarray(slow, np.float64) / np.asarray(fast, np.float64)
    picks = np.random.default_rng(seed).integers(0, len(ratios), (resamples, len(ratios)))
    low, high = np.percentile(np.median(ratios[picks], axis=1), [2.5, 97.5])
    return {"ratio": float(np.median(ratios)), "ci95_low": float(low), "ci95_high": float(high), "pairs": len(ratios)}


def timm_exports(python: str, names: Sequence[str], size: int, out_dir: str) -> Dict[str, Any]:
    """timm_onnx.py's record ({"timm", "torch", "files": {name: {"path", "export_s"}}}), or {"error"}."""
    cmd = [python, TIMM_SCRIPT, "--out", out_dir, "--size", str(size), *names]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timm_model(entry: Dict[str, Any], quantize: str) -> Dict[str, Any]:
    """{"model": bytes, "export_s"} of a timm ONNX export (timm_onnx.py's {"path", "export_s"}),
    int8-quantized by the same quantizer as ours."""
    import onnx

    from mvit2_jax import export as export_lib

    proto = onnx.load(entry["path"])
    t0 = time.perf_counter()
    if quantize != "none":
        dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        proto = export_lib.quantize_onnx(proto, quantize, calibration(dims))
    return {"model": proto.SerializeToString(), "export_s": entry["export_s"] + time.perf_counter() - t0}


def ratio_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """timm's ONNX Runtime latency over ours, per model, precision and thread count: from the
    paired rounds where the timm row has them (`paired_ratio`), else the ratio of the medians."""
    out = []
    for row in rows:
        if row["impl"] != "timm":
            continue
        (ours,) = [r for r in rows if r["impl"] == "ours" and r["runtime"] == "onnxruntime" and r["model"] == row["model"]
                   and r["size"] == row["size"] and r["quantize"] == row["quantize"] and r["threads"] == row["threads"]]
        ratio = {"model": row["model"], "size": row["size"], "quantize": row["quantize"], "threads": row["threads"],
                 "ours_ms": ours["latency_ms"], "timm_ms": row["latency_ms"], "timm_over_ours": row["latency_ms"] / ours["latency_ms"]}
        if "paired" in row:
            p = row["paired"]
            ratio.update(timm_over_ours=p["ratio"], ci95=f"{p['ci95_low']:.3f}-{p['ci95_high']:.3f}", pairs=p["pairs"])
        out.append(ratio)
    return out


def plot(rows: Sequence[Dict[str, Any]], path: str, title: str) -> None:
    plt = common.pyplot()
    fig, (ax_o, ax_l, ax_a) = plt.subplots(1, 3, figsize=(17, 4.8))
    pick = lambda **kw: [r for r in rows if all(r.get(k) == v for k, v in kw.items())]  # noqa: E731
    for threads, style in ((1, "-"), (2, "--")):
        for impl, marker in (("ours", "o"), ("timm", "s")):
            v2 = pick(impl=impl, runtime="onnxruntime", family="v2", attention="separable", size=256, quantize="none", threads=threads)
            if v2:
                ax_o.plot([r["alpha"] for r in v2], [r["latency_ms"] for r in v2], marker + style, label=f"v2 {impl}, {threads}t")
            v1 = pick(impl=impl, runtime="onnxruntime", family="v1", quantize="none", threads=threads)
            if v1:
                ax_o.scatter([0.5, 0.75, 1.0][: len(v1)], [r["latency_ms"] for r in v1], marker="x" if impl == "ours" else "+",
                             label=f"v1 XXS/XS/S {impl}, {threads}t")
    ax_o.set(xlabel="MobileViTv2 width (v1 sizes at their accuracy-matched widths)", ylabel="batch-1 latency (ms)",
             title="ONNX Runtime, float32, 256x256: ours vs timm's export")
    for (quantize, threads), style in zip([("none", 1), ("none", 2), ("int8", 1), ("int8", 2)], ["o-", "o--", "s-", "s--"]):
        sel = pick(impl="ours", runtime="litert", family="v2", attention="separable", size=256, quantize=quantize, threads=threads)
        if sel:
            ax_l.plot([r["alpha"] for r in sel], [r["latency_ms"] for r in sel], style, label=f"v2 {quantize}, {threads}t")
        v1 = pick(impl="ours", runtime="litert", family="v1", quantize=quantize, threads=threads)
        if v1:
            ax_l.scatter([0.5, 0.75, 1.0][: len(v1)], [r["latency_ms"] for r in v1], marker="x", label=f"v1 {quantize}, {threads}t")
    ax_l.set(xlabel="MobileViTv2 width", ylabel="batch-1 latency (ms)", title="LiteRT (XNNPACK), 256x256")
    attentions = ["separable", "linformer", "mha"]
    xs = np.arange(len(attentions))
    bars = [(runtime, size) for runtime in RUNTIMES for size in (256, 512)]
    width = 0.8 / len(bars)
    for i, (runtime, size) in enumerate(bars):
        vals = []
        for attention in attentions:
            r = pick(impl="ours", runtime=runtime, family="v2", alpha=1.0, attention=attention, size=size, quantize="none", threads=2)
            vals.append(r[0]["latency_ms"] if r else 0.0)
        drawn = ax_a.bar(xs + (i - (len(bars) - 1) / 2) * width, vals, width=width, label=f"{runtime} {size}x{size}")
        ax_a.bar_label(drawn, fmt="%.0f", fontsize=6)
    ax_a.set_xticks(xs, attentions)
    ax_a.set(ylabel="batch-1 latency (ms), float32, 2 threads", title="MobileViTv2-1.0: the attention unit")
    for ax in (ax_o, ax_l, ax_a):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a run without some rows draws nothing there)
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    common.save_figure(fig, path)


PAIRED_NOTE = (
    "ours and timm's export take turns in blocks of calls of about 0.25 s on the same input (order reversed every round, "
    "an untimed call first in each block); ours_ms / timm_ms: their median latencies; timm_over_ours: the median of the "
    "per-round ratios of the blocks' medians, timm / ours; ci95: a 95% bootstrap interval of that median; pairs: the rounds"
)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for mobile.{md,csv,json,png} and mobile_vs_timm.*")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quantize", nargs="+", default=["none", "int8"], choices=("none", "int8"))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls at least")
    parser.add_argument("--min-time", type=float, default=2.0, help="timed seconds at least, per measurement")
    parser.add_argument("--pair-rounds", type=int, default=24, help="rounds at least of ours and timm's taking turns")
    parser.add_argument("--timm-python", default=None, help="a Python with torch and timm (ONNX export); skipped if absent")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run: two small models at 64x64")
    args = parser.parse_args(argv)
    specs = default_specs()
    if args.tiny:
        specs = [dict(family="v2", alpha=0.5, attention="separable", size=64), dict(family="v2", alpha=0.5, attention="mha", size=64)]
        args.threads, args.repeats, args.min_time, args.pair_rounds = [1], 3, 0.0, 1
    info = common.machine_info()
    print(f"mobile runtimes benchmark: {info}", flush=True)
    import onnxruntime

    notes = [
        f"litert: ai-edge-litert interpreter, default XNNPACK delegate; onnxruntime {onnxruntime.__version__}: CPU provider, "
        "ORT_ENABLE_ALL graph optimizations, intra-op threads as given, one inter-op thread",
        "batch 1, float32 input; random weights; int8: weights and activations, calibrated on 4 random images (latency only); "
        "ONNX int8: onnxruntime.quantization static QDQ, per-channel weights, uint8 activations",
        "latency_ms: median of the timed calls after one warm-up call; p10 / p90: their 10th / 90th percentiles",
    ]
    timm_record: Dict[str, Any] = {}
    scratch = tempfile.TemporaryDirectory()
    if args.timm_python and "onnxruntime" in args.runtimes:
        names = sorted({n for n in map(timm_name, specs) if n})
        sizes = sorted({s["size"] for s in specs if timm_name(s)})
        for size in sizes:
            record = timm_exports(args.timm_python, names, size, scratch.name)
            if "error" in record:
                notes.append(f"timm skipped: {record['error']}")
                break
            timm_record.setdefault("files", {}).update({(n, size): f for n, f in record["files"].items()})
            timm_record["version"] = f"timm {record['timm']}, torch {record['torch']}, torch.onnx.export opset {record['opset']}"
        if "version" in timm_record:
            notes.append(f"timm rows: {timm_record['version']} (TorchScript exporter, NCHW input), timed in the same onnxruntime, "
                         "taking turns in blocks of calls with our ONNX export of the same model")
    elif not args.timm_python:
        notes.append("timm skipped: no --timm-python given")
    rows = []
    for spec in specs:
        name = timm_name(spec)
        for quantize in args.quantize:
            models = {("ours", runtime): entry for runtime, entry in our_exports(spec, quantize, args.runtimes).items()}
            if name and (name, spec["size"]) in timm_record.get("files", {}):
                models[("timm", "onnxruntime")] = timm_model(timm_record["files"][(name, spec["size"])], quantize)
            pair = [("ours", "onnxruntime"), ("timm", "onnxruntime")]
            for threads in args.threads:
                calls, rounds = {}, {}
                if all(key in models for key in pair):  # ours and timm's take turns (time_onnx_paired)
                    times = time_onnx_paired([models[k]["model"] for k in pair], threads, args.repeats, args.min_time,
                                             min_rounds=args.pair_rounds)
                    calls, rounds = (dict(zip(pair, t)) for t in times)
                for (impl, runtime), entry in models.items():
                    row = {"model": label(spec), "impl": impl, "runtime": runtime, "family": spec["family"], "alpha": spec.get("alpha"),
                           "variant": spec.get("variant"), "attention": spec["attention"], "size": spec["size"], "quantize": quantize,
                           "threads": threads, "file_MB": len(entry["model"]) / 1e6, "export_s": entry["export_s"]}
                    if (impl, runtime) in calls:
                        row.update(_latency(calls[impl, runtime]))
                        if impl == "timm":
                            row["paired"] = paired_ratio(rounds[pair[1]], rounds[pair[0]])
                    else:
                        row.update(TIMERS[runtime](entry["model"], threads, args.repeats, args.min_time))
                    row["load"] = common.load_average()
                    rows.append(row)
                    print(f"  {row['model']} {impl} {runtime} {spec['size']} {quantize} {threads}t: {row['latency_ms']:.1f} ms", flush=True)
    scratch.cleanup()
    columns = ["model", "impl", "runtime", "size", "quantize", "threads", "latency_ms", "p10_ms", "p90_ms", "repeats", "file_MB",
               "export_s", "load"]
    common.write_table(rows, columns, args.out, "mobile", "Batch-1 latency in LiteRT (XNNPACK) and ONNX Runtime", notes, info)
    ratios = ratio_rows(rows)
    if ratios:
        common.write_table(ratios, ["model", "size", "quantize", "threads", "ours_ms", "timm_ms", "timm_over_ours", "ci95", "pairs"],
                           args.out, "mobile_vs_timm", "ONNX Runtime: timm's ONNX export over ours (latency ratio, > 1: ours is faster)",
                           notes[:1] + [PAIRED_NOTE], info)
    plot(rows, f"{args.out}/mobile.png", f"batch 1, {info['cpu_cores']} cores ({info['cpu']})")
    return rows


if __name__ == "__main__":
    allocator.maybe_reexec()
    main()
