"""The training system: config checks, sharding invariance, multi-process, exact resume, learning.

All runs use the digits (built offline from scikit-learn) at 32x32 with alpha 0.5 and one
shared config (tests/train_config.py), so one compile serves most tests.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mvit2_jax import load_model, train
from mvit2_jax.checkpoint import read_config
from train_config import small_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def subprocess_env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return env


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.alpha", 0.0, "alpha must be > 0"),
        ("model.attention", "performer", "attention must be one of"),
        ("data.image_size", 16, "at least 32"),
        ("batch_size", 30, "divisible by the 4 devices"),
        ("grad_accum_steps", 3, "divisible by config.grad_accum_steps"),
        ("optim.name", "lamb", "adamw"),
        ("ema_decay", 1.0, "ema_decay"),
    ],
)
def test_bad_config_is_one_clear_line(field, value, message):
    config = small_config()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=message) as err:
        train.validate_config(config, device_count=4, process_count=1)
    assert "\n" not in str(err.value)


def test_learning_rate_schedule_warms_up_then_decays_to_min_lr():
    config = small_config()
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 10
    schedule = train.learning_rate_schedule(config, 100)
    o = config.optim
    assert float(schedule(0)) == pytest.approx(o.warmup_init_lr, rel=1e-3)
    assert float(schedule(10)) == pytest.approx(o.lr, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(o.min_lr, rel=1e-3)
    assert float(schedule(5)) < float(schedule(10)) and float(schedule(60)) < float(schedule(20))


def test_weight_decay_skips_one_dimensional_parameters():
    mask = train.decay_mask({"kernel": np.zeros((3, 3)), "bias": np.zeros(3), "scale": np.zeros(3)})
    assert mask == {"kernel": True, "bias": False, "scale": False}


# ----------------------------------------------------------------------------- sharding


def run_probe(tmp_path, devices: int, num_steps: int = 2) -> dict:
    out = tmp_path / f"probe_{devices}.npz"
    proc = subprocess.run(
        [sys.executable, str(TESTS / "train_probe.py"), str(out), str(num_steps)],
        env=subprocess_env(devices), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_step_on_one_device_equals_step_on_four(tmp_path):
    one, four = run_probe(tmp_path, 1), run_probe(tmp_path, 4)
    assert int(one.pop("device_count")) == 1 and int(four.pop("device_count")) == 4
    assert one.keys() == four.keys()
    for key in one:  # params and BatchNorm statistics (over the global batch) alike
        np.testing.assert_allclose(one[key], four[key], rtol=2e-4, atol=2e-5, err_msg=key)


# ----------------------------------------------------------------------------- resume and learning


def test_resume_equals_uninterrupted_run(tmp_path):
    config = small_config(train_split="train[:192]", eval_split="test[:100]")
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after_steps=3)
    assert read_config(str(tmp_path / "resumed"))[1] == 3
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    for ema in (False, True):
        _, a = load_model(str(tmp_path / "straight"), ema=ema)
        _, b = load_model(str(tmp_path / "resumed"), ema=ema)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """A short quickstart run on the full digits split: 3 epochs of batch 32 (132 steps)."""
    workdir = tmp_path_factory.mktemp("quickstart")
    config = small_config()
    config.num_epochs = 3
    config.optim.schedule = "cosine"  # decays to min_lr: 60% after 3 epochs (constant lr: 28%)
    config.log_every_steps = 20
    config.checkpoint_every_steps = 1000
    metrics = train.train_and_evaluate(config, str(workdir))
    return workdir, metrics


def test_short_quickstart_run_learns(learned_run):
    workdir, metrics = learned_run
    assert metrics["num_examples"] == 360
    assert metrics["top1"] > 0.5  # chance is 0.1
    assert (workdir / "checkpoints").is_dir()
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard log"


def test_load_model_reads_a_training_workdir(learned_run):
    workdir, _ = learned_run
    model, raw = load_model(str(workdir), ema=False)
    _, ema = load_model(str(workdir), ema=True)
    assert model.num_classes == 10 and model.alpha == 0.5
    assert not np.allclose(raw["params"]["head"]["kernel"], ema["params"]["head"]["kernel"])
    assert read_config(str(workdir))[0]["class_names"] == [str(i) for i in range(10)]


def test_eval_mode_evaluates_the_latest_checkpoint(learned_run):
    workdir, metrics = learned_run
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--workdir={workdir}",
         "--mode=eval", "--config.batch_size=32", "--config.eval_batch_size=64"],
        env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("ema_loss=")][-1]
    printed = dict(kv.split("=") for kv in line.split())
    assert float(printed["top1"]) == pytest.approx(metrics["top1"], abs=1e-6)
    assert float(printed["ema_top1"]) == pytest.approx(metrics["ema_top1"], abs=1e-6)


def test_eval_mode_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--workdir={tmp_path}", "--mode=eval"],
        env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2 and "no checkpoint in" in proc.stderr


# ----------------------------------------------------------------------------- fine-tuning

FIXTURE = TESTS / "fixtures" / "mobilevitv2_050_parity.safetensors"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The timm parity fixture (alpha 0.5, 1000 classes) converted to a model directory."""
    from mvit2_jax.convert import convert

    return convert(str(FIXTURE), str(tmp_path_factory.mktemp("converted") / "mvit2_050"))


def test_init_from_restores_backbone_and_reinitializes_new_head(converted):
    config = small_config()
    config.init_from = converted
    steps = train.compile_steps(config, num_steps=6)
    fresh = steps.init()
    state = train.init_from_pretrained(fresh, config, steps.mesh)
    _, source = load_model(converted)
    assert source["params"]["head"]["kernel"].shape == (256, 1000)
    assert state.params["head"]["kernel"].shape == (256, 10)
    np.testing.assert_array_equal(state.params["head"]["kernel"], fresh.params["head"]["kernel"])
    for part in ("params", "batch_stats"):
        src = dict(jax.tree_util.tree_flatten_with_path(source[part])[0])
        got = jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]
        backbone = [(k, v) for k, v in got if "head" not in jax.tree_util.keystr(k)]
        assert len(backbone) == len(src) - (2 if part == "params" else 0)
        for key, value in backbone:
            np.testing.assert_array_equal(value, src[key], err_msg=jax.tree_util.keystr(key))
    np.testing.assert_array_equal(state.ema_params["stem"]["conv"]["kernel"], source["params"]["stem"]["conv"]["kernel"])


@pytest.mark.parametrize("field, value", [("alpha", 0.75), ("attention", "mha")])
def test_init_from_a_different_model_is_a_clear_error(converted, field, value):
    config = small_config()
    config.init_from = converted
    config.model[field] = value
    with pytest.raises(ValueError, match=f"holds a {field}=.*config.model.{field}="):
        train.init_from_pretrained(None, config, None)


def test_frozen_backbone_and_backbone_lr_scale():
    import optax

    params = {"head": {"kernel": np.ones((2, 2))}, "stem": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}}
    grads = jax.tree.map(np.ones_like, params)
    config = small_config()
    config.optim.name, config.optim.weight_decay = "sgd", 0.0
    updates = {}
    for name, freeze, scale in (("plain", False, 1.0), ("frozen", True, 1.0), ("slow", False, 0.1)):
        config.freeze_backbone, config.optim.backbone_lr_scale = freeze, scale
        tx = train.create_optimizer(config, optax.constant_schedule(1.0))
        updates[name] = tx.update(grads, tx.init(params), params)[0]
    np.testing.assert_allclose(updates["frozen"]["head"]["kernel"], updates["plain"]["head"]["kernel"])
    assert not np.any(updates["frozen"]["stem"]["kernel"]) and not np.any(updates["frozen"]["stem"]["bias"])
    np.testing.assert_allclose(updates["slow"]["stem"]["kernel"], 0.1 * updates["plain"]["stem"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(updates["slow"]["head"]["kernel"], updates["plain"]["head"]["kernel"])


def test_finetuning_a_converted_checkpoint_learns_the_digits(converted, tmp_path):
    config = small_config()
    config.init_from = converted
    config.num_epochs = 3
    config.checkpoint_every_steps = 1000
    metrics = train.train_and_evaluate(config, str(tmp_path / "ft"))
    assert metrics["top1"] > 0.3  # chance is 0.1


def test_eval_mode_evaluates_a_converted_checkpoint(converted, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--checkpoint={converted}",
         "--mode=eval", "--config.eval_batch_size=64", "--config.data.dataset=imagenet2012"],
        env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    # No ImageNet here: the run stops with the data error before compiling anything.
    assert proc.returncode == 2 and "ILSVRC2012_img_val.tar" in proc.stderr


def test_training_on_an_image_folder_with_a_corrupt_file(tmp_path):
    """A folder with one sub-folder per class trains by path; a corrupt file is skipped and named."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from mvit2_jax.data import skipped_files

    digits = load_digits()
    root = tmp_path / "digits_folder"
    for c in range(10):
        (root / f"digit_{c}").mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(digits.target == c)[:12]):
            Image.fromarray((digits.images[idx] * 255 / 16).astype(np.uint8)).save(root / f"digit_{c}" / f"{i}.png")
    (root / "digit_3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = small_config(dataset=str(root), train_split="train", eval_split="validation", data_dir=str(tmp_path / "tfds"))
    config.checkpoint_every_steps = 1000
    metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["num_examples"] == 12  # 10% of the 120 readable images
    assert list(skipped_files(str(root), str(tmp_path / "tfds"))) == ["digit_3/broken.png"]
    assert read_config(str(tmp_path / "run"))[0]["class_names"] == [f"digit_{c}" for c in range(10)]
