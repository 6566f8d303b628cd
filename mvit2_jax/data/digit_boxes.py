"""TFDS builder of a built-in detection dataset: digits on canvases, a box and a class per digit.

The generator of mvit2_digit_scenes (scikit-learn's handwritten digits on 64x64 canvases with
smooth random backgrounds and contrasting colours; train and test canvases from disjoint
digits, fixed seeds; 3,000 train and 500 test canvases) with smaller digits, as objects
are in detection datasets: one to four per canvas, enlarged to 10-24 pixels, placed apart
(a digit that finds no free place in 20 draws is left out). Stored as detection datasets are
in TFDS (coco/2017, voc): "image" and "objects" with "bbox" (normalized ymin, xmin, ymax,
xmax: the ink extent of each digit, its pixels at a quarter of the digit's maximum ink or
more) and "label" (the digit, 0-9; a detector counts the background too: 11 classes).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds

from mvit2_jax.data import digit_scenes, digits

NAME = "mvit2_digit_boxes"
NUM_CLASSES = 11  # background + the ten digits
CLASS_NAMES = digit_scenes.CLASS_NAMES  # background + the ten digits
SIZE = digit_scenes.SIZE
DIGIT_SIZES = (10, 24)
MAX_DIGITS = 4
SEEDS = {"train": 11, "test": 12}


class DigitBoxes(digits.OfflineBuilder):
    """Digits on 64x64 canvases with their boxes and classes; prepares offline."""

    name = NAME

    def _info(self) -> tfds.core.DatasetInfo:
        objects = {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(names=CLASS_NAMES[1:])}
        return digit_scenes.canvas_info(self, __doc__, objects=tfds.features.Sequence(objects))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Any]:
        del dl_manager  # Nothing to download: the digits ship with scikit-learn.
        images, labels = digits.digits_as_uint8_rgb()
        ink = images[..., 0].astype(np.float64) / 255.0
        indices = digits.split_indices(labels)
        counts = {split: count for split, (count, _) in digit_scenes.SPLITS.items()}
        return {split: self._generate_examples(ink[indices[split]], labels[indices[split]], counts[split], SEEDS[split]) for split in counts}

    def _generate_examples(self, ink: np.ndarray, labels: np.ndarray, count: int, seed: int) -> Iterator[Tuple[int, Dict[str, Any]]]:
        rng = np.random.default_rng(seed)
        for k in range(count):
            image, _, objects = digit_scenes.canvas_objects(rng, ink, labels, DIGIT_SIZES, MAX_DIGITS, apart=True)
            x0, y0, x1, y1 = (objects[:, i].astype(np.float32) / SIZE for i in range(4))
            boxes = [tfds.features.BBox(ymin=a, xmin=b, ymax=c, xmax=d) for a, b, c, d in zip(y0, x0, y1, x1)]
            yield k, {"image": image, "objects": {"bbox": boxes, "label": objects[:, 4]}}
