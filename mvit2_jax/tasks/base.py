"""What a task gives the engine: the task-specific half of training and evaluation.

The engine (mvit2_jax.train) owns the train state, optimizer, steps, loop, mesh, input
prefetch, checkpoints and reliability; it calls these hooks and nothing else that knows
about the task. Hooks that run inside the jitted steps (`prepare_batch`, `loss`,
`train_metrics`, `eval_sums`) must be pure jnp functions; eval sums must be additive over
batches (the engine sums them over the whole split and then calls `finalize`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Protocol, Sequence, Tuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

Config = ml_collections.ConfigDict
Batch = Dict[str, Any]


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

    def loss(self, outputs: Any, targets: Any, config: Config) -> jax.Array:
        """The mean loss of a (micro-)batch."""

    def train_metrics(self, outputs: Any, batch: Batch) -> Dict[str, jax.Array]:
        """Batch means logged during training."""

    def eval_sums(self, outputs: Any, batch: Batch) -> Dict[str, jax.Array]:
        """Additive sums over the real (mask 1) examples of an eval batch."""

    def finalize(self, sums: Mapping[str, np.ndarray], count: float) -> Dict[str, float]:
        """Eval metrics from the sums over a whole split of `count` examples."""
