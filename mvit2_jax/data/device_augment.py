"""RandAugment and random erasing in JAX, on a batch, inside the jitted train step.

With `config.data.augment_on = "device"` the host pipeline stops after the random-resized
crop and the flip and sends uint8 images; the train step applies the rest of the recipe
here, on the accelerator: RandAugment (the ops and magnitudes of randaugment.py, which
follows torchvision's op list and PIL's arithmetic) and random erasing (preprocess.py's).
One host core runs the crop and flip about three times as fast as the whole recipe (see
the README's input pipeline table), and uint8 batches cost a quarter of the host-to-device
bandwidth of float32 ones.

Each op here computes what its TensorFlow counterpart computes (the tests compare them op by
op); the random draws differ (jax.random here, TF's stateless Philox there), so a run with
the augmentation on the device has the recipe's distribution, not the host run's numbers.
Everything is a function of the step's PRNG key, so training stays exactly resumable.

The batch is processed as a whole: the geometric ops (shear, translate, rotate) are one
bilinear warp per op slot whose matrix is the identity for the other ops (an identity warp
returns its input exactly), and the pixel ops are computed and selected per example.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp

# Same order as randaugment.OP_NAMES (the draw picks an index into it).
OP_NAMES = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip
SIGNED = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness")
ENHANCE = ("brightness", "color", "contrast", "sharpness")
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10


def op_magnitude(name: str, magnitude: int, num_bins: int = 31) -> float:
    """torchvision's value for op `name` at bin `magnitude` of `num_bins` (before its sign)."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"RandAugment magnitude {magnitude} must be in [0, {num_bins})")
    f = magnitude / (num_bins - 1)
    return {
        "shear_x": 0.3 * f, "shear_y": 0.3 * f, "translate_x": 150 / 331 * f, "translate_y": 150 / 331 * f,
        "rotate": 30.0 * f, "brightness": 0.9 * f, "color": 0.9 * f, "contrast": 0.9 * f, "sharpness": 0.9 * f,
        "posterize": float(8 - round(magnitude / ((num_bins - 1) / 4))), "solarize": 255.0 * (1 - f),
    }.get(name, 0.0)  # fmt: skip


# ----------------------------------------------------------------------------- one image, [H, W, 3] float32 in 0..255


def _pixels(x: jax.Array) -> jax.Array:
    return jnp.floor(jnp.clip(x, 0.0, 255.0))  # PIL truncates back to uint8


def _blend(image: jax.Array, degenerate: jax.Array, factor: jax.Array) -> jax.Array:
    return _pixels(degenerate + factor * (image - degenerate))


def _grayscale(image: jax.Array) -> jax.Array:
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, rounded), [H, W, 1]."""
    r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
    return jnp.floor(r * 0.299 + g * 0.587 + b * 0.114 + 0.5)


def warp_matrix(name: str, value: jax.Array, height: int, width: int) -> jax.Array:
    """The [2, 3] matrix mapping output (x, y, 1) to input (x, y) of geometric op `name`."""
    one, zero = jnp.ones_like(value), jnp.zeros_like(value)
    if name == "shear_x":
        rows = [[one, value, 0.5 * value], [zero, one, zero]]
    elif name == "shear_y":
        rows = [[one, zero, zero], [value, one, 0.5 * value]]
    elif name in ("translate_x", "translate_y"):
        side = width if name == "translate_x" else height
        pixels = jnp.trunc(value * side)  # whole pixels, as torchvision's int()
        rows = [[one, zero, -pixels if name == "translate_x" else zero], [zero, one, -pixels if name == "translate_y" else zero]]
    elif name == "rotate":
        theta = value * (math.pi / 180.0)
        cos, sin = jnp.cos(theta), jnp.sin(theta)
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        rows = [[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]]
    else:
        rows = [[one, zero, zero], [zero, one, zero]]
    return jnp.stack([jnp.stack(r) for r in rows])


def warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Bilinear affine warp with zeros outside (TF's ImageProjectiveTransformV3, CONSTANT 0)."""
    height, width, channels = image.shape
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    src_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    src_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    x0, y0 = jnp.floor(src_x), jnp.floor(src_y)
    flat = image.reshape(height * width, channels)

    def read(y: jax.Array, x: jax.Array) -> jax.Array:
        inside = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
        index = jnp.clip(y, 0, height - 1).astype(jnp.int32) * width + jnp.clip(x, 0, width - 1).astype(jnp.int32)
        return jnp.where(inside[..., None], flat[index], 0.0)

    wx, wy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    top = (x0 + 1 - src_x)[..., None] * read(y0, x0) + wx * read(y0, x0 + 1)
    bottom = (x0 + 1 - src_x)[..., None] * read(y0 + 1, x0) + wx * read(y0 + 1, x0 + 1)
    out = (y0 + 1 - src_y)[..., None] * top + wy * bottom
    return _pixels(out + 1e-3)  # + 1e-3: exact warps (90 degrees) must not truncate 95.99999


def brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, jnp.zeros_like(image), factor)


def color(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, _grayscale(image), factor)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, jnp.floor(jnp.mean(_grayscale(image)) + 0.5), factor)


def sharpness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend with a 3x3 smoothed copy whose one-pixel border is the original (as PIL)."""
    rows = image[:-2] + image[1:-1] + image[2:]  # integer-valued: the 3x3 sum is exact in any order
    total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * image[1:-1, 1:-1]
    smooth = jnp.pad(jnp.round(total / 13.0), ((1, 1), (1, 1), (0, 0)))
    interior = jnp.pad(jnp.ones(smooth.shape[:2], bool)[1:-1, 1:-1], 1)[..., None]
    degenerate = jnp.where(interior, smooth, image)
    return _blend(image, degenerate, factor)


def posterize(image: jax.Array, bits: jax.Array) -> jax.Array:
    step = jnp.power(2.0, 8.0 - bits)
    return jnp.floor(image / step) * step


def solarize(image: jax.Array, threshold: jax.Array) -> jax.Array:
    return jnp.where(image >= threshold, 255.0 - image, image)


def autocontrast(image: jax.Array, _: jax.Array = None) -> jax.Array:
    lo = jnp.min(image, axis=(0, 1))
    hi = jnp.max(image, axis=(0, 1))
    flat = hi <= lo
    scale = jnp.where(flat, 1.0, 255.0 / jnp.where(flat, 1.0, hi - lo))
    return _pixels((image - jnp.where(flat, 0.0, lo)) * scale)


def _equalize_channel(channel: jax.Array) -> jax.Array:
    """torchvision's histogram equalization of one uint8-valued channel [H, W]."""
    values = channel.astype(jnp.int32)
    hist = jnp.zeros(256, jnp.int32).at[values.reshape(-1)].add(1)
    step = (jnp.sum(hist) - hist[jnp.max(values)]) // 255
    lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, jnp.int32), lut[:-1]]), 0, 255)
    return jnp.where(step == 0, channel, lut[values].astype(jnp.float32))


def equalize(image: jax.Array, _: jax.Array = None) -> jax.Array:
    return jnp.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)


PIXEL_OPS = {
    "brightness": brightness, "color": color, "contrast": contrast, "sharpness": sharpness,
    "posterize": posterize, "solarize": solarize, "autocontrast": autocontrast, "equalize": equalize,
}  # fmt: skip


def op_argument(name: str, value: float, sign: jax.Array) -> jax.Array:
    """The argument op `name` is called with: enhance ops take a factor around 1."""
    signed = value * sign if name in SIGNED else jnp.asarray(value, jnp.float32)
    return 1.0 + signed if name in ENHANCE else signed


def apply_op(image: jax.Array, index: jax.Array, sign: jax.Array, values: Tuple[float, ...]) -> jax.Array:
    """Op OP_NAMES[index] (a traced int) at its value from `values`, signed by `sign` (+-1)."""
    height, width, _ = image.shape
    matrices = jnp.stack([warp_matrix(n, op_argument(n, v, sign), height, width) for n, v in zip(OP_NAMES, values)])
    x = warp(image, matrices[index])  # the identity for every op that is not geometric
    out = x
    for name, op in PIXEL_OPS.items():  # selected element-wise: no stack of every op's output
        i = OP_NAMES.index(name)
        out = jnp.where(index == i, op(x, op_argument(name, values[i], sign)), out)
    return out


# ----------------------------------------------------------------------------- batches


def rand_augment(key: jax.Array, images: jax.Array, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31) -> jax.Array:
    """`num_ops` ops drawn uniformly (with replacement) per image: uint8-valued float32
    [B, H, W, 3] -> same."""
    values = tuple(op_magnitude(n, magnitude, num_bins) for n in OP_NAMES)
    batch = images.shape[0]
    k_op, k_sign = jax.random.split(key)
    indices = jax.random.randint(k_op, (num_ops, batch), 0, len(OP_NAMES))
    signs = jnp.where(jax.random.uniform(k_sign, (num_ops, batch)) < 0.5, -1.0, 1.0)
    one = jax.vmap(lambda x, i, s: apply_op(x, i, s, values))
    # A loop, not a Python for: its carry is materialized between slots. Unrolled, XLA fuses
    # one slot's ops into the next slot's reads (gathers of gathers): 3.7x the time of one slot
    # for two, on a CPU.
    return jax.lax.fori_loop(0, num_ops, lambda slot, x: one(x, indices[slot], signs[slot]), images)


def _erase_one(key: jax.Array, image: jax.Array, prob: float) -> jax.Array:
    k_apply, k_area, k_ratio, k_pos = jax.random.split(key, 4)
    height, width, _ = image.shape
    h, w = float(height), float(width)
    area = h * w * jax.random.uniform(k_area, (ERASE_ATTEMPTS,), minval=ERASE_SCALE[0], maxval=ERASE_SCALE[1])
    log_ratio = jax.random.uniform(k_ratio, (ERASE_ATTEMPTS,), minval=math.log(ERASE_RATIO[0]), maxval=math.log(ERASE_RATIO[1]))
    heights = jnp.round(jnp.sqrt(area * jnp.exp(log_ratio)))
    widths = jnp.round(jnp.sqrt(area / jnp.exp(log_ratio)))
    fits = (heights < h) & (widths < w)
    first = jnp.argmax(fits)  # the first attempt that fits, as torchvision
    eh, ew = heights[first], widths[first]
    u = jax.random.uniform(k_pos, (2,))
    top, left = jnp.floor(u[0] * (h - eh + 1)), jnp.floor(u[1] * (w - ew + 1))
    rows = jnp.arange(height, dtype=jnp.float32)[:, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, :]
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    erase = (jax.random.uniform(k_apply) < prob) & jnp.any(fits)
    return jnp.where((box & erase)[..., None], jnp.zeros_like(image), image)


def random_erase(key: jax.Array, images: jax.Array, prob: float) -> jax.Array:
    """torchvision RandomErasing(p=prob, value=0) per image of [B, H, W, C]."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _erase_one(k, x, prob))(keys, images)


def augment(
    key: jax.Array,
    images: jax.Array,
    *,
    randaugment: bool = True,
    num_ops: int = 2,
    magnitude: int = 9,
    num_bins: int = 31,
    erasing_prob: float = 0.25,
) -> jax.Array:
    """The device half of the train recipe: uint8 [B, H, W, 3] (cropped, resized, flipped on the
    host) -> float32 in [0, 1] after RandAugment and random erasing, as pipeline.train_image."""
    k_ra, k_erase = jax.random.split(key)
    x = images.astype(jnp.float32)
    if randaugment and num_ops > 0:
        x = rand_augment(k_ra, x, num_ops, magnitude, num_bins)
    x = x / 255.0
    if erasing_prob > 0:
        x = random_erase(k_erase, x, erasing_prob)
    return x
