"""Training throughput of the real train step (AdamW, EMA, Mixup/CutMix) on synthetic batches.

    python -m mvit2_jax.benchmarks.train_step --config=experiments/alpha_1.py --batch 16 --steps 10

Reports the time to the first step (init + compile + one step) and images/s from the median
step time, on whatever backend JAX sees; the input pipeline is not involved (see the data
benchmark). `mvit2_jax.benchmarks.model` runs this for every width beside timm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mvit2_jax import allocator, tasks, train
from mvit2_jax.benchmarks.common import load_config
from mvit2_jax.errors import usage_errors_exit


def synthetic_batch(compiled: train.Steps, config, batch_size: int) -> Dict[str, Any]:
    """A random global batch {"image": [B, S, S, 3] in [0, 1], "label": [B]} on the mesh
    (uint8 pixels where RandAugment runs in the step, config.data.augment_on = "device")."""
    size = config.data.image_size
    sharding = NamedSharding(compiled.mesh, P("data"))
    rng = np.random.default_rng(0)
    shape = (batch_size, size, size, 3)
    on_device = config.data.get("augment_on", "host") == "device"
    return train.to_global(
        {
            "image": rng.integers(0, 256, shape, np.uint8) if on_device else rng.random(shape, np.float32),
            "label": rng.integers(0, config.data.num_classes, batch_size).astype(np.int32),
        },
        sharding,
    )


def random_like(shapes: Any, sharding: Optional[jax.sharding.Sharding] = None, seed: int = 0) -> Any:
    """Arrays shaped like `shapes` (a pytree of ShapeDtypeStructs) with plausible weights.

    Kernels: uniform(+-1/sqrt(fan_in)); norm scales and variances: 1; everything else,
    optimizer state included: 0. For speed measurements only: the values are not the init's.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "opt_state" in name or not np.issubdtype(leaf.dtype, np.floating):
            value = np.zeros(leaf.shape, leaf.dtype)
        elif "var" in name or "scale" in name:
            value = np.ones(leaf.shape, leaf.dtype)
        elif leaf.ndim > 1:
            bound = 1.0 / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))
            value = rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)
        else:
            value = np.zeros(leaf.shape, leaf.dtype)
        return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def synthetic_state(compiled: train.Steps) -> train.TrainState:
    """A TrainState of the right shapes with random weights, made without compiling the init.

    Compiling the real init (one threefry random draw per parameter) takes XLA:CPU tens of
    seconds; the step's speed does not depend on the values, so smoke runs use this instead.
    """
    return random_like(jax.eval_shape(compiled.init), NamedSharding(compiled.mesh, P()))


def measure(
    config, batch_size: int, steps: int, warmup: int = 2, min_time: float = 0.0, real_init: bool = True
) -> Dict[str, Any]:
    """Time to the first step (init + compile + step) and the median step time after warm-up.

    Times at least `steps` steps, and more until `min_time` seconds have passed. With
    `real_init=False` the state comes from `synthetic_state` (no init compile).
    """
    config.batch_size = batch_size
    size = config.data.image_size
    t0 = time.perf_counter()
    compiled = train.compile_steps(config, tasks.get(config.task), num_steps=1000)
    batch = synthetic_batch(compiled, config, batch_size)
    state = compiled.init() if real_init else synthetic_state(compiled)
    jax.block_until_ready(state)
    if real_init and jax.default_backend() == "cpu":
        allocator.release_compiled(compiled.init)  # as the training loop does
    init_time = time.perf_counter() - t0
    state, metrics = compiled.train(state, batch)
    jax.block_until_ready(metrics)
    first_step = time.perf_counter() - t0
    for _ in range(warmup - 1):
        state, metrics = compiled.train(state, batch)
    jax.block_until_ready(metrics)
    load_before = os.getloadavg()[0]
    times = []
    cpu0 = time.process_time()
    while len(times) < steps or sum(times) < min_time:
        t0 = time.perf_counter()
        state, metrics = compiled.train(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    cpu = (time.process_time() - cpu0) / len(times)
    return {
        "alpha": config.model.alpha,
        "attention": config.model.attention,
        "dtype": config.model.dtype,
        "image_size": size,
        "batch_size": batch_size,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "time_to_first_step_s": round(first_step, 2),
        "init_s": round(init_time, 2),
        "real_init": real_init,
        "step_time_ms": round(1000 * median, 1),
        "min_step_time_ms": round(1000 * min(times), 1),
        "cpu_ms_per_step": round(1000 * cpu, 1),
        "steps_timed": len(times),
        "images_per_second": round(batch_size / median, 2),
        "load": round(max(load_before, os.getloadavg()[0]), 2),
        "loss_is_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/alpha_1.py")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    args = parser.parse_args(argv)
    with usage_errors_exit():
        config = load_config(args.config)
    if args.image_size:
        config.data.image_size = args.image_size
    if args.dtype:
        config.model.dtype = args.dtype
    print(json.dumps(measure(config, args.batch, args.steps)))


if __name__ == "__main__":
    allocator.maybe_reexec()
    allocator.run_cpu_computations_inline()  # as `python -m mvit2_jax.main` runs
    main()
