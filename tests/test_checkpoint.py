"""Checkpoint I/O: the config record, directories written by the first release, weight sets.

tests/fixtures/v0_checkpoints.tar.gz was written by the first release's code (commit
ca59a9b, tests/fixtures/make_v0_checkpoints.py): a converted model directory and a training
workdir, with that code's logits on fixed images. Today's code must load both, migrating
their record, and give the same logits; and resume the old run.
"""

import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest

from mvit2_jax import load_model
from mvit2_jax.checkpoint import FORMAT, load_weight_sets, migrate_meta, read_config
from mvit2_jax.errors import ConfigError

ARCHIVE = Path(__file__).resolve().parent / "fixtures" / "v0_checkpoints.tar.gz"


@pytest.fixture(scope="module")
def v0(tmp_path_factory):
    root = tmp_path_factory.mktemp("v0")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root


def test_first_release_records_are_migrated(v0):
    for name in ("converted", "workdir"):
        meta = read_config(str(v0 / name))[0]
        assert meta["format"] == FORMAT and meta["task"] == "classification"
        assert meta["model"]["kernels"] == "auto" and "conv_impl" not in meta["model"]
        assert meta["model"]["alpha"] == 0.1 and meta["model"]["num_classes"] == 10
    config = read_config(str(v0 / "workdir"))[0]["config"]
    assert config["task"] == "classification" and config["model"]["kernels"] == "auto"


def test_conv_impl_values_map_to_kernels():
    for old, new in (("auto", "auto"), ("xla", "portable"), ("unrolled", "cpu")):
        assert migrate_meta({"model": {"alpha": 1.0, "conv_impl": old}})["model"]["kernels"] == new
    with pytest.raises(ConfigError, match="newer mvit2_jax"):
        migrate_meta({"format": FORMAT + 1, "model": {}})


@pytest.mark.parametrize("name, kwargs", [("converted", {}), ("workdir_raw", {"ema": False}), ("workdir_ema", {"ema": True})])
def test_first_release_directories_give_the_same_logits(v0, name, kwargs):
    reference = np.load(v0 / "logits.npz")
    model, variables = load_model(str(v0 / name.split("_")[0]), **kwargs)
    logits = np.asarray(jax.jit(model.apply)(variables, reference["images"]))
    np.testing.assert_allclose(logits, reference[name], rtol=1e-5, atol=1e-5)


def test_weight_sets_of_a_workdir_and_of_a_model_directory(v0):
    meta, sets = load_weight_sets(str(v0 / "workdir"))
    assert sorted(sets) == ["", "ema_"] and meta["task"] == "classification"
    _, raw = load_model(str(v0 / "workdir"), ema=False)
    for a, b in zip(jax.tree.leaves(sets[""]), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(a, b)
    _, sets = load_weight_sets(str(v0 / "converted"))
    assert sorted(sets) == [""]


def test_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint directory at"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="no checkpoint in"):
        read_config(str(tmp_path))


@pytest.mark.slow
def test_a_first_release_run_resumes(v0, tmp_path):
    """The old workdir's train state restores into today's engine, which trains on from step 2."""
    import shutil

    from experiments import quickstart
    from mvit2_jax import train

    workdir = tmp_path / "workdir"
    shutil.copytree(v0 / "workdir", workdir)
    config = quickstart.get_config()
    config.model.alpha = 0.1
    config.data.train_split, config.data.eval_split = "train[:64]", "test[:32]"
    config.batch_size, config.eval_batch_size, config.optim.warmup_steps = 32, 32, 1
    config.num_epochs = 2
    metrics = train.train_and_evaluate(config, str(workdir))
    assert read_config(str(workdir))[1] == 4 and metrics["num_examples"] == 32
    _, before = load_model(str(v0 / "workdir"), ema=False)
    _, after = load_model(str(workdir), ema=False)
    assert not np.array_equal(before["params"]["head"]["kernel"], after["params"]["head"]["kernel"])
