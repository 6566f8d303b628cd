"""Tasks: everything task-specific, one module per task; the engine (mvit2_jax.train) knows none.

A config's `task` field names its task; `get(name)` returns the task object (see base.Task
for what a task provides). Task modules are imported on first use.
"""

from __future__ import annotations

import importlib

from mvit2_jax.errors import ConfigError
from mvit2_jax.tasks.base import Task

TASKS = {
    "classification": "mvit2_jax.tasks.classification",
    "segmentation": "mvit2_jax.tasks.segmentation",
    "detection": "mvit2_jax.tasks.detection",
}


def get(name: str) -> Task:
    """The task called `name` (a config's `task` field)."""
    if name not in TASKS:
        raise ConfigError(f"config.task must be one of {tuple(TASKS)}, got {name!r}")
    return importlib.import_module(TASKS[name]).TASK


__all__ = ["TASKS", "Task", "get"]
