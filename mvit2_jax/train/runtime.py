"""The run's surroundings: the device mesh, global batches and prefetch, the workdir lock,
preemption, and a checksum that shows every process holds the same weights."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding

from mvit2_jax.errors import EXIT_PREEMPTED, ConfigError


def make_mesh() -> jax.sharding.Mesh:
    """One "data" axis over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def to_global(batch: Dict[str, np.ndarray], sharding: NamedSharding) -> Dict[str, jax.Array]:
    """This process's batch -> global jax.Arrays split along the batch axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch(iterator: Iterator[Dict[str, np.ndarray]], sharding: NamedSharding, size: int) -> Iterator[Dict[str, jax.Array]]:
    """Transfer `size` batches ahead of the one being consumed."""
    queue = []
    for batch in iterator:
        queue.append(to_global(batch, sharding))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


class WorkdirLock:
    """An exclusive lock on WORKDIR/.lock (process 0), so two runs never share a workdir."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), ".lock")
        self.file = None

    def __enter__(self) -> "WorkdirLock":
        if jax.process_index() != 0:
            return self
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConfigError(
                f"{os.path.dirname(self.path)} is in use by a running job ({holder}): wait for it to end or choose another --workdir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with EXIT_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class PreemptionFlag:
    """Set by SIGTERM; agreed between processes so that every process stops at one step."""

    def __init__(self):
        in_main_thread = threading.current_thread() is threading.main_thread()
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handler) if in_main_thread else None

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self.raised = True

    def should_stop(self, mngr: ocp.CheckpointManager, step: int, check_peers: bool) -> bool:
        stop = self.raised or mngr.reached_preemption(step)
        if check_peers and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.process_allgather(np.asarray(stop)).any())
        return stop

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def params_checksum(params: Any) -> float:
    """Sum of |x| over this process's copy of `params`: equal on every process of a sound run."""
    total = 0.0
    for leaf in jax.tree.leaves(params):
        total += float(np.abs(np.asarray(leaf.addressable_data(0)).astype(np.float64)).sum())
    return total
