"""Input pipeline: TFDS datasets (incl. the offline digits and image folders), augmentation,
batch mixing.

Importing this package registers the "mvit2_digits" TFDS dataset. A directory given as the
dataset name is an image-folder dataset (folder.py); `configure_folder` sets its options.
"""

from mvit2_jax.data import digits  # noqa: F401  (registers the "mvit2_digits" builder)
from mvit2_jax.data.datasets import (
    DatasetNotPreparedError,
    check_dataset,
    class_names,
    eval_steps,
    load_split,
    num_examples,
    steps_per_epoch,
)
from mvit2_jax.data.folder import BadImageError, FolderError, configure_folder, is_folder_dataset, skipped_files
from mvit2_jax.data.pipeline import (
    TrainAugmentation,
    eval_dataset,
    eval_iterator,
    train_dataset,
    train_iterator,
)

__all__ = [
    "BadImageError",
    "DatasetNotPreparedError",
    "FolderError",
    "TrainAugmentation",
    "check_dataset",
    "class_names",
    "configure_folder",
    "eval_dataset",
    "eval_iterator",
    "eval_steps",
    "is_folder_dataset",
    "load_split",
    "num_examples",
    "skipped_files",
    "steps_per_epoch",
    "train_dataset",
    "train_iterator",
]
