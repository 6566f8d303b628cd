"""Input pipeline throughput: images/s per CPU core for the train and eval preprocessing.

    python -m mvit2_jax.benchmarks.data --out /tmp/bench_data
    python -m mvit2_jax.benchmarks.data --out /tmp/bench_data --tiny   # seconds

Generates ImageNet-sized JPEGs in memory (default 200 images of 500x375, smooth
natural-image-like content, quality 90: about the size of an average ImageNet JPEG) and
runs them through the real per-example functions of mvit2_jax.data.pipeline inside tf.data:
`train_image` with the full recipe (random-resized crop + decode, bicubic resize, flip,
RandAugment 2 ops magnitude 9, random erasing 0.25), the host half of
`config.data.augment_on = "device"` (crop, resize, flip; uint8 out), and `eval_image`
(resize 288, center crop 256). Each variant runs on one thread (images/s per core) and on
every core. Mixup/CutMix run on the accelerator inside the train step and are not part of
this. Writes data.{md,csv,json} and data.png to --out; divide the training throughput of
your accelerators by the per-core rate to size hosts.

The device half (RandAugment and erasing of mvit2_jax.data.device_augment on a uint8 batch,
jitted) is timed on JAX's default backend and written to data_device.{md,csv,json}: what
the accelerator spends per image when the host sends it the crops alone.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from mvit2_jax import allocator
from mvit2_jax.benchmarks import common


def synthetic_jpegs(count: int, width: int, height: int, quality: int = 90, seed: int = 0) -> List[bytes]:
    """JPEGs with natural-image statistics: smooth shapes, gradients and 1/f-like texture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(count):
        img = np.zeros((height, width, 3), np.float32)
        # A lit background: a random linear gradient per channel.
        for c in range(3):
            a, base = rng.uniform(-0.4, 0.4, 2), rng.uniform(60, 190)
            img[..., c] = base + 80 * (a[0] * xx / width + a[1] * yy / height)
        # Texture at several scales (upsampled noise: power falling with frequency).
        for scale, amp in ((8, 40.0), (32, 24.0), (96, 18.0), (250, 16.0), (500, 14.0)):
            small = rng.standard_normal((max(2, height * scale // 500), max(2, width * scale // 500), 3)).astype(np.float32)
            layer = np.asarray(Image.fromarray(small[..., 0]).resize((width, height), Image.BICUBIC))
            tint = rng.uniform(0.5, 1.0, 3)
            img += amp * layer[..., None] * tint
        # A few objects: filled ellipses of random colour.
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(15, height / 2.5), rng.uniform(15, width / 2.5)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
            img[mask] = 0.35 * img[mask] + 0.65 * rng.uniform(0, 255, 3)
        img += rng.normal(0, 5.0, img.shape)  # sensor noise
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def variants(image_size: int, resize_size: int):
    """name -> per-example function (encoded bytes, seed) -> float32 image."""
    from mvit2_jax.data.pipeline import TrainAugmentation, eval_image, train_image

    full = TrainAugmentation()
    host_half = TrainAugmentation(on_device=True)
    return {
        "train, full recipe (crop, flip, RandAugment 2x9, erasing)": lambda b, s: train_image(b, s, image_size, full),
        "train, host half of augment_on=device (crop, flip; uint8)": lambda b, s: train_image(b, s, image_size, host_half),
        f"eval (resize {resize_size}, crop {image_size})": lambda b, s: eval_image(b, image_size, resize_size),
    }


def measure(fn, images: List[bytes], threads: int, num_examples: int, warmup: int) -> Dict[str, Any]:
    """images/s of `fn` over a repeated in-memory dataset on `threads` threads."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(images)).repeat().enumerate()
    ds = ds.map(
        lambda i, b: fn(b, tf.stack([tf.cast(i, tf.int64), tf.constant(7, tf.int64)])),
        num_parallel_calls=threads,
        deterministic=False,
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    ds = ds.with_options(options).prefetch(2 * threads)
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    load_before = common.load_average()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(num_examples):
        next(it).numpy()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "threads": threads,
        "images_per_s": num_examples / dt,
        "images_per_s_per_core": num_examples / dt / threads,
        "images_per_cpu_s": num_examples / cpu if cpu > 0 else None,
        "examples": num_examples,
        "load": max(load_before, common.load_average()),
    }


def measure_device(batch: int, image_size: int, min_time: float) -> Dict[str, Any]:
    """images/s of the device half (RandAugment 2x9 + erasing 0.25) on a uint8 batch, jitted."""
    import jax

    from mvit2_jax.data.device_augment import augment

    run = jax.jit(augment)
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, image_size, image_size, 3), np.uint8))
    keys = iter(jax.random.split(jax.random.key(0), 10_000))
    t0 = time.perf_counter()
    run(next(keys), images).block_until_ready()
    first = time.perf_counter() - t0
    timing = common.time_call(lambda: run(next(keys), images).block_until_ready(), min_total_s=min_time)
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "batch": batch,
        "images_per_s": batch / timing["median_s"],
        "step_ms": 1e3 * timing["median_s"],
        "cpu_ms": 1e3 * timing["cpu_s"],
        "first_call_s": first,
        "repeats": timing["repeats"],
        "load": timing["load"],
    }


def plot(rows: Sequence[Dict[str, Any]], path: str, title: str) -> None:
    plt = common.pyplot()
    names = list(dict.fromkeys(r["variant"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(threads)
    for t_i, t in enumerate(threads):
        vals = [next((r["images_per_s"] for r in rows if r["variant"] == n and r["threads"] == t), 0.0) for n in names]
        bars = ax.bar([i + (t_i - (len(threads) - 1) / 2) * width for i in range(len(names))], vals, width, label=f"{t} thread(s)")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for data.{md,csv,json,png}")
    parser.add_argument("--images", type=int, default=200, help="distinct JPEGs generated")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-size", type=int, default=288)
    parser.add_argument("--examples", type=int, default=400, help="timed examples per measurement (per thread)")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and every core")
    parser.add_argument("--device-batch", type=int, default=64, help="batch of the device half's timing (0: skip it)")
    parser.add_argument("--device-min-time", type=float, default=3.0, help="seconds of timed device calls")
    parser.add_argument("--device-only", action="store_true", help="time the device half alone (no TensorFlow needed)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run: 8 small JPEGs, 64x64 output")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.width, args.height, args.image_size, args.resize_size, args.examples = 8, 160, 120, 64, 72, 16
        args.device_batch, args.device_min_time = min(args.device_batch, 4), 0.2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cores = common.cpu_count()
    threads = args.threads or sorted({1, cores})
    info = common.machine_info()
    t0 = time.perf_counter()
    images = synthetic_jpegs(args.images, args.width, args.height)
    mean_kb = sum(map(len, images)) / len(images) / 1024
    info.update(jpegs=f"{args.images} x {args.width}x{args.height}, mean {mean_kb:.0f} KiB", output=f"{args.image_size}x{args.image_size}")
    print(f"data benchmark: {info} (generated in {time.perf_counter() - t0:.1f} s)", flush=True)
    rows = [] if args.device_only else host_rows(args, images, threads, info)
    if args.device_batch > 0:
        d = measure_device(args.device_batch, args.image_size, args.device_min_time)
        d["variant"] = f"device half of augment_on=device (RandAugment 2x9, erasing; {args.image_size}x{args.image_size} uint8 in)"
        print(f"  {d['variant']}: {d['backend']} batch {d['batch']} {d['images_per_s']:.1f} img/s", flush=True)
        device_columns = ["variant", "backend", "device", "batch", "images_per_s", "step_ms", "cpu_ms", "first_call_s", "repeats", "load"]
        device_notes = ["first_call_s: compile and first run; on a CPU backend the host's cores run it (no accelerator to offload to)"]
        common.write_table([d], device_columns, args.out, "data_device", "Device half of the train augmentation (jitted, one batch)", device_notes, info)
        rows.append(d)
    return rows


def host_rows(args: argparse.Namespace, images: List[bytes], threads: Sequence[int], info: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The tf.data variants on 1 and every thread; writes data.{md,csv,json,png}."""
    import tensorflow as tf

    info["tensorflow"] = tf.__version__
    rows = []
    for name, fn in variants(args.image_size, args.resize_size).items():
        for t in threads:
            # Warm-up long enough for every RandAugment branch to have run once.
            r = measure(fn, images, t, args.examples * t, warmup=4 * t if args.tiny else max(64, 16 * t))
            r["variant"] = name
            rows.append(r)
            print(f"  {name}: {t} thread(s) {r['images_per_s']:.1f} img/s (load {r['load']})", flush=True)
    notes = [
        "images_per_s_per_core: throughput / threads; with the 1-thread row it is what one host core sustains",
        "images_per_cpu_s: images per second of this process's CPU time (less sensitive to other load)",
        f"cores needed for N training images/s with the full recipe: about N / {rows[0]['images_per_cpu_s']:.0f} "
        "(images per CPU-second of the 1-thread run; the wall-clock rates depend on the load)",
        "Mixup/CutMix run on the accelerator inside the train step; not included",
    ]
    columns = ["variant", "threads", "images_per_s", "images_per_s_per_core", "images_per_cpu_s", "examples", "load"]
    common.write_table(rows, columns, args.out, "data", "Preprocessing throughput (tf.data, per-example functions of the pipeline)", notes, info)
    plot(rows, os.path.join(args.out, "data.png"), f"preprocessing {info['jpegs']} -> {info['output']}, {info['cpu']} ({common.cpu_count()} cores)")
    print(f"wrote {args.out}/data.{{md,csv,json,png}}")
    return rows


if __name__ == "__main__":
    allocator.maybe_reexec()
    main()
