"""The engine's config checks: everything but the task's own fields, before anything compiles."""

from __future__ import annotations

import ml_collections

from mvit2_jax.errors import ConfigError
from mvit2_jax.train.optim import OPTIMIZERS, SCHEDULES

POSITIVE = ("batch_size", "eval_batch_size", "grad_accum_steps", "num_epochs", "log_every_steps", "eval_every_steps",
            "checkpoint_every_steps", "keep_checkpoints")


# Why a required field has no default, for the error message.
_REQUIRED_WHY = {
    "init_from": "the checkpoint to start from: a training workdir, a converted model directory or a hub name (hf-hub:...)",
    "optim.lr": "this width has no paper recipe",
    "optim.min_lr": "this width has no paper recipe",
    "optim.weight_decay": "this width has no paper recipe",
}


def unset_required(config: ml_collections.ConfigDict) -> list:
    """The fields named in config.required_fields that have no value (None or "")."""
    missing = []
    for name in config.get("required_fields", ()):
        try:
            value = config
            for part in name.split("."):
                value = value[part]
        except (KeyError, AttributeError):
            raise ConfigError(f"config.required_fields names {name!r}, which is not a config field") from None
        if value is None or value == "":
            missing.append(name)
    return missing


def check_config(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
    """Raise a one-line ConfigError for an engine setting that cannot run."""
    missing = unset_required(config)
    if missing:
        why = {_REQUIRED_WHY[name] for name in missing if name in _REQUIRED_WHY}
        flags = " ".join(f"--config.{name}=..." for name in missing)
        raise ConfigError(f"this config requires {', '.join(f'config.{m}' for m in missing)}"
                          f"{' (' + '; '.join(sorted(why)) + ')' if why else ''}: pass {flags}")
    for field in POSITIVE:
        if config[field] < 1:
            raise ConfigError(f"config.{field} must be a positive integer, got {config[field]}")
    micro = config.batch_size // config.grad_accum_steps
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"config.batch_size ({config.batch_size}) must be divisible by config.grad_accum_steps ({config.grad_accum_steps})")
    for name, size in (("batch_size / grad_accum_steps", micro), ("eval_batch_size", config.eval_batch_size)):
        if size % device_count:
            raise ConfigError(f"config.{name} ({size}) must be divisible by the {device_count} devices")
        if size % process_count:
            raise ConfigError(f"config.{name} ({size}) must be divisible by the {process_count} processes")
    o = config.optim
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"config.optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"config.optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    if not o.lr > 0 or o.min_lr < 0 or o.weight_decay < 0:
        raise ConfigError(f"config.optim needs lr > 0, min_lr >= 0 and weight_decay >= 0, got {o.lr}, {o.min_lr}, {o.weight_decay}")
    if config.max_nonfinite_steps < 1:
        raise ConfigError(f"config.max_nonfinite_steps must be >= 1, got {config.max_nonfinite_steps}")
    if not 0 <= config.ema_decay < 1:
        raise ConfigError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
