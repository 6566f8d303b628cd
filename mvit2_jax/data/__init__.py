"""Input pipeline: TFDS datasets (incl. the offline digits and image folders), image ops,
augmentation, the train stream and eval pass every task shares, batch mixing.

Importing this package registers the built-in TFDS datasets "mvit2_digits" (classification),
"mvit2_digit_scenes" (segmentation) and "mvit2_digit_boxes" (detection), and the builders of the official segmentation
datasets from manual downloads, "mvit2_ade20k" and "mvit2_voc_aug" (seg_datasets.py). A directory given as the dataset name is an
image-folder dataset (folder.py); `DatasetSpec` carries its options. Segmentation's pairs of
image and label map go through segmentation.py, detection's images and boxes through
detection.py.
"""

from mvit2_jax.data import digit_boxes, digit_scenes, digits, seg_datasets  # noqa: F401  (register the builders)
from mvit2_jax.data.folder import BadImageError, FolderError, FolderOptions, is_folder_dataset
from mvit2_jax.data.pipeline import (
    TrainAugmentation,
    as_numpy,
    eval_image,
    eval_pass,
    labeled_eval_pass,
    labeled_train_stream,
    train_image,
    train_stream,
)
from mvit2_jax.data.sources import (
    DatasetLike,
    DatasetNotPreparedError,
    DatasetSpec,
    check_split,
    class_names,
    eval_steps,
    get_builder,
    load_split,
    num_examples,
    skipped_files,
    steps_per_epoch,
)

__all__ = [
    "BadImageError",
    "DatasetLike",
    "DatasetNotPreparedError",
    "DatasetSpec",
    "FolderError",
    "FolderOptions",
    "TrainAugmentation",
    "as_numpy",
    "check_split",
    "class_names",
    "eval_image",
    "eval_pass",
    "eval_steps",
    "get_builder",
    "is_folder_dataset",
    "labeled_eval_pass",
    "labeled_train_stream",
    "load_split",
    "num_examples",
    "skipped_files",
    "steps_per_epoch",
    "train_image",
    "train_stream",
]
