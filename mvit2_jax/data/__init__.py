"""Input pipeline: TFDS datasets (incl. the offline digits and image folders), image ops,
augmentation, the train stream and eval pass every task shares, batch mixing.

Importing `mvit2_jax.data.sources` (which everything that reads a dataset does) registers the
built-in TFDS datasets "mvit2_digits" (classification),
"mvit2_digit_scenes" (segmentation) and "mvit2_digit_boxes" (detection), and the builders of the official segmentation
datasets from manual downloads, "mvit2_ade20k" and "mvit2_voc_aug" (seg_datasets.py). A directory given as the dataset name is an
image-folder dataset (folder.py); `DatasetSpec` carries its options. Segmentation's pairs of
image and label map go through segmentation.py, detection's images and boxes through
detection.py.

The package itself imports nothing: its names below load their module (and TensorFlow) on first
use, so that the train step's Mixup (mixing.py) and device-side RandAugment (device_augment.py),
pure JAX, do not pull in TensorFlow.
"""

import importlib
from typing import Any

_MODULES = {
    "BadImageError": "folder",
    "FolderError": "folder",
    "FolderOptions": "folder",
    "is_folder_dataset": "folder",
    "TrainAugmentation": "pipeline",
    "as_numpy": "pipeline",
    "eval_image": "pipeline",
    "eval_pass": "pipeline",
    "labeled_eval_pass": "pipeline",
    "labeled_train_stream": "pipeline",
    "train_image": "pipeline",
    "train_stream": "pipeline",
    "DatasetLike": "sources",
    "DatasetNotPreparedError": "sources",
    "DatasetSpec": "sources",
    "check_split": "sources",
    "class_names": "sources",
    "eval_steps": "sources",
    "get_builder": "sources",
    "load_split": "sources",
    "num_examples": "sources",
    "skipped_files": "sources",
    "steps_per_epoch": "sources",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_MODULES))


__all__ = sorted(_MODULES)
