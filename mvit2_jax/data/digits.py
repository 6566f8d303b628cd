"""TFDS builder for scikit-learn's bundled UCI handwritten digits, as small RGB images.

The 1,797 8x8 grayscale digits (values 0..16) ship inside the scikit-learn wheel, so this
dataset prepares offline: `download_and_prepare` downloads nothing. Pixels are scaled to
0..255, repeated to 3 channels and stored PNG-encoded, so training on the digits runs the
same decode path as ImageNet's JPEGs (PNG takes the decode-then-crop branch).

The train/test split is a stratified 80/20 split with a fixed seed (1,437 / 360 examples);
`index` is the example's position in `sklearn.datasets.load_digits()`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds

NAME = "mvit2_digits"
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def digits_as_uint8_rgb() -> Tuple[np.ndarray, np.ndarray]:
    """All digits as (uint8 images [N, 8, 8, 3] in 0..255, int64 labels [N])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> Dict[str, np.ndarray]:
    """The fixed stratified train/test partition of example indices."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test)}


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the built-in datasets made from scikit-learn's digits: version 1.0.0, prepared
    offline on first use."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    PREPARES_OFFLINE = True  # read by mvit2_jax.data.sources: safe to prepare on first use


class Digits(OfflineBuilder):
    """scikit-learn's 8x8 handwritten digits as uint8 RGB images; prepares offline."""

    name = NAME

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Dict[str, Any]:
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        images, labels = digits_as_uint8_rgb()
        return {
            split: self._generate_examples(images, labels, indices) for split, indices in split_indices(labels).items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[Tuple[int, Dict[str, Any]]]:
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}
