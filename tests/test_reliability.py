"""Preemption, crashes, corrupt checkpoints, non-finite steps, bad flags, concurrent runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mvit2_jax import load_model, train
from mvit2_jax.checkpoint import read_config
from test_train import ROOT, subprocess_env
from train_config import CLI_FLAGS, small_config


def cli(workdir, *extra):
    return [sys.executable, "-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--workdir={workdir}", *CLI_FLAGS, *extra]


def assert_same_weights(a_dir, b_dir):
    for ema in (False, True):
        a, b = load_model(str(a_dir), ema=ema)[1], load_model(str(b_dir), ema=ema)[1]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted epoch of the full digits train split (44 steps), in-process."""
    workdir = tmp_path_factory.mktemp("straight")
    train.train_and_evaluate(small_config(eval_split="test[:64]"), str(workdir))
    return workdir


def wait_for_checkpoint(proc, workdir: Path, step: int, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


def start_epoch_run(workdir: Path):
    """The straight run's config through the command line, checkpointing every 4 steps."""
    args = cli(workdir, "--config.data.eval_split=test[:64]", "--config.checkpoint_every_steps=4")
    proc = subprocess.Popen(args, env=subprocess_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return args, proc


def test_kill9_then_same_command_ends_identical_to_uninterrupted_run(straight_run, tmp_path):
    workdir = tmp_path / "run"
    args, proc = start_epoch_run(workdir)
    wait_for_checkpoint(proc, workdir, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args, env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from step" in done.stderr
    assert_same_weights(straight_run, workdir)


def test_sigterm_saves_the_current_step_and_exits_preempted(straight_run, tmp_path):
    workdir = tmp_path / "run"
    args, proc = start_epoch_run(workdir)
    wait_for_checkpoint(proc, workdir, 4)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == train.PREEMPTED_EXIT_CODE, log[-3000:]
    stopped = int(log.split("Preempted at step ")[1].split(":")[0])
    assert read_config(str(workdir))[1] == stopped and stopped < 44
    done = subprocess.run(args, env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and f"Resuming from step {stopped}" in done.stderr, done.stderr[-3000:]
    assert_same_weights(straight_run, workdir)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    config = small_config(train_split="train[:192]", eval_split="test[:64]")
    config.checkpoint_every_steps = 3
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    _, before = load_model(str(workdir), ema=False)
    files = sorted((workdir / "checkpoints" / "6" / "state").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)
    biggest = files[-1]
    if damage == "truncate":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        biggest.unlink()
    train.train_and_evaluate(config, str(workdir))  # resumes from step 3 and redoes 4..6
    assert "Checkpoint 6 is unreadable" in caplog.text
    assert [p.name.split("-")[0] for p in (workdir / "corrupt_checkpoints").iterdir()] == ["6"]
    _, after = load_model(str(workdir), ema=False)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)


def test_nonfinite_step_is_not_applied_and_counted():
    config = small_config(train_split="train[:192]")
    steps = train.compile_steps(config, num_steps=6)
    state = steps.init()
    before = jax.device_get(state.params)
    batch = next(train.train_input(config, 0))
    sharding = NamedSharding(steps.mesh, P("data"))
    poisoned = dict(batch, image=np.full_like(batch["image"], np.nan))
    state, metrics = steps.train(state, train.to_global(poisoned, sharding))
    assert float(metrics["skipped_update"]) == 1.0 and int(state.bad_steps) == 1 and int(state.step) == 1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(x, y)
    state, metrics = steps.train(state, train.to_global(batch, sharding))
    assert float(metrics["skipped_update"]) == 0.0 and int(state.bad_steps) == 0
    assert not np.array_equal(before["head"]["kernel"], jax.device_get(state.params["head"]["kernel"]))


def test_too_many_nonfinite_steps_stop_the_run_naming_the_steps():
    train.check_finite(2, 3, 10)
    with pytest.raises(train.NonFiniteError, match=r"3 consecutive steps \(steps 8 to 10\)"):
        train.check_finite(3, 3, 10)


def test_second_run_on_the_same_workdir_is_refused(tmp_path):
    with train.WorkdirLock(str(tmp_path)):
        with pytest.raises(ValueError, match="in use by a running job .*pid"):
            train.train_and_evaluate(small_config(train_split="train[:192]"), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model.alfa=1", "unknown config field 'alfa'"),
        ("--config.batch_size=abc", "invalid literal for int"),
        ("--config.data.dataset=no_such_dataset", "Unknown TFDS dataset 'no_such_dataset'"),
    ],
)
def test_config_errors_are_one_line_before_anything_compiles(tmp_path, flag, message):
    """Through the command line; every value check of validate_config is in test_train.py."""
    args = cli(tmp_path / "run", flag)
    proc = subprocess.run(args, env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and __import__("re").search(message, errors[0]), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
