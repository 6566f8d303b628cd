"""Model checkpoints on disk: Orbax directories that record the model's configuration.

Two kinds of directory load with `load_model`:
- a model directory written by `save_model` (mvit2_jax.convert writes these): an Orbax
  CheckpointManager with items "model_config" (JSON) and "variables" (params, batch_stats);
- a training workdir (mvit2_jax.train): its "checkpoints/" manager holds "model_config"
  and "state", whose raw and EMA weights are both loadable.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mvit2_jax.models import MobileViTv2

Variables = Dict[str, Any]
CONFIG_ITEM = "model_config"
VARIABLES_ITEM = "variables"
STATE_ITEM = "state"
TRAIN_CHECKPOINT_SUBDIR = "checkpoints"


def abstract_variables(model: MobileViTv2, image_size: Tuple[int, int] = (256, 256)) -> Variables:
    """Shapes and dtypes of `model`'s variables, without computing anything."""
    images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


def save_model(path: str, model: MobileViTv2, variables: Variables, extra_config: Optional[Dict[str, Any]] = None) -> str:
    """Write `variables` and `model.config()` as an Orbax model directory at `path`."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"{path} exists and is not empty: choose a new destination directory")
    config = {"model": model.config(), **(extra_config or {})}
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.CheckpointManager(path) as mngr:
        mngr.save(
            0,
            args=ocp.args.Composite(
                **{CONFIG_ITEM: ocp.args.JsonSave(config), VARIABLES_ITEM: ocp.args.StandardSave(tree)}
            ),
        )
        mngr.wait_until_finished()
    return path


def _manager_dir(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    sub = os.path.join(path, TRAIN_CHECKPOINT_SUBDIR)
    return sub if os.path.isdir(sub) else path


def read_config(path: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], int, str]:
    """(config, step, manager directory) of the checkpoint at `path` (latest step by default)."""
    directory = _manager_dir(path)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        if step is None:
            step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory} holds no Orbax checkpoint: pass a converted model or a training workdir")
        config = mngr.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]
    return config, step, directory


def load_model(
    path: str, *, ema: bool = True, step: Optional[int] = None, **overrides: Any
) -> Tuple[MobileViTv2, Variables]:
    """Rebuild (model, variables) from a model directory or a training workdir.

    Args:
      path: a directory written by mvit2_jax.convert / save_model, or a training workdir.
      ema: for training checkpoints, load the EMA weights (True) or the raw ones.
      step: which step to load; the latest by default.
      **overrides: model fields to change (e.g. dtype="bfloat16", conv_impl="xla").
    """
    config, step, directory = read_config(path, step)
    model = MobileViTv2(**{**config["model"], **overrides})
    abstract = abstract_variables(MobileViTv2(**config["model"]), tuple(config.get("image_size", (256, 256))))
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        items = set(mngr.item_metadata(step).keys())
        if VARIABLES_ITEM in items:
            restored = mngr.restore(
                step, args=ocp.args.Composite(**{VARIABLES_ITEM: ocp.args.StandardRestore(abstract)})
            )[VARIABLES_ITEM]
            return model, dict(restored)
    from mvit2_jax.train import restore_variables  # training workdirs

    return model, restore_variables(directory, step, abstract, ema=ema)
