"""Stateless RandAugment in TensorFlow, with torchvision's op list and magnitudes.

cvnets trains MobileViTv2 with torchvision's `RandAugment(num_ops=2, magnitude=9,
num_magnitude_bins=31)`: each op's strength is `magnitude / (bins - 1)` = 0.3 of its maximum
(rotate 9 degrees, shear 0.09, translate 0.136 of the side, enhance factors 1 +- 0.27,
posterize to 7 bits, solarize above 178.5). Library versions (keras.layers.RandAugment)
draw from stateful seed generators, which breaks exact resume, so this one takes a seed
tensor and is a pure function of (image, seed).

cvnets runs it on PIL images, so the ops follow PIL: they work on float32 pixels in
[0, 255] and truncate after each op as PIL does; the color ops (brightness, color, contrast,
sharpness, autocontrast, equalize, posterize, solarize) match PIL pixel for pixel, and the
geometric ops (bilinear, fill 0) match PIL's except on the outermost pixels of the warped
image, where PIL blends partially outside samples differently.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List

import tensorflow as tf

from mvit2_jax.data.device_augment import OP_NAMES, SIGNED, op_magnitude
from mvit2_jax.data.preprocess import split_seed

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (pixels [H, W, 3] float, magnitude) -> pixels


def _pixels(x: tf.Tensor) -> tf.Tensor:
    return tf.floor(tf.clip_by_value(x, 0.0, 255.0))  # PIL truncates back to uint8


def _blend(image: tf.Tensor, degenerate: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _pixels(degenerate + factor * (image - degenerate))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, rounded)."""
    return tf.floor(tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True) + 0.5)


def _transform(image: tf.Tensor, matrix: List[tf.Tensor]) -> tf.Tensor:
    """Bilinear projective warp; `matrix` maps output (x, y) to input, zeros outside."""
    transform = tf.cast(tf.stack(matrix + [0.0, 0.0])[None], tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return _pixels(out[0] + 1e-3)  # + 1e-3: exact warps (90 degrees) must not truncate 95.99999


def shear_x(image: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    return _transform(image, [1.0, m, 0.5 * m, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    return _transform(image, [1.0, 0.0, 0.0, m, 1.0, 0.5 * m])


def translate_x(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    pixels = tf.cast(tf.cast(fraction * tf.cast(tf.shape(image)[1], tf.float32), tf.int32), tf.float32)
    return _transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0])


def translate_y(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    pixels = tf.cast(tf.cast(fraction * tf.cast(tf.shape(image)[0], tf.float32), tf.int32), tf.float32)
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels])


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    theta = degrees * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1.0) / 2.0
    cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1.0) / 2.0
    return _transform(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(image, tf.zeros_like(image), factor)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(image, _grayscale(image), factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(image, tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5), factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with a 3x3 smoothed copy whose one-pixel border is the original (as PIL)."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    degenerate = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
    return _blend(image, tf.where(interior, degenerate, image), factor)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    step = tf.pow(2.0, 8.0 - bits)
    return tf.floor(image / step) * step


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    return tf.where(image >= threshold, 255.0 - image, image)


def autocontrast(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    lo = tf.reduce_min(image, axis=[0, 1])
    hi = tf.reduce_max(image, axis=[0, 1])
    flat = hi <= lo
    scale = tf.where(flat, 1.0, 255.0 / tf.where(flat, 1.0, hi - lo))
    return _pixels((image - tf.where(flat, 0.0, lo)) * scale)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """torchvision's histogram equalization of one uint8-valued channel."""
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(values, minlength=256, maxlength=256)
    step = (tf.reduce_sum(hist) - tf.gather(hist, tf.reduce_max(values))) // 255
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], axis=0), 0, 255)
    return tf.where(step == 0, channel, tf.cast(tf.gather(lut, values), tf.float32))


def equalize(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def identity(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    return image


OPS: Dict[str, Op] = {name: globals()[name] for name in OP_NAMES}


def _op_argument(name: str, value: float, sign: tf.Tensor) -> tf.Tensor:
    """The argument op `name` is called with: enhance ops take a factor around 1."""
    signed = value * sign if name in SIGNED else tf.constant(value)
    return 1.0 + signed if name in ("brightness", "color", "contrast", "sharpness") else signed


def apply_op(image: tf.Tensor, name: str, magnitude: int, num_bins: int = 31, sign: float = 1.0) -> tf.Tensor:
    """One op on a uint8 image at a fixed magnitude (for tests and inspection)."""
    value = op_magnitude(name, magnitude, num_bins)
    out = OPS[name](tf.cast(image, tf.float32), _op_argument(name, value, tf.constant(sign)))
    return tf.cast(out, tf.uint8)


def _random_op(x: tf.Tensor, seed: tf.Tensor, values: List[float]) -> tf.Tensor:
    """One op drawn uniformly from OP_NAMES, with a random sign for the signed ones."""
    s_op, s_sign = split_seed(seed, 2)
    index = tf.random.stateless_uniform([], s_op, 0, len(OP_NAMES), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    branches = [
        functools.partial(OPS[name], x, _op_argument(name, value, sign)) for name, value in zip(OP_NAMES, values)
    ]
    return tf.ensure_shape(tf.switch_case(index, branches), x.shape)


def rand_augment(
    image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31
) -> tf.Tensor:
    """Apply `num_ops` ops drawn uniformly (with replacement) from OP_NAMES to a uint8 image."""
    values = [op_magnitude(name, magnitude, num_bins) for name in OP_NAMES]
    x = tf.cast(image, tf.float32)
    for op_seed in split_seed(seed, num_ops):
        x = _random_op(x, op_seed, values)
    return tf.cast(x, tf.uint8)
