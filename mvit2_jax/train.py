"""Training and evaluation: jit over a data-parallel mesh of every device of every process.

Read top to bottom: config checks, mesh, input, model and optimizer, train and eval steps,
checkpoints, the loop. State is one pytree (`TrainState`); steps are pure functions.
Everything a run writes goes under its workdir: checkpoints/ (Orbax) and TensorBoard events.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.sharding import NamedSharding, PartitionSpec as P

from mvit2_jax import data as data_lib
from mvit2_jax.checkpoint import CONFIG_ITEM, STATE_ITEM, TRAIN_CHECKPOINT_SUBDIR
from mvit2_jax.data.mixing import mix_batch
from mvit2_jax.models import ATTENTION_TYPES, MobileViTv2

Batch = Dict[str, Any]
Metrics = Dict[str, jax.Array]
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped by a preemption, checkpoint saved"
MIN_IMAGE_SIZE = 32  # the network's total stride


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


# ----------------------------------------------------------------------------- config checks


def validate_config(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """Raise a one-line ValueError for a config that cannot run, before anything compiles."""
    m, d = config.model, config.data
    if not m.alpha > 0:
        raise ValueError(f"config.model.alpha must be > 0 (a width multiplier such as 1.0), got {m.alpha}")
    if m.attention not in ATTENTION_TYPES:
        raise ValueError(f"config.model.attention must be one of {ATTENTION_TYPES}, got {m.attention!r}")
    if m.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
    if d.image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"config.data.image_size must be at least {MIN_IMAGE_SIZE} (the network's stride), got {d.image_size}")
    if d.eval_resize_size < d.image_size:
        raise ValueError(f"config.data.eval_resize_size ({d.eval_resize_size}) must be >= config.data.image_size ({d.image_size})")
    for field in ("batch_size", "eval_batch_size", "grad_accum_steps", "num_epochs", "num_classes"):
        value = config[field] if field in config else d[field]
        if value < 1:
            raise ValueError(f"config.{field} must be a positive integer, got {value}")
    micro = config.batch_size // config.grad_accum_steps
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(f"config.batch_size ({config.batch_size}) must be divisible by config.grad_accum_steps ({config.grad_accum_steps})")
    for name, size in (("batch_size / grad_accum_steps", micro), ("eval_batch_size", config.eval_batch_size)):
        if size % device_count:
            raise ValueError(f"config.{name} ({size}) must be divisible by the {device_count} devices")
        if size % process_count:
            raise ValueError(f"config.{name} ({size}) must be divisible by the {process_count} processes")
    if config.optim.name not in ("adamw", "sgd"):
        raise ValueError(f"config.optim.name must be 'adamw' or 'sgd', got {config.optim.name!r}")
    if config.max_nonfinite_steps < 1:
        raise ValueError(f"config.max_nonfinite_steps must be >= 1, got {config.max_nonfinite_steps}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")


# ----------------------------------------------------------------------------- mesh


def make_mesh() -> jax.sharding.Mesh:
    """One "data" axis over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def to_global(batch: Dict[str, np.ndarray], sharding: NamedSharding) -> Batch:
    """This process's batch -> global jax.Arrays split along the batch axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch(iterator: Iterator[Dict[str, np.ndarray]], sharding: NamedSharding, size: int) -> Iterator[Batch]:
    """Transfer `size` batches ahead of the one being consumed."""
    queue = []
    for batch in iterator:
        queue.append(to_global(batch, sharding))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


# ----------------------------------------------------------------------------- input


def train_input(config: ml_collections.ConfigDict, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
    d = config.data
    aug = data_lib.TrainAugmentation(
        crop_scale=tuple(d.crop_scale),
        flip=d.flip,
        randaugment=d.randaugment,
        randaugment_ops=d.randaugment_ops,
        randaugment_magnitude=d.randaugment_magnitude,
        erasing_prob=d.erasing_prob,
    )
    return data_lib.train_iterator(
        d.dataset,
        d.train_split,
        batch_size=config.batch_size // jax.process_count(),
        image_size=d.image_size,
        data_dir=d.data_dir,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augmentation=aug,
        shuffle_buffer=d.shuffle_buffer,
    )


def eval_input(config: ml_collections.ConfigDict, split: Optional[str] = None) -> Iterator[Dict[str, np.ndarray]]:
    d = config.data
    return data_lib.eval_iterator(
        d.dataset,
        split or d.eval_split,
        batch_size=config.eval_batch_size // jax.process_count(),
        image_size=d.image_size,
        resize_size=d.eval_resize_size,
        data_dir=d.data_dir,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def configure_dataset(config: ml_collections.ConfigDict) -> None:
    """Give an image-folder dataset its options before anything reads it."""
    d = config.data
    if data_lib.is_folder_dataset(d.dataset):
        data_lib.configure_folder(d.dataset, val_fraction=d.folder_val_fraction, seed=d.folder_split_seed, on_bad_file=d.bad_files)


def class_names(config: ml_collections.ConfigDict) -> Optional[list]:
    """The dataset's label names, recorded with checkpoints for predict."""
    return data_lib.class_names(config.data.dataset, config.data.data_dir)


def check_num_classes(config: ml_collections.ConfigDict) -> None:
    names = class_names(config)
    if names is not None and len(names) != config.data.num_classes:
        raise ValueError(f"{config.data.dataset} has {len(names)} classes: set config.data.num_classes={len(names)} (got {config.data.num_classes})")


def total_steps(config: ml_collections.ConfigDict) -> int:
    n = data_lib.num_examples(config.data.dataset, config.data.train_split, config.data.data_dir)
    per_epoch = data_lib.steps_per_epoch(n, config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{config.data.dataset}[{config.data.train_split}] has {n} examples, fewer than config.batch_size={config.batch_size}")
    return config.num_epochs * per_epoch


# ----------------------------------------------------------------------------- model, optimizer, state


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


def create_model(config: ml_collections.ConfigDict) -> MobileViTv2:
    return MobileViTv2(num_classes=config.data.num_classes, **config.model.to_dict())


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from warmup_init_lr, then cosine from lr to min_lr (or constant lr)."""
    o = config.optim
    warmup = min(o.warmup_steps, max(num_steps - 1, 0))
    if o.schedule == "constant":
        main = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, max(num_steps - warmup, 1), alpha=o.min_lr / o.lr)
    else:
        raise ValueError(f"config.optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(o.warmup_init_lr, o.lr, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels only: no decay on 1-D parameters (biases, norm scales)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW or SGD+momentum, optionally with a frozen or slower backbone, after global-norm clipping."""
    o = config.optim

    def base() -> optax.GradientTransformation:
        if o.name == "adamw":
            return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
        return optax.chain(optax.add_decayed_weights(o.weight_decay, mask=decay_mask), optax.sgd(schedule, momentum=o.momentum))

    opt = base()
    if config.freeze_backbone or o.backbone_lr_scale != 1.0:
        backbone = optax.set_to_zero() if config.freeze_backbone else optax.chain(base(), optax.scale(o.backbone_lr_scale))
        opt = optax.multi_transform({"head": opt, "backbone": backbone}, head_or_backbone)
    if o.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt


def head_or_backbone(params: Any) -> Any:
    """'head' for the classifier's parameters, 'backbone' for everything else."""
    return {k: jax.tree.map(lambda _: "head" if k == "head" else "backbone", v) for k, v in params.items()}


def init_state(model: MobileViTv2, tx: optax.GradientTransformation, config: ml_collections.ConfigDict) -> TrainState:
    """A fresh TrainState; jit it with out_shardings to create it on the mesh."""
    key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(key)
    size = config.data.image_size
    variables = model.init(init_key, jnp.zeros((1, size, size, 3), jnp.float32))
    params, batch_stats = variables["params"], variables["batch_stats"]
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


# ----------------------------------------------------------------------------- train and eval steps


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits, per example."""
    top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: MobileViTv2,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
) -> Tuple[TrainState, Metrics]:
    """One optimizer step on a global batch (split into grad_accum_steps micro-batches)."""
    d = config.data
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mix_key, dropout_key = jax.random.split(step_key)
    labels = batch["label"]
    onehot = jax.nn.one_hot(labels, d.num_classes)
    images, targets = mix_batch(
        mix_key,
        batch["image"],
        onehot,
        mixup_alpha=d.mixup_alpha,
        cutmix_alpha=d.cutmix_alpha,
        prob=d.mix_prob,
        switch_prob=d.mix_switch_prob,
        label_smoothing=config.label_smoothing,
    )

    def loss_fn(params, batch_stats, images, targets, key):
        variables = {"params": params, "batch_stats": batch_stats}
        if config.freeze_backbone:  # a frozen backbone runs as at inference: BN running statistics
            logits = model.apply(variables, images, train=False)
        else:
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})
            batch_stats = updates["batch_stats"]
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
        return loss, (logits, batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = config.grad_accum_steps
    if k == 1:
        (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, images, targets, dropout_key)
    else:
        # Micro-batch j takes rows j, j+k, ...: every device keeps its own rows.
        def micro(x):
            return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

        def body(carry, xs):
            batch_stats, grad_sum, loss_sum = carry
            imgs, tgts, j = xs
            (loss, (logits, batch_stats)), grads = grad_fn(
                state.params, batch_stats, imgs, tgts, jax.random.fold_in(dropout_key, j)
            )
            return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), logits

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (batch_stats, grads, loss), logits = jax.lax.scan(
            body, (state.batch_stats, zeros, 0.0), (micro(images), micro(targets), jnp.arange(k))
        )
        grads = jax.tree.map(lambda g: g / k, grads)
        loss = loss / k
        logits = jnp.swapaxes(logits, 0, 1).reshape(-1, logits.shape[-1])

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = config.ema_decay
    ema = lambda e, p: decay * e + (1.0 - decay) * p  # noqa: E731
    updated = state.replace(
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=jax.tree.map(ema, state.ema_params, params),
        ema_batch_stats=jax.tree.map(ema, state.ema_batch_stats, batch_stats),
    )
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite loss or gradient leaves every weight, statistic and optimizer moment as it was.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    new_state = new_state.replace(step=state.step + 1, bad_steps=jnp.where(finite, 0, state.bad_steps + 1))
    metrics = {
        "loss": loss,
        "top1": topk_correct(logits, labels, 1).mean(),
        "top5": topk_correct(logits, labels, 5).mean(),
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "skipped_update": 1.0 - finite.astype(jnp.float32),
    }
    return new_state, metrics


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def check_finite(bad_steps: int, limit: int, step: int) -> None:
    """Stop the run once `limit` consecutive updates were skipped as non-finite."""
    if limit and bad_steps >= limit:
        raise NonFiniteError(
            f"loss or gradient was not finite for {bad_steps} consecutive steps (steps {step - bad_steps + 1} to {step}); "
            "those updates were not applied and the checkpoints hold the last good weights: lower config.optim.lr, "
            "use float32, or check the data"
        )


def eval_step(state: TrainState, batch: Batch, *, model: MobileViTv2) -> Metrics:
    """Sums over the real (mask 1) examples of a batch, for the raw and the EMA weights."""
    mask, labels = batch["mask"], batch["label"]
    sums = {"count": mask.sum()}
    for prefix, params, stats in (("", state.params, state.batch_stats), ("ema_", state.ema_params, state.ema_batch_stats)):
        logits = model.apply({"params": params, "batch_stats": stats}, batch["image"], train=False)
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        sums[prefix + "loss"] = (loss * mask).sum()
        sums[prefix + "top1"] = (topk_correct(logits, labels, 1) * mask).sum()
        sums[prefix + "top5"] = (topk_correct(logits, labels, 5) * mask).sum()
    return sums


@flax.struct.dataclass
class Steps:
    """The compiled functions of a run, shared by train, eval and tests."""

    train: Callable = flax.struct.field(pytree_node=False)
    eval: Callable = flax.struct.field(pytree_node=False)
    init: Callable = flax.struct.field(pytree_node=False)
    model: MobileViTv2 = flax.struct.field(pytree_node=False)
    schedule: Callable = flax.struct.field(pytree_node=False)
    mesh: Any = flax.struct.field(pytree_node=False)


def compile_steps(config: ml_collections.ConfigDict, num_steps: int, mesh: Optional[jax.sharding.Mesh] = None) -> Steps:
    """jit the init, train and eval functions with explicit shardings on `mesh`."""
    mesh = mesh or make_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    model = create_model(config)
    schedule = learning_rate_schedule(config, num_steps)
    tx = create_optimizer(config, schedule)
    init = jax.jit(functools.partial(init_state, model, tx, config), out_shardings=replicated)
    train = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(
        functools.partial(eval_step, model=model), in_shardings=(replicated, batch_sharding), out_shardings=replicated
    )
    return Steps(train=train, eval=evaluate, init=init, model=model, schedule=schedule, mesh=mesh)


def evaluate(steps: Steps, state: TrainState, config: ml_collections.ConfigDict, split: Optional[str] = None, progress: bool = False) -> Dict[str, float]:
    """Top-1, top-5 and loss of the raw and EMA weights over the whole eval split, once."""
    sharding = NamedSharding(steps.mesh, P("data"))
    totals = None
    batches = prefetch(eval_input(config, split), sharding, config.prefetch)
    if progress and jax.process_index() == 0:
        import tqdm

        n = data_lib.eval_steps(
            data_lib.num_examples(config.data.dataset, split or config.data.eval_split, config.data.data_dir),
            config.eval_batch_size // jax.process_count(),
            jax.process_count(),
        )
        batches = tqdm.tqdm(batches, total=n, desc="eval", unit="batch")
    for batch in batches:
        sums = steps.eval(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    out = {k: float(v) / count for k, v in totals.items()}
    out["num_examples"] = count
    return out


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict, read_only: bool = False) -> ocp.CheckpointManager:
    """Latest `keep_checkpoints` plus the best by EMA eval top-1; asynchronous saves."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=config.keep_checkpoints),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m["ema_top1"], n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=True, read_only=read_only, create=not read_only
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_SUBDIR), options=options)


def run_config(config: ml_collections.ConfigDict, model: MobileViTv2) -> Dict[str, Any]:
    """What load_model and predict need to rebuild the model, saved beside every checkpoint."""
    size = config.data.image_size
    return {
        "model": model.config(),
        "image_size": [size, size],
        "eval_resize_size": config.data.eval_resize_size,
        "dataset": config.data.dataset,
        "class_names": class_names(config),
        "config": config.to_dict(),
    }


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(meta)})
    mngr.save(step, args=args, metrics=metrics, force=force)


def abstract_state(steps: Steps) -> TrainState:
    replicated = NamedSharding(steps.mesh, P())
    shapes = jax.eval_shape(steps.init)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def restore(mngr: ocp.CheckpointManager, steps: Steps, step: Optional[int] = None) -> Optional[TrainState]:
    """The newest readable checkpoint (or `step`); unreadable ones are moved aside with a warning."""
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state(steps))})
    if step is not None:
        return mngr.restore(step, args=args)[STATE_ITEM]
    for candidate in sorted(mngr.all_steps(), reverse=True):
        try:
            return mngr.restore(candidate, args=args)[STATE_ITEM]
        except Exception as e:  # a truncated, deleted or half-written file: any read error
            moved = quarantine(mngr, candidate)
            logging.warning("Checkpoint %d is unreadable (%s: %s); moved it to %s and trying the previous one",
                            candidate, type(e).__name__, str(e).splitlines()[0][:200], moved)
    return None


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move checkpoint `step` out of the manager's directory (kept for inspection, not deleted)."""
    directory = os.fspath(mngr.directory)
    target = os.path.join(os.path.dirname(directory), "corrupt_checkpoints", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(directory, str(step)), target)
    mngr.reload()
    return target


def restore_variables(directory: str, step: int, abstract: Dict[str, Any], ema: bool = True) -> Dict[str, Any]:
    """{"params", "batch_stats"} (EMA or raw) of a training checkpoint, for load_model."""
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        tree = mngr.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()}))[STATE_ITEM]
    prefix = "ema_" if ema else ""
    variables = {"params": tree[prefix + "params"], "batch_stats": tree[prefix + "batch_stats"]}
    expected = jax.tree.map(lambda x: x.shape, abstract)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), variables)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError(f"checkpoint {directory}/{step} does not match its recorded model configuration")
    return jax.tree.map(jnp.asarray, variables)


def merge_pretrained(target: Any, source: Any) -> Tuple[Any, list]:
    """`target` with every array that `source` has at the same path and shape; the rest listed."""
    src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    merged, fresh = [], []
    for path, value in leaves:
        key = jax.tree_util.keystr(path)
        if key in src and tuple(np.shape(src[key])) == tuple(value.shape):
            merged.append(jnp.asarray(src[key], value.dtype))
        else:
            merged.append(value)
            fresh.append(key + ("" if key not in src else f" (shape {tuple(np.shape(src[key]))} -> {tuple(value.shape)})"))
    return jax.tree_util.tree_unflatten(treedef, merged), fresh


def init_from_pretrained(state: TrainState, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainState:
    """Start from config.init_from's weights: same width and attention; new shapes re-initialized."""
    from mvit2_jax.checkpoint import load_model, read_config

    path = config.init_from
    source = read_config(path)[0]["model"]
    for field in ("alpha", "attention"):
        if source[field] != config.model[field]:
            raise ValueError(
                f"config.init_from={path} holds a {field}={source[field]!r} model but config.model.{field}={config.model[field]!r}: "
                f"set config.model.{field}={source[field]!r} or choose another checkpoint"
            )
    _, variables = load_model(path, ema=config.init_from_ema)
    params, fresh = merge_pretrained(state.params, variables["params"])
    batch_stats, fresh_stats = merge_pretrained(state.batch_stats, variables["batch_stats"])
    logging.info("Initialized from %s; re-initialized (not in the checkpoint or new shape): %s", path, ", ".join(fresh + fresh_stats) or "nothing")
    params, batch_stats = jax.device_put((params, batch_stats), NamedSharding(mesh, P()))
    copy = functools.partial(jax.tree.map, jnp.copy)  # distinct buffers: the train step donates the state
    return state.replace(params=params, batch_stats=batch_stats, ema_params=copy(params), ema_batch_stats=copy(batch_stats))


# ----------------------------------------------------------------------------- the loop


class PreemptionFlag:
    """Set by SIGTERM; agreed between processes so that every process stops at one step."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handler) if _is_main_thread() else None

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self.raised = True

    def should_stop(self, mngr: ocp.CheckpointManager, step: int, check_peers: bool) -> bool:
        stop = self.raised or mngr.reached_preemption(step)
        if check_peers and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.process_allgather(np.asarray(stop)).any())
        return stop

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def params_checksum(params: Any) -> float:
    """Sum of |x| over this process's copy of `params`: equal on every process of a sound run."""
    total = 0.0
    for leaf in jax.tree.leaves(params):
        total += float(np.abs(np.asarray(leaf.addressable_data(0), np.float64)).sum())
    return total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_after_steps: Optional[int] = None) -> Dict[str, float]:
    """Train from the latest checkpoint in `workdir` (or from scratch); returns final eval metrics.

    `stop_after_steps` ends this invocation early (with a checkpoint) without changing the
    schedule, as a preemption would; running again continues the same run.
    """
    validate_config(config, jax.device_count(), jax.process_count())
    configure_dataset(config)
    data_lib.check_dataset(config.data.dataset, config.data.train_split, config.data.data_dir)
    data_lib.check_dataset(config.data.dataset, config.data.eval_split, config.data.data_dir)
    check_num_classes(config)
    num_steps = total_steps(config)
    with WorkdirLock(workdir):
        return _train_loop(config, workdir, num_steps, stop_after_steps)


class WorkdirLock:
    """An exclusive lock on WORKDIR/.lock (process 0), so two runs never share a workdir."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), ".lock")
        self.file = None

    def __enter__(self) -> "WorkdirLock":
        if jax.process_index() != 0:
            return self
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(
                f"{os.path.dirname(self.path)} is in use by a running job ({holder}): wait for it to end or choose another --workdir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock


def _train_loop(config: ml_collections.ConfigDict, workdir: str, num_steps: int, stop_after_steps: Optional[int]) -> Dict[str, float]:
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    steps = compile_steps(config, num_steps)
    meta = run_config(config, steps.model)
    mngr = checkpoint_manager(workdir, config)
    state = restore(mngr, steps)
    if state is None:
        state = steps.init()
        if config.init_from:
            state = init_from_pretrained(state, config, steps.mesh)
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
        logging.info("Starting a new run in %s", workdir)
    else:
        logging.info("Resuming from step %d in %s", int(state.step), workdir)
    start = int(jax.device_get(state.step))
    if start == 0:
        parameter_overview.log_parameter_overview(state.params)

    sharding = NamedSharding(steps.mesh, P("data"))
    batches = prefetch(train_input(config, start), sharding, config.prefetch)
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps)
    flag = PreemptionFlag()
    history, t_log, eval_metrics, step = [], time.time(), {}, start
    if start >= num_steps:
        logging.info("The run in %s is complete (step %d of %d): evaluating only", workdir, start, num_steps)
        eval_metrics = evaluate(steps, state, config)
    try:
        for step in range(start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = steps.train(state, next(batches))
            if step == start + 1:  # leave the compile out of the throughput numbers
                jax.block_until_ready(state)
                t_log = time.time()
            else:
                history.append(metrics)
            report(step)
            is_last = step == num_steps
            if (step % config.log_every_steps == 0 or is_last) and history:
                summary = {f"train/{k}": float(v) for k, v in jax.tree.map(lambda *x: np.mean(x), *jax.device_get(history)).items()}
                dt = time.time() - t_log
                summary["train/images_per_second"] = len(history) * config.batch_size / dt
                summary["train/images_per_second_per_device"] = summary["train/images_per_second"] / jax.device_count()
                summary["train/step_time_ms"] = 1000 * dt / len(history)
                writer.write_scalars(step, summary)
                history, t_log = [], time.time()
            if step % config.eval_every_steps == 0 or is_last:
                eval_metrics = evaluate(steps, state, config)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                t_log = time.time()
            if step % config.max_nonfinite_steps == 0 or step % config.log_every_steps == 0 or is_last:
                check_finite(int(jax.device_get(state.bad_steps)), config.max_nonfinite_steps, step)
            evaluated = step % config.eval_every_steps == 0 or is_last
            stopping = stop_after_steps is not None and step - start >= stop_after_steps
            preempted = flag.should_stop(mngr, step, check_peers=step % config.log_every_steps == 0)
            if evaluated or stopping or preempted or step % config.checkpoint_every_steps == 0:
                save(mngr, state, meta, eval_metrics if evaluated else None, force=stopping or preempted)
            if stopping:
                break
            if preempted:
                mngr.wait_until_finished()
                logging.warning("Preempted at step %d: checkpoint saved; run the same command to resume", step)
                raise Preempted(step)
    finally:
        mngr.wait_until_finished()
        writer.flush()
        flag.restore()
    mngr.close()
    logging.info("process %d params checksum %.12e at step %d", jax.process_index(), params_checksum(state.params), step)
    return eval_metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict, source: str, split: Optional[str] = None) -> Dict[str, float]:
    """Evaluate a checkpoint (a training workdir: raw and EMA; or a converted model) on a split.

    The model (width, attention, classes) comes from the checkpoint; the data and
    preprocessing from `config`.
    """
    from mvit2_jax.checkpoint import load_model, read_config

    try:
        recorded = read_config(source)[0]["model"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint in {source}: pass --workdir of a run or --checkpoint of a converted model") from None
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for field, value in recorded.items():
            if field == "num_classes":
                config.data.num_classes = value
            elif field in config.model:
                config.model[field] = value
    validate_config(config, jax.device_count(), jax.process_count())
    configure_dataset(config)
    data_lib.check_dataset(config.data.dataset, split or config.data.eval_split, config.data.data_dir)
    check_num_classes(config)
    steps = compile_steps(config, 1)
    _, raw = load_model(source, ema=False)
    _, ema = load_model(source, ema=True)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=raw["params"], batch_stats=raw["batch_stats"], opt_state=(),
        ema_params=ema["params"], ema_batch_stats=ema["batch_stats"], rng=jnp.zeros((2,), jnp.uint32),
        bad_steps=jnp.zeros((), jnp.int32),
    )
    state = jax.device_put(state, NamedSharding(steps.mesh, P()))
    return evaluate(steps, state, config, split, progress=True)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
