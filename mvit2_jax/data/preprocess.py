"""Per-example image ops in TensorFlow: decode, crops, bicubic resize, random erasing.

Every random op is stateless: it takes a seed tensor of shape [2] and is a pure function of
(image, seed), so a tf.data pipeline built from these ops is exactly reproducible and can
resume anywhere. Images move through the pipeline as uint8 [H, W, 3] (the resize rounds back
to uint8, as torchvision's PIL transforms do) until `to_unit_float` maps them to [0, 1].

Where these ops differ from torchvision's (the cvnets recipe):
- Random-resized crop samples boxes with `tf.image.stateless_sample_distorted_bounding_box`
  (10 attempts): the aspect ratio is uniform rather than log-uniform in (3/4, 4/3), the
  box height rather than its area is uniform between its bounds (small crops come more
  often), and when every attempt fails it keeps the whole image where torchvision takes a
  center crop. JPEGs are decoded inside the crop window only.
- Bicubic resizing is TF's Keys cubic (a = -0.5) with antialiasing, close to PIL's bicubic.
- Random erasing follows torchvision (scale 0.02-0.33, log-uniform ratio 0.3-3.3, 10 attempts,
  value 0) exactly in distribution; only the random numbers themselves differ.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import tensorflow as tf

from mvit2_jax.data.device_augment import ERASE_ATTEMPTS, ERASE_RATIO, ERASE_SCALE


def split_seed(seed: tf.Tensor, num: int) -> Sequence[tf.Tensor]:
    """`num` independent stateless seeds derived from `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num, alg="philox"))


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/... -> uint8 [H, W, 3] (grayscale is repeated to RGB)."""
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _sample_crop_window(
    shape: tf.Tensor, seed: tf.Tensor, scale: Tuple[float, float], ratio: Tuple[float, float]
) -> tf.Tensor:
    """A random box [top, left, height, width] covering `scale` of the area, aspect `ratio`."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_and_random_crop(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Decode and crop a random-resized-crop box; JPEGs decode only the box (fused op)."""

    def jpeg() -> tf.Tensor:
        window = _sample_crop_window(tf.image.extract_jpeg_shape(image_bytes), seed, scale, ratio)
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other() -> tf.Tensor:
        image = decode(image_bytes)
        top, left, height, width = tf.unstack(_sample_crop_window(tf.shape(image), seed, scale, ratio))
        return image[top : top + height, left : left + width]

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Bicubic (antialiased) resize of a uint8 image, rounded back to uint8."""
    resized = tf.image.resize(image, [height, width], method="bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resize so the shorter side is `size`, keeping the aspect ratio (torchvision Resize(int))."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.cast(tf.cast(size * long, tf.float64) / tf.cast(short, tf.float64), tf.int32)
    height_is_short = h <= w
    return resize(image, tf.where(height_is_short, size, new_long), tf.where(height_is_short, new_long, size))


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central size x size window (torchvision CenterCrop rounding)."""
    shape = tf.shape(image)
    top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 in [0, 1] (the recipe uses RGB / 255, no mean/std)."""
    return tf.cast(image, tf.float32) / 255.0


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed)


def random_erase(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
    """torchvision RandomErasing(p=prob, value=0) on a float [H, W, C] image."""
    s_apply, s_area, s_ratio, s_pos = split_seed(seed, 4)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area = h * w * tf.random.stateless_uniform([ERASE_ATTEMPTS], s_area, *ERASE_SCALE)
    log_ratio = tf.random.stateless_uniform([ERASE_ATTEMPTS], s_ratio, *map(math.log, ERASE_RATIO))
    heights = tf.round(tf.sqrt(area * tf.exp(log_ratio)))
    widths = tf.round(tf.sqrt(area / tf.exp(log_ratio)))
    fits = (heights < h) & (widths < w)
    first = tf.argmax(tf.cast(fits, tf.int32))  # the first attempt that fits, as torchvision
    eh, ew = heights[first], widths[first]
    u = tf.random.stateless_uniform([2], s_pos)
    top, left = tf.floor(u[0] * (h - eh + 1)), tf.floor(u[1] * (w - ew + 1))
    rows = tf.range(h)[:, None]
    cols = tf.range(w)[None, :]
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    erase = (tf.random.stateless_uniform([], s_apply) < prob) & tf.reduce_any(fits)
    return tf.where((box & erase)[..., None], tf.zeros_like(image), image)
