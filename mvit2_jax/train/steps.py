"""The jitted step functions. They know the task only through its hooks (mvit2_jax.tasks.base)."""

from __future__ import annotations

import collections
import functools
import json
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from mvit2_jax import allocator
from mvit2_jax.tasks.base import Task
from mvit2_jax.train.optim import create_optimizer, global_norm, learning_rate_schedule
from mvit2_jax.train.runtime import make_mesh
from mvit2_jax.train.state import TrainState, apply_update, init_state

Batch = Dict[str, Any]
Metrics = Dict[str, jax.Array]


def loss_and_parts(out: Any) -> Tuple[jax.Array, Metrics]:
    """(loss, named parts) of what a task's `loss` returns: a loss, or a loss and its parts."""
    return out if isinstance(out, tuple) else (out, {})


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    task: Task,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
) -> Tuple[TrainState, Metrics]:
    """One optimizer step on a global batch (split into grad_accum_steps micro-batches)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch_key, dropout_key = jax.random.split(step_key)
    inputs, targets = task.prepare_batch(batch_key, batch, config)

    def loss_fn(params, batch_stats, inputs, targets, key):
        variables = {"params": params, "batch_stats": batch_stats}
        if config.freeze_backbone:  # a frozen backbone runs as at inference: BN running statistics
            outputs = model.apply(variables, inputs, train=False)
        else:
            outputs, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"], rngs={"dropout": key})
            batch_stats = updates["batch_stats"]
        loss, parts = loss_and_parts(task.loss(outputs, targets, config))
        return loss, (outputs, batch_stats, parts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = config.grad_accum_steps
    if k == 1:
        (loss, (outputs, batch_stats, parts)), grads = grad_fn(state.params, state.batch_stats, inputs, targets, dropout_key)
    else:
        # Micro-batch j takes rows j, j+k, ...: every device keeps its own rows.
        def micro(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        def body(carry, xs):
            batch_stats, grad_sum, loss_sum = carry
            micro_inputs, micro_targets, j = xs
            (loss, (outputs, batch_stats, parts)), grads = grad_fn(
                state.params, batch_stats, micro_inputs, micro_targets, jax.random.fold_in(dropout_key, j)
            )
            return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), (outputs, parts)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro_inputs, micro_targets = jax.tree.map(micro, (inputs, targets))
        (batch_stats, grads, loss), (outputs, parts) = jax.lax.scan(
            body, (state.batch_stats, zeros, 0.0), (micro_inputs, micro_targets, jnp.arange(k))
        )
        grads = jax.tree.map(lambda g: g / k, grads)
        loss = loss / k
        parts = jax.tree.map(lambda x: x.mean(0), parts)
        outputs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), outputs)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = apply_update(state, params, batch_stats, opt_state, config.ema_decay, finite)
    metrics = {
        "loss": loss,
        **parts,
        **task.train_metrics(outputs, batch),
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "skipped_update": 1.0 - finite.astype(jnp.float32),
    }
    return new_state, metrics


def eval_step(weights: Mapping[str, Any], batch: Batch, *, task: Task, model: nn.Module, config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """{"count": real (mask 1) examples, "sums": {name: the task's sums}} of a batch, for each
    named set of weights ({"": raw, "ema_": EMA} or one set). A task with `eval_examples`
    (metrics that are not sums, such as detection's mAP) adds {"examples": {"mask", "sets":
    {name: its per-example arrays}}}: the engine gathers the real examples on the host."""
    sums, examples = {}, {}
    for name, variables in weights.items():
        outputs = model.apply(variables, task.inputs(batch), train=False)
        sums[name] = task.eval_sums(outputs, batch, config)
        if hasattr(task, "eval_examples"):
            examples[name] = task.eval_examples(outputs, batch, config)
    out = {"count": batch["mask"].sum(), "sums": sums}
    if examples:
        out["examples"] = {"mask": batch["mask"], "sets": examples}
    return out


@flax.struct.dataclass
class Steps:
    """The compiled functions of a run, shared by train, eval and tests."""

    train: Callable = flax.struct.field(pytree_node=False)
    eval: Callable = flax.struct.field(pytree_node=False)
    init: Callable = flax.struct.field(pytree_node=False)
    model: nn.Module = flax.struct.field(pytree_node=False)
    task: Task = flax.struct.field(pytree_node=False)
    schedule: Callable = flax.struct.field(pytree_node=False)
    mesh: Any = flax.struct.field(pytree_node=False)


# Config fields that only the host-side loop and input pipeline read: runs that differ only in
# these share their compiled steps (see compile_steps).
LOOP_ONLY_FIELDS = (
    "init_from", "init_from_ema", "required_fields", "num_epochs", "batch_size", "eval_batch_size",
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "prefetch",
    "max_nonfinite_steps", "data.dataset", "data.train_split", "data.eval_split", "data.data_dir",
    "data.folder_val_fraction", "data.folder_split_seed", "data.bad_files", "data.shuffle_buffer",
)
_COMPILED: "collections.OrderedDict[str, Steps]" = collections.OrderedDict()
_KEEP_COMPILED = 4


# XLA:CPU schedules a program to run independent operations side by side, which keeps more of
# them live at once; the train step's temporaries are its peak memory (one block per call), so
# on the CPU it is scheduled for memory instead: alpha 1.0, batch 16, 256x256: 2,500 MiB of
# temporaries against 2,995, the same values, steps 1-3% slower (README, Performance).
CPU_TRAIN_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _compile_key(config: ml_collections.ConfigDict, task: Task, num_steps: int, mesh: jax.sharding.Mesh) -> str:
    fields = traverse_util.flatten_dict(config.to_dict(), sep=".")
    kept = {k: v for k, v in fields.items() if k not in LOOP_ONLY_FIELDS}
    devices = [int(d.id) for d in mesh.devices.flat]
    return json.dumps([task.name, num_steps, devices, mesh.axis_names, kept], sort_keys=True, default=str)


def compile_steps(
    config: ml_collections.ConfigDict, task: Task, num_steps: int, mesh: Optional[jax.sharding.Mesh] = None
) -> Steps:
    """jit the init, train and eval functions of `task` with explicit shardings on `mesh`.

    The jitted functions of the last few configurations are kept, so that running again in
    the same process (resuming, evaluating, a notebook cell run twice) neither traces nor
    compiles them again; configs that differ only in LOOP_ONLY_FIELDS share them.
    """
    allocator.release_after_compiles()  # the compiler's freed memory back to the OS
    mesh = mesh or make_mesh()
    key = _compile_key(config, task, num_steps, mesh)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    config = ml_collections.FrozenConfigDict(config)  # captured by the steps: later edits must not leak in
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    model = task.create_model(task.model_config(config))
    schedule = learning_rate_schedule(config, num_steps)
    tx = create_optimizer(config, schedule, task.head_prefixes)
    # The init runs once: on the CPU, compiling it without LLVM's optimizations takes a third of
    # the time (its many random draws are slow to optimize) and gives the same values.
    on_cpu = jax.default_backend() == "cpu"
    init_options = {"xla_backend_optimization_level": 0} if on_cpu else None
    init = jax.jit(
        functools.partial(init_state, model, tx, task.init_inputs(config), config.seed),
        out_shardings=replicated,
        compiler_options=init_options,
    )
    train = jax.jit(
        functools.partial(train_step, task=task, model=model, tx=tx, schedule=schedule, config=config),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=CPU_TRAIN_OPTIONS if on_cpu else None,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, task=task, model=model, config=config), in_shardings=(replicated, batch_sharding), out_shardings=replicated
    )
    steps = Steps(train=train, eval=evaluate, init=init, model=model, task=task, schedule=schedule, mesh=mesh)
    _COMPILED[key] = steps
    while len(_COMPILED) > _KEEP_COMPILED:
        _COMPILED.popitem(last=False)
    return steps
