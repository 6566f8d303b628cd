"""Everything on disk: Orbax model directories and training checkpoints, load_model.

Two kinds of directory load with `load_model`:
- a model directory written by `save_model` (mvit2_jax.convert writes these): an Orbax
  CheckpointManager with items "model_config" (JSON) and "variables" (params, batch_stats);
- a training workdir (mvit2_jax.train): its "checkpoints/" manager holds "model_config"
  and "state" (the engine's TrainState), whose raw and EMA weights are both loadable.

"model_config" records what rebuilds the model without anything else: the task, the
model's constructor arguments, the image size and preprocessing, the class names, and for
training checkpoints the run's config. Directories written before this record had a
"format" (the first release: classification only, `conv_impl` for today's `kernels`) are
migrated when read; nothing on disk is rewritten.

This module imports no training code: the engine passes in its state's shapes.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mvit2_jax import tasks
from mvit2_jax.errors import ConfigError

Variables = Dict[str, Any]
CONFIG_ITEM = "model_config"
VARIABLES_ITEM = "variables"
STATE_ITEM = "state"
TRAIN_CHECKPOINT_SUBDIR = "checkpoints"
FORMAT = 2
# The first release's `conv_impl` values and the `kernels` values that mean the same.
_CONV_IMPL_TO_KERNELS = {"auto": "auto", "xla": "portable", "unrolled": "cpu"}


# ----------------------------------------------------------------------------- the recorded config


def migrate_meta(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """A "model_config" record in today's format, whatever release wrote it."""
    meta = copy.deepcopy(dict(meta))
    if meta.get("format", 1) > FORMAT:
        raise ConfigError(f"this checkpoint was written by a newer mvit2_jax (format {meta['format']}): upgrade mvit2_jax")
    if meta.get("format", 1) == 1:
        for model in (meta.get("model"), meta.get("config", {}).get("model")):
            if model is not None and "conv_impl" in model:
                model["kernels"] = _CONV_IMPL_TO_KERNELS[model.pop("conv_impl")]
        meta.setdefault("task", "classification")
        if "config" in meta:
            meta["config"].setdefault("task", meta["task"])
        meta["format"] = FORMAT
    return meta


def abstract_variables(model: nn.Module, image_size: Tuple[int, int] = (256, 256)) -> Variables:
    """Shapes and dtypes of `model`'s variables, without computing anything (traced once per
    model configuration: a whole model's trace takes about a second)."""
    return jax.tree.map(lambda leaf: leaf, _abstract_variables(model, tuple(image_size)))  # fresh containers


@functools.lru_cache(maxsize=32)
def _abstract_variables(model: nn.Module, image_size: Tuple[int, int]) -> Variables:
    images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


def save_model(path: str, model: nn.Module, variables: Variables, meta: Optional[Dict[str, Any]] = None, task: str = "classification") -> str:
    """Write `variables` and the model's configuration as an Orbax model directory at `path`."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise ConfigError(f"{path} exists and is not empty: choose a new destination directory")
    record = {"format": FORMAT, "task": task, "model": model.config(), **(meta or {})}
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.CheckpointManager(path) as mngr:
        mngr.save(
            0,
            args=ocp.args.Composite(
                **{CONFIG_ITEM: ocp.args.JsonSave(record), VARIABLES_ITEM: ocp.args.StandardSave(tree)}
            ),
        )
        mngr.wait_until_finished()
    return path


def _manager_dir(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"no checkpoint directory at {path}: pass a converted model directory or a training workdir")
    sub = os.path.join(path, TRAIN_CHECKPOINT_SUBDIR)
    return sub if os.path.isdir(sub) else path


def read_config(path: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], int, str]:
    """(config record, step, manager directory) of the checkpoint at `path` (latest step by default)."""
    directory = _manager_dir(path)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        if step is None:
            step = mngr.latest_step()
        if step is None:
            raise ConfigError(f"no checkpoint in {path}: pass --workdir of a run or --checkpoint of a converted model")
        meta = mngr.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]
    return migrate_meta(meta), step, directory


def build_model(meta: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The model a config record describes (with `overrides` of its constructor arguments)."""
    return tasks.get(meta["task"]).create_model({**meta["model"], **overrides})


def _is_training_checkpoint(directory: str, step: int) -> bool:
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        return VARIABLES_ITEM not in set(mngr.item_metadata(step).keys())


def load_model(path: str, *, ema: bool = True, step: Optional[int] = None, **overrides: Any) -> Tuple[nn.Module, Variables]:
    """Rebuild (model, variables) from a model directory or a training workdir.

    Args:
      path: a directory written by mvit2_jax.convert / save_model, or a training workdir.
      ema: for training checkpoints, load the EMA weights (True) or the raw ones.
      step: which step to load; the latest by default.
      **overrides: model fields to change (e.g. dtype="bfloat16", kernels="portable").
    """
    meta, step, directory = read_config(path, step)
    model = build_model(meta, **overrides)
    abstract = abstract_variables(build_model(meta), tuple(meta.get("image_size", (256, 256))))
    if _is_training_checkpoint(directory, step):
        return model, restore_variables(directory, step, abstract, ema=ema)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(**{VARIABLES_ITEM: ocp.args.StandardRestore(abstract)}))
    return model, dict(restored[VARIABLES_ITEM])


def load_weight_sets(path: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Variables]]:
    """(config record, {"": raw weights, "ema_": EMA weights}) of a checkpoint; a converted
    model directory has only "" (it holds one set of weights)."""
    meta, step, directory = read_config(path, step)
    abstract = abstract_variables(build_model(meta), tuple(meta.get("image_size", (256, 256))))
    if not _is_training_checkpoint(directory, step):
        return meta, {"": load_model(path, step=step)[1]}
    return meta, {prefix: restore_variables(directory, step, abstract, ema=ema) for prefix, ema in (("", False), ("ema_", True))}


def restore_variables(directory: str, step: int, abstract: Variables, ema: bool = True) -> Variables:
    """{"params", "batch_stats"} (EMA or raw) of a training checkpoint."""
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers=handlers) as mngr:
        # Onto this process's first device, whatever mesh wrote it (a multi-host run's
        # checkpoint loads on a laptop).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), mngr.item_metadata(step)[STATE_ITEM]
        )
        tree = mngr.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]
    prefix = "ema_" if ema else ""
    variables = {"params": tree[prefix + "params"], "batch_stats": tree[prefix + "batch_stats"]}
    expected = jax.tree.map(lambda x: x.shape, abstract)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), variables)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ConfigError(f"checkpoint {directory}/{step} does not match its recorded model configuration")
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


# ----------------------------------------------------------------------------- training checkpoints


def train_manager(
    workdir: str, *, keep: int, best_metric: str, read_only: bool = False
) -> ocp.CheckpointManager:
    """The run's manager: the latest `keep` checkpoints plus the best by eval `best_metric`."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=True, read_only=read_only, create=not read_only
    )
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()}  # item_metadata reads them
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_SUBDIR), options=options, item_handlers=handlers)


def save_state(
    mngr: ocp.CheckpointManager, step: int, state: Any, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None, force: bool = False
) -> None:
    """Save the train state and its config record at `step` (asynchronously)."""
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(meta)})
    mngr.save(step, args=args, metrics=metrics, force=force)


def restore_state(
    mngr: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None, upgrade: Optional[Callable[[Any], Any]] = None
) -> Optional[Any]:
    """The newest readable train state (or that of `step`), laid out as `abstract_state`;
    unreadable checkpoints are moved aside with a warning. None if there is none.

    `upgrade(saved)`, given a checkpoint's saved tree metadata, returns None for today's layout,
    or (restore target, convert) for an earlier one: the checkpoint is read as it was written
    and `convert` makes today's state of it (nothing on disk is rewritten).
    """

    def read(candidate: int) -> Tuple[Any, Callable[[Any], Any]]:
        earlier = upgrade(mngr.item_metadata(candidate)[STATE_ITEM]) if upgrade is not None else None
        target, convert = earlier if earlier is not None else (abstract_state, None)
        tree = mngr.restore(candidate, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]
        return tree, convert

    def converted(candidate: int, tree: Any, convert: Optional[Callable[[Any], Any]]) -> Any:
        if convert is None:
            return tree
        # Outside the read's error handling: a failing conversion is a bug, not a bad file.
        logging.info("Checkpoint %d was written with an earlier layout of the train state: converted on reading", candidate)
        return convert(tree)

    if step is not None:
        return converted(step, *read(step))
    for candidate in sorted(mngr.all_steps(), reverse=True):
        try:
            tree, convert = read(candidate)
        except Exception as e:  # a truncated, deleted or half-written file: any read error
            moved = quarantine(mngr, candidate)
            logging.warning("Checkpoint %d is unreadable (%s: %s); moved it to %s and trying the previous one",
                            candidate, type(e).__name__, str(e).splitlines()[0][:200], moved)
            continue
        return converted(candidate, tree, convert)
    return None


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move checkpoint `step` out of the manager's directory (kept for inspection, not deleted)."""
    directory = os.fspath(mngr.directory)
    target = os.path.join(os.path.dirname(directory), "corrupt_checkpoints", f"{step}-{int(time.time())}")
    while os.path.exists(target):  # the same step quarantined twice within a second
        target += "+"
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(directory, str(step)), target)
    mngr.reload()
    return target

