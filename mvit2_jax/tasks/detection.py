"""Object detection (SSDLite on MobileViTv2): the training loss, as the official code computes it.

`multibox_loss` is ml-cvnets' SSD multibox loss (loss_fn/detection/ssd_multibox_loss.py):
smooth L1 (beta 1) over the positive anchors' locations plus cross-entropy over the positive
anchors and the hardest negatives (the `neg_pos_ratio` times as many per image as it has
positives, ranked by their background loss), both summed over the batch and divided by the
batch's number of positives (at least 1). Targets come from mvit2_jax.models.anchors.match.
The detection task module (model factory, input pipeline, COCO evaluation) builds on this.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp


def multibox_loss(
    loc_pred: jax.Array,
    cls_logits: jax.Array,
    loc_target: jax.Array,
    labels: jax.Array,
    neg_pos_ratio: int = 3,
    label_smoothing: float = 0.0,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(total, location, classification) losses of a batch.

    loc_pred, loc_target [B, A, 4]; cls_logits [B, A, C] (class 0 is background); labels
    [B, A] int (0 background). Label smoothing is the official loss's option (off by default).
    """
    positive = labels > 0
    num_pos = jnp.maximum(positive.sum(), 1).astype(jnp.float32)
    diff = (loc_pred - loc_target).astype(jnp.float32)
    smooth_l1 = jnp.where(jnp.abs(diff) < 1.0, 0.5 * diff**2, jnp.abs(diff) - 0.5).sum(-1)
    location = jnp.where(positive, smooth_l1, 0.0).sum()

    log_probs = jax.nn.log_softmax(cls_logits.astype(jnp.float32), axis=-1)
    background = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(-log_probs[..., 0]))
    rank = jnp.argsort(jnp.argsort(-background, axis=1, stable=True), axis=1, stable=True)  # 0: hardest negative
    keep = positive | (rank < neg_pos_ratio * positive.sum(axis=1, keepdims=True))
    num_classes = cls_logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
    cross_entropy = -(targets * log_probs).sum(-1)
    classification = jnp.where(keep, cross_entropy, 0.0).sum()
    return (location + classification) / num_pos, location / num_pos, classification / num_pos
