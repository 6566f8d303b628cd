"""The train state and what happens to it beyond the optimizer: init, EMA, the finite guard."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mvit2_jax.errors import NonFiniteError
from mvit2_jax.train.optim import Layout


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


# The optimizer's per-parameter entries by name (optax's ScaleByAdamState and TraceState).
_MOMENTS = ("mu", "nu", "trace")


def _per_tensor_moments(saved: Any, found: Optional[Dict[str, List[Any]]] = None) -> Dict[str, List[Any]]:
    """Every per-parameter moment tree (a dict, not a vector) in a saved optimizer state, by name."""
    found = {} if found is None else found
    if isinstance(saved, dict):
        for key, value in saved.items():
            if key in _MOMENTS and isinstance(value, dict):
                found.setdefault(key, []).append(value)
            else:
                _per_tensor_moments(value, found)
    elif isinstance(saved, (list, tuple)):
        for value in saved:
            _per_tensor_moments(value, found)
    return found


def _counts(saved: Any) -> List[Any]:
    if isinstance(saved, dict):
        return ([saved["count"]] if "count" in saved else []) + [c for k, v in saved.items() if k != "count" for c in _counts(v)]
    if isinstance(saved, (list, tuple)):
        return [c for v in saved for c in _counts(v)]
    return []


def upgrade_per_tensor_optimizer(abstract: TrainState):
    """checkpoint.restore_state's `upgrade` for checkpoints whose optimizer state is per tensor
    (written before the optimizer was raveled, see mvit2_jax.train.optim): the moments of every
    parameter group are merged and raveled, the step count kept; all else is read as it is."""

    def upgrade(saved: Any) -> Optional[Tuple[Any, Any]]:
        if not _per_tensor_moments(saved["opt_state"]):
            return None
        sharding = jax.tree.leaves(abstract)[0].sharding
        target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved[key]) for key in saved.keys()}

        def convert(tree: Any) -> TrainState:
            params = tree["params"]
            layout = Layout(params)
            moments = {}
            for name, trees in _per_tensor_moments(tree["opt_state"]).items():
                merged = [None] * len(layout.sizes)  # a group's tree holds None where another group's parameter is
                for t in trees:
                    for i, leaf in enumerate(layout.treedef.flatten_up_to(t)):
                        merged[i] = leaf if leaf is not None else merged[i]
                moments[name] = [jnp.zeros(shape, jnp.float32) if leaf is None else leaf for leaf, shape in zip(merged, layout.shapes)]
            count = _counts(tree["opt_state"])[0]

            def build(moments, count):  # the arrays as arguments: captured, they would be constants
                def fill(path, leaf):
                    name = path[-1].name if isinstance(path[-1], jax.tree_util.GetAttrKey) else None
                    if name in moments:
                        return layout.ravel(jax.tree.unflatten(layout.treedef, moments[name]))
                    if name == "count":
                        return count.astype(leaf.dtype)
                    raise ValueError(f"no per-tensor optimizer state for {jax.tree_util.keystr(path)} in the checkpoint")

                return jax.tree_util.tree_map_with_path(fill, abstract.opt_state)

            opt_state = jax.jit(build, out_shardings=sharding)(moments, count)
            fields = {f.name: tree[f.name] for f in dataclasses.fields(TrainState) if f.name != "opt_state"}
            return TrainState(opt_state=opt_state, **fields)

        return target, convert

    return upgrade
