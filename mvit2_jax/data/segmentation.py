"""Segmentation input: image / label-map pairs, the official train augmentation, the eval resize.

Records carry "image" (an encoded RGB image) and "label" (an encoded single-channel PNG of
stored class values). `LabelMap` turns stored values into train ids 0..C-1 and IGNORE (255,
never scored): ADE20k stores 0 for "other" and 1..150 for its classes (the official code
subtracts 1 and ignores the -1), PASCAL VOC stores 0..20 and 255 on object borders.

Train (`train_example`): ml-cvnets' segmentation transforms, in their order:
1. random short side in [short_side_min, short_side_max], the long side at most
   max_image_dim; image bicubic, labels nearest;
2. horizontal flip with probability 1/2;
3. random crop_size crop, padded at the bottom and right with 0 (image) and IGNORE (labels)
   when the image is smaller; the window is drawn again, up to 10 times, while one class
   covers class_max_ratio or more of the crop's labelled pixels (or the crop has one value);
4. Gaussian blur with probability 1/2, sigma uniform in [0, 1);
5. photometric distortion: brightness (x0.875-1.125), contrast (x0.5-1.5, before or after
   the next two), saturation (x0.5-1.5), hue (+-0.05), channel permutation, each with
   probability 1/2;
6. rotation by a uniform angle in [-rotate_degrees, rotate_degrees]: image bilinear with 0
   fill, labels nearest with IGNORE fill.
Every op is stateless (a pure function of the record and a seed), so the train stream is
exactly resumable, as classification's. The random numbers differ from PIL's and the
interpolation kernels from PIL's only in rounding.

Eval (`eval_example`): image (bicubic) and labels (nearest) resized to eval_size x
eval_size, as the official validation during training does (its `resize` transform).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mvit2_jax.data import preprocess
from mvit2_jax.data.pipeline import eval_pass, train_stream

IGNORE = 255
CROP_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Stored label values -> train ids: `reduce_zero_label` (ADE20k) maps 0 to IGNORE and
    v to v - 1; values >= num_classes (other than IGNORE) are ignored too."""

    num_classes: int
    reduce_zero_label: bool = False

    def __call__(self, stored: tf.Tensor) -> tf.Tensor:
        ids = tf.cast(stored, tf.int32)
        if self.reduce_zero_label:
            ids = tf.where(ids == 0, IGNORE, ids - 1)
        return tf.where((ids >= self.num_classes) | (ids < 0), IGNORE, ids)


@dataclasses.dataclass(frozen=True)
class SegAugmentation:
    """The official train augmentation; the defaults are ml-cvnets' segmentation configs."""

    crop_size: int = 512
    short_side_min: int = 256
    short_side_max: int = 768
    max_image_dim: int = 1024
    flip: bool = True
    class_max_ratio: float = 0.75
    blur: bool = True
    photometric: bool = True
    rotate_degrees: float = 10.0


def decode_label(label_bytes: tf.Tensor) -> tf.Tensor:
    """An encoded label PNG -> int32 [H, W, 1] of stored values (the first channel)."""
    return tf.cast(tf.io.decode_png(label_bytes, channels=0)[..., :1], tf.int32)


def resize_pair(image: tf.Tensor, label: tf.Tensor, height: Any, width: Any) -> Tuple[tf.Tensor, tf.Tensor]:
    """Image bicubic (uint8), labels nearest."""
    label = tf.image.resize(label, tf.stack([height, width]), method="nearest")
    return preprocess.resize(image, height, width), tf.cast(label, tf.int32)


def random_short_side_resize(image, label, seed, aug: SegAugmentation):
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    short = tf.cast(tf.random.stateless_uniform([], seed, aug.short_side_min, aug.short_side_max + 1, tf.int32), tf.float64)
    scale = tf.minimum(short / tf.reduce_min(shape), aug.max_image_dim / tf.reduce_max(shape))
    size = tf.cast(shape * scale, tf.int32)  # int(), as the official code
    return resize_pair(image, label, size[0], size[1])


def random_flip_pair(image, label, seed):
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: (image[:, ::-1], label[:, ::-1]), lambda: (image, label))


def pad_pair(image, label, height: int, width: int):
    """Pad at the bottom and right to at least height x width: image 0, labels IGNORE."""
    shape = tf.shape(image)
    pad_h, pad_w = tf.maximum(height - shape[0], 0), tf.maximum(width - shape[1], 0)
    paddings = [[0, pad_h], [0, pad_w], [0, 0]]
    return tf.pad(image, paddings), tf.pad(label, paddings, constant_values=IGNORE)


def crop_is_acceptable(crops: tf.Tensor, class_max_ratio: float) -> tf.Tensor:
    """Per crop [N, h, w, 1] of train ids: more than one value, some labelled pixels, and no
    class covering class_max_ratio or more of the labelled pixels."""
    n = tf.shape(crops)[0]
    flat = tf.reshape(crops, [n, -1])
    counts = tf.math.bincount(flat, minlength=IGNORE + 1, maxlength=IGNORE + 1, axis=-1)
    valid = counts[:, :IGNORE]
    total = tf.reduce_sum(valid, axis=1)
    ratio = tf.cast(tf.reduce_max(valid, axis=1), tf.float32) / tf.cast(tf.maximum(total, 1), tf.float32)
    values = tf.math.count_nonzero(counts, axis=1)
    return (total > 0) & (values > 1) & (ratio < class_max_ratio)


def random_crop_pair(image, label, seed, aug: SegAugmentation):
    size = aug.crop_size
    image, label = pad_pair(image, label, size, size)
    shape = tf.shape(image)
    u = tf.random.stateless_uniform([CROP_ATTEMPTS + 1, 2], seed)
    tops = tf.cast(tf.floor(u[:, 0] * tf.cast(shape[0] - size + 1, tf.float32)), tf.int32)
    lefts = tf.cast(tf.floor(u[:, 1] * tf.cast(shape[1] - size + 1, tf.float32)), tf.int32)
    if aug.class_max_ratio is not None and aug.class_max_ratio < 1.0:
        crops = tf.map_fn(
            lambda tl: label[tl[0] : tl[0] + size, tl[1] : tl[1] + size],
            tf.stack([tops, lefts], 1),
            fn_output_signature=tf.TensorSpec([None, None, 1], tf.int32),
        )
        ok = crop_is_acceptable(crops, aug.class_max_ratio)[:CROP_ATTEMPTS]
        # The first acceptable window, else the one drawn after the last rejection.
        k = tf.where(tf.reduce_any(ok), tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32), CROP_ATTEMPTS)
    else:
        k = 0
    top, left = tops[k], lefts[k]
    image = image[top : top + size, left : left + size]
    label = label[top : top + size, left : left + size]
    return tf.ensure_shape(image, [size, size, 3]), tf.ensure_shape(label, [size, size, 1])


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Separable Gaussian blur (radius 3, edges replicated) of a uint8 image; sigma ~ 0 is the identity."""
    taps = tf.range(-3.0, 4.0)
    weights = tf.exp(-0.5 * tf.square(taps / tf.maximum(sigma, 1e-3)))
    weights = weights / tf.reduce_sum(weights)
    x = tf.cast(image, tf.float32)[None]
    x = tf.pad(x, [[0, 0], [3, 3], [3, 3], [0, 0]], mode="SYMMETRIC")
    kernel_h = tf.tile(tf.reshape(weights, [7, 1, 1, 1]), [1, 1, 3, 1])
    kernel_w = tf.tile(tf.reshape(weights, [1, 7, 1, 1]), [1, 1, 3, 1])
    x = tf.nn.depthwise_conv2d(x, kernel_h, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kernel_w, [1, 1, 1, 1], "VALID")
    return tf.cast(tf.round(tf.clip_by_value(x[0], 0.0, 255.0)), tf.uint8)


def photometric_distort(image: tf.Tensor, seed: tf.Tensor, p: float = 0.5) -> tf.Tensor:
    """cvnets' PhotometricDistort on a uint8 image (each op with probability p)."""
    s_apply, s_factors, s_perm = preprocess.split_seed(seed, 3)
    r = tf.random.stateless_uniform([7], s_apply)
    f = tf.random.stateless_uniform([4], s_factors)
    brightness, contrast, saturation = 0.875 + 0.25 * f[0], 0.5 + f[1], 0.5 + f[2]
    hue = -0.05 + 0.1 * f[3]
    x = tf.cast(image, tf.float32) / 255.0

    def blend(a, b, factor):
        return tf.clip_by_value(factor * a + (1.0 - factor) * b, 0.0, 1.0)

    def gray(img):
        return tf.reduce_sum(img * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)

    def adjust_contrast(img):
        return blend(img, tf.reduce_mean(gray(img)), contrast)

    x = tf.where(r[0] < p, tf.clip_by_value(x * brightness, 0.0, 1.0), x)
    contrast_first = r[1] < p
    x = tf.where(contrast_first & (r[2] < p), adjust_contrast(x), x)
    x = tf.where(r[3] < p, blend(x, gray(x), saturation), x)
    x = tf.where(r[4] < p, tf.image.adjust_hue(x, hue), x)
    x = tf.where(~contrast_first & (r[5] < p), adjust_contrast(x), x)
    order = tf.argsort(tf.random.stateless_uniform([3], s_perm))
    x = tf.where(r[6] < p, tf.gather(x, order, axis=-1), x)
    return tf.cast(tf.round(x * 255.0), tf.uint8)


def _rotation_transform(angle: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """The projective transform (output -> input coordinates) of a rotation about the center."""
    h, w = tf.cast(height, tf.float32) - 1.0, tf.cast(width, tf.float32) - 1.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = (w - (cos * w - sin * h)) / 2.0
    y_offset = (h - (sin * w + cos * h)) / 2.0
    return tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])[None]


def rotate_pair(image, label, seed, degrees: float):
    angle = tf.random.stateless_uniform([], seed, -degrees, degrees) * (math.pi / 180.0)
    shape = tf.shape(image)
    transform = _rotation_transform(angle, shape[0], shape[1])

    def warp(x, interpolation, fill):
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(x, tf.float32)[None],
            transforms=transform,
            output_shape=shape[:2],
            fill_value=fill,
            interpolation=interpolation,
            fill_mode="CONSTANT",
        )
        return out[0]

    image = tf.cast(tf.round(tf.clip_by_value(warp(image, "BILINEAR", 0.0), 0.0, 255.0)), tf.uint8)
    label = tf.cast(warp(label, "NEAREST", float(IGNORE)), tf.int32)
    return image, label


def train_pair(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, aug: SegAugmentation) -> Tuple[tf.Tensor, tf.Tensor]:
    """Decoded uint8 image [H, W, 3] and train ids [H, W, 1] -> augmented (float [S, S, 3] in
    [0, 1], int32 [S, S]) with S = aug.crop_size."""
    s_resize, s_flip, s_crop, s_blur, s_photo, s_rotate = preprocess.split_seed(seed, 6)
    image, label = random_short_side_resize(image, label, s_resize, aug)
    if aug.flip:
        image, label = random_flip_pair(image, label, s_flip)
    image, label = random_crop_pair(image, label, s_crop, aug)
    if aug.blur:
        u = tf.random.stateless_uniform([2], s_blur)
        image = tf.cond(u[0] < 0.5, lambda: gaussian_blur(image, u[1]), lambda: image)
    if aug.photometric:
        image = photometric_distort(image, s_photo)
    if aug.rotate_degrees:
        image, label = rotate_pair(image, label, s_rotate, aug.rotate_degrees)
    return preprocess.to_unit_float(image), label[..., 0]


def eval_image(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """The one eval preprocessing of an encoded image (the eval pass, predict, export):
    float32 [size, size, 3] in [0, 1], resized bicubic."""
    return preprocess.to_unit_float(preprocess.resize(preprocess.decode(image_bytes), size, size))


def eval_label(label: tf.Tensor, size: int) -> tf.Tensor:
    """Train ids [H, W, 1] -> int32 [size, size], resized nearest."""
    return tf.cast(tf.image.resize(label, [size, size], method="nearest"), tf.int32)[..., 0]


def train_example(key: tf.Tensor, record: Dict[str, tf.Tensor], aug: SegAugmentation, labels: LabelMap) -> Dict[str, tf.Tensor]:
    image, label = train_pair(preprocess.decode(record["image"]), labels(decode_label(record["label"])), key, aug)
    return {"image": image, "label": label}


def eval_example(record: Dict[str, tf.Tensor], size: int, labels: LabelMap) -> Dict[str, tf.Tensor]:
    return {"image": eval_image(record["image"], size), "label": eval_label(labels(decode_label(record["label"])), size)}


def segmentation_train_stream(dataset, split: str, *, augmentation: SegAugmentation, labels: LabelMap, **stream_kwargs: Any) -> tf.data.Dataset:
    """`train_stream` of {"image": float [S, S, 3], "label": int32 [S, S]} (batch_size, seed,
    start_step, process_index, process_count, shuffle_buffer as for train_stream)."""
    return train_stream(
        dataset,
        split,
        example_fn=lambda key, record: train_example(key, record, augmentation, labels),
        features=("image", "label"),
        **stream_kwargs,
    )


def segmentation_eval_pass(dataset, split: str, *, size: int, labels: LabelMap, **pass_kwargs: Any) -> tf.data.Dataset:
    """`eval_pass` of {"image", "label", "mask"} at size x size (batch_size, process_index,
    process_count as for eval_pass)."""
    return eval_pass(dataset, split, example_fn=lambda record: eval_example(record, size, labels), features=("image", "label"), **pass_kwargs)


def colorize(ids: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Train ids [H, W] -> uint8 RGB [H, W, 3] with `palette` (IGNORE black)."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[np.asarray(ids, np.int64).clip(0, 255)]
