"""Semantic segmentation: DeepLabv3 or PSPNet on MobileViTv2 (MobileViTv2Segmentation).

The model is built from `config.model` (backbone fields as in classification, plus head,
output_stride, aux_head, aspp_rates, aspp_features, psp_pool_sizes, psp_features,
head_dropout, aux_dropout) and `config.data.num_classes`. The loss is cross-entropy over the
labelled pixels (IGNORE = 255 excluded; with `config.class_weights`, weighted per class by the
official ENet weighting of the labels of each global batch, where the official code weighs each
GPU's share; off in every official recipe) plus `config.aux_loss_weight` (0.4 officially)
times the aux head's, whose logits are resized (bilinear, align_corners=True) to the label
map as the official loss does. Evaluation sums a confusion matrix over the whole split (every
process's share, ignore label excluded) and reports mIoU over the classes that occur
(in the labels or the predictions), per-class IoU, pixel accuracy and the loss per pixel;
the best checkpoint is the one with the highest EMA mIoU.

Data (`config.data`): a TFDS dataset whose examples hold "image" and "label" (a label map
stored as a single-channel PNG): the built-in mvit2_digit_scenes, or any such dataset;
`reduce_zero_label` maps stored 0 to IGNORE and v to v - 1 (ADE20k). Augmentation: the
official recipe (mvit2_jax.data.segmentation.SegAugmentation from config.data), crops of
image_size; eval resizes image and labels to eval_image_size (the official validation;
unset: image_size, as every official recipe has it), the size predict and export use too.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mvit2_jax.errors import ConfigError, DataError
from mvit2_jax.models import HEADS, OUTPUT_STRIDES, MobileViTv2Segmentation
from mvit2_jax.models.layers import resize_bilinear_align_corners
from mvit2_jax.tasks.base import MIN_IMAGE_SIZE, ImageTask

Config = ml_collections.ConfigDict
IGNORE = 255
_TUPLE_FIELDS = ("aspp_rates", "psp_pool_sizes")


def eval_image_size(config: Config) -> int:
    """The eval resize: config.data.eval_image_size, or image_size (the train crop) when unset."""
    size = config.data.get("eval_image_size")
    return config.data.image_size if size is None else size


def _dataset(config: Config):
    from mvit2_jax import data as data_lib

    return data_lib, data_lib.DatasetSpec.from_config(config.data)


def pixel_cross_entropy(
    logits: jax.Array, labels: jax.Array, class_weights: Optional[jax.Array] = None
) -> Tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy over labelled pixels, their count); logits [B, H, W, C], labels
    [B, H, W] with IGNORE on unlabelled pixels. With `class_weights` [C], each pixel's term and
    count are weighted by its label's weight (the weighted mean of torch's cross_entropy)."""
    valid = labels != IGNORE
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    weight = valid.astype(jnp.float32)
    if class_weights is not None:
        weight = weight * class_weights[safe]
    return jnp.sum(ce * weight), jnp.sum(weight)


def enet_class_weights(labels: jax.Array, num_classes: int, norm: float = 1.1) -> jax.Array:
    """The official class weighting (cvnets `loss.segmentation.cross_entropy.class_weights`,
    ENet section 5.2): from the batch's label histogram h (IGNORE excluded) normalised to sum 1,
    w_c = 1 / log(h_c + norm), and 0 for classes absent from the batch. [num_classes] float32."""
    valid = labels != IGNORE
    hist = jnp.bincount(jnp.where(valid, labels, 0).reshape(-1), valid.reshape(-1).astype(jnp.float32), length=num_classes)
    share = hist / jnp.maximum(hist.sum(), 1.0)
    return jax.lax.stop_gradient(jnp.where(hist > 0, 1.0 / jnp.log(share + norm), 0.0))


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int, weights: jax.Array) -> jax.Array:
    """[C, C] counts (rows: label, columns: prediction) over pixels with a label < C,
    weighted per pixel by `weights` (0 for padding examples)."""
    valid = (labels < num_classes) & (weights > 0)
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.zeros((num_classes * num_classes,), jnp.float32).at[index.reshape(-1)].add(
        (valid * weights).reshape(-1).astype(jnp.float32)
    )
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(IoU per class, whether the class occurs) from a confusion matrix; IoU is NaN where a
    class is neither in the labels nor in the predictions."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / np.where(present, union, 1), np.nan)
    return iou, present


class Segmentation(ImageTask):
    name = "segmentation"
    best_metric = "ema_miou"
    head_prefixes = ("aspp", "psp", "classifier", "aux_head")

    # ------------------------------------------------------------------------- configuration

    def check_config(self, config: Config) -> None:
        self.check_backbone_config(config)
        m, d = config.model, config.data
        if m.head not in HEADS:
            raise ConfigError(f"config.model.head must be one of {HEADS}, got {m.head!r}")
        if m.output_stride not in OUTPUT_STRIDES:
            raise ConfigError(f"config.model.output_stride must be one of {OUTPUT_STRIDES}, got {m.output_stride!r}")
        if len(m.aspp_rates) != 3:
            raise ConfigError(f"config.model.aspp_rates must be three dilation rates such as (6, 12, 18), got {tuple(m.aspp_rates)}")
        if not 1 <= d.num_classes < IGNORE:
            raise ConfigError(f"config.data.num_classes must be in [1, {IGNORE}) ({IGNORE} is the ignore label), got {d.num_classes}")
        if not d.short_side_min <= d.short_side_max:
            raise ConfigError(f"config.data.short_side_min ({d.short_side_min}) must be <= config.data.short_side_max ({d.short_side_max})")
        if d.get("eval_image_size") is not None and d.eval_image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"config.data.eval_image_size must be at least {MIN_IMAGE_SIZE} (the network's stride), got {d.eval_image_size}"
            )
        if config.aux_loss_weight < 0:
            raise ConfigError(f"config.aux_loss_weight must be >= 0, got {config.aux_loss_weight}")

    def check_data(self, config: Config, splits: Optional[Sequence[str]] = None) -> None:
        data_lib, spec = _dataset(config)
        if spec.name.split("/")[0] == "scene_parse150":
            raise DataError(
                "TFDS scene_parse150 holds ChallengeData2017's instance annotations, not ADE20k's 150-class label maps: "
                "use config.data.dataset=mvit2_ade20k with ADEChallengeData2016.zip in <data_dir>/downloads/manual/"
            )
        if data_lib.is_folder_dataset(spec.name):
            from mvit2_jax.data import mask_folder

            mask_folder.check(spec.name, spec.folder)
        features = data_lib.get_builder(spec).info.features
        if not all(name in features.keys() for name in ("image", "label")):
            raise DataError(
                f"{spec.name} is not a segmentation dataset: its examples need an 'image' and a 'label' map, "
                f"they have {sorted(features.keys())}"
            )
        for split in splits or (config.data.train_split, config.data.eval_split):
            data_lib.check_split(spec, split)
        names = self.class_names(config)
        if names is not None and len(names) != config.data.num_classes:
            raise DataError(f"{spec.name} has {len(names)} classes: set config.data.num_classes={len(names)} (got {config.data.num_classes})")

    def class_names(self, config: Config) -> Optional[List[str]]:
        """The dataset's class names (its TFDS metadata "class_names"), if it records them."""
        data_lib, spec = _dataset(config)
        names = data_lib.get_builder(spec).info.metadata
        return list(names["class_names"]) if names and "class_names" in names else None

    def run_meta(self, config: Config) -> Dict[str, Any]:
        size = eval_image_size(config)
        return {"image_size": [size, size], "dataset": config.data.dataset, "class_names": self.class_names(config)}

    # ------------------------------------------------------------------------- model

    def model_config(self, config: Config) -> Dict[str, Any]:
        model = MobileViTv2Segmentation(num_classes=config.data.num_classes, **self._model_fields(config.model.to_dict()))
        return model.config()

    @staticmethod
    def _model_fields(fields: Mapping[str, Any]) -> Dict[str, Any]:
        return {k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in fields.items()}

    def create_model(self, model_config: Mapping[str, Any]) -> MobileViTv2Segmentation:
        return MobileViTv2Segmentation(**self._model_fields(model_config))

    # ------------------------------------------------------------------------- input

    def _labels(self, config: Config):
        from mvit2_jax.data.segmentation import LabelMap

        return LabelMap(config.data.num_classes, config.data.reduce_zero_label)

    def train_input(self, config: Config, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
        from mvit2_jax.data.segmentation import SegAugmentation, segmentation_train_stream

        data_lib, spec = _dataset(config)
        d = config.data
        aug = SegAugmentation(
            crop_size=d.image_size,
            short_side_min=d.short_side_min,
            short_side_max=d.short_side_max,
            max_image_dim=d.max_image_dim,
            flip=d.flip,
            class_max_ratio=d.class_max_ratio,
            blur=d.blur,
            photometric=d.photometric,
            rotate_degrees=d.rotate_degrees,
        )
        stream = segmentation_train_stream(
            spec,
            d.train_split,
            augmentation=aug,
            labels=self._labels(config),
            **self.train_stream_args(config, start_step),
        )
        return data_lib.as_numpy(stream)

    def eval_input(self, config: Config, split: Optional[str] = None) -> Iterator[Dict[str, np.ndarray]]:
        from mvit2_jax.data.segmentation import segmentation_eval_pass

        data_lib, spec = _dataset(config)
        batches = segmentation_eval_pass(
            spec,
            split or config.data.eval_split,
            size=eval_image_size(config),
            labels=self._labels(config),
            **self.eval_pass_args(config),
        )
        return data_lib.as_numpy(batches)

    # ------------------------------------------------------------------------- in the steps

    def inputs(self, batch: Mapping[str, Any]) -> jax.Array:
        return batch["image"]

    def prepare_batch(self, key: jax.Array, batch: Mapping[str, Any], config: Config) -> Tuple[jax.Array, jax.Array]:
        del key  # augmentation happens in the input pipeline
        return batch["image"], batch["label"]

    def loss(self, outputs: Any, targets: jax.Array, config: Config) -> jax.Array:
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        weights = enet_class_weights(targets, logits.shape[-1]) if config.get("class_weights") else None
        total, count = pixel_cross_entropy(logits, targets, weights)
        loss = total / jnp.maximum(count, 1.0)
        if aux is not None and config.aux_loss_weight:
            aux = resize_bilinear_align_corners(aux, targets.shape[1], targets.shape[2])
            aux_total, _ = pixel_cross_entropy(aux, targets, weights)
            loss = loss + config.aux_loss_weight * aux_total / jnp.maximum(count, 1.0)
        return loss

    def train_metrics(self, outputs: Any, batch: Mapping[str, Any]) -> Dict[str, jax.Array]:
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        labels = batch["label"]
        valid = labels != IGNORE
        correct = (jnp.argmax(logits, -1) == labels) & valid
        return {"pixel_acc": jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)}

    def eval_sums(self, outputs: jax.Array, batch: Mapping[str, Any], config: Config) -> Dict[str, jax.Array]:
        del config
        labels = batch["label"]
        weights = batch["mask"].astype(jnp.float32)[:, None, None] * jnp.ones(labels.shape, jnp.float32)
        total, _ = pixel_cross_entropy(outputs, jnp.where(weights > 0, labels, IGNORE))
        return {"confusion": confusion_matrix(jnp.argmax(outputs, -1), labels, outputs.shape[-1], weights), "loss": total}

    def finalize(self, sums: Mapping[str, np.ndarray], count: float) -> Dict[str, float]:
        confusion = np.asarray(sums["confusion"], np.float64)
        iou, present = iou_from_confusion(confusion)
        pixels = confusion.sum()
        metrics = {
            "miou": float(np.nanmean(iou)) if present.any() else 0.0,
            "pixel_acc": float(np.trace(confusion) / max(pixels, 1.0)),
            "loss": float(sums["loss"]) / max(pixels, 1.0),
        }
        metrics.update({f"iou/{c}": float(v) for c, v in enumerate(iou) if present[c]})
        return metrics


TASK = Segmentation()
