"""RandAugment and erasing on the device: the TF ops' pixels, the recipe's draws, the task's wiring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mvit2_jax.data import device_augment as da
from mvit2_jax.data import pipeline, preprocess
from mvit2_jax.data import randaugment as ra
from mvit2_jax.errors import ConfigError
from mvit2_jax import tasks

RNG = np.random.default_rng(3)
IMAGE = RNG.integers(0, 256, (23, 30, 3)).astype(np.uint8)  # not square: rows and columns differ
IMAGE[:6, :10] = 40  # a flat patch for the histogram and smoothing ops
COMBOS = [(name, sign) for name in da.OP_NAMES for sign in (1.0, -1.0)]


@functools.partial(jax.jit, static_argnums=3)
def _apply_each(images, indices, signs, values):
    return jax.vmap(lambda x, i, s: da.apply_op(x, i, s, values))(images, indices, signs)


def _device_ops(image, magnitude):
    """Every (op, sign) of COMBOS applied to `image` at `magnitude`, in one compiled call."""
    values = tuple(da.op_magnitude(n, magnitude) for n in da.OP_NAMES)
    images = jnp.broadcast_to(jnp.asarray(image, jnp.float32), (len(COMBOS), *image.shape))
    indices = jnp.array([da.OP_NAMES.index(n) for n, _ in COMBOS])
    signs = jnp.array([s for _, s in COMBOS], jnp.float32)
    return np.asarray(_apply_each(images, indices, signs, values)).astype(np.uint8)


@pytest.mark.parametrize("magnitude", [9, 30])
def test_every_op_gives_the_host_ops_pixels(magnitude):
    out = _device_ops(IMAGE, magnitude)
    for (name, sign), got in zip(COMBOS, out):
        expected = ra.apply_op(IMAGE, name, magnitude, sign=sign).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} sign {sign} magnitude {magnitude}")
    assert len({o.tobytes() for o in out}) > 20  # the ops differ from one another


def test_rand_augment_applies_one_drawn_op_per_image():
    batch = np.stack([np.roll(IMAGE, 3 * i, axis=1) for i in range(16)])
    out = np.asarray(jax.jit(da.rand_augment, static_argnums=(2, 3))(jax.random.key(0), batch.astype(np.float32), 1, 9))
    assert out.shape == batch.shape and np.array_equal(out, np.floor(out)) and out.min() >= 0 and out.max() <= 255
    found = set()
    for image, got in zip(batch, out):
        matches = {(n, s) for n, s in COMBOS if np.array_equal(ra.apply_op(image, n, 9, sign=s).numpy(), got)}
        assert matches, "each image is one op of the list applied to it"
        found |= {n for n, _ in matches}
    assert len(found) >= 6  # ops are drawn per image, not per batch


def test_erasing_zeroes_one_box_of_the_recipes_size_per_image():
    images = jnp.full((64, 40, 48, 3), 0.5)
    out = np.asarray(jax.jit(da.random_erase, static_argnums=2)(jax.random.key(4), images, 1.0))
    zero = out[..., 0] == 0
    assert np.array_equal(zero, (out == 0).all(-1)) and np.all(out[~zero] == 0.5)
    fractions = zero.mean(axis=(1, 2))
    assert np.all((fractions > 0.015) & (fractions < 0.34))  # scale 0.02-0.33 of the area, rounded sides
    for mask in zero:  # one axis-aligned box
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and mask.sum() == len(rows) * len(cols)
    never = np.asarray(jax.jit(da.random_erase, static_argnums=2)(jax.random.key(4), images, 0.0))
    assert np.all(never == 0.5)


def _train_images(aug):
    image_bytes = tf.io.encode_jpeg(tf.constant(np.repeat(np.repeat(IMAGE, 2, 0), 2, 1)))
    return [pipeline.train_image(image_bytes, tf.constant([s, 5], tf.int64), 16, aug).numpy() for s in range(4)]


def test_the_host_half_is_the_host_recipes_crop_and_flip_in_uint8():
    on_device = _train_images(pipeline.TrainAugmentation(on_device=True))  # RandAugment and erasing on: skipped
    host = _train_images(pipeline.TrainAugmentation(randaugment=False, erasing_prob=0.0))
    for d, h in zip(on_device, host):
        assert d.dtype == np.uint8 and d.shape == (16, 16, 3)
        np.testing.assert_array_equal(preprocess.to_unit_float(d).numpy(), h)  # same seeds, same crops


def test_the_classification_task_augments_uint8_batches_in_its_step(small_config):
    config = small_config(augment_on="device", randaugment=True, erasing_prob=0.25, mix_prob=0.0)
    task = tasks.get(config.task)
    task.check_config(config)
    batch = {"image": np.stack([IMAGE[:16, :16], IMAGE[-16:, :16], IMAGE[:16, -16:], 255 - IMAGE[:16, :16]]), "label": np.arange(4)}
    step = jax.jit(lambda k, b: task.prepare_batch(k, b, config))
    images, targets = step(jax.random.key(0), batch)
    assert images.dtype == jnp.float32 and images.shape == (4, 16, 16, 3)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert not np.allclose(images, batch["image"] / 255.0)  # RandAugment ran
    np.testing.assert_array_equal(step(jax.random.key(0), batch)[0], images)  # a pure function of the step's key
    assert not np.array_equal(step(jax.random.key(1), batch)[0], images)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    host = small_config(mix_prob=0.0)
    same, _ = tasks.get(host.task).prepare_batch(jax.random.key(0), {**batch, "image": batch["image"] / 255.0}, host)
    np.testing.assert_array_equal(same, batch["image"] / 255.0)  # on the host the step leaves pixels alone
    config.data.augment_on = "gpu"
    with pytest.raises(ConfigError, match='augment_on must be "host" or "device"'):
        task.check_config(config)
