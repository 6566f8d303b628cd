"""What a task gives the engine: the task-specific half of training and evaluation.

The engine (mvit2_jax.train) owns the train state, optimizer, steps, loop, mesh, input
prefetch, checkpoints and reliability; it calls these hooks and nothing else that knows
about the task. Hooks that run inside the jitted steps (`prepare_batch`, `loss`,
`train_metrics`, `eval_sums`) must be pure jnp functions; eval sums must be additive over
batches (the engine sums them over the whole split and then calls `finalize`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Protocol, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvit2_jax.errors import ConfigError

Config = ml_collections.ConfigDict
Batch = Dict[str, Any]
LossOut = Union[jax.Array, Tuple[jax.Array, Dict[str, jax.Array]]]
MIN_IMAGE_SIZE = 32  # the network's total stride


class Task(Protocol):
    name: str
    best_metric: str  # the eval metric (higher is better) that picks the best checkpoint
    head_prefixes: Tuple[str, ...]  # parameter path prefixes of the task head (not the backbone)

    # --- configuration and data, before anything compiles
    def check_config(self, config: Config) -> None:
        """Raise ConfigError (one line) for task fields that cannot run."""

    def check_data(self, config: Config, splits: Optional[Sequence[str]] = None) -> None:
        """Raise DataError / ConfigError for the dataset, its splits (train and eval by
        default) and labels."""

    def run_meta(self, config: Config) -> Dict[str, Any]:
        """What predict/export need besides the model: image size, preprocessing, class names."""

    # --- the model
    def model_config(self, config: Config) -> Dict[str, Any]:
        """The model's constructor arguments from a run config (recorded with checkpoints)."""

    def create_model(self, model_config: Mapping[str, Any]) -> nn.Module:
        """The model from `model_config` (a run's or a checkpoint's)."""

    def init_inputs(self, config: Config) -> jax.Array:
        """A dummy input batch for model.init."""

    def check_pretrained(self, source: Mapping[str, Any], config: Config, path: str) -> None:
        """Raise ConfigError when init_from's model (`source` config) cannot start this run's."""

    def config_from_checkpoint(self, config: Config, model_config: Mapping[str, Any]) -> Config:
        """`config` with the model fields of a checkpoint to evaluate."""

    # --- input
    def train_input(self, config: Config, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
        """This process's train batches from `start_step` on (exactly resumable)."""

    def eval_input(self, config: Config, split: Optional[str]) -> Iterator[Dict[str, np.ndarray]]:
        """This process's share of an eval split, once, padded, with a "mask"."""

    # --- inside the jitted steps
    def inputs(self, batch: Batch) -> Any:
        """The model's input from an eval batch."""

    def prepare_batch(self, key: jax.Array, batch: Batch, config: Config) -> Tuple[Any, Any]:
        """(model input, loss targets) of a train batch, with on-device augmentation."""

    def loss(self, outputs: Any, targets: Any, config: Config) -> LossOut:
        """The mean loss of a (micro-)batch, or (that loss, {name: mean scalar}): the named
        parts (detection's location and classification losses) are logged with the train
        metrics, averaged over micro-batches, so that no hook computes the loss twice."""

    def train_metrics(self, outputs: Any, batch: Batch) -> Dict[str, jax.Array]:
        """Batch means logged during training."""

    def eval_sums(self, outputs: Any, batch: Batch, config: Config) -> Dict[str, jax.Array]:
        """Additive sums over the real (mask 1) examples of an eval batch."""

    def finalize(self, sums: Mapping[str, np.ndarray], count: float) -> Dict[str, float]:
        """Eval metrics from the sums over a whole split of `count` examples.

        A task whose metrics are not sums (detection's mAP) also defines
        `eval_examples(outputs, batch, config) -> {name: [B, ...] array}` (inside the eval
        step); the engine then gathers those arrays of every real example of the split on the
        host and calls `finalize(sums, count, examples={name: [N, ...] array})`."""


class ImageTask:
    """The hooks that every task on the MobileViTv2 family shares: square float images of
    config.data.image_size in, the backbone's identity (width, attention) required of
    `init_from`, the class count in config.data."""

    def check_backbone_config(self, config: Config) -> None:
        """The config checks of the backbone and the input size, as one-line ConfigErrors."""
        from mvit2_jax.models import KERNELS
        from mvit2_jax.models.mobilevitv2 import DTYPES
        from mvit2_jax.models.attention import check_attention

        from mvit2_jax.models import V1_VARIANTS

        m, d = config.model, config.data
        family = m.get("family", "mobilevitv2")
        if family == "mobilevit":
            if m.get("variant") not in V1_VARIANTS:
                raise ConfigError(f"config.model.variant must be one of {tuple(V1_VARIANTS)} (MobileViTv1 sizes), got {m.get('variant')!r}")
        elif family != "mobilevitv2":
            raise ConfigError(f"config.model.family must be 'mobilevitv2' or 'mobilevit' (v1), got {family!r}")
        elif not m.alpha > 0:
            raise ConfigError(f"config.model.alpha must be > 0 (a width multiplier such as 1.0), got {m.alpha}")
        try:
            check_attention(m.attention)
        except ConfigError as e:
            raise ConfigError(f"config.model.{e}") from None
        if m.dtype not in DTYPES:
            raise ConfigError(f"config.model.dtype must be one of {tuple(DTYPES)}, got {m.dtype!r}")
        if m.kernels not in KERNELS:
            raise ConfigError(f"config.model.kernels must be one of {KERNELS}, got {m.kernels!r}")
        if d.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"config.data.image_size must be at least {MIN_IMAGE_SIZE} (the network's stride), got {d.image_size}")

    def init_inputs(self, config: Config) -> jax.Array:
        size = config.data.image_size
        return jnp.zeros((1, size, size, 3), jnp.float32)

    def check_pretrained(self, source: Mapping[str, Any], config: Config, path: str) -> None:
        family = source.get("family", "mobilevitv2")
        if family != config.model.get("family", "mobilevitv2"):
            names = {"mobilevitv2": "a MobileViTv2", "mobilevit": "a MobileViTv1"}
            raise ConfigError(f"config.init_from={path} holds {names.get(family, family)} model but config.model describes "
                              f"{names.get(config.model.get('family', 'mobilevitv2'))} one: choose a config of the same family")
        for field in ("variant", "attention") if family == "mobilevit" else ("alpha", "attention"):
            if source[field] != config.model[field]:
                raise ConfigError(
                    f"config.init_from={path} holds a {field}={source[field]!r} model but config.model.{field}={config.model[field]!r}: "
                    f"set config.model.{field}={source[field]!r} or choose another checkpoint"
                )

    @staticmethod
    def train_stream_args(config: Config, start_step: int) -> Dict[str, Any]:
        """This process's arguments of the shared train stream (mvit2_jax.data.pipeline.train_stream)."""
        return dict(
            batch_size=config.batch_size // jax.process_count(),
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            shuffle_buffer=config.data.shuffle_buffer,
        )

    @staticmethod
    def eval_pass_args(config: Config) -> Dict[str, Any]:
        """This process's arguments of the shared eval pass (mvit2_jax.data.pipeline.eval_pass)."""
        return dict(batch_size=config.eval_batch_size // jax.process_count(), process_index=jax.process_index(), process_count=jax.process_count())

    def config_from_checkpoint(self, config: Config, model_config: Mapping[str, Any]) -> Config:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            if model_config.get("family", "mobilevitv2") != config.model.get("family", "mobilevitv2"):
                # Another family (a MobileViTv1 checkpoint, a MobileViTv2 config): its fields, not the config's.
                config.model = ml_collections.ConfigDict({k: v for k, v in model_config.items() if k != "num_classes"})
            for field, value in model_config.items():
                if field == "num_classes":
                    config.data.num_classes = value
                elif field in config.model:
                    config.model[field] = value
        return config
