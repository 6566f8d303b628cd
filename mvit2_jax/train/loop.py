"""The train loop and evaluation, for any task: cadences, checkpoints, resume, preemption.

Read top to bottom: checks, the run's record, evaluation, the loop. Everything a run writes
goes under its workdir: checkpoints/ (Orbax), TensorBoard events and the .lock file.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from mvit2_jax import allocator, checkpoint, hub, tasks
from mvit2_jax.errors import DataError
from mvit2_jax.tasks.base import Task
from mvit2_jax.train import checks
from mvit2_jax.train.runtime import PreemptionFlag, Preempted, WorkdirLock, params_checksum, prefetch
from mvit2_jax.train.state import TrainState, check_finite, upgrade_per_tensor_optimizer
from mvit2_jax.train.steps import Steps, compile_steps

Config = ml_collections.ConfigDict


def check_run(config: Config) -> Task:
    """Every check that can fail before anything compiles; returns the run's task."""
    task = tasks.get(config.task)
    checks.check_config(config, jax.device_count(), jax.process_count())
    task.check_config(config)
    task.check_data(config)
    return task


def num_train_steps(config: Config) -> int:
    from mvit2_jax.data import sources  # TensorFlow: imported when a run needs its data

    spec = sources.DatasetSpec.from_config(config.data)
    n = sources.num_examples(spec, config.data.train_split)
    per_epoch = sources.steps_per_epoch(n, config.batch_size)
    if per_epoch == 0:
        raise DataError(
            f"{config.data.dataset}[{config.data.train_split}] has {n} examples, fewer than config.batch_size={config.batch_size}: "
            "lower config.batch_size or use a larger split"
        )
    return config.num_epochs * per_epoch


def run_meta(config: Config, task: Task) -> Dict[str, Any]:
    """The record saved beside every checkpoint: what load_model, predict and export need."""
    return {
        "format": checkpoint.FORMAT,
        "task": task.name,
        "model": task.model_config(config),
        **task.run_meta(config),
        "config": config.to_dict(),
    }


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    steps: Steps, weights: Mapping[str, Any], config: Config, split: Optional[str] = None, progress: bool = False
) -> Dict[str, float]:
    """The task's metrics of each set of weights ({"": raw, "ema_": EMA}) over a whole split, once."""
    sharding = NamedSharding(steps.mesh, P("data"))
    batches = prefetch(steps.task.eval_input(config, split), sharding, config.prefetch)
    if progress and jax.process_index() == 0:
        import tqdm

        from mvit2_jax.data import sources

        spec = sources.DatasetSpec.from_config(config.data)
        n = sources.eval_steps(
            sources.num_examples(spec, split or config.data.eval_split), config.eval_batch_size // jax.process_count(), jax.process_count()
        )
        batches = tqdm.tqdm(batches, total=n, desc="eval", unit="batch")
    totals = None
    gathered: Dict[str, list] = {}  # per weight set, the real examples' arrays of each batch
    for batch in batches:
        sums = steps.eval(weights, batch)
        examples = sums.pop("examples", None)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if examples is not None:
            examples = jax.device_get(examples)
            real = np.asarray(examples["mask"]) > 0
            for name, arrays in examples["sets"].items():
                gathered.setdefault(name, []).append({k: np.asarray(v)[real] for k, v in arrays.items()})
    totals = jax.device_get(totals)
    count = float(totals["count"])
    out: Dict[str, float] = {}
    for prefix, sums in totals["sums"].items():  # metric names carry their weights' name: top1, ema_top1
        extra = {}
        if prefix in gathered:
            extra["examples"] = {k: np.concatenate([b[k] for b in gathered[prefix]]) for k in gathered[prefix][0]}
        out.update({prefix + k: v for k, v in steps.task.finalize(sums, count, **extra).items()})
    out["num_examples"] = count
    return out


def evaluate_checkpoint(config: Config, source: str, split: Optional[str] = None) -> Dict[str, float]:
    """Evaluate a checkpoint (a training workdir: raw and EMA; or a converted model) on a split.

    The model comes from the checkpoint's record; the data and preprocessing from `config`.
    """
    meta, weights = checkpoint.load_weight_sets(hub.local_path(source))
    task = tasks.get(meta["task"])
    config = task.config_from_checkpoint(config, meta["model"])  # a copy
    with config.unlocked():
        config.task = meta["task"]
    checks.check_config(config, jax.device_count(), jax.process_count())
    task.check_config(config)
    task.check_data(config, splits=[split or config.data.eval_split])
    steps = compile_steps(config, task, 1)
    weights = jax.device_put(weights, NamedSharding(steps.mesh, P()))
    return evaluate(steps, weights, config, split, progress=True)


# ----------------------------------------------------------------------------- the loop


def init_from_pretrained(state: TrainState, config: Config, task: Task, mesh: jax.sharding.Mesh) -> TrainState:
    """Start from config.init_from's weights: the same model family; new shapes re-initialized."""
    path = hub.local_path(config.init_from)
    source = checkpoint.read_config(path)[0]
    task.check_pretrained(source["model"], config, path)
    _, variables = checkpoint.load_model(path, ema=config.init_from_ema)
    params, fresh = checkpoint.merge_pretrained(state.params, variables["params"])
    batch_stats, fresh_stats = checkpoint.merge_pretrained(state.batch_stats, variables["batch_stats"])
    logging.info("Initialized from %s; re-initialized (not in the checkpoint or new shape): %s", path, ", ".join(fresh + fresh_stats) or "nothing")
    params, batch_stats = jax.device_put((params, batch_stats), NamedSharding(mesh, P()))
    copy = functools.partial(jax.tree.map, jnp.copy)  # distinct buffers: the train step donates the state
    return state.replace(params=params, batch_stats=batch_stats, ema_params=copy(params), ema_batch_stats=copy(batch_stats))


def abstract_state(steps: Steps) -> TrainState:
    replicated = NamedSharding(steps.mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(steps.init))


def restore_latest(mngr, steps: Steps) -> Optional[TrainState]:
    """The newest readable train state in `mngr` (None if none), also from checkpoints written
    with the per-tensor optimizer state of earlier releases."""
    abstract = abstract_state(steps)
    return checkpoint.restore_state(mngr, abstract, upgrade=upgrade_per_tensor_optimizer(abstract))


def train_and_evaluate(config: Config, workdir: str, stop_after_steps: Optional[int] = None) -> Dict[str, float]:
    """Train from the latest checkpoint in `workdir` (or from scratch); returns final eval metrics.

    `stop_after_steps` ends this invocation early (with a checkpoint) without changing the
    schedule, as a preemption would; running again continues the same run.
    """
    task = check_run(config)
    num_steps = num_train_steps(config)
    with WorkdirLock(workdir):
        return _train_loop(config, task, workdir, num_steps, stop_after_steps)


def _train_loop(config: Config, task: Task, workdir: str, num_steps: int, stop_after_steps: Optional[int]) -> Dict[str, float]:
    from clu import metric_writers, periodic_actions  # import TensorFlow (its summary writer)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    steps = compile_steps(config, task, num_steps)
    meta = run_meta(config, task)
    mngr = checkpoint.train_manager(workdir, keep=config.keep_checkpoints, best_metric=task.best_metric)
    on_cpu = all(d.platform == "cpu" for d in steps.mesh.devices.flat)
    state = restore_latest(mngr, steps)
    if state is None:
        state = steps.init()
        if on_cpu:
            allocator.release_compiled(steps.init)  # runs once: its program off the heap before the train step's
        if config.init_from:
            state = init_from_pretrained(state, config, task, steps.mesh)
        hparams = traverse_util.flatten_dict(config.to_dict(), sep=".")
        writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()})
        logging.info("Starting a new run in %s", workdir)
    else:
        logging.info("Resuming from step %d in %s", int(state.step), workdir)
    start = int(jax.device_get(state.step))
    if start == 0:
        parameter_overview.log_parameter_overview(state.params)

    sharding = NamedSharding(steps.mesh, P("data"))
    batches = prefetch(task.train_input(config, start), sharding, config.prefetch)
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps)
    flag = PreemptionFlag()
    history, t_log, eval_metrics, step = [], time.time(), {}, start
    # XLA:CPU allocates a step's temporaries when the step is dispatched: steps queued behind a
    # running one each hold their own (3 GiB at alpha 1.0, batch 16, 256x256) on fresh pages.
    # Dispatched ahead, 8 steps there took 4.2-5.5 s each with a peak RSS of 11-17 GB; one at a
    # time 2.5 s. On the CPU a step runs on all cores, so waiting for it costs nothing.
    # `python -m mvit2_jax.main` also runs CPU calls inline (allocator.run_cpu_computations_inline),
    # where the wait is already done; it matters where JAX dispatches asynchronously (notebooks).
    if start >= num_steps:
        logging.info("The run in %s is complete (step %d of %d): evaluating only", workdir, start, num_steps)
        eval_metrics = evaluate(steps, state.weight_sets(), config)
    try:
        for step in range(start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = steps.train(state, next(batches))
            if step == start + 1 or on_cpu:
                jax.block_until_ready(state)
            if step == start + 1:  # leave the compile out of the throughput numbers
                t_log = time.time()
            else:
                history.append(metrics)
            report(step)
            is_last = step == num_steps
            if (step % config.log_every_steps == 0 or is_last) and history:
                summary = {f"train/{k}": float(v) for k, v in jax.tree.map(lambda *x: np.mean(x), *jax.device_get(history)).items()}
                dt = time.time() - t_log
                summary["train/images_per_second"] = len(history) * config.batch_size / dt
                summary["train/images_per_second_per_device"] = summary["train/images_per_second"] / jax.device_count()
                summary["train/step_time_ms"] = 1000 * dt / len(history)
                writer.write_scalars(step, summary)
                history, t_log = [], time.time()
            evaluated = step % config.eval_every_steps == 0 or is_last
            if evaluated:
                eval_metrics = evaluate(steps, state.weight_sets(), config)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                t_log = time.time()
            if step % config.max_nonfinite_steps == 0 or step % config.log_every_steps == 0 or is_last:
                check_finite(int(jax.device_get(state.bad_steps)), config.max_nonfinite_steps, step)
            stopping = stop_after_steps is not None and step - start >= stop_after_steps
            preempted = flag.should_stop(mngr, step, check_peers=step % config.log_every_steps == 0)
            if evaluated or stopping or preempted or step % config.checkpoint_every_steps == 0:
                checkpoint.save_state(mngr, step, state, meta, eval_metrics if evaluated else None, force=stopping or preempted)
            if stopping:
                break
            if preempted:
                mngr.wait_until_finished()
                logging.warning("Preempted at step %d: checkpoint saved; run the same command to resume", step)
                raise Preempted(step)
    finally:
        mngr.wait_until_finished()
        writer.flush()
        flag.restore()
    mngr.close()
    logging.info("process %d params checksum %.12e at step %d", jax.process_index(), params_checksum(state.params), step)
    return eval_metrics
