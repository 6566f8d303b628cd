"""Learning-rate schedules and the optimizer, with parameter groups by path prefix."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import ml_collections
import optax
from flax import traverse_util

from mvit2_jax.errors import ConfigError

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from warmup_init_lr, then cosine from lr to min_lr (or constant lr)."""
    o = config.optim
    warmup = min(o.warmup_steps, max(num_steps - 1, 0))
    if o.schedule == "constant":
        main = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, max(num_steps - warmup, 1), alpha=o.min_lr / o.lr)
    else:
        raise ConfigError(f"config.optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(o.warmup_init_lr, o.lr, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels only: no decay on 1-D parameters (biases, norm scales)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def param_groups(params: Any, prefixes: Mapping[str, Sequence[str]], default: str) -> Any:
    """A label per parameter: the first group one of whose path prefixes ("head",
    "seg_head/aux_head") the parameter's path starts with, else `default`."""

    def label(path, _):
        name = "/".join(path)
        for group, starts in prefixes.items():
            if any(name == s or name.startswith(s + "/") for s in starts):
                return group
        return default

    return traverse_util.path_aware_map(label, params)


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule, head_prefixes: Sequence[str]) -> optax.GradientTransformation:
    """AdamW or SGD+momentum after global-norm clipping; the backbone (every parameter outside
    `head_prefixes`) optionally frozen (config.freeze_backbone) or slower (optim.backbone_lr_scale)."""
    o = config.optim

    def base() -> optax.GradientTransformation:
        if o.name == "adamw":
            return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
        return optax.chain(optax.add_decayed_weights(o.weight_decay, mask=decay_mask), optax.sgd(schedule, momentum=o.momentum))

    opt = base()
    if config.freeze_backbone or o.backbone_lr_scale != 1.0:
        backbone = optax.set_to_zero() if config.freeze_backbone else optax.chain(base(), optax.scale(o.backbone_lr_scale))
        opt = optax.multi_transform(
            {"head": opt, "backbone": backbone}, lambda params: param_groups(params, {"head": head_prefixes}, "backbone")
        )
    if o.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt
