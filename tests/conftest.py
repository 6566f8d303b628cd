"""Shared test set-up: the compilation cache, the small training config, common fixtures.

Compiles dominate the suite's time on CPU. One persistent XLA compilation cache
(~/.cache/mvit2_jax/xla_tests, or $JAX_COMPILATION_CACHE_DIR) serves every session,
subprocesses and pytest-xdist workers included, so a function compiled once is loaded, not
compiled, the next time (measured: the fast tier 268 s cold, 148 s warm); in one process the engine also keeps its jitted
steps. The training tests all use `experiments/quickstart.py:smoke` (one config, one
compiled train step) with small overrides, and the reliability tests share one reference
run (`reference_run`) that each of them reproduces after an interruption.

Tiers: `python -m pytest -m "not slow" tests` is the fast tier for development (compiled at
XLA's lowest CPU optimization level, see pytest_configure); tests marked slow (whole training
runs, subprocesses, the notebook) run in the full suite. Both run on two pytest-xdist workers
(setup.cfg); the reference run's tests share a worker.
"""

import importlib.util
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
# steps of batch 32), evaluated on the whole test split, checkpointed every 22 steps, with
# RandAugment off (on 1,437 digits it slows learning, and each new input pipeline spends
# seconds tracing it): top-1 about 67%. It keeps the smoke config's constant learning rate,
# so its compiled train step is the smoke config's (the two differ only in the host loop and
# the input pipeline).
REFERENCE = {"data.train_split": "train", "data.eval_split": "test", "num_epochs": 2, "checkpoint_every_steps": 22,
             "data.randaugment": False}
REFERENCE_FLAGS = [f"--config.{k}={v}" for k, v in REFERENCE.items()]


def assert_boxes_apart(objects) -> None:
    """No two of a canvas's digit boxes (x0, y0, x1, y1, digit) overlap."""
    for a, (x0, y0, x1, y1, _) in enumerate(objects):
        for p0, q0, p1, q1, _ in objects[:a]:
            assert x1 <= p0 or p1 <= x0 or y1 <= q0 or q1 <= y0, f"boxes {objects[a][:4]} and {(p0, q0, p1, q1)} overlap"


def random_like(abstract, seed=0):
    """Non-trivial arrays shaped as the leaves of `abstract` (a tree of jax.ShapeDtypeStruct,
    from jax.eval_shape), made by NumPy, with no compile: kernels N(0, 1/fan_in), norm scales
    near 1, running variances in [0.5, 1.5], other floats (biases, means, optimizer moments)
    near 0, integers (steps, keys) 0. A compiled init spends most of its time on the random
    draws of every parameter (15-30 s on 2 cores for a whole model); this takes under a second."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = getattr(path[-1], "key", "") if path else "", leaf.shape
        if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            return jax.numpy.zeros(shape, leaf.dtype)
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1)), shape)
        elif name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=shape)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = 0.05 * rng.normal(size=shape)
        return jax.numpy.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def random_variables(module, *args, seed=0, **kwargs):
    """Variables of `module` laid out as `module.init(key, *args, **kwargs)` lays them out,
    filled by random_like (no compiled init)."""
    return random_like(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)), seed)


def reference_config():
    config = small_config()
    for key, value in REFERENCE.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole training runs, subprocesses and the notebook (not in the fast tier)")
    if config.getoption("markexpr", "") == "not slow" and "optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # The fast tier compiles at XLA's lowest CPU backend optimization level (before any
        # backend starts): the same results, compiles about 35% faster (measured: the tier
        # 234 s -> 177 s cold), steps slower, the right trade for tests of a call or two. The
        # full suite compiles as users' runs do.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    if not hasattr(config, "workerinput") and not _built_in_datasets_on_disk() and importlib.util.find_spec("tensorflow"):
        # the controller: prepare the digits once, before any worker (importing TensorFlow and
        # TFDS for it costs ~7 s before the workers start, so only when a dataset is missing;
        # should this check be wrong, a worker prepares it: TFDS writes it atomically; without
        # TensorFlow, as on a GPU machine that cannot install it, the data's tests fail alone)
        from mvit2_jax.data import check_split, digit_boxes, digit_scenes, digits

        for name in (digits.NAME, digit_scenes.NAME, digit_boxes.NAME):
            check_split(name, "train")


def _built_in_datasets_on_disk():
    """Whether TFDS's data directory holds a prepared version of each built-in dataset."""
    root = Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    names = ("mvit2_digits", "mvit2_digit_scenes", "mvit2_digit_boxes")
    return all(any(root.glob(f"{name}/*/dataset_info.json")) for name in names)


def pytest_collection_modifyitems(items):
    """The notebook runs last: its worker's xdist group ("notebook") runs the segmentation and
    detection end-to-end tests first, so the notebook's kernel loads their compiled steps (and
    those of the training tests, by then in the persistent cache) instead of compiling them."""
    items.sort(key=lambda item: item.path.name == "test_notebook.py")  # (a stable sort)


def _helper_fixture(name, value):
    """A session fixture that gives a test module this file's helper `value` (test modules
    take helpers as fixtures: none imports another)."""

    @pytest.fixture(name=name, scope="session")
    def fixture():
        return value

    return fixture


small_config_fixture = _helper_fixture("small_config", small_config)
small_seg_config_fixture = _helper_fixture("small_seg_config", small_seg_config)
subprocess_env_fixture = _helper_fixture("subprocess_env", subprocess_env)
main_cli_fixture = _helper_fixture("main_cli", main_cli)
random_variables_fixture = _helper_fixture("random_variables", random_variables)
random_like_fixture = _helper_fixture("random_like", random_like)
assert_boxes_apart_fixture = _helper_fixture("assert_boxes_apart", assert_boxes_apart)
reference_flags_fixture = _helper_fixture("reference_flags", REFERENCE_FLAGS)
reference_config_fixture = _helper_fixture("reference_config", reference_config)


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_basetemp(tmp_path_factory):
    """Python's temporary files of this process under pytest's base temporary directory
    (which pytest prunes to the last three sessions): TFDS's DatasetInfo makes an empty
    `tmp*tfds` directory in the system's for every builder of a dataset not yet prepared
    (mock data, image folders) and never removes it, about 50 per run of the fast tier."""
    import tempfile

    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = before


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
