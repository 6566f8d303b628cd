"""The offline digits dataset: prepared from scikit-learn's wheel into any TFDS data dir."""

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mvit2_jax import data
from mvit2_jax.data import digits


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "tfds"  # shared by every test module of the session
    data.check_split(digits.NAME, "train", str(path))  # prepares on first use
    return str(path)


def _examples(data_dir, split):
    return list(tfds.as_numpy(data.load_split(digits.NAME, split, data_dir)))


def test_importing_the_package_registers_the_builder():
    assert digits.NAME in tfds.list_builders()


def test_prepares_offline_into_the_data_dir(data_dir):
    builder = tfds.builder(digits.NAME, data_dir=data_dir)
    assert builder.is_prepared()
    assert builder.data_dir.startswith(data_dir)


def test_split_sizes_are_a_fixed_80_20_split(data_dir):
    assert data.num_examples(digits.NAME, "train", data_dir) == 1437
    assert data.num_examples(digits.NAME, "test", data_dir) == 360


def test_images_are_png_uint8_rgb_and_labels_are_the_ten_digits(data_dir):
    test = _examples(data_dir, "test")
    images = np.stack([ex["image"] for ex in test])
    assert images.shape == (360, 8, 8, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all() and images.max() == 255
    assert sorted({int(ex["label"]) for ex in test}) == list(range(10))
    encoded = next(iter(data.load_split(digits.NAME, "test", data_dir, decoders={"image": tfds.decode.SkipDecoding()})))
    assert encoded["image"].numpy().startswith(b"\x89PNG")


def test_train_and_test_are_disjoint_stratified_and_cover_all_digits(data_dir):
    train, test = _examples(data_dir, "train"), _examples(data_dir, "test")
    train_ids = {int(ex["index"]) for ex in train}
    test_ids = {int(ex["index"]) for ex in test}
    assert not train_ids & test_ids
    assert train_ids | test_ids == set(range(1797))
    per_class = collections.Counter(int(ex["label"]) for ex in test)
    assert min(per_class.values()) >= 35 and max(per_class.values()) <= 37


def test_stored_pixels_match_scikit_learn(data_dir):
    images, labels = digits.digits_as_uint8_rgb()
    for ex in _examples(data_dir, "test")[:20]:
        np.testing.assert_array_equal(ex["image"], images[ex["index"]])
        assert ex["label"] == labels[ex["index"]]
