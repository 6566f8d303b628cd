"""Input pipeline: TFDS datasets (incl. the offline digits), augmentation, batch mixing.

Importing this package registers the "mvit2_digits" TFDS dataset.
"""

from mvit2_jax.data import digits  # noqa: F401  (registers the "mvit2_digits" builder)
from mvit2_jax.data.datasets import (
    DatasetNotPreparedError,
    check_dataset,
    eval_steps,
    load_split,
    num_examples,
    steps_per_epoch,
)
from mvit2_jax.data.pipeline import (
    TrainAugmentation,
    eval_dataset,
    eval_iterator,
    train_dataset,
    train_iterator,
)

__all__ = [
    "DatasetNotPreparedError",
    "TrainAugmentation",
    "check_dataset",
    "eval_dataset",
    "eval_iterator",
    "eval_steps",
    "load_split",
    "num_examples",
    "steps_per_epoch",
    "train_dataset",
    "train_iterator",
]
