"""TFDS builders of the official segmentation datasets, read from archives a user downloads.

Put the archives in the TFDS manual directory (<data_dir>/downloads/manual/) and prepare once
with `tfds build mvit2_ade20k --imports mvit2_jax.data` (or let the first run fail and say
so). Examples hold "image" (the JPEG as stored) and "label" (a single-channel PNG of the
stored class values; mvit2_jax.data.segmentation.LabelMap makes train ids of them).

mvit2_ade20k: ADEChallengeData2016.zip, the data ml-cvnets trains on (MIT scene parsing,
150 classes): images/{training,validation}/*.jpg and annotations/{training,validation}/*.png
with 0 = "other" (ignored) and 1..150; splits train (20,210) and validation (2,000). TFDS's
own scene_parse150 prepares ChallengeData2017's annotations_instance.tar, whose PNGs are
instance annotations, not these 150-class label maps.

mvit2_voc_aug: PASCAL VOC 2012 with the SBD annotations ("train_aug"), from
VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz: validation is VOC's segmentation val
(1,449); train is SBD's train and val plus VOC's segmentation train, minus VOC val (10,582).
Labels 0..20, 255 on object borders (VOC); SBD's .mat labels are read with scipy. (The
official recipe adds COCO images mapped to the VOC classes; that part is not built here.)
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import tensorflow_datasets as tfds

from mvit2_jax.data.label_names import ADE20K_CLASSES, VOC_CLASSES


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "name": tfds.features.Text(),
        }
    )


def _index_png(data: bytes) -> np.ndarray:
    """A label PNG (grayscale or palette) -> its index values, uint8 [H, W, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img, np.uint8)[..., None] if img.mode in ("L", "P") else np.asarray(img.convert("L"), np.uint8)[..., None]


class Ade20k(tfds.core.GeneratorBasedBuilder):
    """ADE20k / MIT scene parsing (ADEChallengeData2016.zip, put in the manual directory)."""

    name = "mvit2_ade20k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    ARCHIVE = "ADEChallengeData2016.zip"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {ARCHIVE} (http://data.csail.mit.edu/places/ADEchallenge/{ARCHIVE}) into the manual directory."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=_features(), description=__doc__, metadata=tfds.core.MetadataDict(class_names=ADE20K_CLASSES)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Any]:
        path = os.path.join(dl_manager.manual_dir, self.ARCHIVE)
        return {"train": self._generate_examples(path, "training"), "validation": self._generate_examples(path, "validation")}

    def _generate_examples(self, path: str, folder: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            pattern = re.compile(rf"(?:^|/)images/{folder}/([^/]+)\.jpg$")
            for member in sorted(names):
                match = pattern.search(member)
                if not match:
                    continue
                label = member[: match.start()] + ("/" if match.start() else "") + f"annotations/{folder}/{match.group(1)}.png"
                label = label.lstrip("/")
                if label not in names:
                    raise FileNotFoundError(f"{path}: {member} has no label map {label}")
                yield match.group(1), {
                    "image": io.BytesIO(archive.read(member)),
                    "label": _index_png(archive.read(label)),
                    "name": match.group(1),
                }


class VocAug(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 + SBD train_aug (VOCtrainval_11-May-2012.tar, benchmark.tgz in the manual directory)."""

    name = "mvit2_voc_aug"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    VOC_ARCHIVE, SBD_ARCHIVE = "VOCtrainval_11-May-2012.tar", "benchmark.tgz"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {VOC_ARCHIVE} (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and SBD's {SBD_ARCHIVE} "
        "(http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz) "
        "into the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=_features(), description=__doc__, metadata=tfds.core.MetadataDict(class_names=VOC_CLASSES)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Any]:
        manual = dl_manager.manual_dir
        return {
            "train": self._generate_examples(os.path.join(manual, self.VOC_ARCHIVE), os.path.join(manual, self.SBD_ARCHIVE), "train"),
            "validation": self._generate_examples(os.path.join(manual, self.VOC_ARCHIVE), None, "val"),
        }

    @staticmethod
    def _members(archive: tarfile.TarFile) -> Dict[str, tarfile.TarInfo]:
        return {m.name.split("VOC2012/", 1)[-1] if "VOC2012/" in m.name else m.name: m for m in archive.getmembers() if m.isfile()}

    @staticmethod
    def _ids(archive: tarfile.TarFile, members: Dict[str, tarfile.TarInfo], name: str) -> List[str]:
        member = members.get(name)
        if member is None:
            raise FileNotFoundError(f"{archive.name}: no {name}")
        return archive.extractfile(member).read().decode().split()

    def _generate_examples(self, voc_path: str, sbd_path: Any, split: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        with tarfile.open(voc_path) as voc:
            members = self._members(voc)
            lists = "ImageSets/Segmentation/{}.txt"
            val = self._ids(voc, members, lists.format("val"))

            def voc_example(i: str) -> Dict[str, Any]:
                return {
                    "image": io.BytesIO(voc.extractfile(members[f"JPEGImages/{i}.jpg"]).read()),
                    "label": _index_png(voc.extractfile(members[f"SegmentationClass/{i}.png"]).read()),
                    "name": i,
                }

            if split == "val":
                for i in val:
                    yield i, voc_example(i)
                return
            excluded = set(val)
            voc_train = [i for i in self._ids(voc, members, lists.format("train")) if i not in excluded]
            for i in voc_train:
                yield i, voc_example(i)
            seen = set(voc_train) | excluded
            import scipy.io

            with tarfile.open(sbd_path) as sbd:
                sbd_members = {m.name.split("dataset/", 1)[-1]: m for m in sbd.getmembers() if m.isfile() and "dataset/" in m.name}
                ids = [i for name in ("train.txt", "val.txt") for i in sbd.extractfile(sbd_members[name]).read().decode().split()]
                for i in ids:
                    if i in seen:
                        continue
                    seen.add(i)
                    mat = scipy.io.loadmat(io.BytesIO(sbd.extractfile(sbd_members[f"cls/{i}.mat"]).read()))
                    label = np.asarray(mat["GTcls"]["Segmentation"][0][0], np.uint8)[..., None]
                    image = sbd.extractfile(sbd_members[f"img/{i}.jpg"]).read()
                    yield i, {"image": io.BytesIO(image), "label": label, "name": i}
