"""The training engine, for every task: state, optimizer, steps, loop, runtime.

    from mvit2_jax import train
    metrics = train.train_and_evaluate(config, workdir)

It knows no task: the config's `task` field picks one from mvit2_jax.tasks, which supplies
the model, the loss, the metrics and the input. Modules: state (TrainState, EMA, finite
guard), optim (schedules, parameter groups), steps (the jitted train and eval steps),
runtime (mesh, prefetch, lock, preemption), checks (engine config checks), loop (the loop,
evaluation, fine-tuning starts).
"""

from mvit2_jax.errors import EXIT_PREEMPTED, NonFiniteError
from mvit2_jax.train.checks import check_config
from mvit2_jax.train.loop import (
    check_run,
    evaluate,
    evaluate_checkpoint,
    init_from_pretrained,
    num_train_steps,
    run_meta,
    train_and_evaluate,
)
from mvit2_jax.train.optim import create_optimizer, decay_mask, learning_rate_schedule, param_groups
from mvit2_jax.train.runtime import Preempted, WorkdirLock, make_mesh, params_checksum, prefetch, to_global
from mvit2_jax.train.state import TrainState, check_finite
from mvit2_jax.train.steps import Steps, compile_steps, eval_step, train_step

__all__ = [
    "EXIT_PREEMPTED",
    "NonFiniteError",
    "Preempted",
    "Steps",
    "TrainState",
    "WorkdirLock",
    "check_config",
    "check_finite",
    "check_run",
    "compile_steps",
    "create_optimizer",
    "decay_mask",
    "eval_step",
    "evaluate",
    "evaluate_checkpoint",
    "init_from_pretrained",
    "learning_rate_schedule",
    "make_mesh",
    "num_train_steps",
    "param_groups",
    "params_checksum",
    "prefetch",
    "run_meta",
    "to_global",
    "train_and_evaluate",
    "train_step",
]
