"""Detection input: images with boxes, the official SSD train augmentation, anchor matching.

Records are TFDS detection examples (coco/2017, voc, the built-in mvit2_digit_boxes, and the
COCO-format folders of coco_folder.py): "image" (encoded) and "objects" with "bbox"
(normalized ymin, xmin, ymax, xmax), "label" (0-based, without background) and optionally
"is_crowd" (COCO) or "is_difficult" (VOC). `record_objects` turns them into corner-form
boxes (x0, y0, x1, y1, normalized), labels 1.. (0 is the background) and an "ignore" flag
(crowd or difficult): ignored objects are not trained on and are not counted as misses by
the evaluation (COCO's iscrowd, VOC's difficult).

Train (`train_example`): ml-cvnets' SSD transforms, in their order:
1. SSD crop (IoU-constrained): a minimum overlap is drawn from `iou_thresholds`; 0 keeps the
   whole image; otherwise up to `crop_trials` windows (sides uniform in [0.3, 1] of the
   image's, aspect h/w in [0.5, 2], both sides at least `min_crop_pixels`) are drawn until
   one overlaps some box by the minimum IoU and contains the center of at least one box;
   such boxes are kept, clipped to the window. A new minimum is drawn while no window
   passes (the official loop runs until one does; here at most `crop_rounds` draws, then the
   whole image);
2. photometric distortion (mvit2_jax.data.segmentation.photometric_distort: cvnets'
   PhotometricDistort), 3. horizontal flip with probability 1/2, 4. resize to
   image_size x image_size (bicubic), boxes following exactly (they are normalized).
Every op is a pure function of the record and a seed, so the stream is exactly resumable.

Eval (`eval_example`): the resize alone. Both attach the anchors' targets (`match`: the
official SSD matcher, each anchor's best box at IoU >= 0.5 and every box's best anchor, the
same rule as mvit2_jax.models.anchors.match, whose tests pin this one; the anchors and box
coding come in `Targets`, from the model's side) and the objects
padded to `max_boxes` slots (static shapes) with the image's original size, for the
evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mvit2_jax.data import preprocess
from mvit2_jax.data.pipeline import eval_pass, train_stream
from mvit2_jax.data.segmentation import photometric_distort

FEATURES = ("image", "objects")


@dataclasses.dataclass(frozen=True)
class DetAugmentation:
    """The official SSD train augmentation; the defaults are ml-cvnets' SSD config's."""

    image_size: int = 320
    ssd_crop: bool = True
    iou_thresholds: Tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    crop_trials: int = 40
    crop_rounds: int = 32
    min_aspect_ratio: float = 0.5
    max_aspect_ratio: float = 2.0
    min_crop_pixels: int = 100
    photometric: bool = True
    flip: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class Targets:
    """How examples become model targets: the model's anchors (center form, normalized, for
    image_size x image_size inputs; mvit2_jax.models.anchors.ssd_anchors), the matcher's
    IoU threshold and box coding, and the number of object slots an eval example carries."""

    anchors: np.ndarray
    image_size: int
    center_variance: float
    size_variance: float
    iou_eps: float
    iou_threshold: float = 0.5
    max_boxes: int = 100


def record_objects(record: Dict[str, Any]) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(boxes [N, 4] corner form normalized float32, labels [N] int32 1.., ignore [N] bool,
    area [N] float32: the annotation's area in pixels where the dataset records one (COCO's
    segment area), else 0)."""
    objects = record["objects"]
    yxyx = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
    boxes = tf.gather(yxyx, [1, 0, 3, 2], axis=1)
    labels = tf.cast(objects["label"], tf.int32) + 1
    ignore = tf.zeros_like(labels, tf.bool)
    for flag in ("is_crowd", "is_difficult"):
        if flag in objects:
            ignore = ignore | tf.cast(objects[flag], tf.bool)
    area = tf.cast(objects["area"], tf.float32) if "area" in objects else tf.zeros(tf.shape(labels), tf.float32)
    return boxes, labels, ignore, area


def _iou(boxes: tf.Tensor, others: tf.Tensor, eps: float = 0.0) -> tf.Tensor:
    """[..., N, M] IoU of corner-form boxes [..., N, 4] and [..., M, 4]."""
    a, b = boxes[..., :, None, :], others[..., None, :, :]
    wh = tf.maximum(tf.minimum(a[..., 2:], b[..., 2:]) - tf.maximum(a[..., :2], b[..., :2]), 0.0)
    overlap = wh[..., 0] * wh[..., 1]

    def area(x):
        side = tf.maximum(x[..., 2:] - x[..., :2], 0.0)
        return side[..., 0] * side[..., 1]

    return overlap / (area(a) + area(b) - overlap + eps)


def ssd_crop(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, aug: DetAugmentation):
    """The SSD crop (see the module doc): (image, boxes normalized to the crop, labels)."""
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    rounds, trials = aug.crop_rounds, aug.crop_trials
    s_mode, s_window = preprocess.split_seed(seed, 2)
    thresholds = tf.constant(aug.iou_thresholds, tf.float32)
    mode = tf.gather(thresholds, tf.random.stateless_uniform([rounds], s_mode, 0, len(aug.iou_thresholds), tf.int32))
    u = tf.random.stateless_uniform([rounds, trials, 4], s_window)
    new_w = tf.floor(0.3 * width + u[..., 0] * 0.7 * width)
    new_h = tf.floor(0.3 * height + u[..., 1] * 0.7 * height)
    left = tf.floor(u[..., 2] * (width - new_w))
    top = tf.floor(u[..., 3] * (height - new_h))
    rects = tf.stack([left, top, left + new_w, top + new_h], -1)  # [R, T, 4] pixels
    pixels = boxes * tf.stack([width, height, width, height])
    iou = _iou(rects, tf.broadcast_to(pixels[None], [rounds, tf.shape(pixels)[0], 4]))  # [R, T, N]
    centers = (pixels[:, :2] + pixels[:, 2:]) * 0.5
    inside = (
        (rects[..., 0:1] < centers[:, 0]) & (rects[..., 1:2] < centers[:, 1])
        & (rects[..., 2:3] > centers[:, 0]) & (rects[..., 3:4] > centers[:, 1])
    )  # [R, T, N]
    aspect = new_h / tf.maximum(new_w, 1.0)
    ok = (
        (aspect >= aug.min_aspect_ratio) & (aspect <= aug.max_aspect_ratio)
        & (tf.reduce_max(iou, -1) >= mode[:, None])
        & tf.reduce_any(inside, -1)
        & (new_w >= aug.min_crop_pixels) & (new_h >= aug.min_crop_pixels)
    )  # [R, T]
    done = (mode == 0.0) | tf.reduce_any(ok, -1)
    r = tf.argmax(tf.cast(done, tf.int32), output_type=tf.int32)
    crop = tf.reduce_any(done) & (mode[r] > 0.0) & (tf.shape(boxes)[0] > 0)

    def cropped():
        t = tf.argmax(tf.cast(ok[r], tf.int32), output_type=tf.int32)
        rect, keep = rects[r, t], inside[r, t]
        x0, y0 = tf.cast(rect[0], tf.int32), tf.cast(rect[1], tf.int32)
        w, h = tf.cast(rect[2], tf.int32) - x0, tf.cast(rect[3], tf.int32) - y0
        kept = tf.boolean_mask(pixels, keep)
        kept = tf.concat([tf.maximum(kept[:, :2], rect[:2]), tf.minimum(kept[:, 2:], rect[2:])], -1) - tf.tile(rect[:2], [2])
        scale = tf.cast(tf.stack([w, h, w, h]), tf.float32)
        return image[y0 : y0 + h, x0 : x0 + w], kept / scale, tf.boolean_mask(labels, keep)

    return tf.cond(crop, cropped, lambda: (image, boxes, labels))


def flip_boxes(boxes: tf.Tensor) -> tf.Tensor:
    """Corner-form normalized boxes of the horizontally mirrored image."""
    return tf.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], -1)


def match(boxes: tf.Tensor, labels: tf.Tensor, targets: Targets) -> Tuple[tf.Tensor, tf.Tensor]:
    """(location targets [A, 4], labels [A] int32) of corner-form `boxes` [N, 4] (any N,
    labels 1..) against the center-form anchors of `targets`: mvit2_jax.models.anchors.match's rule."""
    anchors = tf.constant(targets.anchors, tf.float32)
    corners = tf.concat([anchors[:, :2] - anchors[:, 2:] / 2, anchors[:, :2] + anchors[:, 2:] / 2], -1)
    num = tf.shape(boxes)[0]

    def matched():
        iou = _iou(corners, boxes, eps=targets.iou_eps)  # [A, N]
        best_iou = tf.reduce_max(iou, 1)
        best_target = tf.argmax(iou, 1, output_type=tf.int32)
        best_anchor = tf.argmax(iou, 0, output_type=tf.int32)  # [N]
        # Every box is forced onto its best anchor; of several, the last one wins.
        forced = tf.tensor_scatter_nd_max(
            -tf.ones(tf.shape(anchors)[:1], tf.int32), best_anchor[:, None], tf.range(num, dtype=tf.int32)
        )
        target = tf.where(forced >= 0, forced, best_target)
        positive = (forced >= 0) | (best_iou >= targets.iou_threshold)
        gt = tf.gather(boxes, target)
        gt = tf.concat([(gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]], -1)
        gt = tf.where(positive[:, None], gt, anchors)
        centers = (gt[:, :2] - anchors[:, :2]) / anchors[:, 2:] / targets.center_variance
        sizes = tf.math.log(gt[:, 2:] / anchors[:, 2:]) / targets.size_variance
        return tf.concat([centers, sizes], -1), tf.where(positive, tf.gather(labels, target), 0)

    def empty():
        return tf.zeros(tf.shape(anchors), tf.float32), tf.zeros(tf.shape(anchors)[:1], tf.int32)

    return tf.cond(num > 0, matched, empty)


def _valid(boxes: tf.Tensor) -> tf.Tensor:
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def pad_objects(max_boxes: int, **objects: tf.Tensor) -> Dict[str, tf.Tensor]:
    """The first `max_boxes` objects in fixed slots: each of `objects` ([N, ...]) padded with
    zeros (label 0: an empty slot) to [max_boxes, ...]."""
    out = {}
    for name, value in objects.items():
        n = tf.minimum(tf.shape(value)[0], max_boxes)
        padding = [[0, max_boxes - n]] + [[0, 0]] * (len(value.shape) - 1)
        out[name] = tf.ensure_shape(tf.pad(value[:n], padding), [max_boxes, *value.shape[1:]])
    return out


def train_example(key: tf.Tensor, record: Dict[str, Any], aug: DetAugmentation, targets: Targets) -> Dict[str, tf.Tensor]:
    """{"image" float [S, S, 3] in [0, 1], "loc" [A, 4], "cls" [A] int32} of a train record."""
    s_crop, s_photo, s_flip = preprocess.split_seed(key, 3)
    image = preprocess.decode(record["image"])
    boxes, labels, ignore, _ = record_objects(record)
    keep = ~ignore & _valid(boxes)
    boxes, labels = tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)
    if aug.ssd_crop:
        image, boxes, labels = ssd_crop(image, boxes, labels, s_crop, aug)
    if aug.photometric:
        image = photometric_distort(image, s_photo)
    if aug.flip:
        flip = tf.random.stateless_uniform([], s_flip) < 0.5
        image, boxes = tf.cond(flip, lambda: (image[:, ::-1], flip_boxes(boxes)), lambda: (image, boxes))
    image = preprocess.to_unit_float(preprocess.resize(image, targets.image_size, targets.image_size))
    loc, cls = match(boxes, labels, targets)
    return {"image": image, "loc": loc, "cls": cls}


def eval_image(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """The one eval preprocessing of an encoded image (the eval pass, predict, export):
    float32 [size, size, 3] in [0, 1], resized bicubic (the official SSD validation)."""
    return preprocess.to_unit_float(preprocess.resize(preprocess.decode(image_bytes), size, size))


def eval_example(record: Dict[str, Any], targets: Targets) -> Dict[str, tf.Tensor]:
    """The resized image, the anchors' targets (of the objects that are not ignored), the
    objects in `max_boxes` slots and the original "size" (height, width)."""
    image = preprocess.decode(record["image"])
    size = tf.shape(image)[:2]
    boxes, labels, ignore, area = record_objects(record)
    keep = _valid(boxes)
    boxes, labels, ignore, area = (tf.boolean_mask(x, keep) for x in (boxes, labels, ignore, area))
    loc, cls = match(tf.boolean_mask(boxes, ~ignore), tf.boolean_mask(labels, ~ignore), targets)
    resized = preprocess.to_unit_float(preprocess.resize(image, targets.image_size, targets.image_size))
    slots = pad_objects(targets.max_boxes, boxes=boxes, labels=labels, ignore=ignore, area=area)
    return {"image": resized, "loc": loc, "cls": cls, "size": size, **slots}


def detection_train_stream(dataset, split: str, *, augmentation: DetAugmentation, targets: Targets, **stream_kwargs: Any) -> tf.data.Dataset:
    """`train_stream` of {"image", "loc", "cls"} (batch_size, seed, start_step, process_index,
    process_count, shuffle_buffer as for train_stream)."""
    return train_stream(
        dataset,
        split,
        example_fn=lambda key, record: train_example(key, record, augmentation, targets),
        features=FEATURES,
        **stream_kwargs,
    )


def detection_eval_pass(dataset, split: str, *, targets: Targets, **pass_kwargs: Any) -> tf.data.Dataset:
    """`eval_pass` of eval_example's fields and "mask" (batch_size, process_index,
    process_count as for eval_pass)."""
    return eval_pass(dataset, split, example_fn=lambda record: eval_example(record, targets), features=FEATURES, **pass_kwargs)


def box_colors(n: int) -> Sequence[Tuple[int, int, int]]:
    """n distinct saturated RGB colours (for drawing classes)."""
    hues = (np.arange(n) * 0.618034) % 1.0
    out = []
    for h in hues:
        i, f = int(h * 6), h * 6 - int(h * 6)
        rgb = [(1, f, 0), (1 - f, 1, 0), (0, 1, f), (0, 1 - f, 1), (f, 0, 1), (1, 0, 1 - f)][i % 6]
        out.append(tuple(int(round(220 * c + 20)) for c in rgb))
    return out
