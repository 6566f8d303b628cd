"""Learning-rate schedules and the optimizer, with parameter groups by path prefix.

The engine's optimizer updates all parameters as one vector (`raveled`): the moments are
vectors, and weight decay and the backbone's learning-rate scale are per-element factors.
Per tensor, each part of the optimizer (clipping norm, moments, update) was a kernel per
parameter, which XLA:CPU compiles one by one: the alpha 1.0 train step had 2,635 fused kernels
and 1,157 copies, raveled 1,785 and 771. The arithmetic is optax's, element for element;
`create_optimizer(..., raveled_state=False)` is the same optimizer per tensor (the tests hold
the two together).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


class Layout:
    """Where each leaf of a pytree of arrays lies in one float32 vector (tree order)."""

    def __init__(self, tree: Any):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]
        self.offsets = np.cumsum([0] + self.sizes).tolist()

    def ravel(self, tree: Any) -> jax.Array:
        leaves = self.treedef.flatten_up_to(tree)
        if not leaves:
            return jnp.zeros((0,), jnp.float32)
        return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])

    def unravel(self, vector: jax.Array) -> Any:
        leaves = [
            vector[start:start + size].reshape(shape).astype(dtype)
            for start, size, shape, dtype in zip(self.offsets, self.sizes, self.shapes, self.dtypes)
        ]
        return jax.tree.unflatten(self.treedef, leaves)

    def per_element(self, values: Sequence[float]) -> jax.Array:
        """A vector holding values[i] over leaf i's elements (a float where all are equal),
        made in the compiled program from a byte per element."""
        distinct = sorted(set(float(v) for v in values))
        if len(distinct) <= 1:
            return distinct[0] if distinct else 0.0
        index = jnp.asarray(np.repeat(np.asarray([distinct.index(float(v)) for v in values], np.uint8), self.sizes))
        out = jnp.full(index.shape, distinct[0], jnp.float32)
        for i, value in enumerate(distinct[1:], 1):
            out = jnp.where(index == i, jnp.float32(value), out)
        return out


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, computed as the raveled optimizer's clipping does
    (the train step's logged norm and the clipping's are then one computation)."""
    return optax.tree.norm(Layout(tree).ravel(tree))


def raveled(build: Callable[[Any], optax.GradientTransformation]) -> optax.GradientTransformation:
    """`build(params)`, an optax transformation of one vector, applied to a pytree of parameters
    raveled into one vector (`Layout`); its state holds vectors, its updates come back as a pytree.
    `build` sees the parameters' tree (shapes and paths) to make per-element factors."""

    def init(params):
        layout = Layout(params)
        return build(params).init(layout.ravel(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the raveled optimizer needs the parameters (tx.update(grads, state, params))")
        layout = Layout(params)
        flat, state = build(params).update(layout.ravel(updates), state, layout.ravel(params))
        # One vector computed once, then cut into tensors (without the barrier XLA may fuse the
        # whole update into each tensor's slice, one kernel per tensor again).
        return layout.unravel(jax.lax.optimization_barrier(flat)), state

    return optax.GradientTransformation(init, update)


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, head_prefixes: Sequence[str], raveled_state: bool = True
) -> optax.GradientTransformation:
    """AdamW or SGD+momentum after global-norm clipping; the backbone (every parameter outside
    `head_prefixes`) optionally frozen (config.freeze_backbone) or slower (optim.backbone_lr_scale).

    With `raveled_state` (the engine's) all parameters are updated as one vector (see the module
    docstring); without, per tensor with optax's masks and parameter groups: the same updates.
    """
    if raveled_state:
        return raveled(lambda params: _vector_optimizer(config, schedule, head_prefixes, params))
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


def _vector_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule, head_prefixes: Sequence[str], params: Any) -> optax.GradientTransformation:
    """create_optimizer's optimizer for `params` raveled into one vector: the decay mask and the
    backbone's scale as per-element factors."""
    o = config.optim
    layout = Layout(params)
    decay = layout.per_element([o.weight_decay if mask else 0.0 for mask in jax.tree.leaves(decay_mask(params))])
    if o.name == "adamw":
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=decay)
    else:
        opt = optax.chain(optax.add_decayed_weights(decay), optax.sgd(schedule, momentum=o.momentum))
    if config.freeze_backbone or o.backbone_lr_scale != 1.0:
        backbone = 0.0 if config.freeze_backbone else o.backbone_lr_scale
        groups = jax.tree.leaves(param_groups(params, {"head": head_prefixes}, "backbone"))
        opt = optax.chain(opt, optax.scale(layout.per_element([1.0 if g == "head" else backbone for g in groups])))
    if o.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt
