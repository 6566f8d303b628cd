"""Shared test set-up: the compilation cache, the small training config, common fixtures.

Compiles dominate the suite's time on CPU. One persistent XLA compilation cache
(~/.cache/mvit2_jax/xla_tests, or $JAX_COMPILATION_CACHE_DIR) serves every session,
subprocesses and pytest-xdist workers included, so a function compiled once is loaded, not
compiled, the next time (measured: the fast tier 268 s cold, 148 s warm); in one process the engine also keeps its jitted
steps. The training tests all use `experiments/quickstart.py:smoke` (one config, one
compiled train step) with small overrides, and the reliability tests share one reference
run (`reference_run`) that each of them reproduces after an interruption.

Tiers: `python -m pytest -m "not slow" tests` is the fast tier for development; tests
marked slow (whole training runs, subprocesses, the notebook) run in the full suite. Both
run on two pytest-xdist workers (setup.cfg); the reference run's tests share a worker.
"""

import os
import sys
from pathlib import Path

_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mvit2_jax", "xla_tests"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
PARITY_WEIGHTS = FIXTURES / "mobilevitv2_050_parity.safetensors"
SMOKE_CONFIG = "experiments/quickstart.py:smoke"
SEG_SMOKE_CONFIG = "experiments/segmentation/quickstart.py:smoke"


def small_config(**data_overrides):
    """The smoke config (experiments/quickstart.py:smoke) with `config.data` overrides."""
    from experiments import quickstart

    config = quickstart.get_config("smoke")
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


def small_seg_config(**data_overrides):
    """The segmentation smoke config (experiments/segmentation/quickstart.py:smoke) with `config.data` overrides."""
    from experiments.segmentation import quickstart

    config = quickstart.get_config("smoke")
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


def subprocess_env(devices: int = 1, quick_compile: bool = False) -> dict:
    """The environment of a child Python: `devices` CPU devices, the repository importable.

    `quick_compile` lowers XLA's CPU backend optimization level: compiles take about 40%
    less time and steps run about 3x slower, the right trade for runs of a step or two."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if quick_compile:
        env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def main_cli(workdir, *extra) -> list:
    """`python -m mvit2_jax.main` on the smoke config in `workdir`, with extra flags."""
    return [sys.executable, "-m", "mvit2_jax.main", f"--config={SMOKE_CONFIG}", f"--workdir={workdir}", *extra]


# The reference run: the smoke config on the whole digits train split for 2 epochs (88
# steps of batch 32), evaluated on the whole test split, checkpointed every 22 steps. Its
# cosine schedule decays the rate to min_lr, and RandAugment is off (on 1,437 digits it slows
# learning, and each new input pipeline spends seconds tracing it): top-1 about 82%.
REFERENCE = {"data.train_split": "train", "data.eval_split": "test", "num_epochs": 2, "checkpoint_every_steps": 22,
             "optim.schedule": "cosine", "data.randaugment": False}
REFERENCE_FLAGS = [f"--config.{k}={v}" for k, v in REFERENCE.items()]


def quick_init(model, x, seed=0):
    """model.init, compiled on the CPU without backend optimization (as the engine does): it
    runs once, and compiles in less than half the time."""
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(model.init, compiler_options=options)(jax.random.key(seed), x)


def reference_config():
    config = small_config()
    for key, value in REFERENCE.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole training runs, subprocesses and the notebook (not in the fast tier)")
    if not hasattr(config, "workerinput"):  # the controller: prepare the digits once, before any worker
        from mvit2_jax.data import check_split, digit_scenes, digits

        check_split(digits.NAME, "train")
        check_split(digit_scenes.NAME, "train")


@pytest.fixture(name="small_config", scope="session")
def small_config_fixture():
    return small_config


@pytest.fixture(name="small_seg_config", scope="session")
def small_seg_config_fixture():
    return small_seg_config


@pytest.fixture(name="subprocess_env", scope="session")
def subprocess_env_fixture():
    return subprocess_env


@pytest.fixture(name="main_cli", scope="session")
def main_cli_fixture():
    return main_cli


@pytest.fixture(name="quick_init", scope="session")
def quick_init_fixture():
    return quick_init


@pytest.fixture(name="reference_flags", scope="session")
def reference_flags_fixture():
    return REFERENCE_FLAGS


@pytest.fixture(name="reference_config", scope="session")
def reference_config_fixture():
    return reference_config


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """(workdir, final metrics) of the reference run, trained in this process.

    Tests that use it must carry @pytest.mark.xdist_group("reference"), so that one worker
    trains it once."""
    from mvit2_jax import train

    workdir = tmp_path_factory.mktemp("reference")
    metrics = train.train_and_evaluate(reference_config(), str(workdir))
    return workdir, metrics


@pytest.fixture(scope="session")
def converted_050(tmp_path_factory) -> str:
    """The timm parity fixture (alpha 0.5, 1000 classes) converted to a model directory."""
    from mvit2_jax.convert import convert

    return convert(str(PARITY_WEIGHTS), str(tmp_path_factory.mktemp("converted") / "mobilevitv2_050"))
