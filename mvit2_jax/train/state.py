"""The train state and what happens to it beyond the optimizer: init, EMA, the finite guard."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mvit2_jax.errors import NonFiniteError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    bad_steps: jax.Array  # consecutive steps whose loss or gradient was not finite (update skipped)

    def weight_sets(self) -> dict:
        """{"": raw variables, "ema_": EMA variables}: what evaluation runs."""
        return {
            "": {"params": self.params, "batch_stats": self.batch_stats},
            "ema_": {"params": self.ema_params, "batch_stats": self.ema_batch_stats},
        }


def init_state(model: nn.Module, tx: optax.GradientTransformation, inputs: jax.Array, seed: int) -> TrainState:
    """A fresh TrainState; jit it with out_shardings to create it on the mesh."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = model.init(init_key, inputs)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=params,
        ema_batch_stats=batch_stats,
        rng=jax.random.key_data(train_key),
        bad_steps=jnp.zeros((), jnp.int32),
    )


def apply_update(state: TrainState, params: Any, batch_stats: Any, opt_state: Any, ema_decay: float, finite: jax.Array) -> TrainState:
    """The state after one step: new weights, statistics and optimizer state, their EMA, and
    the step count; a non-finite step leaves every weight, statistic and moment as it was."""
    rate = 1.0 - ema_decay
    updated = state.replace(
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=optax.incremental_update(params, state.ema_params, rate),
        ema_batch_stats=optax.incremental_update(batch_stats, state.ema_batch_stats, rate),
    )
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    return kept.replace(step=state.step + 1, bad_steps=jnp.where(finite, 0, state.bad_steps + 1))


def check_finite(bad_steps: int, limit: int, step: int) -> None:
    """Stop the run once `limit` consecutive updates were skipped as non-finite."""
    if limit and bad_steps >= limit:
        raise NonFiniteError(
            f"loss or gradient was not finite for {bad_steps} consecutive steps (steps {step - bad_steps + 1} to {step}); "
            "those updates were not applied and the checkpoints hold the last good weights: lower config.optim.lr, "
            "use float32, or check the data"
        )
