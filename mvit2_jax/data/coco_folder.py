"""COCO-format detection datasets: an annotation file (or the COCO layout) and its images, no code needed.

    --config.data.dataset=/data/mine/annotations.json      # one split, "train"
    --config.data.dataset=/data/coco                         # the COCO layout: one split per file

A dataset name ending in ".json" is one COCO-format annotation file: its images are looked up
relative to the folder named after the file's split part (instances_val2017.json ->
val2017/), then images/, then the file's own folder (the first that holds the first image
wins), and its one split is "train" (slice it: train[:90%], train[90%:]). A directory that
holds annotations/instances_<SPLIT>.json files is the COCO layout: split <SPLIT> reads its
images from <dir>/<SPLIT>/.

The examples are TFDS detection examples like coco/2017's: "image", "objects" ({"bbox"
normalized ymin, xmin, ymax, xmax; "label" 0..K-1 over the file's categories in id order,
named by them; "is_crowd"; "area"}) and "image/filename". Bad input is named: an image that
is missing or does not decode, and an annotation without a valid box (not four numbers, no
area, outside the image) or with an unknown image or category id, are skipped and logged
with the reason (config.data.bad_files="skip", recorded in the dataset's metadata) or stop the
preparation with an error naming them ("error"). Prepared once into the TFDS data dir, like
image folders; a changed file makes a new dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from mvit2_jax.data import folder
from mvit2_jax.data.folder import BadImageError, FolderError, FolderOptions

NAME_PREFIX = "mvit2_coco_"
FORMAT = 1


def is_coco_folder(name: str) -> bool:
    """Whether a dataset name is a COCO-format annotation file or a COCO-layout directory."""
    path = os.path.expanduser(name)
    if name.endswith(".json"):
        return True
    return os.path.isdir(path) and bool(_layout_files(path))


def _layout_files(root: str) -> Dict[str, str]:
    annotations = os.path.join(root, "annotations")
    if not os.path.isdir(annotations):
        return {}
    out = {}
    for name in sorted(os.listdir(annotations)):
        m = re.fullmatch(r"instances_(\w+)\.json", name)
        if m:
            out[m.group(1)] = os.path.join(annotations, name)
    return out


@dataclasses.dataclass(frozen=True)
class _Split:
    annotations: str
    images: str


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    root: str
    splits: Mapping[str, _Split]
    categories: Tuple[Tuple[int, str], ...]  # (COCO id, name), in id order
    options: FolderOptions


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise FolderError(f"cannot read the annotation file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise FolderError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise FolderError(f"{path} is not a COCO annotation file: it needs 'images' and 'annotations' lists (and 'categories')")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise FolderError(f"{path} has no 'categories': a COCO detection file lists its categories with 'id' and 'name'")
    return data


def _image_folder(path: str, data: Mapping[str, Any]) -> str:
    """Where the images of annotation file `path` are (see the module doc)."""
    here = os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    split = stem.split("_", 1)[1] if "_" in stem else stem
    candidates = [os.path.join(d, split) for d in (here, os.path.dirname(here))] + [os.path.join(here, "images"), here]
    first = next((im.get("file_name") for im in data["images"] if isinstance(im, dict) and im.get("file_name")), None)
    if first is None:
        raise FolderError(f"{path} lists no image with a 'file_name'")
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, first)):
            return candidate
    raise FolderError(f"{path}: cannot find its first image {first!r} in any of {', '.join(candidates)}: put the images there")


def _source(name: str, options: FolderOptions) -> _Source:
    path = folder.resolve(name)
    if name.endswith(".json"):
        if not os.path.isfile(path):
            raise FolderError(f"COCO annotation file {path} does not exist")
        files = {"train": path}
        root = os.path.dirname(path)
    else:
        root, files = path, _layout_files(path)
    splits, categories, identity = {}, None, {"format": FORMAT, "on_bad_file": options.on_bad_file}
    for split, file in files.items():
        data = _read_json(file)
        cats = tuple(sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in data["categories"]))
        if categories is not None and cats != categories:
            raise FolderError(f"{file} lists other categories than the other annotation files of {root}")
        categories = cats
        splits[split] = _Split(file, _image_folder(file, data))
        stat = os.stat(file)
        identity[split] = [file, stat.st_size, stat.st_mtime_ns, splits[split].images]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(path))[0].lower()).strip("_")[:40]
    return _Source(f"{NAME_PREFIX}{slug}_{digest}", root, splits, categories, options)


def check(name: str, options: FolderOptions = FolderOptions()) -> None:
    """Raise the dataset's path and format errors now, before a run builds anything."""
    _source(name, options)


_CLASSES: Dict[str, type] = {}


def builder(name: str, data_dir: Optional[str], options: FolderOptions) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a COCO-format dataset (prepared on first use by sources.load_split)."""
    source = _source(name, options)
    cls = _CLASSES.get(source.name)
    if cls is None:
        cls = _CLASSES[source.name] = type(
            f"CocoFolder_{source.name}", (CocoFolder,), {"name": source.name, "SOURCE": source, "__module__": __name__}, skip_registration=True
        )
    return cls(data_dir=data_dir)


def _box_problem(ann: Mapping[str, Any], width: float, height: float) -> Optional[str]:
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in box):
        return f"bbox {box!r} is not four numbers [x, y, width, height]"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"bbox {list(box)} has no area"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"bbox {list(box)} lies outside the {width:g}x{height:g} image"
    return None


class CocoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the per-dataset builders that `builder` makes; prepares offline, never downloads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    PREPARES_OFFLINE = True
    SOURCE: ClassVar[_Source]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.SOURCE
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"COCO-format detection annotations in {s.root}.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),  # the original file's bytes
                    "image/filename": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=[n for _, n in s.categories]),
                            "is_crowd": tfds.features.Tensor(shape=(), dtype=np.bool_),
                            "area": tfds.features.Tensor(shape=(), dtype=np.float32),
                        }
                    ),
                }
            ),
            metadata=tfds.core.MetadataDict(root=s.root, skipped={}, num_skipped=0),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Iterator]:
        del dl_manager
        self._skipped: Dict[str, str] = {}
        return {split: self._generate_examples(split, s) for split, s in self.SOURCE.splits.items()}

    def _bad(self, what: str, reason: str) -> None:
        if self.SOURCE.options.on_bad_file == "error":
            raise BadImageError(f"{what}: {reason}; fix or remove it, or skip bad entries (config.data.bad_files='skip')")
        logging.warning("COCO dataset %s: skipping %s: %s", self.SOURCE.root, what, reason)
        self._skipped[what] = reason
        self.info.metadata["skipped"] = dict(sorted(self._skipped.items()))
        self.info.metadata["num_skipped"] = len(self._skipped)

    def _generate_examples(self, split: str, source: _Split) -> Iterator[Tuple[str, Dict[str, Any]]]:
        data = _read_json(source.annotations)
        label_of = {cid: k for k, (cid, _) in enumerate(self.SOURCE.categories)}
        images = {}
        for im in data["images"]:
            if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
                self._bad(f"{source.annotations} image entry {im!r}"[:200], "needs an 'id' and a 'file_name'")
                continue
            images[im["id"]] = im
        objects: Dict[Any, List[Dict[str, Any]]] = {k: [] for k in images}
        for ann in data["annotations"]:
            what = f"{os.path.basename(source.annotations)} annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r}"
            if not isinstance(ann, dict) or ann.get("image_id") not in images:
                self._bad(what, f"unknown image_id {ann.get('image_id') if isinstance(ann, dict) else None!r}")
                continue
            if ann.get("category_id") not in label_of:
                self._bad(what, f"unknown category_id {ann.get('category_id')!r}")
                continue
            im = images[ann["image_id"]]
            problem = _box_problem(ann, float(im.get("width") or np.inf), float(im.get("height") or np.inf))
            if problem:
                self._bad(what, problem)
                continue
            objects[ann["image_id"]].append(ann)
        order = sorted(images, key=lambda k: str(images[k]["file_name"]))
        paths = [str(images[k]["file_name"]) for k in order]
        kept = 0
        for key, path, (encoded, problem) in zip(order, paths, folder._checked(source.images, paths)):
            if problem:
                self._bad(os.path.join(source.images, path), problem)
                continue
            width, height = PIL.Image.open(io.BytesIO(encoded)).size
            boxes, labels, crowd, area = [], [], [], []
            for ann in objects[key]:
                x, y, w, h = (float(v) for v in ann["bbox"])
                x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
                boxes.append(tfds.features.BBox(ymin=y0 / height, xmin=x0 / width, ymax=y1 / height, xmax=x1 / width))
                labels.append(label_of[ann["category_id"]])
                crowd.append(bool(ann.get("iscrowd", 0)))
                area.append(float(ann.get("area") or w * h))
            kept += 1
            yield path, {
                "image": encoded,
                "image/filename": path,
                "objects": {"bbox": boxes, "label": labels, "is_crowd": crowd, "area": np.asarray(area, np.float32).reshape(-1)},
            }
        if not kept:
            raise FolderError(f"{source.annotations}: every image of split {split!r} is bad or missing: fix them or the annotation file")
