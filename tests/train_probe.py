"""Run a few train steps of the test config on however many devices this process sees.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/train_probe.py OUT.npz STEPS

Used by test_train.py to compare 1 device with 4 simulated devices in separate processes.
"""

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_config import small_config  # noqa: E402

from mvit2_jax import train  # noqa: E402


def main(out: str, num_steps: int) -> None:
    config = small_config(train_split="train[:192]")
    # SGD's update is linear in the gradient, so float reduction-order noise stays noise
    # (Adam would turn a 1e-9 gradient into a full +-lr step of either sign).
    config.optim.name = "sgd"
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.lr = 0.1
    steps = train.compile_steps(config, num_steps=6)
    state = steps.init()
    batches = train.prefetch(train.train_input(config, 0), NamedSharding(steps.mesh, P("data")), 1)
    for _ in range(num_steps):
        state, _ = steps.train(state, next(batches))
    flat = jax.tree_util.tree_flatten_with_path({"params": state.params, "batch_stats": state.batch_stats})[0]
    np.savez(out, device_count=jax.device_count(), **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
