"""Whole-model throughput per width: inference and the real train step, beside timm.

    python -m mvit2_jax.benchmarks.model --out /tmp/bench_model --alphas 0.5 1.0 \\
        --batch 16 --timm-python /path/to/venv/bin/python
    python -m mvit2_jax.benchmarks.model --out /tmp/bench_model --tiny   # seconds, no timm

For each width multiplier: inference images/s (jit of model.apply, eval mode) and training
images/s (mvit2_jax.train.compile_steps' train step: AdamW, gradient clipping, EMA,
Mixup/CutMix, on synthetic batches, as mvit2_jax.benchmarks.train_step), the time to the
first step (init + compile + first call), and the peak memory (process RSS high-water mark;
on GPU/TPU also the device's peak bytes in use). Each measurement runs in a fresh process
(so peak memory and compile time are its own) unless --in-process. Images/s come from the
median step time after warm-up.

With --timm-python (a Python that has torch and timm), timm's mobilevitv2_* runs on the same
machine at the same batch size and resolution through timm_bench.py, in its best eager
setting (channels_last; torch.inference_mode for inference; in training the same recipe as
ours through timm's own Mixup, SoftTargetCrossEntropy, clip_grad_norm_ and ModelEmaV3, or a
bare AdamW step with --timm-recipe plain; OpenMP with
OMP_DYNAMIC=FALSE so that it keeps every core under load), and the
table gives the ratio ours / timm. `--timm-settings` runs timm in several settings (eager or
torch.compile, float32 or bfloat16 autocast; on a GPU TF32 off) in the same run; the ratio
is then against timm's fastest row for that width and mode, named in `timm_setting`. Both
run under the same host allocator, chosen by MVIT2_ALLOCATOR as for every program of this
package (see mvit2_jax.allocator; it changes both by up to 2x on the CPU):
MVIT2_ALLOCATOR=system compares them under the system's.
Writes model.{md,csv,json}, model_vs_timm.{md,csv,json} and model.png to --out. Every row
records the load average while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from mvit2_jax import allocator
from mvit2_jax.benchmarks import common
from mvit2_jax.models import VARIANTS

ALPHAS = tuple(VARIANTS)
TIMM_NAMES = {alpha: v.timm_name for alpha, v in VARIANTS.items()}
RESULT_PREFIX = "BENCHMARK_RESULT "
TIMM_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_bench.py")


def make_config(alpha: float, batch: int, size: int, dtype: str, config_path: str):
    """The experiment config for width `alpha` (the paper's recipe), resized for the benchmark."""
    config = common.load_config(config_path, alpha=alpha)
    config.model.alpha = alpha
    config.model.dtype = dtype
    config.data.image_size = size
    config.data.eval_resize_size = max(config.data.eval_resize_size, size)
    config.batch_size = batch
    return config


def run_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement of this package's model, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mvit2_jax.benchmarks import train_step
    from mvit2_jax.models import MobileViTv2

    alpha, batch, size, dtype = spec["alpha"], spec["batch"], spec["size"], spec["dtype"]
    row: Dict[str, Any] = {"alpha": alpha, "impl": "mvit2_jax", "mode": spec["mode"], "batch": batch, "size": size, "dtype": dtype}
    if spec["mode"] == "infer":
        model = MobileViTv2(alpha=alpha, dtype=dtype)
        images = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3), np.float32))
        # Random weights of the right shapes: compiling the real init (threefry) would dominate
        # the time to first step, and a deployed model loads its weights instead.
        variables = train_step.random_like(jax.eval_shape(model.init, jax.random.key(0), images[:1]))
        t0 = time.perf_counter()
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
        jax.block_until_ready(forward(variables, images))
        row["first_step_s"] = round(time.perf_counter() - t0, 2)
        t = common.time_call(
            lambda: jax.block_until_ready(forward(variables, images)),
            warmup=1, min_repeats=spec["repeats"], max_repeats=200, min_total_s=spec["min_time"],
        )
        row.update(
            step_ms=1000 * t["median_s"], min_step_ms=1000 * t["min_s"], cpu_ms=1000 * t["cpu_s"], repeats=t["repeats"], load=t["load"]
        )
    else:
        config = make_config(alpha, batch, size, dtype, spec.get("config"))
        m = train_step.measure(
            config, batch, steps=spec["repeats"], warmup=2, min_time=spec["min_time"], real_init=spec.get("real_init", True)
        )
        row.update(
            first_step_s=m["time_to_first_step_s"], init_s=m["init_s"], step_ms=m["step_time_ms"], min_step_ms=m["min_step_time_ms"],
            cpu_ms=m["cpu_ms_per_step"],
            repeats=m["steps_timed"], load=m["load"],
        )
    row["images_per_s"] = batch / (row["step_ms"] / 1000)
    row["peak_rss_MiB"] = common.peak_rss_mb()
    row["device_peak_MiB"] = common.device_peak_mb()
    return row


def run_isolated(spec: Dict[str, Any], env: Dict[str, str]) -> Dict[str, Any]:
    """run_ours in a fresh Python process (its own peak RSS and compile) with environment `env`."""
    cmd = [sys.executable, "-m", "mvit2_jax.benchmarks.model", "--worker", json.dumps(spec)]
    return _run_json(cmd, spec, env)


TIMM_SETTINGS = ("eager", "eager-bf16", "compile", "compile-bf16")


def run_timm(python: str, spec: Dict[str, Any], env: Dict[str, str], setting: str = "eager", device: str = "cpu") -> Dict[str, Any]:
    """timm_bench.py for `spec` in one of TIMM_SETTINGS on `device` ("cpu" or "cuda")."""
    alpha = spec["alpha"]
    compiled, bf16 = setting.startswith("compile"), setting.endswith("-bf16")
    cmd = [
        python, TIMM_SCRIPT, "--model", TIMM_NAMES[alpha], "--mode", spec["mode"], "--batch", str(spec["batch"]),
        "--size", str(spec["size"]), "--repeats", str(spec["repeats"]), "--min-time", str(spec["min_time"]),
        "--recipe", spec.get("timm_recipe", "paper"), "--device", device,
        "--precision", "bfloat16" if bf16 else "float32", *(["--compile"] if compiled else []),
    ]
    out = _run_json(cmd, spec, env, prefix="")
    if "error" in out:
        return {**out, "impl": "timm", "timm_setting": setting}
    return {
        "alpha": alpha,
        "impl": f"timm {out['timm']} (torch {out['torch']}, {setting}, {out['memory_format']}, {out['threads']} threads"
        + (f", {out['recipe']} step)" if out.get("recipe") else ")"),
        "timm_setting": setting,
        "mode": spec["mode"], "batch": spec["batch"], "size": spec["size"], "dtype": "bfloat16" if bf16 else "float32",
        "first_step_s": out["first_step_s"], "step_ms": out["step_ms"], "min_step_ms": out["min_step_ms"], "cpu_ms": out["cpu_ms"],
        "repeats": out["repeats"], "load": out["load"], "images_per_s": out["images_per_s"],
        "peak_rss_MiB": out["peak_rss_MiB"], "device_peak_MiB": out.get("device_peak_MiB"),
    }


def _run_json(cmd: List[str], spec: Dict[str, Any], env: Dict[str, str], prefix: str = RESULT_PREFIX) -> Dict[str, Any]:
    env = dict(env)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # PyTorch's OpenMP otherwise drops to fewer threads when the load average is high.
    env.setdefault("OMP_DYNAMIC", "FALSE")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(prefix) and line[len(prefix):].lstrip().startswith("{"):
            return json.loads(line[len(prefix):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"alpha": spec["alpha"], "mode": spec["mode"], "error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def wait_for_load(max_load: Optional[float], max_wait_s: float) -> None:
    """Sleep until the 1-minute load average drops below `max_load` (at most `max_wait_s`)."""
    if max_load is None:
        return
    deadline = time.time() + max_wait_s
    while common.load_average() >= max_load and time.time() < deadline:
        time.sleep(10)


def model_flops(alpha: float, size: int, mode: str) -> float:
    """FLOPs per image: 2 x the forward multiply-accumulates (convolutions, dense layers and
    the attention's products, mvit2_jax.stats), x 3 for a training step (forward and the two
    products of the backward pass)."""
    from mvit2_jax import stats
    from mvit2_jax.models import MobileViTv2

    counts = stats.model_stats(MobileViTv2(alpha=alpha), size)
    return 2.0 * (counts["macs"] + counts["attn_macs"]) * (3 if mode == "train" else 1)


def add_flop_rates(rows: Sequence[Dict[str, Any]], peaks: Dict[str, float]) -> None:
    """Each row's model GFLOP/s (`model_flops` x images/s) and its fraction of the measured
    matrix-product peak of its dtype (`peaks`: {"float32": GFLOP/s, "bfloat16": GFLOP/s})."""
    flops: Dict[Any, float] = {}
    for r in rows:
        if not r.get("images_per_s"):
            continue
        key = (r["alpha"], r["size"], r["mode"])
        if key not in flops:
            flops[key] = model_flops(*key)
        r["GFLOP_s"] = flops[key] * r["images_per_s"] / 1e9
        peak = peaks.get(r.get("dtype", "float32"))
        if peak:
            r["of_matmul_peak"] = r["GFLOP_s"] / peak


def best_timm_row(rows: Sequence[Dict[str, Any]], alpha: float, mode: str) -> Optional[Dict[str, Any]]:
    """timm's fastest measured row for `alpha` and `mode` (over its settings), or None."""
    t = [x for x in rows if x.get("impl", "").startswith("timm") and x["alpha"] == alpha and x["mode"] == mode and x.get("images_per_s")]
    return max(t, key=lambda x: x["images_per_s"]) if t else None


def ratio_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per measured width and mode of ours: ours against timm's fastest setting."""
    out = []
    for r in rows:
        if r.get("impl") != "mvit2_jax" or not r.get("images_per_s"):
            continue
        t = best_timm_row(rows, r["alpha"], r["mode"])
        if t:
            out.append({
                "alpha": r["alpha"], "mode": r["mode"], "ours_img_s": r["images_per_s"], "timm_img_s": t["images_per_s"],
                "ours_over_timm": r["images_per_s"] / t["images_per_s"], "timm_setting": t.get("timm_setting"),
                "ours_first_step_s": r.get("first_step_s"), "timm_first_step_s": t.get("first_step_s"),
                "ours_peak_rss_MiB": r.get("peak_rss_MiB"), "timm_peak_rss_MiB": t.get("peak_rss_MiB"),
                "ours_device_peak_MiB": r.get("device_peak_MiB"), "timm_device_peak_MiB": t.get("device_peak_MiB"),
                "ours_of_matmul_peak": r.get("of_matmul_peak"), "timm_of_matmul_peak": t.get("of_matmul_peak"),
                "load": max(r.get("load") or 0, t.get("load") or 0),
            })
    return out


def plot(rows: Sequence[Dict[str, Any]], path: str, title: str) -> None:
    plt = common.pyplot()
    modes = [m for m in ("infer", "train") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        alphas = sorted({r["alpha"] for r in rows if r["mode"] == mode})
        xs = range(len(alphas))
        for offset, impl, color in ((-0.2, "mvit2_jax", "tab:blue"), (0.2, "timm", "tab:orange")):
            vals = []
            for a in alphas:
                if impl == "timm":
                    best = best_timm_row(rows, a, mode)
                    vals.append(best["images_per_s"] if best else 0.0)
                    continue
                r = [x for x in rows if x["mode"] == mode and x["alpha"] == a and x.get("impl") == impl and x.get("images_per_s")]
                vals.append(r[0]["images_per_s"] if r else 0.0)
            if any(vals):
                bars = ax.bar([x + offset for x in xs], vals, width=0.4, color=color, label=impl)
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(xs), [str(a) for a in alphas])
        ax.set_xlabel("width multiplier alpha")
        ax.set_ylabel("images / s")
        ax.set_title({"infer": "inference", "train": "training step"}[mode])
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="directory for model*.{md,csv,json} and model.png")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls at least")
    parser.add_argument("--min-time", type=float, default=10.0, help="timed seconds at least, per measurement")
    parser.add_argument("--config", default="experiments/base.py", help="experiment file with get_config(alpha=...)")
    parser.add_argument("--timm-python", default=None, help="a Python with torch and timm; skipped if absent")
    parser.add_argument("--timm-alphas", type=float, nargs="+", default=None, help="widths to run timm for (default: all)")
    parser.add_argument(
        "--timm-recipe", choices=("paper", "plain"), default="paper",
        help="timm's training step: the same recipe as ours (Mixup/CutMix, smoothing, clipping, EMA) or a bare AdamW step",
    )
    parser.add_argument(
        "--timm-settings", nargs="+", choices=TIMM_SETTINGS, default=["eager"],
        help="timm's settings, each measured (eager / torch.compile, float32 / bfloat16 autocast); ratios use the fastest",
    )
    parser.add_argument("--in-process", action="store_true", help="measure in this process (peak RSS is then cumulative)")
    parser.add_argument("--wait-for-load", type=float, default=None, help="before each measurement wait until load < this")
    parser.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for the load at most")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run: alpha 0.5, 64x64, batch 2, in-process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # a child process measuring one configuration
        allocator.run_cpu_computations_inline()  # as `python -m mvit2_jax.main` runs
        allocator.release_after_compiles()
        print(RESULT_PREFIX + json.dumps(run_ours(json.loads(args.worker))), flush=True)
        return []
    if not args.out:
        parser.error("--out is required")
    if args.tiny:
        args.alphas, args.size, args.batch, args.repeats, args.min_time = [0.5], 64, 2, 2, 0.0
        args.in_process = True
    notes = []
    timm_python = args.timm_python
    if timm_python and not (os.path.isfile(timm_python) and os.access(timm_python, os.X_OK)):
        notes.append(f"timm skipped: {timm_python} is not an executable Python")
        timm_python = None
    elif not timm_python:
        notes.append("timm skipped: no --timm-python given")

    try:  # both implementations run under the same allocator (see mvit2_jax.allocator)
        child_env = {**os.environ, **allocator.fast_allocator_env(os.environ)}
    except allocator.AllocatorError as e:
        parser.error(str(e))
    info = common.machine_info()
    info.update(batch=args.batch, size=args.size, dtype=args.dtype)
    # The machine's own matrix-product ceilings, in this run (n 2048 on a CPU, 8192 on an
    # accelerator, whose units a 2048 product does not fill; --tiny: 256).
    matmul_n = 256 if args.tiny else 2048 if info["backend"] == "cpu" else 8192
    peaks = {dtype: common.matmul_peak(dtype, matmul_n, 0.0 if args.tiny else 3.0) for dtype in ("float32", "bfloat16")}
    info.update({f"matmul_{dtype}_GFLOP_s": round(v, 1) for dtype, v in peaks.items()}, matmul_n=matmul_n)
    if not args.in_process:
        info["allocator"] = allocator.describe(child_env)
    print(f"model benchmark: {info}", flush=True)
    rows: List[Dict[str, Any]] = []
    for alpha in args.alphas:
        for mode in args.modes:
            spec = dict(
                alpha=alpha, mode=mode, batch=args.batch, size=args.size, dtype=args.dtype, repeats=args.repeats,
                min_time=args.min_time, config=args.config, real_init=not args.tiny, timm_recipe=args.timm_recipe,
            )
            wait_for_load(args.wait_for_load, args.max_wait)
            row = run_ours(spec) if args.in_process else run_isolated(spec, child_env)
            rows.append(row)
            print(f"  ours alpha={alpha} {mode}: {row.get('images_per_s', row.get('error'))} img/s (load {row.get('load')})", flush=True)
            if timm_python and alpha in TIMM_NAMES and (args.timm_alphas is None or alpha in args.timm_alphas):
                for setting in args.timm_settings:
                    wait_for_load(args.wait_for_load, args.max_wait)
                    row = run_timm(timm_python, spec, child_env, setting, "cuda" if info["backend"] in ("gpu", "cuda") else "cpu")
                    rows.append(row)
                    print(f"  timm {setting} alpha={alpha} {mode}: {row.get('images_per_s', row.get('error'))} img/s "
                          f"(load {row.get('load')})", flush=True)
    for r in rows:
        if r.get("error"):
            who = f"timm {r.get('timm_setting')}" if r.get("impl", "").startswith("timm") else "mvit2_jax"
            notes.append(f"{who} alpha {r['alpha']} {r['mode']} failed: {r['error']}")
    if args.in_process:
        notes.append("measured in one process: peak_rss_MiB is the process's high-water mark so far")
    if info["backend"] == "cpu":
        notes.append("CPU run; no GPU/TPU numbers in this table (device_peak_MiB applies to accelerators only)")
    notes.append(
        "first_step_s: compile + first call; infer uses random weights (no init), train includes the "
        "real init (init_s: its compile and run)" + (" except in --tiny (random weights)" if args.tiny else "")
    )
    notes.append(
        "cpu_ms: mean process CPU time (all threads) per timed step, as the OS reports it (in our train rows it "
        "has exceeded cores x step_ms on a VM: compare images_per_s, not cpu_ms)"
    )
    notes.append(
        "train: our step does AdamW with Mixup/CutMix, label smoothing, gradient clipping and an EMA of the weights; "
        + ("timm's does the same with timm's own Mixup, SoftTargetCrossEntropy, clip_grad_norm_ and ModelEmaV3 (--timm-recipe paper)"
           if args.timm_recipe == "paper" else "timm's is a bare AdamW step (--timm-recipe plain)")
    )
    notes.append(
        "GFLOP_s: 2 x the forward multiply-accumulates per image (x 3 in training) x images_per_s; of_matmul_peak: that "
        "over the n x n matrix product (info: matmul_n) of the row's dtype through XLA in this run (info: matmul_*_GFLOP_s)"
    )
    add_flop_rates(rows, peaks)
    columns = ["alpha", "impl", "timm_setting", "mode", "batch", "size", "dtype", "images_per_s", "GFLOP_s", "of_matmul_peak", "step_ms", "min_step_ms",
               "cpu_ms", "repeats", "first_step_s", "init_s", "peak_rss_MiB", "device_peak_MiB", "load", "error"]
    common.write_table(rows, columns, args.out, "model", f"Model throughput at {args.size}x{args.size}, batch {args.batch}", notes, info)
    ratios = ratio_rows(rows)
    if ratios:
        columns = ["alpha", "mode", "ours_img_s", "timm_img_s", "ours_over_timm", "timm_setting", "ours_of_matmul_peak",
                   "timm_of_matmul_peak", "ours_first_step_s", "timm_first_step_s", "ours_peak_rss_MiB", "timm_peak_rss_MiB",
                   "ours_device_peak_MiB", "timm_device_peak_MiB", "load"]
        common.write_table(ratios, columns, args.out, "model_vs_timm", "mvit2_jax / timm images per second", (), info)
    title = f"MobileViTv2 {args.size}x{args.size}, batch {args.batch}, {args.dtype}, {info['backend']} ({info['cpu_cores']} cores)"
    plot(rows, os.path.join(args.out, "model.png"), title)
    print(f"wrote {args.out}/model*.{{md,csv,json}} and model.png")
    return rows


if __name__ == "__main__":
    main()
