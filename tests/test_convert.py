"""Tests of mvit2_jax.convert: official checkpoints -> mvit2_jax model directories.

The parity fixture (tests/fixtures/make_parity_fixture.py) holds a timm mobilevitv2_050
state dict with random norm statistics and timm's logits for three input sizes, so these
tests need neither timm nor network access. Tests that write .pt files need torch. The live
comparison against timm for several widths is tests/fixtures/live_timm_parity.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from mvit2_jax.checkpoint import abstract_variables, load_model, read_config
from mvit2_jax.convert import (
    ConversionError,
    convert,
    convert_state_dict,
    load_state_dict,
    path_to_timm_key,
    timm_key_to_path,
)
from mvit2_jax.errors import ConfigError, DataError
from mvit2_jax.models import VARIANTS, MobileViTv2

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_WEIGHTS = FIXTURES / "mobilevitv2_050_parity.safetensors"
PARITY_LOGITS = FIXTURES / "mobilevitv2_050_parity.npz"
PARITY_SIZES = ("256", "224", "250x270")
TOLERANCE = 1e-4
TRANSFORMER_DEPTHS = {2: 2, 3: 4, 4: 3}  # timm stage -> attention layers


# --------------------------------------------------------------------------- helpers


def timm_to_cvnets(name: str) -> str:
    """timm key -> ml-cvnets key, written from the reference's table (section 5)."""

    def final_norm(m: re.Match) -> str:
        return f"layer_{int(m[1]) + 1}.1.global_rep.{TRANSFORMER_DEPTHS[int(m[1])]}.{m[2]}"

    rules = (
        (r"^stem\.conv\.", "conv_1.block.conv."),
        (r"^stem\.bn\.", "conv_1.block.norm."),
        (r"^head\.fc\.", "classifier.1."),
        (r"^stages\.(\d+)\.1\.norm\.(weight|bias)$", final_norm),
        (r"^stages\.(\d+)\.", lambda m: f"layer_{int(m[1]) + 1}."),
        (r"\.conv1_1x1\.conv\.", ".block.exp_1x1.block.conv."),
        (r"\.conv1_1x1\.bn\.", ".block.exp_1x1.block.norm."),
        (r"\.conv2_kxk\.conv\.", ".block.conv_3x3.block.conv."),
        (r"\.conv2_kxk\.bn\.", ".block.conv_3x3.block.norm."),
        (r"\.conv3_1x1\.conv\.", ".block.red_1x1.block.conv."),
        (r"\.conv3_1x1\.bn\.", ".block.red_1x1.block.norm."),
        (r"\.conv_kxk\.conv\.", ".local_rep.0.block.conv."),
        (r"\.conv_kxk\.bn\.", ".local_rep.0.block.norm."),
        (r"\.conv_1x1\.weight$", ".local_rep.1.block.conv.weight"),
        (r"\.transformer\.(\d+)\.norm1\.", r".global_rep.\1.pre_norm_attn.0."),
        (r"\.transformer\.(\d+)\.attn\.(qkv_proj|out_proj)\.", r".global_rep.\1.pre_norm_attn.1.\2.block.conv."),
        (r"\.transformer\.(\d+)\.norm2\.", r".global_rep.\1.pre_norm_ffn.0."),
        (r"\.transformer\.(\d+)\.mlp\.fc1\.", r".global_rep.\1.pre_norm_ffn.1.block.conv."),
        (r"\.transformer\.(\d+)\.mlp\.fc2\.", r".global_rep.\1.pre_norm_ffn.3.block.conv."),
        (r"\.conv_proj\.conv\.", ".conv_proj.block.conv."),
        (r"\.conv_proj\.bn\.", ".conv_proj.block.norm."),
    )
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def fake_timm_state_dict(alpha: float, num_classes: int = 1000) -> Dict[str, np.ndarray]:
    """A timm-named state dict of zeros, built from the model's own variable shapes."""
    abstract = abstract_variables(MobileViTv2(alpha=alpha, num_classes=num_classes))
    state: Dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key = path_to_timm_key(tuple(p.key for p in path))
        shape = tuple(leaf.shape)
        if len(shape) == 4:  # HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif key == "head.fc.weight":  # Linear
            shape = (shape[1], shape[0])
        elif len(shape) == 2:  # 1x1 convs of the transformer
            shape = (shape[1], shape[0], 1, 1)
        state[key] = np.zeros(shape, np.float32)
        if key.endswith(".running_mean"):
            state[key.replace("running_mean", "num_batches_tracked")] = np.zeros((), np.int64)
    return state


def flat(variables) -> Dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def assert_same_variables(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].shape == fb[key].shape, key
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run(
        [sys.executable, "-m", "mvit2_jax.convert", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def timm_weights() -> Dict[str, np.ndarray]:
    return load_file(str(PARITY_WEIGHTS))


@pytest.fixture(scope="module")
def reference(timm_weights):
    """(model, variables) converted from the parity fixture's timm weights."""
    return convert_state_dict(timm_weights)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "mobilevitv2_050"
    assert convert(PARITY_WEIGHTS, dst) == str(dst)
    return dst


@pytest.fixture(scope="module")
def loaded(converted_dir):
    return load_model(str(converted_dir))


# --------------------------------------------------------------------------- (a) parity


def test_converted_config(converted_dir, loaded):
    config, _, _ = read_config(str(converted_dir))
    assert config["model"]["alpha"] == 0.5
    assert config["model"]["num_classes"] == 1000
    assert config["image_size"] == [256, 256]
    assert config["source"] == str(PARITY_WEIGHTS)
    model, _ = loaded
    assert (model.alpha, model.num_classes) == (0.5, 1000)


@pytest.mark.parametrize("size", PARITY_SIZES)
def test_logits_match_timm(loaded, size):
    model, variables = loaded
    data = np.load(PARITY_LOGITS)
    images, expected = data[f"images_{size}"], data[f"logits_{size}"]
    logits = np.asarray(jax.jit(model.apply)(variables, images))
    assert logits.shape == expected.shape == (2, 1000)
    diff = np.abs(logits - expected).max()
    assert diff < TOLERANCE, f"{size}: max |jax - timm| = {diff:.3g}"


def test_loaded_variables_equal_converted(loaded, reference):
    assert_same_variables(loaded[1], reference[1])


# --------------------------------------------------------------------------- (b) cvnets names


def test_cvnets_pt_gives_identical_variables(tmp_path, timm_weights, reference):
    torch = pytest.importorskip("torch")
    cvnets = {timm_to_cvnets(k): torch.from_numpy(np.array(v)) for k, v in timm_weights.items()}
    assert not any(k.startswith(("stem.", "stages.", "head.")) for k in cvnets)
    path = tmp_path / "mobilevitv2-0.5.pt"
    torch.save(cvnets, path)
    model, variables = convert_state_dict(load_state_dict(path))
    assert (model.alpha, model.num_classes) == (0.5, 1000)
    assert_same_variables(variables, reference[1])


def test_wrapped_torch_checkpoint(tmp_path, timm_weights, reference):
    torch = pytest.importorskip("torch")
    inner = {f"module.{k}": torch.from_numpy(np.array(v)) for k, v in timm_weights.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model": {"state_dict": inner}}, path)
    _, variables = convert_state_dict(load_state_dict(path))
    assert_same_variables(variables, reference[1])


def test_bfloat16_torch_checkpoint_is_read_as_float32(tmp_path, timm_weights):
    torch = pytest.importorskip("torch")
    path = tmp_path / "half.bin"
    torch.save({"stem.conv.weight": torch.from_numpy(timm_weights["stem.conv.weight"]).bfloat16()}, path)
    loaded = load_state_dict(path)
    assert loaded["stem.conv.weight"].dtype == np.float32
    np.testing.assert_allclose(loaded["stem.conv.weight"], timm_weights["stem.conv.weight"], rtol=1e-2, atol=1e-2)


def _training_checkpoint(torch, timm_weights, ema: bool) -> dict:
    """A cvnets training checkpoint (utils/checkpoint_utils.get_training_state's layout): raw
    weights are half the fixture's, the EMA weights the fixture's."""
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in timm_weights.items()}
    state = {
        "iterations": 1200, "epoch": 3, "best_metric": 61.5,
        "model_state_dict": {k: v * 0.5 if v.is_floating_point() else v for k, v in tensors.items()},
        "optim_state_dict": {"state": {0: {"step": torch.tensor(1200.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.001, "params": [0]}]},
        "gradient_scaler_state_dict": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
    }
    if ema:
        state["ema_state_dict"] = tensors
    return state


def test_cvnets_training_checkpoint_converts_its_ema_weights_by_default_and_raw_by_flag(tmp_path, timm_weights, reference, capsys):
    torch = pytest.importorskip("torch")
    from mvit2_jax.convert import main

    path = tmp_path / "training_checkpoint_last.pt"
    torch.save(_training_checkpoint(torch, timm_weights, ema=True), path)
    assert main([str(path), str(tmp_path / "ema")]) == 0
    assert "the training checkpoint's EMA weights" in capsys.readouterr().out
    assert read_config(str(tmp_path / "ema"))[0]["weights"] == "ema"
    assert_same_variables(load_model(str(tmp_path / "ema"))[1], reference[1])

    convert(path, tmp_path / "raw", weights="raw")
    raw = load_model(str(tmp_path / "raw"))[1]
    assert read_config(str(tmp_path / "raw"))[0]["weights"] == "raw"
    np.testing.assert_array_equal(raw["params"]["stem"]["conv"]["kernel"], reference[1]["params"]["stem"]["conv"]["kernel"] * np.float32(0.5))

    # A run without EMA: its raw weights by default, said so; EMA asked for explicitly is an error.
    no_ema = tmp_path / "no_ema.pt"
    torch.save(_training_checkpoint(torch, timm_weights, ema=False), no_ema)
    convert(no_ema, tmp_path / "no_ema")
    assert read_config(str(tmp_path / "no_ema"))[0]["weights"] == "raw"
    with pytest.raises(DataError, match="without EMA weights .*--weights raw"):
        convert(no_ema, tmp_path / "refused", weights="ema")
    with pytest.raises(ConfigError, match="applies to training checkpoints"):
        convert(PARITY_WEIGHTS, tmp_path / "refused", weights="raw")
    assert not (tmp_path / "refused").exists()


def test_a_file_in_an_unknown_layout_is_refused_with_its_top_level_keys(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "mystery.pt"
    torch.save({"epoch": 3, "net_weights": [torch.zeros(2)], "config": {"lr": 0.1}}, path)
    with pytest.raises(ConversionError, match="top-level keys are 'epoch', 'net_weights', 'config'"):
        load_state_dict(path)


def test_the_command_says_which_resolution_it_recorded(tmp_path, capsys):
    from mvit2_jax.convert import main

    assert main([str(PARITY_WEIGHTS), str(tmp_path / "a")]) == 0
    assert "classification, MobileViTv2-0.5, 1000 classes, image size 256x256 recorded" in capsys.readouterr().out
    assert main([str(PARITY_WEIGHTS), str(tmp_path / "b"), "--image-size", "384"]) == 0
    assert "image size 384x384 recorded" in capsys.readouterr().out
    assert read_config(str(tmp_path / "b"))[0]["image_size"] == [384, 384]


# --------------------------------------------------------------------------- (c) pickles


class _CodeRunningPayload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_running_pickle_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"stem.conv.weight": _CodeRunningPayload(str(marker))}, path)
    with pytest.raises(DataError, match="refusing to load") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing to load"):
        convert(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_torch_missing_gives_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=re.escape('pip install "mvit2_jax[convert]"')):
        load_state_dict(path)


@pytest.mark.slow  # a subprocess
def test_package_does_not_import_torch():
    code = (
        "import sys, mvit2_jax, mvit2_jax.models, mvit2_jax.checkpoint, mvit2_jax.convert\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- (d) mismatches


def test_missing_key_is_listed(timm_weights):
    state = dict(timm_weights)
    del state["stages.3.1.transformer.2.attn.out_proj.bias"]
    with pytest.raises(ConversionError, match="missing") as info:
        convert_state_dict(state)
    assert "stages.3.1.transformer.2.attn.out_proj.bias (96,)" in str(info.value)


def test_unexpected_key_is_listed(timm_weights):
    state = dict(timm_weights)
    state["stages.3.1.extra.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ConversionError, match="unexpected") as info:
        convert_state_dict(state)
    assert "stages.3.1.extra.weight" in str(info.value)


def test_wrong_shape_is_listed(timm_weights):
    state = dict(timm_weights)
    state["stages.4.1.transformer.0.mlp.fc1.weight"] = np.zeros((256, 128, 3, 3), np.float32)
    with pytest.raises(ConversionError, match="wrong shape") as info:
        convert_state_dict(state)
    message = str(info.value)
    assert "stages.4.1.transformer.0.mlp.fc1.weight: got (256, 128, 3, 3), expected (256, 128, 1, 1)" in message


def test_all_differences_in_one_error(timm_weights):
    state = {timm_to_cvnets(k): v for k, v in timm_weights.items()}
    del state["layer_4.1.global_rep.2.pre_norm_ffn.0.weight"]
    state["layer_4.1.global_rep.9.something.weight"] = np.zeros(3, np.float32)
    state["classifier.1.bias"] = np.zeros(999, np.float32)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state)
    message = str(info.value)
    assert "cvnets names" in message
    assert "stages.3.1.transformer.2.norm2.weight" in message  # missing, in timm's naming
    assert "layer_4.1.global_rep.9.something.weight" in message  # unexpected, as given
    assert "classifier.1.bias (timm name head.fc.bias): got (999,), expected (1000,)" in message
    assert "head.fc.bias (1000,)" not in message  # present with a wrong shape, so not "missing"
    assert "1 missing" in message and "1 unexpected" in message and "1 wrong shape" in message


def test_unknown_naming_scheme():
    with pytest.raises(ConversionError, match="naming scheme"):
        convert_state_dict({"encoder.weight": np.zeros(3, np.float32)})


def test_missing_width_key(timm_weights):
    state = dict(timm_weights)
    del state["stages.2.1.conv_1x1.weight"]
    with pytest.raises(ConversionError, match=re.escape("stages.2.1.conv_1x1.weight")):
        convert_state_dict(state)


# --------------------------------------------------------------------------- (e) detection


def test_the_name_table_goes_both_ways(timm_weights):
    """Every key of a real timm state dict maps to a Flax path and back to itself."""
    keys = [k for k in timm_weights if not k.endswith("num_batches_tracked")]
    assert len(keys) == 269 - 25  # 25 BatchNorms each have a num_batches_tracked
    for key in keys:
        path = timm_key_to_path(key, timm_weights[key].ndim)
        assert path[0] in ("params", "batch_stats") and path_to_timm_key(path) == key
    assert timm_key_to_path("stages.2.1.transformer.0.mlp.fc1.weight", 4) == ("params", "stages_2_1", "transformer_0", "fc1", "kernel")
    assert timm_key_to_path("head.fc.bias", 1) == ("params", "head", "bias")


@pytest.mark.parametrize("alpha", sorted(VARIANTS))
def test_alpha_detection(alpha):
    state = fake_timm_state_dict(alpha)
    assert len(state) == 269
    model, variables = convert_state_dict(state)
    assert (model.alpha, model.num_classes) == (alpha, 1000)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract_variables(model))


def test_alpha_detection_cvnets_names():
    state = {timm_to_cvnets(k): v for k, v in fake_timm_state_dict(1.5).items()}
    model, _ = convert_state_dict(state)
    assert (model.alpha, model.num_classes) == (1.5, 1000)


def test_num_classes_detection():
    model, variables = convert_state_dict(fake_timm_state_dict(0.75, num_classes=10))
    assert (model.alpha, model.num_classes) == (0.75, 10)
    assert variables["params"]["head"]["kernel"].shape == (384, 10)


def test_non_standard_alpha_from_layer5():
    model, _ = convert_state_dict(fake_timm_state_dict(0.25))
    assert model.alpha == 0.25


def test_inconsistent_widths_are_refused():
    state = fake_timm_state_dict(1.0)
    state["stem.conv.weight"] = np.zeros((24, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError, match="no width multiplier"):
        convert_state_dict(state)


# --------------------------------------------------------------------------- (g) CLI, paths


@pytest.mark.slow  # a subprocess
def test_cli_converts_and_refuses_non_empty_destination(tmp_path, reference):
    dst = tmp_path / "model"
    result = run_cli(str(PARITY_WEIGHTS), str(dst), "--image-size", "320")
    assert result.returncode == 0, result.stderr
    assert str(dst) in result.stdout
    config, _, _ = read_config(str(dst))
    assert config["image_size"] == [320, 320]
    assert_same_variables(load_model(str(dst))[1], reference[1])

    again = run_cli(str(PARITY_WEIGHTS), str(dst))
    assert again.returncode == 2
    assert "not an empty directory" in again.stderr and str(dst) in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow  # a subprocess
def test_cli_bad_source(tmp_path):
    src = tmp_path / "no_such_checkpoint.safetensors"
    result = run_cli(str(src), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "checkpoint not found" in result.stderr and str(src) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_api_refuses_non_empty_destination(tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "file.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an empty directory"):
        convert(PARITY_WEIGHTS, dst)
    assert (dst / "file.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError):
        convert(PARITY_WEIGHTS, a_file)


def test_api_bad_source(tmp_path):
    with pytest.raises(DataError, match="checkpoint not found"):
        convert(tmp_path / "missing.pt", tmp_path / "out")
    with pytest.raises(DataError, match="directory"):
        load_state_dict(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="safetensors"):
        load_state_dict(garbage)


def test_empty_destination_and_384_default(tmp_path):
    src = tmp_path / "mobilevitv2_050_in22k_ft_384.safetensors"
    src.symlink_to(PARITY_WEIGHTS)
    dst = tmp_path / "empty"
    dst.mkdir()
    convert(src, dst)
    config, _, _ = read_config(str(dst))
    assert config["image_size"] == [384, 384]
