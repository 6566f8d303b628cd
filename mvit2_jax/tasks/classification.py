"""Image classification: MobileViTv2 on any TFDS or image-folder dataset with integer labels.

The model is `MobileViTv2` built from `config.model` and `config.data.num_classes`; the
loss is softmax cross-entropy on targets smoothed by `config.label_smoothing` and mixed
on device by Mixup/CutMix (config.data.mixup_alpha, cutmix_alpha, mix_prob,
mix_switch_prob); metrics are top-1 and top-5; the best checkpoint is the one with the
highest EMA top-1. Preprocessing: the cvnets ImageNet train recipe (random-resized crop,
flip, RandAugment, erasing; config.data; with config.data.augment_on = "device" RandAugment
and erasing run in the train step on uint8 batches, `prepare_batch`) and the official eval preprocessing (shorter side
to eval_resize_size, bicubic; center crop image_size), which predict and export share.

The input pipeline (TensorFlow) is imported when first used, so rebuilding a model from a
checkpoint does not import it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mvit2_jax.errors import ConfigError, DataError
from mvit2_jax.models import MobileViT, MobileViTv2
from mvit2_jax.tasks.base import ImageTask

Config = ml_collections.ConfigDict
CLASSIFIERS = {"mobilevitv2": MobileViTv2, "mobilevit": MobileViT}
EVAL_RESIZE_RATIO = 288 / 256  # the official eval resize for 256 crops, scaled for other sizes


def default_eval_resize(image_size: int) -> int:
    """The official eval resize (shorter side) for a center crop of `image_size`: 288 for 256."""
    return int(round(image_size * EVAL_RESIZE_RATIO))


def augment_on(config: Config) -> str:
    """Where RandAugment and erasing run ("host" for configs written before the option)."""
    return config.data.get("augment_on", "host")


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits, per example."""
    top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _dataset(config: Config):
    from mvit2_jax import data as data_lib

    return data_lib, data_lib.DatasetSpec.from_config(config.data)


class Classification(ImageTask):
    name = "classification"
    best_metric = "ema_top1"
    head_prefixes = ("head",)

    # ------------------------------------------------------------------------- configuration

    def check_config(self, config: Config) -> None:
        self.check_backbone_config(config)
        d = config.data
        if d.eval_resize_size < d.image_size:
            raise ConfigError(f"config.data.eval_resize_size ({d.eval_resize_size}) must be >= config.data.image_size ({d.image_size})")
        if d.num_classes < 1:
            raise ConfigError(f"config.data.num_classes must be a positive integer, got {d.num_classes}")
        if augment_on(config) not in ("host", "device"):
            raise ConfigError(f'config.data.augment_on must be "host" or "device", got {augment_on(config)!r}')
        if not 0 <= config.label_smoothing < 1:
            raise ConfigError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}")

    def check_data(self, config: Config, splits: Optional[Sequence[str]] = None) -> None:
        data_lib, spec = _dataset(config)
        if data_lib.is_folder_dataset(spec.name):
            from mvit2_jax.data import folder

            folder.check(spec.name, spec.folder)
        for split in splits or (config.data.train_split, config.data.eval_split):
            data_lib.check_split(spec, split)
        names = self.class_names(config)
        if names is not None and len(names) != config.data.num_classes:
            raise DataError(
                f"{spec.name} has {len(names)} classes: set config.data.num_classes={len(names)} (got {config.data.num_classes})"
            )

    def class_names(self, config: Config) -> Optional[List[str]]:
        """The dataset's label names (recorded with checkpoints for predict), if it has them."""
        data_lib, spec = _dataset(config)
        return data_lib.class_names(spec)

    def run_meta(self, config: Config) -> Dict[str, Any]:
        size = config.data.image_size
        return {
            "image_size": [size, size],
            "eval_resize_size": config.data.eval_resize_size,
            "dataset": config.data.dataset,
            "class_names": self.class_names(config),
        }

    # ------------------------------------------------------------------------- model

    def model_config(self, config: Config) -> Dict[str, Any]:
        return self.create_model({"num_classes": config.data.num_classes, **config.model.to_dict()}).config()

    def create_model(self, model_config: Mapping[str, Any]) -> nn.Module:
        """MobileViTv2, or MobileViTv1 where the config says `family: "mobilevit"`."""
        fields = dict(model_config)
        family = fields.pop("family", "mobilevitv2")
        if family not in CLASSIFIERS:
            raise ConfigError(f"model family must be one of {tuple(CLASSIFIERS)}, got {family!r}")
        return CLASSIFIERS[family](**fields)

    # ------------------------------------------------------------------------- input

    def train_input(self, config: Config, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
        data_lib, spec = _dataset(config)
        d = config.data
        aug = data_lib.TrainAugmentation(
            crop_scale=tuple(d.crop_scale),
            flip=d.flip,
            randaugment=d.randaugment,
            randaugment_ops=d.randaugment_ops,
            randaugment_magnitude=d.randaugment_magnitude,
            erasing_prob=d.erasing_prob,
            on_device=augment_on(config) == "device",
        )
        stream = data_lib.labeled_train_stream(
            spec,
            d.train_split,
            image_size=d.image_size,
            augmentation=aug,
            **self.train_stream_args(config, start_step),
        )
        return data_lib.as_numpy(stream)

    def eval_input(self, config: Config, split: Optional[str] = None) -> Iterator[Dict[str, np.ndarray]]:
        data_lib, spec = _dataset(config)
        d = config.data
        batches = data_lib.labeled_eval_pass(
            spec,
            split or d.eval_split,
            image_size=d.image_size,
            resize_size=d.eval_resize_size,
            **self.eval_pass_args(config),
        )
        return data_lib.as_numpy(batches)

    # ------------------------------------------------------------------------- in the steps

    def inputs(self, batch: Mapping[str, Any]) -> jax.Array:
        return batch["image"]

    def prepare_batch(self, key: jax.Array, batch: Mapping[str, Any], config: Config) -> Tuple[jax.Array, jax.Array]:
        from mvit2_jax.data.mixing import mix_batch

        d = config.data
        images = batch["image"]
        if augment_on(config) == "device":
            from mvit2_jax.data.device_augment import augment

            k_aug, key = jax.random.split(key)
            images = augment(
                k_aug,
                images,
                randaugment=d.randaugment,
                num_ops=d.randaugment_ops,
                magnitude=d.randaugment_magnitude,
                erasing_prob=d.erasing_prob,
            )
        onehot = jax.nn.one_hot(batch["label"], d.num_classes)
        return mix_batch(
            key,
            images,
            onehot,
            mixup_alpha=d.mixup_alpha,
            cutmix_alpha=d.cutmix_alpha,
            prob=d.mix_prob,
            switch_prob=d.mix_switch_prob,
            label_smoothing=config.label_smoothing,
        )

    def loss(self, outputs: jax.Array, targets: jax.Array, config: Config) -> jax.Array:
        return optax.softmax_cross_entropy(outputs.astype(jnp.float32), targets).mean()

    def train_metrics(self, outputs: jax.Array, batch: Mapping[str, Any]) -> Dict[str, jax.Array]:
        labels = batch["label"]
        return {"top1": topk_correct(outputs, labels, 1).mean(), "top5": topk_correct(outputs, labels, 5).mean()}

    def eval_sums(self, outputs: jax.Array, batch: Mapping[str, Any], config: Config) -> Dict[str, jax.Array]:
        del config
        mask, labels = batch["mask"], batch["label"]
        logits = outputs.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "loss": (loss * mask).sum(),
            "top1": (topk_correct(logits, labels, 1) * mask).sum(),
            "top5": (topk_correct(logits, labels, 5) * mask).sum(),
        }

    def finalize(self, sums: Mapping[str, np.ndarray], count: float) -> Dict[str, float]:
        return {k: float(v) / max(count, 1.0) for k, v in sums.items()}


TASK = Classification()
