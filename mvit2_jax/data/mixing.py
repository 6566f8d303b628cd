"""Batch-level Mixup / CutMix in JAX, run on device inside the jitted train step.

With probability `prob` (recipe: 0.5) a batch is mixed with itself rolled by one example,
as cvnets and torchvision's reference scripts pair examples; a mixed batch uses CutMix
(alpha 1.0) with probability `switch_prob` (0.5) and Mixup (alpha 0.2) otherwise.
Everything is a function of the PRNG key, so a train step that folds its step number into
its key is exactly reproducible.

Both modes are one formula: `images = w * images + (1 - w) * rolled`, where the per-pixel
weight w is the scalar Mixup lambda or 0 inside the CutMix box and 1 outside it, and the
targets mix with the mean of w (for CutMix, 1 - box area / image area, as torchvision).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp


def smooth_labels(labels_onehot: jax.Array, smoothing: float) -> jax.Array:
    """(1 - smoothing) * one-hot + smoothing / num_classes."""
    return labels_onehot * (1.0 - smoothing) + smoothing / labels_onehot.shape[-1]


def _sample_lambda(key: jax.Array, alpha: float) -> jax.Array:
    """Beta(alpha, alpha); Beta(1, 1) is drawn as the uniform it equals (cheaper to compile)."""
    return jax.random.uniform(key) if alpha == 1.0 else jax.random.beta(key, alpha, alpha)


def _cutmix_keep_mask(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """[H, W] float: 0 inside a box of area about (1 - lam) * H * W at a uniform center, else 1."""
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    half = 0.5 * jnp.sqrt(1.0 - lam)
    half_h, half_w = (half * height).astype(jnp.int32), (half * width).astype(jnp.int32)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= cy - half_h) & (rows < cy + half_h) & (cols >= cx - half_w) & (cols < cx + half_w)
    return 1.0 - inside.astype(jnp.float32)


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    labels_onehot: jax.Array,
    *,
    mixup_alpha: float = 0.2,
    cutmix_alpha: float = 1.0,
    prob: float = 0.5,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
) -> Tuple[jax.Array, jax.Array]:
    """Mix a batch: (images [B, H, W, C], one-hot [B, K]) -> (images, soft targets [B, K]).

    An alpha <= 0 disables that mode (both <= 0, or prob 0: the batch passes unchanged).
    `label_smoothing` is applied to the targets before mixing (0 leaves it to the loss).
    """
    targets = smooth_labels(labels_onehot.astype(jnp.float32), label_smoothing)
    if prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return images, targets
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
    height, width = images.shape[1], images.shape[2]
    keep = jnp.ones((height, width))  # per-pixel weight of the batch itself
    if mixup_alpha > 0:
        mixup = _sample_lambda(k_mixup, mixup_alpha) * keep
    if cutmix_alpha > 0:
        cutmix = _cutmix_keep_mask(k_box, _sample_lambda(k_cutmix, cutmix_alpha), height, width)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        weight = jnp.where(jax.random.uniform(k_switch) < switch_prob, cutmix, mixup)
    else:
        weight = mixup if mixup_alpha > 0 else cutmix
    weight = jnp.where(jax.random.uniform(k_apply) < prob, weight, keep)
    lam = jnp.mean(weight)
    w = weight[None, :, :, None].astype(images.dtype)
    mixed = w * images + (1 - w) * jnp.roll(images, 1, axis=0)
    return mixed, lam * targets + (1.0 - lam) * jnp.roll(targets, 1, axis=0)
