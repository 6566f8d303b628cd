"""Train and eval streams: batch format, exact determinism and resume, exact eval coverage."""

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mvit2_jax import data
from mvit2_jax.data import digits

MOCK_EXAMPLES = 40  # mock imagenet2012: 40 random JPEGs of 5..50 pixels a side, 1000 classes
STEPS_PER_EPOCH = 5  # 40 examples / batch 8
NO_AUGMENTATION = data.TrainAugmentation(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, randaugment=False, erasing_prob=0.0
)


@pytest.fixture
def mock_imagenet():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


@pytest.fixture(scope="module")
def stream():
    """The first 3 epochs and 3 steps of the mock imagenet stream for seed 1."""
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        return _train(3 * STEPS_PER_EPOCH + 3, seed=1)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "tfds"  # shared by every test module of the session
    data.check_split(digits.NAME, "train", str(path))
    return str(path)


def train_iterator(dataset, split, data_dir=None, **kwargs):
    return data.as_numpy(data.labeled_train_stream(data.DatasetSpec(dataset, data_dir), split, **kwargs))


def eval_iterator(dataset, split, data_dir=None, **kwargs):
    return data.as_numpy(data.labeled_eval_pass(data.DatasetSpec(dataset, data_dir), split, **kwargs))


def _train(n, **kwargs):
    kwargs = {"batch_size": 8, "image_size": 32, **kwargs}
    it = train_iterator("imagenet2012", "train", **kwargs)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))


def _fingerprints(batches):
    """One entry per real example: (pixels, label)."""
    return collections.Counter(
        (image.tobytes(), int(label))
        for b in batches
        for image, label, mask in zip(b["image"], b["label"], b.get("mask", np.ones(len(b["label"]))))
        if mask
    )


def test_train_batches_have_the_recipe_format(mock_imagenet):
    (batch,) = _train(1, batch_size=4, image_size=256)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, 256, 256, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()


def test_same_seed_same_stream_other_seed_other_stream(mock_imagenet, stream):
    assert _same(stream, _train(len(stream), seed=1))
    assert not np.array_equal(stream[0]["image"], _train(1, seed=2)[0]["image"])
    other_process = _train(1, seed=1, process_index=1, process_count=2)  # mock shares are alike
    assert not np.array_equal(stream[0]["image"][:4], other_process[0]["image"][:4])


@pytest.mark.parametrize("start_step", [1, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3, 3 * STEPS_PER_EPOCH + 1])
def test_resuming_at_a_step_reproduces_the_stream_from_that_step(mock_imagenet, stream, start_step):
    assert _same(stream[start_step : start_step + 2], _train(2, seed=1, start_step=start_step))


def test_each_epoch_visits_every_example_once_in_a_new_order(stream):
    epochs = [
        np.concatenate([b["label"] for b in stream[e * STEPS_PER_EPOCH : (e + 1) * STEPS_PER_EPOCH]]) for e in range(3)
    ]
    assert len(epochs[0]) == MOCK_EXAMPLES
    for later in epochs[1:]:
        assert sorted(later) == sorted(epochs[0]) and not np.array_equal(later, epochs[0])


def test_eval_batches_are_padded_with_masked_examples(mock_imagenet):
    batches = list(eval_iterator("imagenet2012", "validation", batch_size=16, image_size=64, resize_size=72))
    assert [b["mask"].sum() for b in batches] == [16, 16, 8]
    last = batches[-1]
    assert last["image"].shape == (16, 64, 64, 3) and last["mask"].dtype == np.float32
    assert not last["image"][8:].any() and not last["label"][8:].any()
    assert 0.0 <= min(b["image"].min() for b in batches) and max(b["image"].max() for b in batches) <= 1.0


@pytest.mark.parametrize("split,batch_size", [("test[:97]", 16), ("test", 64)])
def test_eval_sees_every_example_exactly_once_on_any_number_of_processes(digits_dir, split, batch_size):
    kwargs = {"batch_size": batch_size, "image_size": 16, "resize_size": 16, "data_dir": digits_dir}
    whole = list(eval_iterator(digits.NAME, split, **kwargs))
    shares = [
        list(eval_iterator(digits.NAME, split, process_index=i, process_count=2, **kwargs)) for i in range(2)
    ]
    n = data.num_examples(data.DatasetSpec(digits.NAME, digits_dir), split)
    assert len(shares[0]) == len(shares[1]) == data.eval_steps(n, batch_size, 2)
    assert sum(b["mask"].sum() for share in shares for b in share) == n
    assert _fingerprints(shares[0]) + _fingerprints(shares[1]) == _fingerprints(whole)
    if split == "test[:97]":  # shares of 49 and 48: the second ends with a batch of padding only
        assert shares[1][-1]["mask"].sum() == 0


def test_digits_train_at_32_pixels_with_a_quickstart_augmentation(digits_dir):
    quickstart = data.TrainAugmentation(crop_scale=(0.35, 1.0), flip=False, randaugment=False)
    it = train_iterator(
        digits.NAME, "train", batch_size=32, image_size=32, data_dir=digits_dir, augmentation=quickstart
    )
    batch = next(it)
    assert batch["image"].shape == (32, 32, 32, 3) and 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert set(batch["label"]) <= set(range(10))


def test_train_processes_read_disjoint_shares(digits_dir):
    kwargs = {"batch_size": 32, "image_size": 16, "data_dir": digits_dir}
    every_example = _fingerprints(eval_iterator(digits.NAME, "train", resize_size=16, **kwargs))
    steps = data.steps_per_epoch(1437, 64)
    epoch = collections.Counter()
    for i in range(2):
        it = train_iterator(
            digits.NAME, "train", process_index=i, process_count=2, augmentation=NO_AUGMENTATION, **kwargs
        )
        epoch += _fingerprints(next(it) for _ in range(steps))
    assert sum(epoch.values()) == 2 * steps * 32
    assert not epoch - every_example  # no example twice, nothing that is not a train example
