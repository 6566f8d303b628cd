"""tf.data input pipelines: an endless, exactly resumable train stream and a padded eval pass.

Train: each process reads its own share of the split (`tfds.even_splits` by process index).
Epoch e shuffles that share with a shuffle buffer seeded by (seed, process, e), keeps the
first `steps_per_epoch * batch_size` examples, and augments example i of epoch e with
stateless ops keyed by (seed, process, e, i). Nothing depends on iterator state, so
`start_step=k` gives exactly the batches k, k+1, ... of a run started at step 0 (it skips
the first examples of epoch k // steps_per_epoch before decoding them). Every per-example
augmentation (crop, flip, RandAugment, erasing) is reproduced exactly; Mixup/CutMix run on
device (mixing.py) from the train step's PRNG key. Reproducibility holds for the same
TF/TFDS versions, data, batch size and process count, and as long as the process does not
change TF's global seed (`tf.random.set_seed` also reseeds tf.data's shuffle); changing the
process count reshards the data.

The order within an epoch is a shuffle-buffer permutation of TFDS's deterministic read
order (TFDS already shuffled the examples when it prepared the dataset); a buffer at least
as large as a process's share (the digits, CIFAR) gives a uniformly random permutation.

Eval: every example of the split is seen exactly once across processes. Each process gets
the same number of full batches; padding examples have `mask` 0.

Batches are dicts of numpy arrays: train {"image": float32 [B, H, W, 3] in [0, 1],
"label": int32 [B]}; eval adds "mask": float32 [B] (1 real, 0 padding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mvit2_jax.data import preprocess
from mvit2_jax.data.datasets import eval_steps, load_split, num_examples, process_split, steps_per_epoch
from mvit2_jax.data.randaugment import rand_augment

Batch = Dict[str, np.ndarray]
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class TrainAugmentation:
    """Per-example train augmentation; the defaults are the cvnets ImageNet recipe."""

    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    randaugment_bins: int = 31
    erasing_prob: float = 0.25


def _read(name: str, split: Any, data_dir: Optional[str]) -> tf.data.Dataset:
    """(encoded image, label) pairs in TFDS's deterministic file order."""
    ds = load_split(name, split, data_dir, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False)
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))


def _hash(key: tf.Tensor) -> tf.Tensor:
    """An int64 hash of a whole stateless seed (a folded-in seed's first half ignores the data)."""
    return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)


def _fold_in(key: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg="philox")


def train_example(image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int, aug: TrainAugmentation) -> tf.Tensor:
    """Encoded image -> augmented float32 [image_size, image_size, 3] in [0, 1]."""
    s_crop, s_flip, s_ra, s_erase = preprocess.split_seed(seed, 4)
    image = preprocess.decode_and_random_crop(image_bytes, s_crop, aug.crop_scale, aug.crop_ratio)
    image = preprocess.resize(image, image_size, image_size)
    if aug.flip:
        image = preprocess.random_flip(image, s_flip)
    if aug.randaugment and aug.randaugment_ops > 0:
        image = rand_augment(image, s_ra, aug.randaugment_ops, aug.randaugment_magnitude, aug.randaugment_bins)
    image = preprocess.to_unit_float(image)
    if aug.erasing_prob > 0:
        image = preprocess.random_erase(image, s_erase, aug.erasing_prob)
    return image


def eval_example(image_bytes: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """Encoded image -> shorter side to `resize_size`, center `image_size` crop, [0, 1]."""
    image = preprocess.resize_shorter_side(preprocess.decode(image_bytes), resize_size)
    return preprocess.to_unit_float(preprocess.center_crop(image, image_size))


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def train_dataset(
    name: str = "imagenet2012",
    split: str = "train",
    *,
    batch_size: int,
    image_size: int = 256,
    data_dir: Optional[str] = None,
    seed: int = 0,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augmentation: TrainAugmentation = TrainAugmentation(),
    shuffle_buffer: int = 16_384,
) -> tf.data.Dataset:
    """The endless train stream of this process from global step `start_step` on."""
    steps = steps_per_epoch(num_examples(name, split, data_dir), batch_size * process_count)
    if steps == 0:
        raise ValueError(f"{name}[{split}] has fewer examples than one global batch of {batch_size * process_count}")
    records = _read(name, process_split(split, process_index, process_count), data_dir)
    examples_per_epoch = steps * batch_size
    process_key = tf.constant([seed, process_index], tf.int64)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        epoch_key = _fold_in(process_key, e)
        shuffled = records.shuffle(shuffle_buffer, seed=_hash(epoch_key), reshuffle_each_iteration=False)
        # filter, not take: reading the share to its end lets TFDS's in-memory cache complete.
        kept = shuffled.enumerate().filter(lambda i, _: i < examples_per_epoch)
        return kept.map(lambda i, ex: (_fold_in(epoch_key, i), ex))

    start_epoch, start_batch = divmod(start_step, steps)
    ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch).skip(start_batch * batch_size)

    def example(key: tf.Tensor, record: Tuple[tf.Tensor, tf.Tensor]) -> Dict[str, tf.Tensor]:
        return {"image": train_example(record[0], key, image_size, augmentation), "label": record[1]}

    ds = ds.map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _with_options(ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE))


def eval_dataset(
    name: str = "imagenet2012",
    split: str = "validation",
    *,
    batch_size: int,
    image_size: int = 256,
    resize_size: int = 288,
    data_dir: Optional[str] = None,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """This process's share of `split`, once, in full batches padded with mask-0 examples."""
    if resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than the {image_size} center crop")
    num_batches = eval_steps(num_examples(name, split, data_dir), batch_size, process_count)
    records = _read(name, process_split(split, process_index, process_count), data_dir)
    num_padding = num_batches * batch_size - int(records.cardinality())
    if num_padding < 0:  # only if the share's size disagrees with the split's metadata
        raise RuntimeError(f"{name}[{split}]: process {process_index} got more examples than expected")
    ds = records.map(
        lambda image, label: {"image": eval_example(image, image_size, resize_size), "label": label, "mask": 1.0},
        num_parallel_calls=AUTOTUNE,
    )
    padding = {"image": tf.zeros([image_size, image_size, 3]), "label": 0, "mask": 0.0}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    return _with_options(ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE))


def train_iterator(name: str = "imagenet2012", split: str = "train", **kwargs: Any) -> Iterator[Batch]:
    """`train_dataset(...)` as an iterator of numpy batches."""
    return iter(tfds.as_numpy(train_dataset(name, split, **kwargs)))


def eval_iterator(name: str = "imagenet2012", split: str = "validation", **kwargs: Any) -> Iterator[Batch]:
    """`eval_dataset(...)` as an iterator of numpy batches."""
    return iter(tfds.as_numpy(eval_dataset(name, split, **kwargs)))
