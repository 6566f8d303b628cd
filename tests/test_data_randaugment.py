"""Stateless RandAugment: torchvision's op list and magnitudes, PIL's pixels, pure in the seed."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from mvit2_jax.data import randaugment as ra

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (24, 32, 3)).astype(np.uint8)


def _op(name, value, image=IMAGE):
    return ra.OPS[name](tf.constant(image, tf.float32), tf.constant(value, tf.float32)).numpy()


@pytest.mark.parametrize("name", ra.OP_NAMES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_op_keeps_shape_and_pixel_range_and_is_deterministic(name, sign):
    out = ra.apply_op(IMAGE, name, magnitude=9, sign=sign)
    assert out.shape == IMAGE.shape and out.dtype == tf.uint8
    np.testing.assert_array_equal(out, ra.apply_op(IMAGE, name, magnitude=9, sign=sign))
    value = ra.op_magnitude(name, 9)
    raw = _op(name, 1.0 + sign * value if name in ("brightness", "color", "contrast", "sharpness") else sign * value)
    assert raw.min() >= 0 and raw.max() <= 255 and np.array_equal(raw, np.floor(raw))


def test_magnitude_9_of_31_bins_is_torchvisions_table():
    expected = {
        "shear_x": 0.09, "translate_x": 150 / 331 * 0.3, "rotate": 9.0, "brightness": 0.27,
        "sharpness": 0.27, "posterize": 7.0, "solarize": 178.5, "identity": 0.0, "equalize": 0.0,
    }  # fmt: skip
    for name, value in expected.items():
        assert ra.op_magnitude(name, 9) == pytest.approx(value)
    with pytest.raises(ValueError):
        ra.op_magnitude("rotate", 31)


@pytest.mark.parametrize("factor", [0.3, 0.73, 1.27, 1.8])
@pytest.mark.parametrize("name,enhancer", [
    ("brightness", ImageEnhance.Brightness), ("color", ImageEnhance.Color),
    ("contrast", ImageEnhance.Contrast), ("sharpness", ImageEnhance.Sharpness),
])  # fmt: skip
def test_enhance_ops_match_pil_exactly(name, enhancer, factor):
    expected = np.asarray(enhancer(Image.fromarray(IMAGE)).enhance(factor))
    np.testing.assert_array_equal(_op(name, factor), expected)


@pytest.mark.parametrize("name,value,pil_op", [
    ("autocontrast", 0.0, ImageOps.autocontrast), ("equalize", 0.0, ImageOps.equalize),
    ("posterize", 3.0, lambda im: ImageOps.posterize(im, 3)),
    ("solarize", 128.0, lambda im: ImageOps.solarize(im, 128)),
])  # fmt: skip
def test_histogram_and_bit_ops_match_pil_exactly(name, value, pil_op):
    low_contrast = (IMAGE // 2 + 40).astype(np.uint8)
    for image in (IMAGE, low_contrast):
        np.testing.assert_array_equal(_op(name, value, image), np.asarray(pil_op(Image.fromarray(image))))


@pytest.mark.parametrize("name,value,pil_transform", [
    ("shear_x", 0.3, lambda im: im.transform(im.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0), Image.BILINEAR)),
    ("shear_y", -0.3, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, -0.3, 1, 0), Image.BILINEAR)),
    ("rotate", 30.0, lambda im: im.rotate(30.0, Image.BILINEAR)),
])  # fmt: skip
def test_geometric_ops_match_pil_away_from_the_border(name, value, pil_transform):
    diff = np.abs(_op(name, value).astype(int) - np.asarray(pil_transform(Image.fromarray(IMAGE))).astype(int))
    inside = _op(name, value, np.full_like(IMAGE, 255))[..., 0] == 255  # sampled wholly inside the source
    interior = inside[:-2, :-2] & inside[1:-1, :-2] & inside[2:, :-2] & inside[:-2, 1:-1] & inside[2:, 1:-1]
    interior &= inside[:-2, 2:] & inside[1:-1, 2:] & inside[2:, 2:] & inside[1:-1, 1:-1]
    assert interior.mean() > 0.5
    assert diff[1:-1, 1:-1][interior].max() <= 1  # PIL interpolates in fixed point


def test_rotate_and_translate_move_pixels_as_expected():
    square = IMAGE[:, :24]
    np.testing.assert_array_equal(_op("rotate", 90.0, square), np.rot90(square))  # counter-clockwise
    shifted = _op("translate_x", 0.25)  # int(0.25 * 32) = 8 columns to the right, zeros enter
    np.testing.assert_array_equal(shifted[:, 8:], IMAGE[:, :-8])
    assert not shifted[:, :8].any()


def test_rand_augment_is_a_pure_function_of_the_seed():
    image = tf.constant(IMAGE)
    outs = [ra.rand_augment(image, tf.constant([s, 7], tf.int64)).numpy() for s in range(6)]
    again = [ra.rand_augment(image, tf.constant([s, 7], tf.int64)).numpy() for s in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(outs, again))
    assert len({o.tobytes() for o in outs}) > 1
    assert all(o.shape == IMAGE.shape and o.dtype == np.uint8 for o in outs)


def test_rand_augment_runs_inside_tf_data():
    ds = tf.data.Dataset.range(4).map(lambda i: ra.rand_augment(tf.constant(IMAGE), tf.stack([i, i])))
    first, second = list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator())
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
