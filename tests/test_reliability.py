"""Preemption, crashes, corrupt checkpoints, non-finite steps, bad flags, concurrent runs,
and which errors are one line (exit 2) and which keep their traceback."""

import logging
import re
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mvit2_jax import load_model, tasks, train
from mvit2_jax.checkpoint import read_config
from mvit2_jax.errors import EXIT_PREEMPTED, ConfigError, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]


def assert_same_weights(a_dir, b_dir):
    for ema in (False, True):
        a, b = load_model(str(a_dir), ema=ema)[1], load_model(str(b_dir), ema=ema)[1]
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


def wait_for_checkpoint(proc, workdir: Path, step: int, timeout: float = 400) -> None:
    """Until the save of checkpoint `step` has begun (its directory, final or temporary, exists)."""
    deadline = time.time() + timeout
    while not any(p.name.split(".")[0] == str(step) for p in (workdir / "checkpoints").glob(f"{step}*")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_sigterm_then_kill9_then_rerun_ends_identical_to_the_uninterrupted_run(
    reference_run, reference_config, reference_flags, main_cli, subprocess_env, tmp_path
):
    """The reference run through the command line, preempted (SIGTERM: the current step is
    saved, exit 143), run again and killed (kill -9), run again: the same final weights."""
    reference, _ = reference_run
    workdir = tmp_path / "run"
    args = main_cli(workdir, *reference_flags)
    proc = subprocess.Popen(args, env=subprocess_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(proc, workdir, 22)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
    stopped = int(log.split("Preempted at step ")[1].split(":")[0])
    assert read_config(str(workdir))[1] == stopped and 22 <= stopped < 66

    # Killed while it writes its next periodic checkpoint.
    proc = subprocess.Popen(args, env=subprocess_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(proc, workdir, (stopped // 22 + 1) * 22)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=60)[0]
    assert f"Resuming from step {stopped}" in log, log[-3000:]

    # Running it again (here in-process, with the compiled steps of the reference run) finishes it.
    train.train_and_evaluate(reference_config(), str(workdir))
    assert read_config(str(workdir))[1] == 88
    assert_same_weights(reference, workdir)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
# Orbax abandons the pending array reads of an unreadable checkpoint (coroutines never awaited).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference_run, reference_config, tmp_path, caplog):
    """The reference run's last checkpoint truncated, then (after the rerun) deleted in part:
    each time it is quarantined and the run redoes its steps from the one before, to the same weights."""
    import shutil

    caplog.set_level(logging.INFO)
    reference, _ = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for damage in ("truncate", "delete"):
        files = sorted((workdir / "checkpoints" / "88" / "state").rglob("*"), key=lambda f: f.stat().st_size if f.is_file() else 0)
        biggest = files[-1]
        if damage == "truncate":
            biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
        else:
            biggest.unlink()
        caplog.clear()
        train.train_and_evaluate(reference_config(), str(workdir))  # resumes from step 66 and redoes 67..88
        assert "Checkpoint 88 is unreadable" in caplog.text and "Resuming from step 66" in caplog.text
        assert_same_weights(reference, workdir)
    assert sorted(p.name.split("-")[0] for p in (workdir / "corrupt_checkpoints").iterdir()) == ["88", "88"]


@pytest.mark.slow
def test_nonfinite_step_is_not_applied_and_counted(small_config):
    config = small_config()
    task = tasks.get(config.task)
    steps = train.compile_steps(config, task, num_steps=6)
    state = steps.init()
    before = jax.device_get(state.params)
    batch = next(task.train_input(config, 0))
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
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(steps 8 to 10\)"):
        train.check_finite(3, 3, 10)


def test_second_run_on_the_same_workdir_is_refused(tmp_path, small_config):
    with train.WorkdirLock(str(tmp_path)):
        with pytest.raises(ConfigError, match="in use by a running job .*pid"):
            train.train_and_evaluate(small_config(), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model.alfa=1", "unknown config field 'alfa'"),
        ("--config.batch_size=abc", "invalid literal for int"),
        pytest.param("--config.data.dataset=no_such_dataset", "Unknown TFDS dataset 'no_such_dataset'", marks=pytest.mark.slow),
        pytest.param("--config=experiments/base.py:0.6", r"requires config.optim.lr, .* \(this width has no paper recipe\)", marks=pytest.mark.slow),
        pytest.param("--config=experiments/transfer.py", r"requires config.init_from \(the checkpoint to start from", marks=pytest.mark.slow),
    ],
)
def test_config_errors_are_one_line_before_anything_compiles(tmp_path, main_cli, subprocess_env, flag, message):
    """Through the command line; every value check of the config is in test_train.py."""
    args = main_cli(tmp_path / "run", flag)
    if flag.startswith("--config="):  # another config file instead of the smoke config
        args = [a for a in args if not a.startswith("--config=")] + [flag]
    proc = subprocess.run(args, env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_bug_keeps_its_traceback(tmp_path, main_cli, subprocess_env):
    """A ValueError that is not a config or data error is a bug: it is not turned into one line."""
    bug = tmp_path / "sitecustomize.py"
    bug.write_text(
        "import mvit2_jax.tasks.classification as c\n"
        "def broken(self, config):\n"
        "    raise ValueError('a bug in the task')\n"
        "c.Classification.check_config = broken\n"
    )
    env = subprocess_env(1)
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = subprocess.run(main_cli(tmp_path / "run"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: a bug in the task" in proc.stderr
    assert "error: a bug" not in proc.stderr
