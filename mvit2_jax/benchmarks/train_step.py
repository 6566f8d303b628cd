"""Training throughput of the real train step (AdamW, EMA, Mixup/CutMix) on synthetic batches.

    python -m mvit2_jax.benchmarks.train_step --config=experiments/alpha_1.py --batch 16 --steps 10

Reports the compile time (time to the first step) and images/s over the timed steps, on
whatever backend JAX sees; the input pipeline is not involved (see the data benchmark).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mvit2_jax import train


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(config, batch_size: int, steps: int, warmup: int = 2) -> Dict[str, Any]:
    config.batch_size = batch_size
    size = config.data.image_size
    compiled = train.compile_steps(config, num_steps=1000)
    sharding = NamedSharding(compiled.mesh, P("data"))
    rng = np.random.default_rng(0)
    batch = train.to_global(
        {
            "image": rng.random((batch_size, size, size, 3), np.float32),
            "label": rng.integers(0, config.data.num_classes, batch_size).astype(np.int32),
        },
        sharding,
    )
    t0 = time.perf_counter()
    state = compiled.init()
    state, metrics = compiled.train(state, batch)
    jax.block_until_ready(metrics)
    first_step = time.perf_counter() - t0
    for _ in range(warmup - 1):
        state, metrics = compiled.train(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled.train(state, batch)
    jax.block_until_ready(metrics)
    dt = time.perf_counter() - t0
    return {
        "alpha": config.model.alpha,
        "attention": config.model.attention,
        "dtype": config.model.dtype,
        "image_size": size,
        "batch_size": batch_size,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "time_to_first_step_s": round(first_step, 2),
        "step_time_ms": round(1000 * dt / steps, 1),
        "images_per_second": round(steps * batch_size / dt, 2),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/alpha_1.py")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.image_size:
        config.data.image_size = args.image_size
    if args.dtype:
        config.model.dtype = args.dtype
    print(json.dumps(measure(config, args.batch, args.steps)))


if __name__ == "__main__":
    main()
