"""Per-example ops: fused JPEG crop == decode + crop, eval geometry, erasing, determinism."""

import numpy as np
import pytest
import tensorflow as tf

from mvit2_jax.data import preprocess

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (60, 80, 3)).astype(np.uint8)
# Without chroma subsampling the fused crop decodes exactly the pixels of a full decode (with
# it, the crop's edge columns can differ slightly: libjpeg upsamples chroma within the window).
JPEG = tf.io.encode_jpeg(PIXELS, quality=90, chroma_downsampling=False)
# The JPEG's own decoded pixels as a PNG: both paths must then crop the same pixels.
PNG_OF_JPEG = tf.io.encode_png(tf.io.decode_jpeg(JPEG))


def _seed(i):
    return tf.constant([i, 3], tf.int64)


def test_fused_jpeg_crop_equals_decode_then_crop():
    for i in range(5):
        jpeg_crop = preprocess.decode_and_random_crop(JPEG, _seed(i))
        png_crop = preprocess.decode_and_random_crop(PNG_OF_JPEG, _seed(i))
        np.testing.assert_array_equal(jpeg_crop, png_crop)


def test_random_resized_crop_respects_scale_and_ratio_and_the_seed():
    areas, shapes = [], set()
    for i in range(40):
        crop = preprocess.decode_and_random_crop(JPEG, _seed(i), scale=(0.08, 1.0))
        h, w, c = crop.shape
        assert c == 3
        areas.append(h * w / (60 * 80))
        shapes.add((h, w))
        if (h, w) != (60, 80):  # the whole image is the fallback when no box fits
            assert 0.75 - 0.1 <= w / h <= 4 / 3 + 0.1
        np.testing.assert_array_equal(crop, preprocess.decode_and_random_crop(JPEG, _seed(i)))
    assert min(areas) >= 0.08 - 0.02 and max(areas) <= 1.0 and len(shapes) > 10
    whole = preprocess.decode_and_random_crop(PNG_OF_JPEG, _seed(0), scale=(1.0, 1.0), ratio=(0.5, 2.0))
    assert whole.shape == (60, 80, 3)


def test_grayscale_images_decode_to_rgb():
    gray_png = tf.io.encode_png(PIXELS[..., :1])
    rgb = preprocess.decode(gray_png).numpy()
    assert rgb.shape == (60, 80, 3) and (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("shape,resized", [((300, 400), (288, 384)), ((400, 300), (384, 288)), ((8, 8), (36, 36))])
def test_resize_shorter_side_keeps_the_aspect_ratio(shape, resized):
    image = tf.zeros(shape + (3,), tf.uint8)
    out = preprocess.resize_shorter_side(image, min(resized))
    assert tuple(out.shape[:2]) == resized and out.dtype == tf.uint8


def test_center_crop_takes_the_middle():
    image = np.arange(288 * 384 * 3).reshape(288, 384, 3)
    np.testing.assert_array_equal(preprocess.center_crop(tf.constant(image), 256), image[16:272, 64:320])


def test_bicubic_resize_rounds_to_uint8_and_keeps_flat_images_flat():
    out = preprocess.resize(tf.fill([8, 8, 3], tf.constant(200, tf.uint8)), 32, 32)
    assert out.dtype == tf.uint8 and out.shape == (32, 32, 3)
    assert (out.numpy() == 200).all()


def test_random_erasing_zeroes_one_box_or_nothing():
    image = tf.ones([64, 48, 3])
    np.testing.assert_array_equal(preprocess.random_erase(image, _seed(0), prob=0.0), image)
    boxes = set()
    for i in range(10):
        out = preprocess.random_erase(image, _seed(i), prob=1.0).numpy()
        np.testing.assert_array_equal(out, preprocess.random_erase(image, _seed(i), prob=1.0))
        erased = out[..., 0] == 0
        rows, cols = np.nonzero(erased)
        assert erased.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one solid rectangle
        assert 0.02 * 64 * 48 * 0.8 <= erased.sum() <= 0.33 * 64 * 48 * 1.2
        assert (out[~erased] == 1).all() and (out[erased] == 0).all()
        boxes.add((rows.min(), cols.min(), erased.sum()))
    assert len(boxes) == 10
    hits = [preprocess.random_erase(image, _seed(i), prob=0.25).numpy().min() == 0 for i in range(200)]
    assert 0.15 < np.mean(hits) < 0.35
