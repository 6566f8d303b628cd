"""Mixup / CutMix on device: convex combinations, soft targets, a pure function of the key."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mvit2_jax.data.mixing import mix_batch, smooth_labels

B, H, W, K = 6, 16, 12, 10
IMAGES = jax.random.uniform(jax.random.key(0), (B, H, W, 3))
LABELS = jnp.arange(B) % K  # distinct labels, so a target's weight on its own class is lambda
ONEHOT = jax.nn.one_hot(LABELS, K)
ROLLED = jnp.roll(IMAGES, 1, axis=0)


@functools.cache
def _jitted(**kw):
    return jax.jit(functools.partial(mix_batch, **kw))


def _mix(seed, **kw):
    return _jitted(**kw)(jax.random.key(seed), IMAGES, ONEHOT)


def _own_weight(targets):
    return np.asarray(targets)[np.arange(B), np.asarray(LABELS)]


def test_prob_zero_leaves_the_batch_unchanged():
    images, targets = _mix(0, prob=0.0)
    np.testing.assert_array_equal(images, IMAGES)
    np.testing.assert_array_equal(targets, ONEHOT)
    _, smoothed = _mix(0, prob=0.0, label_smoothing=0.1)
    np.testing.assert_allclose(smoothed, smooth_labels(ONEHOT, 0.1))
    np.testing.assert_allclose(smoothed.max(), 0.91, rtol=1e-6)


def test_mixup_is_one_convex_combination_with_the_rolled_batch():
    for seed in range(4):
        images, targets = _mix(seed, prob=1.0, cutmix_alpha=0.0)
        lam = _own_weight(targets)
        assert np.allclose(lam, lam[0]) and 0 <= lam[0] <= 1
        np.testing.assert_allclose(images, lam[0] * IMAGES + (1 - lam[0]) * ROLLED, atol=1e-6)


def test_cutmix_pastes_one_box_and_targets_follow_its_area():
    for seed in range(4):
        images, targets = _mix(seed, prob=1.0, mixup_alpha=0.0)
        from_self = np.all(np.isclose(images, IMAGES), axis=(0, 3))
        from_rolled = np.all(np.isclose(images, ROLLED), axis=(0, 3))
        assert (from_self | from_rolled).all()
        np.testing.assert_allclose(_own_weight(targets), from_self.mean(), atol=1e-6)


def test_a_pure_function_of_the_key():
    a, b, c = (_mix(seed, prob=1.0, cutmix_alpha=0.0) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_mixes_half_the_batches_half_of_them_with_cutmix_into_smoothed_distributions():
    keys = jax.random.split(jax.random.key(1), 400)
    images, targets = jax.jit(jax.vmap(lambda k: mix_batch(k, IMAGES, ONEHOT, label_smoothing=0.1)))(keys)
    mixed = ~np.all(np.isclose(images, IMAGES[None]), axis=(1, 2, 3, 4))
    binary = np.all(np.isclose(images, IMAGES[None]) | np.isclose(images, ROLLED[None]), axis=(1, 2, 3, 4))
    cutmix = mixed & binary
    assert 0.4 < mixed.mean() < 0.6
    assert 0.3 < cutmix.sum() / mixed.sum() < 0.7
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert targets.min() >= 0.01 - 1e-7  # smoothing 0.1 over 10 classes
    np.testing.assert_allclose(
        np.asarray(targets)[~mixed], np.broadcast_to(smooth_labels(ONEHOT, 0.1), targets[~mixed].shape)
    )
