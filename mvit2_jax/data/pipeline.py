"""tf.data input pipelines: an endless, exactly resumable train stream and a padded eval pass.

Both take the per-example function of a task, so every task shares the sharding, shuffling,
resume and padding logic here and only says what one example becomes.

Train (`train_stream`): each process reads its own share of the split (`tfds.even_splits`
by process index). Epoch e shuffles that share with a shuffle buffer seeded by (seed,
process, e), keeps the first `steps_per_epoch * batch_size` examples, and calls
`example_fn(key, record)` on example i of epoch e with a stateless key derived from (seed,
process, e, i). Nothing depends on iterator state, so `start_step=k` gives exactly the
batches k, k+1, ... of a run started at step 0 (it skips the first examples of epoch
k // steps_per_epoch before decoding them). Reproducibility holds for the same TF/TFDS
versions, data, batch size and process count, and as long as the process does not change
TF's global seed (`tf.random.set_seed` also reseeds tf.data's shuffle); changing the
process count reshards the data.

The order within an epoch is a shuffle-buffer permutation of TFDS's deterministic read
order (TFDS already shuffled the examples when it prepared the dataset); a buffer at least
as large as a process's share (the digits, CIFAR) gives a uniformly random permutation.

Eval (`eval_pass`): every example of the split is seen exactly once across processes. Each
process gets the same number of full batches of `example_fn(record)`; padding examples are
zeros with `mask` 0 (real ones have `mask` 1).

Records are TFDS example dicts restricted to `features`; images stay encoded (the example
functions decode them, JPEGs fused with the crop). Batches are dicts of numpy arrays.

Image classification's ops live here too: `TrainAugmentation`, `train_image`, `eval_image`
(the one eval preprocessing, shared by the eval pass, predict and export), and the labeled
streams built from them (`labeled_train_stream`, `labeled_eval_pass`: {"image", "label"}).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mvit2_jax.data import preprocess
from mvit2_jax.data.randaugment import rand_augment
from mvit2_jax.data.sources import DatasetLike, as_spec, eval_steps, load_split, num_examples, process_split, steps_per_epoch
from mvit2_jax.errors import DataError

Batch = Dict[str, np.ndarray]
Record = Dict[str, tf.Tensor]
AUTOTUNE = tf.data.AUTOTUNE


# ----------------------------------------------------------------------------- image ops


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
    # True: stop after the flip and return uint8; RandAugment and erasing then run in the train
    # step (device_augment.augment, config.data.augment_on = "device").
    on_device: bool = False


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int, aug: TrainAugmentation) -> tf.Tensor:
    """Encoded image -> augmented float32 [image_size, image_size, 3] in [0, 1] (uint8 after the
    crop and flip alone where `aug.on_device`)."""
    s_crop, s_flip, s_ra, s_erase = preprocess.split_seed(seed, 4)
    image = preprocess.decode_and_random_crop(image_bytes, s_crop, aug.crop_scale, aug.crop_ratio)
    image = preprocess.resize(image, image_size, image_size)
    if aug.flip:
        image = preprocess.random_flip(image, s_flip)
    if aug.on_device:
        return image
    if aug.randaugment and aug.randaugment_ops > 0:
        image = rand_augment(image, s_ra, aug.randaugment_ops, aug.randaugment_magnitude, aug.randaugment_bins)
    image = preprocess.to_unit_float(image)
    if aug.erasing_prob > 0:
        image = preprocess.random_erase(image, s_erase, aug.erasing_prob)
    return image


def eval_image(image_bytes: tf.Tensor, image_size: int, resize_size: int) -> tf.Tensor:
    """Encoded image -> shorter side to `resize_size` (bicubic), center `image_size` crop, [0, 1]."""
    image = preprocess.resize_shorter_side(preprocess.decode(image_bytes), resize_size)
    return preprocess.to_unit_float(preprocess.center_crop(image, image_size))


# ----------------------------------------------------------------------------- streams


def _hash(key: tf.Tensor) -> tf.Tensor:
    """An int64 hash of a whole stateless seed (a folded-in seed's first half ignores the data)."""
    return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)


def _fold_in(key: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg="philox")


def _read(dataset: DatasetLike, split: Any, features: Sequence[str]) -> tf.data.Dataset:
    """Records {feature: tensor} in TFDS's deterministic file order; images (and label maps
    stored as images) stay encoded."""
    decoders = {name: tfds.decode.SkipDecoding() for name in features if name in ("image", "label")}
    ds = load_split(dataset, split, decoders=decoders, shuffle_files=False)
    return ds.map(lambda ex: {name: ex[name] for name in features})


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def train_stream(
    dataset: DatasetLike,
    split: str,
    *,
    example_fn: Callable[[tf.Tensor, Record], Dict[str, tf.Tensor]],
    features: Sequence[str],
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_buffer: int = 16_384,
) -> tf.data.Dataset:
    """The endless train stream of this process from global step `start_step` on."""
    spec = as_spec(dataset)
    steps = steps_per_epoch(num_examples(spec, split), batch_size * process_count)
    if steps == 0:
        raise DataError(
            f"{spec.name}[{split}] has fewer examples than one global batch of {batch_size * process_count}: "
            "lower config.batch_size or use a larger split"
        )
    records = _read(spec, process_split(split, process_index, process_count), features)
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
    ds = ds.map(example_fn, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _with_options(ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE))


def eval_pass(
    dataset: DatasetLike,
    split: str,
    *,
    example_fn: Callable[[Record], Dict[str, tf.Tensor]],
    features: Sequence[str],
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """This process's share of `split`, once, in full batches padded with mask-0 examples."""
    spec = as_spec(dataset)
    num_batches = eval_steps(num_examples(spec, split), batch_size, process_count)
    records = _read(spec, process_split(split, process_index, process_count), features)
    num_padding = num_batches * batch_size - int(records.cardinality())
    if num_padding < 0:  # only if the share's size disagrees with the split's metadata
        raise RuntimeError(f"{spec.name}[{split}]: process {process_index} got more examples than expected")
    ds = records.map(lambda record: {**example_fn(record), "mask": 1.0}, num_parallel_calls=AUTOTUNE)
    shapes = ds.element_spec
    if not all(s.shape.is_fully_defined() for s in tf.nest.flatten(shapes)):
        raise ValueError(f"eval examples need static shapes to be batched and padded, got {shapes}")
    padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), shapes)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    return _with_options(ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE))


def as_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    """A tf.data pipeline as an iterator of numpy batches."""
    return iter(tfds.as_numpy(ds))


# ----------------------------------------------------------------------------- labeled images


def _label(record: Record) -> tf.Tensor:
    return tf.cast(record["label"], tf.int32)


def labeled_train_stream(
    dataset: DatasetLike,
    split: str,
    *,
    image_size: int,
    augmentation: TrainAugmentation = TrainAugmentation(),
    **stream_kwargs: Any,
) -> tf.data.Dataset:
    """`train_stream` of {"image": `train_image`, "label": int32} (batch_size, seed, start_step,
    process_index, process_count, shuffle_buffer as for train_stream)."""

    def example(key: tf.Tensor, record: Record) -> Dict[str, tf.Tensor]:
        return {"image": train_image(record["image"], key, image_size, augmentation), "label": _label(record)}

    return train_stream(dataset, split, example_fn=example, features=("image", "label"), **stream_kwargs)


def labeled_eval_pass(dataset: DatasetLike, split: str, *, image_size: int, resize_size: int, **pass_kwargs: Any) -> tf.data.Dataset:
    """`eval_pass` of {"image": `eval_image`, "label": int32, "mask"} (batch_size,
    process_index, process_count as for eval_pass)."""
    if resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} is smaller than the {image_size} center crop")

    def example(record: Record) -> Dict[str, tf.Tensor]:
        return {"image": eval_image(record["image"], image_size, resize_size), "label": _label(record)}

    return eval_pass(dataset, split, example_fn=example, features=("image", "label"), **pass_kwargs)
