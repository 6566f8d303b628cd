"""Finding, preparing and sharding TFDS datasets, with one-line errors for the usual mistakes.

A dataset is named by a `DatasetSpec`: its TFDS name (or an image-folder path), the TFDS
data dir, and the folder options; `DatasetSpec.from_config(config.data)` builds it from a
run's config, so the options travel with the config. Every function also takes a plain
name ("cifar10", "/data/pets") for the defaults.

`load_split` is the one way the pipeline opens a split: an unknown dataset name, an unknown
split or a dataset that is not prepared fails there with a DataError that says what to do,
before any example is read. Datasets whose builder sets `PREPARES_OFFLINE` (mvit2_digits,
image folders) are prepared into the data dir on first use; everything else must already
be prepared.

A dataset name that is a directory ("/data/pets", "~/pets", "./pets", "data/pets" when it
exists) is an image-folder dataset (folder.py): one sub-folder per class, no code needed;
or, when it holds images/ and masks/, a segmentation folder (mask_folder.py). A COCO-format
annotation file ("/data/mine/train.json") or COCO-layout directory is a detection dataset
(coco_folder.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any, Dict, List, Optional, Union

import tensorflow as tf
import tensorflow_datasets as tfds

from mvit2_jax.data import coco_folder, folder, mask_folder
from mvit2_jax.data import digit_boxes, digit_scenes, digits, seg_datasets  # noqa: F401  (register the built-in builders)
from mvit2_jax.data.folder import FolderOptions
from mvit2_jax.errors import DataError

# Files a person must fetch by hand for datasets that TFDS cannot download itself.
MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "mvit2_ade20k": ("ADEChallengeData2016.zip",),
    "mvit2_voc_aug": ("VOCtrainval_11-May-2012.tar", "benchmark.tgz"),
}


class DatasetNotPreparedError(DataError):
    """A TFDS dataset exists but has not been prepared in the data dir."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Which dataset, where, and (for image folders) how it becomes a dataset."""

    name: str
    data_dir: Optional[str] = None
    folder: FolderOptions = FolderOptions()

    @classmethod
    def from_config(cls, data: Any) -> "DatasetSpec":
        """From a config's `data` section: dataset, data_dir, folder_val_fraction,
        folder_split_seed, bad_files."""
        options = FolderOptions(val_fraction=data.folder_val_fraction, seed=data.folder_split_seed, on_bad_file=data.bad_files)
        return cls(data.dataset, data.data_dir, options)


DatasetLike = Union[str, DatasetSpec]


def as_spec(dataset: DatasetLike, data_dir: Optional[str] = None) -> DatasetSpec:
    """`dataset` as a DatasetSpec (a plain name gets `data_dir` and the default folder options)."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    return DatasetSpec(dataset, data_dir)


def get_builder(dataset: DatasetLike, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a dataset ("imagenet2012", "cifar10", "imagenette/320px-v2", ...)
    or of an image folder given by its path ("/data/pets", "~/pets", "./pets"; see folder.py)."""
    spec = as_spec(dataset, data_dir)
    if coco_folder.is_coco_folder(spec.name):
        return coco_folder.builder(spec.name, spec.data_dir, spec.folder)
    if folder.is_folder_dataset(spec.name):
        kind = mask_folder if mask_folder.is_mask_folder(spec.name) else folder
        return kind.builder(spec.name, spec.data_dir, spec.folder)
    try:
        return tfds.builder(spec.name, data_dir=spec.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)  # the community list needs the network
        close = difflib.get_close_matches(spec.name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        if "/" in spec.name or os.sep in spec.name:
            hint += f" No directory {os.path.abspath(os.path.expanduser(spec.name))} exists either."
        raise DataError(f"Unknown TFDS dataset {spec.name!r}.{hint}") from None


def class_names(dataset: DatasetLike, data_dir: Optional[str] = None) -> Optional[List[str]]:
    """The label names of a dataset (TFDS or folder), or None if it has no class label.

    Reads only the builder's description: nothing is prepared. Labels declared by count
    alone are named "0", "1", ... as TFDS names them.
    """
    features = get_builder(dataset, data_dir).info.features
    if not isinstance(features, tfds.features.FeaturesDict) or "label" not in features.keys():
        return None
    label = features["label"]
    return list(label.names) if isinstance(label, tfds.features.ClassLabel) else None


def _not_prepared_message(builder: tfds.core.DatasetBuilder, data_dir: Optional[str]) -> str:
    root = os.fspath(data_dir or builder.data_dir_root)
    build = f"`tfds build {builder.name} --data_dir {root}`"
    if builder.name in MANUAL_FILES:
        files = " and ".join(MANUAL_FILES[builder.name])
        return (
            f"{builder.name} is not prepared in {root}: put {files} in "
            f"{os.path.join(root, 'downloads', 'manual')}/ and run {build} (hours, once)."
        )
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        return (
            f"{builder.name} is not prepared in {root}: it needs a manual download into "
            f"{os.path.join(root, 'downloads', 'manual')}/ (see its TFDS page), then run {build}."
        )
    return f"{builder.name} is not prepared in {root}: run {build} on a machine with internet access."


def prepared_builder(dataset: DatasetLike, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
    """`get_builder`, after preparing a dataset that prepares offline if it is not yet."""
    builder = get_builder(dataset, data_dir)
    if getattr(builder, "PREPARES_OFFLINE", False) and not builder.is_prepared():
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except OSError:
            if not builder.is_prepared():  # else another process sharing data_dir finished first
                raise
    return builder


def load_split(dataset: DatasetLike, split: str, data_dir: Optional[str] = None, **as_dataset_kwargs: Any) -> tf.data.Dataset:
    """`builder.as_dataset(split)`, preparing offline-preparable datasets first; clear errors."""
    spec = as_spec(dataset, data_dir)
    builder = prepared_builder(spec)
    try:
        return builder.as_dataset(split=split, **as_dataset_kwargs)
    except AssertionError:  # TFDS's way of saying "no data in data_dir"
        raise DatasetNotPreparedError(_not_prepared_message(builder, spec.data_dir)) from None
    except ValueError as e:  # an unknown split name or a malformed slice
        available = ", ".join(builder.info.splits) or "none recorded"
        reason = "" if "Unknown split" in str(e) else ": " + str(e).splitlines()[0]
        raise DataError(f"{spec.name} has no split {split!r} (available: {available}){reason}") from None


def check_split(dataset: DatasetLike, split: str, data_dir: Optional[str] = None) -> None:
    """Raise the errors of `load_split` now, before a run builds its model and state (an
    offline-preparable dataset is prepared on this first use)."""
    load_split(dataset, split, data_dir)


def num_examples(dataset: DatasetLike, split: str, data_dir: Optional[str] = None) -> int:
    """Examples in `split` (slices such as "train[:10%]" allowed), from TFDS's metadata."""
    spec = as_spec(dataset, data_dir)
    count = int(load_split(spec, split).cardinality())
    if count < 0:
        raise DataError(f"{spec.name}[{split}] does not record its number of examples")
    return count


def skipped_files(dataset: DatasetLike, data_dir: Optional[str] = None) -> Dict[str, str]:
    """{relative path: reason} of the bad files left out of an image-folder dataset (prepares
    it first if needed)."""
    return dict(prepared_builder(dataset, data_dir).info.metadata["skipped"])


def process_split(split: str, process_index: int, process_count: int) -> Any:
    """This process's disjoint share of `split`; shares differ in size by at most one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return tfds.even_splits(split, n=process_count)[process_index]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches in one pass over `num_examples` (the train stream drops the rest)."""
    return num_examples // global_batch_size


def eval_steps(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields in one eval pass: its largest share, rounded up."""
    return math.ceil(math.ceil(num_examples / process_count) / batch_size)
