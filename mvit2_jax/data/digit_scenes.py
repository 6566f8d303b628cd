"""TFDS builder of a built-in segmentation dataset: scikit-learn's digits placed on canvases.

Each example is a 64x64 RGB canvas with one to four handwritten digits from
scikit-learn's 8x8 digits (they ship inside its wheel, so this prepares offline): a smooth
random background (two colours blended along a random direction, plus faint noise), each
digit enlarged (bilinear) to 22-38 pixels, given a random colour that contrasts with the
background, and placed at a random position apart from the others (its square is drawn
again, up to 20 times, while it overlaps an earlier digit's square, and the digit is left
out if it still does; 1.6 digits per canvas on average). The label map gives each pixel its
digit's class plus one (1..10) where the enlarged digit's ink is at least a quarter of its
maximum, else 0 (background): 11 classes.

Train canvases use only the digits of mvit2_digits' train split, test canvases only those
of its test split (the same fixed stratified split), so no handwritten digit is shared;
the canvases are generated from fixed seeds (train 3,000, test 500).

Version 1.1.0 places the digits apart, at 22-38 pixels, up to four; 1.0.0 drew one to three
at 18-34 pixels where they fell, later ones covering earlier ones (two digits' squares
overlapped on 55% of the test canvases), so part of the labels named digits of which only a
fragment showed.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds

from mvit2_jax.data import digits

NAME = "mvit2_digit_scenes"
NUM_CLASSES = 11  # background + the ten digits
CLASS_NAMES = ["background"] + [str(d) for d in range(10)]
SIZE = 64
DIGIT_SIZES = (22, 38)
MAX_DIGITS = 4
INK_THRESHOLD = 0.25
SPLITS = {"train": (3000, 1), "test": (500, 2)}  # canvases, seed


def _enlarge(digit: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (align corners) of an [8, 8] float digit to [size, size]."""
    src = np.linspace(0, digit.shape[0] - 1, size)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, digit.shape[0] - 1)
    t = src - lo
    rows = digit[lo] * (1 - t)[:, None] + digit[hi] * t[:, None]
    return rows[:, lo] * (1 - t)[None, :] + rows[:, hi] * t[None, :]


def canvas_objects(
    rng: np.random.Generator,
    ink: np.ndarray,
    labels: np.ndarray,
    digit_sizes: Tuple[int, int] = (18, 34),
    max_digits: int = 3,
    apart: bool = False,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (uint8 image [64, 64, 3], uint8 label map [64, 64, 1], objects [N, 5]) from digits
    `ink` [N, 8, 8] in [0, 1]: 1 to `max_digits` digits of `digit_sizes` pixels (inclusive).
    Each object row is the digit's ink box in pixels (x0, y0, x1, y1: the extent of its
    labelled pixels, x1 and y1 exclusive, before later digits cover it) and its digit 0-9,
    in drawing order. With `apart`, a digit's square is drawn again (up to 20 times) while it
    overlaps an earlier digit's square, and the digit is left out if it still does."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y + 1.0) / 2.0
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    image = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, 0.03, (SIZE, SIZE, 3))
    label = np.zeros((SIZE, SIZE), np.uint8)
    objects, squares = [], []
    for _ in range(rng.integers(1, max_digits + 1)):
        i = rng.integers(len(ink))
        for _ in range(20 if apart else 1):
            size = int(rng.integers(digit_sizes[0], digit_sizes[1] + 1))
            top, left = rng.integers(0, SIZE - size + 1, 2)
            clear = all(left >= r or left + size <= l or top >= b or top + size <= t for l, t, r, b in squares)
            if clear:
                break
        if apart and not clear:
            continue
        squares.append((left, top, left + size, top + size))
        alpha = np.clip(_enlarge(ink[i], size), 0.0, 1.0)
        region = image[top : top + size, left : left + size]
        background = region.mean(axis=(0, 1))
        color = np.where(background > 0.5, rng.uniform(0.0, 0.3, 3), rng.uniform(0.7, 1.0, 3))
        region[:] = region * (1 - alpha[..., None]) + color * alpha[..., None]
        drawn = alpha >= INK_THRESHOLD * alpha.max()
        label[top : top + size, left : left + size][drawn] = labels[i] + 1
        rows, cols = np.nonzero(drawn)
        objects.append([left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1, labels[i]])
    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return image, label[..., None], np.asarray(objects, np.int64).reshape(-1, 5)


def canvas(rng: np.random.Generator, ink: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One (uint8 image [64, 64, 3], uint8 label map [64, 64, 1]) of mvit2_digit_scenes: 1 to
    MAX_DIGITS digits of DIGIT_SIZES pixels, apart (see canvas_objects)."""
    image, label, _ = canvas_objects(rng, ink, labels, DIGIT_SIZES, MAX_DIGITS, apart=True)
    return image, label


def canvas_info(builder: tfds.core.DatasetBuilder, description: str, **features: Any) -> tfds.core.DatasetInfo:
    """The DatasetInfo of a dataset of 64x64 canvases ("image", PNG) with `features`, whose
    class names are CLASS_NAMES."""
    image = tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="png")
    return builder.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"image": image, **features}),
        description=description,
        metadata=tfds.core.MetadataDict(class_names=CLASS_NAMES),
    )


class DigitScenes(digits.OfflineBuilder):
    """Digits on 64x64 canvases with per-pixel labels (11 classes); prepares offline."""

    name = NAME
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Digits placed apart (no digit covers part of another), 22-38 pixels, up to four."}

    def _info(self) -> tfds.core.DatasetInfo:
        return canvas_info(self, __doc__, label=tfds.features.Image(shape=(SIZE, SIZE, 1), encoding_format="png"))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Any]:
        del dl_manager  # Nothing to download: the digits ship with scikit-learn.
        images, labels = digits.digits_as_uint8_rgb()
        ink = images[..., 0].astype(np.float64) / 255.0
        indices = digits.split_indices(labels)
        return {split: self._generate_examples(ink[indices[split]], labels[indices[split]], *SPLITS[split]) for split in SPLITS}

    def _generate_examples(self, ink: np.ndarray, labels: np.ndarray, count: int, seed: int) -> Iterator[Tuple[int, Dict[str, Any]]]:
        rng = np.random.default_rng(seed)
        for k in range(count):
            image, label = canvas(rng, ink, labels)
            yield k, {"image": image, "label": label}
