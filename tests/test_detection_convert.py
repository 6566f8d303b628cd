"""Official SSDLite weights: conversion and parity with the official model.

The fixture (tests/fixtures/make_detection_fixture.py, run against an ml-cvnets checkout)
holds the official SSDLite on MobileViTv2-0.5 for COCO (81 classes), its weights with random
BatchNorm statistics, and its raw outputs ("boxes" and "scores" of the official forward) and
anchors at 320x320 and 288x416.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvit2_jax import convert
from mvit2_jax.models import MobileViTv2SSD
from mvit2_jax.models import anchors as anchor_lib

FIXTURE_WEIGHTS = "tests/fixtures/detection_parity.safetensors"
FIXTURE_OUTPUTS = "tests/fixtures/detection_parity.npz"
SIZES = {"320": (320, 320), "288x416": (288, 416)}  # 288x416: odd sides (9x13) at stride 32
CLS_STEP = 5  # the fixture keeps the logits of every 5th anchor


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted by the command line, then loaded back."""
    from mvit2_jax import load_model
    from mvit2_jax.checkpoint import read_config

    dst = tmp_path_factory.mktemp("ssd") / "model"
    assert convert.main([FIXTURE_WEIGHTS, str(dst)]) == 0
    model, variables = load_model(str(dst))
    return model, variables, read_config(str(dst))[0]


def test_the_converted_ssd_records_what_rebuilds_it(converted):
    from mvit2_jax.data.label_names import COCO_CLASSES

    model, _, meta = converted
    assert isinstance(model, MobileViTv2SSD)
    assert (model.alpha, model.num_classes, tuple(model.proj_channels)) == (0.5, 81, (512, 256, 256, 128, 128, 64))
    assert meta["task"] == "detection" and meta["image_size"] == [320, 320]
    assert meta["class_names"] == COCO_CLASSES and meta["class_names"][1] == "person" and len(COCO_CLASSES) == 81


@pytest.mark.parametrize("size", list(SIZES))
def test_outputs_match_the_official_model(converted, size):
    model, variables, _ = converted
    ref = np.load(FIXTURE_OUTPUTS)
    image = jnp.asarray(ref[f"image_{size}"][None] / 255.0, jnp.float32)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, image)
    num_anchors = ref[f"loc_{size}"].shape[0]
    assert out["loc"].shape == (1, num_anchors, 4) and out["cls"].shape == (1, num_anchors, 81)
    np.testing.assert_allclose(np.asarray(out["loc"][0]), ref[f"loc_{size}"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out["cls"][0, ::CLS_STEP]), ref[f"cls_{size}"], atol=1e-4, rtol=0)
    assert np.abs(ref[f"cls_{size}"]).max() > 0.3 and np.abs(ref[f"loc_{size}"]).max() > 0.3  # not a trivial reference
    # The anchors, in the order of the outputs, are the official generator's.
    np.testing.assert_allclose(np.asarray(anchor_lib.ssd_anchors(*SIZES[size])), ref[f"anchors_{size}"], atol=1e-6)


def test_checkpoints_that_do_not_match_an_ssd_are_refused(tmp_path):
    from safetensors.numpy import save_file

    state = convert.load_state_dict(FIXTURE_WEIGHTS)
    assert convert.detect_scheme(list(state)) == "cvnets-detection"
    broken = {k: v for k, v in state.items() if not k.startswith("ssd_heads.5.")}
    with pytest.raises(convert.ConversionError, match=r"prediction heads \[0, 1, 2, 3, 4\]"):
        convert.convert_state_dict(broken)
    wrong = dict(state)
    wrong["extra_layers.os_64.pw_conv.block.conv.weight"] = np.zeros((256, 100, 1, 1), np.float32)
    with pytest.raises(convert.ConversionError, match=r"extra_layers.os_64.pw_conv.block.conv.weight.*got \(256, 100, 1, 1\), expected \(256, 256, 1, 1\)"):
        convert.convert_state_dict(wrong)
    path = tmp_path / "ssd.safetensors"
    save_file(state, str(path))
    with pytest.raises(Exception, match="divisible by 32"):
        convert.convert(str(path), str(tmp_path / "out"), image_size=300)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # Another class count and projections are read from the heads.
    fewer = {k: (v[: 6 * 25] if k.startswith("ssd_heads.") and ".pw_conv.block.conv." in k else v) for k, v in state.items()}
    fewer["ssd_heads.5.loc_cls_layer.block.conv.weight"] = state["ssd_heads.5.loc_cls_layer.block.conv.weight"][: 4 * 25]
    fewer["ssd_heads.5.loc_cls_layer.block.conv.bias"] = state["ssd_heads.5.loc_cls_layer.block.conv.bias"][: 4 * 25]
    model, variables = convert.convert_state_dict(fewer)
    assert model.num_classes == 21 and variables["params"]["head_0"]["loc_cls"]["pw"]["kernel"].shape == (1, 1, 512, 150)
    json.dumps(model.config())
