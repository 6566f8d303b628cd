"""SSD anchors, box coding and anchor matching, as the official SSDLite (ml-cvnets) defines them.

Pure functions of arrays: the anchors are NumPy constants of the input size; IoU, coding and
matching are jnp and run under jit with static shapes (a fixed number of ground-truth slots
with a validity mask), in the input pipeline's host code or on the device alike.

Conventions (ml-cvnets `anchor_generator/ssd_anchor_generator.py`, `misc/box_utils.py`,
`matcher_det/ssd_matcher.py`):
- Boxes are normalized to [0, 1]; anchors are in center form (cx, cy, w, h), ground truth in
  corner form (x0, y0, x1, y1).
- Levels at output strides 16, 32, 64, 128, 256 and the global level (-1). Per level, the
  cells in row-major order; per cell: the small square (scale s_k), the big square
  (sqrt(s_k * s_k+1)), then for each aspect ratio r the small box widened (w * sqrt(r),
  h / sqrt(r)) and narrowed (w / sqrt(r), h * sqrt(r)). Scales are linspace(0.1, 1.05,
  levels + 1); centers (x + 0.5) / W; all four numbers clipped to [0, 1].
- Location targets (SSD paper, eq. 2): ((g_c - d_c) / d_wh) / 0.1 and log(g_wh / d_wh) / 0.2.
- Inference (ssd.py postprocess_detections): softmax; per class, the scores above 0.01, the
  400 best; class-aware NMS at IoU 0.5 (a box suppresses a lower-scored one of its class
  whose IoU exceeds the threshold); the 200 best of all classes.
- Matching: each anchor takes the ground truth it overlaps most; each ground truth is forced
  onto the anchor it overlaps most (a later ground truth wins an anchor two of them want);
  anchors under the IoU threshold, unless forced, are background (class 0).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

OUTPUT_STRIDES = (16, 32, 64, 128, 256, -1)
ASPECT_RATIOS = ((2, 3), (2, 3), (2, 3), (2, 3), (2, 3), (2,))
MIN_SCALE, MAX_SCALE = 0.1, 1.05
CENTER_VARIANCE, SIZE_VARIANCE = 0.1, 0.2
IOU_EPS = 1e-5  # added to the union, as the official box_iou does


def anchors_per_cell(aspect_ratios: Sequence[int]) -> int:
    """2 squares plus a widened and a narrowed box per distinct aspect ratio."""
    return 2 + 2 * len(set(aspect_ratios))


def feature_map_sizes(height: int, width: int, output_strides: Sequence[int] = OUTPUT_STRIDES) -> Tuple[Tuple[int, int], ...]:
    """The (H, W) of each level for an input whose sides are divisible by 32: layer4 at stride
    16; layer5 at stride 32, an odd side made even (layer5's MobileViTv2 block resizes its
    input to whole 2x2 patches and keeps that size, as the official block does: 96 -> 3 -> 4);
    each extra level a stride-2 3x3 convolution with padding 1 on the previous one
    (ceil(n / 2)); the global level 1x1."""
    if height % 32 or width % 32:
        raise ValueError(f"SSD input sides must be divisible by 32, got {height}x{width}")
    sizes, h, w = [], height // 16, width // 16
    for os in output_strides:
        if os == -1:
            sizes.append((1, 1))
            continue
        if os == 16:
            h, w = height // 16, width // 16
        elif os == 32:
            h, w = 2 * -(-height // 64), 2 * -(-width // 64)
        else:
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return tuple(sizes)


def ssd_anchors(
    height: int,
    width: int,
    output_strides: Sequence[int] = OUTPUT_STRIDES,
    aspect_ratios: Sequence[Sequence[int]] = ASPECT_RATIOS,
    min_scale: float = MIN_SCALE,
    max_scale: float = MAX_SCALE,
    clip: bool = True,
) -> np.ndarray:
    """float32 [A, 4] anchors (cx, cy, w, h) in the official order for an input of height x width."""
    if len(aspect_ratios) != len(output_strides):
        raise ValueError(f"one tuple of aspect ratios per level: {len(output_strides)} levels, {len(aspect_ratios)} tuples")
    scales = np.linspace(min_scale, max_scale, len(output_strides) + 1)
    levels = []
    for k, ((h, w), ratios) in enumerate(zip(feature_map_sizes(height, width, output_strides), aspect_ratios)):
        small, big = scales[k], math.sqrt(scales[k] * scales[k + 1])
        shapes = [(small, small), (big, big)]
        for r in sorted(set(ratios)):
            s = math.sqrt(r)
            shapes += [(small * s, small / s), (small / s, small * s)]
        cy, cx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        centers = np.stack([cx.ravel(), cy.ravel()], -1)  # row-major cells
        sizes = np.asarray(shapes)  # [per cell, (w, h)]
        level = np.concatenate(np.broadcast_arrays(centers[:, None, :], sizes[None, :, :]), -1)
        levels.append(level.reshape(-1, 4))
    anchors = np.concatenate(levels)
    if clip:
        anchors = np.clip(anchors, 0.0, 1.0)
    return anchors.astype(np.float32)


def center_to_corner(boxes):
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return jnp.concatenate([boxes[..., :2] - boxes[..., 2:] * 0.5, boxes[..., :2] + boxes[..., 2:] * 0.5], -1)


def corner_to_center(boxes):
    """(x0, y0, x1, y1) -> (cx, cy, w, h)."""
    return jnp.concatenate([(boxes[..., :2] + boxes[..., 2:]) * 0.5, boxes[..., 2:] - boxes[..., :2]], -1)


def encode(boxes, anchors, center_variance: float = CENTER_VARIANCE, size_variance: float = SIZE_VARIANCE):
    """Location targets of center-form `boxes` against center-form `anchors` (broadcasting)."""
    centers = (boxes[..., :2] - anchors[..., :2]) / anchors[..., 2:] / center_variance
    sizes = jnp.log(boxes[..., 2:] / anchors[..., 2:]) / size_variance
    return jnp.concatenate([centers, sizes], -1)


def decode(locations, anchors, center_variance: float = CENTER_VARIANCE, size_variance: float = SIZE_VARIANCE):
    """Center-form boxes from predicted `locations` (the inverse of encode)."""
    centers = locations[..., :2] * center_variance * anchors[..., 2:] + anchors[..., :2]
    sizes = jnp.exp(locations[..., 2:] * size_variance) * anchors[..., 2:]
    return jnp.concatenate([centers, sizes], -1)


def box_iou(a, b, eps: float = IOU_EPS):
    """[N, M] IoU of corner-form boxes a [N, 4] and b [M, 4] (empty boxes have area 0); `eps`
    is added to the union (the matcher's 1e-5; NMS uses 0, as torchvision's does)."""
    a, b = a[:, None, :], b[None, :, :]
    top_left = jnp.maximum(a[..., :2], b[..., :2])
    bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])

    def area(lo, hi):
        wh = jnp.clip(hi - lo, 0.0)
        return wh[..., 0] * wh[..., 1]

    overlap = area(top_left, bottom_right)
    return overlap / (area(a[..., :2], a[..., 2:]) + area(b[..., :2], b[..., 2:]) - overlap + eps)


def match(gt_boxes, gt_labels, gt_valid, anchors, iou_threshold: float = 0.5,
          center_variance: float = CENTER_VARIANCE, size_variance: float = SIZE_VARIANCE):
    """Assigns ground truth to anchors: (locations [A, 4], labels [A] int32).

    gt_boxes [T, 4] corner form, gt_labels [T] (1.. for objects), gt_valid [T] bool: T is a
    fixed number of slots, padding slots are invalid. Background anchors (label 0) get
    location targets 0 (the loss ignores them; the official code encodes an arbitrary box
    there, which can be infinite for an image without objects).
    """
    gt_valid = jnp.asarray(gt_valid, bool)
    num_anchors, num_slots = anchors.shape[0], gt_boxes.shape[0]
    iou = jnp.where(gt_valid[None, :], box_iou(center_to_corner(anchors), gt_boxes), -1.0)  # [A, T]
    best_iou = iou.max(axis=1)
    best_target = iou.argmax(axis=1)
    best_anchor = iou.argmax(axis=0)  # [T]
    # Every valid target is forced onto its best anchor; of several, the last one wins.
    forced = (best_anchor[None, :] == jnp.arange(num_anchors)[:, None]) & gt_valid[None, :]  # [A, T]
    forced_target = jnp.where(forced, jnp.arange(num_slots)[None, :], -1).max(axis=1)
    is_forced = forced_target >= 0
    target = jnp.where(is_forced, forced_target, best_target)
    positive = (is_forced | (best_iou >= iou_threshold)) & gt_valid.any()
    labels = jnp.where(positive, jnp.asarray(gt_labels)[target], 0).astype(jnp.int32)
    boxes = corner_to_center(jnp.asarray(gt_boxes, jnp.float32)[target])
    boxes = jnp.where(positive[:, None], boxes, anchors)  # background: the anchor itself, target 0
    return encode(boxes, anchors, center_variance, size_variance), labels


def _nms_keep(boxes, valid, iou_threshold: float):
    """Greedy NMS of score-sorted candidates of one class: boxes [K, 4] corner form, valid [K]."""
    overlaps = box_iou(boxes, boxes, eps=0.0) > iou_threshold
    order = jnp.arange(boxes.shape[0])

    def body(i, keep):
        suppressed = jnp.any(keep & overlaps[i] & (order < i))
        return keep.at[i].set(valid[i] & ~suppressed)

    return jax.lax.fori_loop(0, boxes.shape[0], body, jnp.zeros_like(valid))


def postprocess(loc, cls_logits, anchors, score_threshold: float = 0.01, top_k: int = 400,
                iou_threshold: float = 0.5, max_detections: int = 200):
    """Detections from raw head outputs, with static shapes (jit it with the numbers static).

    loc [B, A, 4], cls_logits [B, A, C] (class 0 background), anchors [A, 4] center form.
    Returns {"boxes" [B, D, 4] corner form (normalized), "scores" [B, D], "classes" [B, D]
    int32 (1..C-1), "count" [B]}: per image the `count` best detections first, by decreasing
    score, then padding (score 0, class 0, box 0); D = max_detections.
    """
    k = min(top_k, anchors.shape[0])

    def one_image(loc, logits):
        boxes = center_to_corner(decode(loc, anchors))  # [A, 4]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1:].T  # [C-1, A]
        scores, index = jax.lax.top_k(jnp.where(probs > score_threshold, probs, -1.0), k)  # sorted per class
        candidates = boxes[index]  # [C-1, k, 4]
        keep = jax.vmap(_nms_keep, in_axes=(0, 0, None))(candidates, scores > score_threshold, iou_threshold)
        flat = jnp.where(keep, scores, -1.0).reshape(-1)
        best, which = jax.lax.top_k(flat, min(max_detections, flat.shape[0]))
        found = best > score_threshold
        classes = jnp.where(found, which // k + 1, 0).astype(jnp.int32)
        picked = jnp.where(found[:, None], candidates.reshape(-1, 4)[which], 0.0)
        pad = max_detections - best.shape[0]  # fewer candidates than max_detections: pad
        return (jnp.pad(picked, ((0, pad), (0, 0))), jnp.pad(jnp.where(found, best, 0.0), (0, pad)),
                jnp.pad(classes, (0, pad)), found.sum().astype(jnp.int32))

    boxes, scores, classes, count = jax.vmap(one_image)(loc, cls_logits)
    return {"boxes": boxes, "scores": scores, "classes": classes, "count": count}
