"""Segmentation folders: images and index-PNG masks paired by file name, used by their path.

A directory given as the dataset name is a segmentation folder when it holds `images/` and
`masks/` (an image-folder dataset otherwise, folder.py). Two layouts:

- ROOT/images/... and ROOT/masks/...: a seeded split makes "train" and "validation"
  (`val_fraction` of the pairs, at least one; the pairs with the smallest hash of (seed,
  name) go to validation, so a seed always gives the same split).
- Split folders ROOT/<split>/images/... and ROOT/<split>/masks/... for the splits train,
  val, validation and test (the split names are the folder names).

The image images/a/b.jpg pairs with the mask masks/a/b.png: the same path below the two
folders, the mask a PNG. Images are jpg, jpeg, png, bmp, gif or webp files, stored as their
original bytes. A mask holds class indices as stored: a single-channel (grayscale) or
palette PNG, read as its index values (a palette's colours are only for viewing), the size
of its image; `config.data.num_classes` and `reduce_zero_label` make train ids of them and
255 is never scored (mvit2_jax.data.segmentation.LabelMap). An optional ROOT/classes.txt
names the classes, one per line (the dataset's metadata "class_names": predict and the
per-class metrics use them).

Bad files: an image with no mask, a mask with no image, a file of another type, an image
the pipeline's decoder cannot read, and a mask that is not a single-channel or palette PNG
or whose size differs from its image's. With on_bad_file="skip" they are left out, logged
and recorded by relative path in the prepared dataset's metadata (`skipped`); with "error"
preparing fails naming the file. Preparing, naming and re-preparing on change are those
of image folders (folder.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mvit2_jax.data import folder
from mvit2_jax.data.folder import FolderError, FolderImages, FolderOptions

IMAGES, MASKS = "images", "masks"
CLASSES_FILE = "classes.txt"
MASK_EXTENSION = ".png"
FORMAT = 1  # part of every name hash: bump when a change to this module changes what is stored

Pair = Tuple[str, str]  # (image path, mask path), relative to the root


def _split_dirs(root: str) -> Optional[Dict[str, str]]:
    """{split ("" without split folders): its folder} when `root` is a segmentation folder."""
    top, _ = folder._subfolders(root)
    if {IMAGES, MASKS} <= set(top):
        return {"": root}
    splits = [d for d in top if d in folder.SPLIT_FOLDERS]
    if splits and all({IMAGES, MASKS} <= set(folder._subfolders(os.path.join(root, s))[0]) for s in splits):
        return {s: os.path.join(root, s) for s in splits}
    return None


def is_mask_folder(path: str) -> bool:
    """Whether the existing directory `path` is a segmentation folder (has images/ and masks/)."""
    root = folder.resolve(path)
    return os.path.isdir(root) and _split_dirs(root) is not None


@dataclasses.dataclass(frozen=True)
class _Source:
    """What a segmentation folder's builder needs (the attributes FolderImages reads)."""

    name: str
    root: str
    class_names: Optional[Tuple[str, ...]]
    splits: Dict[str, Tuple[Pair, ...]]
    other: Tuple[Tuple[str, str], ...]  # (path, why it is left out) found while pairing
    options: FolderOptions
    fingerprint: str


def _files(root: str, directory: str, lines: List[str]) -> Iterator[Tuple[str, str, Optional[str]]]:
    """(path relative to `directory` without extension, path relative to root, problem) of
    every file below `directory`; appends the stat lines to `lines`."""
    for rel, problem, line in folder._walk_class(root, directory, []):
        lines.append(line)
        below = os.path.relpath(os.path.join(root, rel), directory).replace(os.sep, "/")
        yield os.path.splitext(below)[0], rel, problem


def _pairs(root: str, split_dir: str, lines: List[str]) -> Tuple[List[Pair], List[Tuple[str, str]]]:
    images: Dict[str, str] = {}
    other: List[Tuple[str, str]] = []
    for key, rel, problem in _files(root, os.path.join(split_dir, IMAGES), lines):
        if problem:
            other.append((rel, problem))
        elif key in images:
            other.append((rel, f"another image has the same name ({images[key]})"))
        else:
            images[key] = rel
    masks: Dict[str, str] = {}
    for key, rel, problem in _files(root, os.path.join(split_dir, MASKS), lines):
        if problem or not rel.lower().endswith(MASK_EXTENSION):
            other.append((rel, "not a PNG mask (masks are single-channel or palette PNGs)"))
        elif key not in images:
            other.append((rel, f"a mask with no image of the same name in {os.path.relpath(os.path.join(split_dir, IMAGES), root)}/"))
        else:
            masks[key] = rel
    for key, rel in images.items():
        if key not in masks:
            mask_dir = os.path.relpath(os.path.join(split_dir, MASKS), root).replace(os.sep, "/")
            other.append((rel, f"no mask {mask_dir}/{key}{MASK_EXTENSION}"))
    return [(images[k], masks[k]) for k in sorted(masks)], other


def _class_names(root: str) -> Optional[Tuple[str, ...]]:
    path = os.path.join(root, CLASSES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not names:
        raise FolderError(f"{path} names no classes: write one class name per line or remove it")
    return names


def _split_pairs(pairs: Sequence[Pair], options: FolderOptions, root: str) -> Dict[str, Tuple[Pair, ...]]:
    if len(pairs) < 2:
        raise FolderError(f"{root} has {len(pairs)} image/mask pairs: a train and a validation split need at least 2")
    count = min(max(1, round(options.val_fraction * len(pairs))), len(pairs) - 1)
    ranked = sorted(pairs, key=lambda pair: folder._rank(options.seed, pair[0]))
    return {"train": tuple(sorted(ranked[count:])), "validation": tuple(sorted(ranked[:count]))}


def _source(root: str, options: FolderOptions) -> _Source:
    split_dirs = _split_dirs(root)
    if split_dirs is None:
        raise FolderError(
            f"{root} is not a segmentation folder: put images in {root}/{IMAGES}/ and their index PNGs in "
            f"{root}/{MASKS}/ (or both in {root}/train/ and {root}/val/)"
        )
    lines: List[str] = []
    found: Dict[str, List[Pair]] = {}
    other: List[Tuple[str, str]] = []
    for split, split_dir in split_dirs.items():
        found[split], bad = _pairs(root, split_dir, lines)
        other += bad
        if not found[split]:
            where = os.path.join(root, split) if split else root
            raise FolderError(
                f"{where} has no image with a mask of the same name: put images in {where}/{IMAGES}/ and their "
                f"index PNGs in {where}/{MASKS}/ (a.jpg pairs with a.png)"
            )
    class_names = _class_names(root)
    if "" in found:
        splits = _split_pairs(found[""], options, root)
        identity = dataclasses.asdict(options)
    else:
        splits = {k: tuple(v) for k, v in found.items()}
        identity = {"on_bad_file": options.on_bad_file}
    fingerprint = hashlib.sha256(json.dumps([class_names, sorted(lines)]).encode()).hexdigest()
    identity.update(root=root, fingerprint=fingerprint, format=FORMAT, kind="masks")
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return _Source(
        name=f"{folder.NAME_PREFIX}{folder._slug(root)}{digest}",
        root=root,
        class_names=class_names,
        splits=splits,
        other=tuple(sorted(other)),
        options=options,
        fingerprint=fingerprint,
    )


def check(path: str, options: FolderOptions) -> None:
    """Raise the folder's path and layout errors now, before a run builds anything."""
    _source(folder._check_root(path), options)


_CLASSES: Dict[str, type] = {}


def builder(path: str, data_dir: Optional[str], options: FolderOptions) -> tfds.core.DatasetBuilder:
    """The TFDS builder of the segmentation folder at `path` (prepared on first use)."""
    source = _source(folder._check_root(path), options)
    cls = _CLASSES.get(source.name)
    if cls is None:
        cls = _CLASSES[source.name] = type(
            f"MaskFolder_{source.name}", (MaskFolder,), {"name": source.name, "SOURCE": source, "__module__": __name__},
            skip_registration=True,
        )
    return cls(data_dir=data_dir)


def read_mask(data: bytes) -> np.ndarray:
    """A mask PNG's index values, uint8 [H, W]; ValueError saying why it is not a mask."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"a {img.format} file, not a PNG")
        if img.mode not in ("L", "P"):
            raise ValueError(f"a {img.mode} PNG: save the class indices as a single-channel (grayscale) or palette PNG")
        return np.asarray(img, np.uint8)


def _check_pair(root: str, pair: Pair) -> Tuple[Optional[Tuple[bytes, np.ndarray]], Optional[Tuple[str, str]]]:
    """((image bytes, mask indices), None) for a good pair, else (None, (path, why not))."""
    image_path, mask_path = pair
    data, problem = folder._check_image(root, image_path)
    if problem:
        return None, (image_path, problem)
    try:
        with open(os.path.join(root, mask_path), "rb") as f:
            mask = read_mask(f.read())
    except Exception as e:  # PIL raises many types for a bad file
        return None, (mask_path, f"not a readable mask ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    shape = tuple(tf.io.extract_jpeg_shape(data).numpy()[:2]) if tf.io.is_jpeg(data) else None
    if shape is None:
        shape = tuple(tf.io.decode_image(data, channels=3, expand_animations=False).shape[:2])
    if mask.shape != shape:
        return None, (mask_path, f"a {mask.shape[1]}x{mask.shape[0]} mask for a {shape[1]}x{shape[0]} image {image_path}")
    return (data, mask), None


class MaskFolder(FolderImages, skip_registration=True):
    """Base of the per-folder builders that `builder` makes; prepares offline, never downloads."""

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.SOURCE
        metadata = dict(root=s.root, fingerprint=s.fingerprint, options=dataclasses.asdict(s.options), skipped={}, num_skipped=0)
        if s.class_names is not None:
            metadata["class_names"] = list(s.class_names)
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images in {s.root} with their index-PNG masks.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),  # the original file's bytes
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),  # stored indices
                    "file_name": tfds.features.Text(),  # the image's, relative to the folder
                }
            ),
            metadata=tfds.core.MetadataDict(**metadata),
        )

    def _generate_examples(self, split: str, pairs: Sequence[Pair]) -> Iterator[Tuple[str, Dict]]:
        root = self.SOURCE.root
        kept = 0
        for (image_path, _), (good, problem) in zip(pairs, folder._checked(root, pairs, _check_pair)):
            if problem:
                self._bad(*problem)
                continue
            kept += 1
            yield image_path, {"image": good[0], "label": good[1][..., None], "file_name": image_path}
        if not kept:
            raise FolderError(f"{root}: every pair of split {split!r} is bad ({len(pairs)} skipped): fix or replace them")
        self._record_skipped()
