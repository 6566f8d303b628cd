"""Segmentation models (DeepLabv3, PSPNet on MobileViTv2) and their official weights.

Parity: tests/fixtures/make_segmentation_fixture.py builds the official ml-cvnets models (and
HF transformers' DeepLabv3) from their own code and configs and stores their weights, random
BatchNorm statistics included, and logits; these tests convert the stored state dicts with
mvit2_jax.convert and compare.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mvit2_jax import load_model
from mvit2_jax.checkpoint import read_config
from mvit2_jax.convert import ConversionError, convert, convert_state_dict
from mvit2_jax.errors import ConfigError
from mvit2_jax.models import VARIANTS, MobileViTv2Backbone, MobileViTv2Segmentation
from mvit2_jax.models.segmentation import ASPP, AuxHead, PyramidPooling, adaptive_avg_pool

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEG_WEIGHTS = FIXTURES / "segmentation_parity.safetensors"
SEG_OUTPUTS = FIXTURES / "segmentation_parity.npz"
ROWS, COLS = slice(3, None, 13), slice(5, None, 11)  # as make_segmentation_fixture.py samples the logits
AUX_ROWS, AUX_COLS = slice(0, None, 2), slice(1, None, 2)  # and the aux logits
TOLERANCE = 1e-4

# Trainable parameters of the official models without the aux head (reference
# downstream.md section 7, counted on the cvnets models), widths 0.5 .. 2.0.
OFFICIAL_PARAMS = {
    ("deeplabv3", 150): (6_308_495, 9_576_455, 13_384_831, 17_733_623, 22_622_831, 28_052_455, 34_022_495),
    ("deeplabv3", 21): (6_242_318, 9_510_278, 13_318_654, 17_667_446, 22_556_654, 27_986_278, 33_956_318),
    ("pspnet", 150): (3_616_911, 6_246_151, 9_448_575, 13_224_183, 17_572_975, 22_494_951, 27_990_111),
    ("pspnet", 21): (3_550_734, 6_179_974, 9_382_398, 13_158_006, 17_506_798, 22_428_774, 27_923_934),
}


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract(model, size=(64, 64)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))


def head_params(head: str, alpha: float, num_classes: int) -> int:
    """Parameters of a head (context module + classifier) on the layer5 of width `alpha`."""
    c5 = VARIANTS[alpha].widths.layer5
    module = ASPP(512, (6, 12, 18)) if head == "deeplabv3" else PyramidPooling(512)
    context = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, c5)), False))
    return count(context["params"]) + 512 * num_classes + num_classes


@pytest.mark.parametrize("head, num_classes", list(OFFICIAL_PARAMS))
def test_parameter_counts_equal_the_official_models(head, num_classes):
    """Every width: backbone (the classifier's count minus its 1000-class head) + head; the
    whole model at width 0.5."""
    for alpha, official in zip(VARIANTS, OFFICIAL_PARAMS[head, num_classes]):
        variant = VARIANTS[alpha]
        backbone = variant.params - (variant.widths.layer5 + 1) * 1000
        assert backbone + head_params(head, alpha, num_classes) == official, alpha
    model = MobileViTv2Segmentation(alpha=0.5, num_classes=num_classes, head=head, output_stride=8)
    assert count(abstract(model)["params"]) == OFFICIAL_PARAMS[head, num_classes][0]


def test_aux_head_parameters_and_output_stride_do_not_change_other_counts():
    base = MobileViTv2Segmentation(alpha=0.5, num_classes=150, head="deeplabv3")
    with_aux = base.clone(aux_head=True)
    assert count(abstract(with_aux)["params"]) == 6_549_285  # official DeepLabv3 ADE20k 0.5 with aux head
    c4 = VARIANTS[0.5].widths.layer4
    aux = jax.eval_shape(lambda: AuxHead(150).init(jax.random.key(0), jnp.zeros((1, 4, 4, c4)), False))
    assert count(aux["params"]) == 6_549_285 - 6_308_495
    for stride in (8, 16, 32):
        assert count(abstract(base.clone(output_stride=stride))["params"]) == 6_308_495


@pytest.mark.parametrize(
    "head, stride, size, attention",
    [("deeplabv3", 8, (64, 96), "separable"), ("pspnet", 16, (96, 64), "mha"), ("deeplabv3", 32, (70, 50), "linformer")],
)
def test_shapes_for_every_head_stride_and_attention(head, stride, size, attention):
    """Logits at the input size (also when it is not a multiple of the stride); in training
    the aux logits at layer4's resolution; float32 out for bfloat16 compute."""
    model = MobileViTv2Segmentation(alpha=0.5, num_classes=7, head=head, output_stride=stride, aux_head=True,
                                    attention=attention, dtype="bfloat16")
    variables = abstract(model, size)
    x = jnp.zeros((2, *size, 3))
    logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert logits.shape == (2, *size, 7) and logits.dtype == jnp.float32
    (logits, aux), _ = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}), variables
    )
    backbone = MobileViTv2Backbone(alpha=0.5, output_stride=stride)
    layer4 = jax.eval_shape(lambda: backbone.init_with_output(jax.random.key(0), x)[0]["layer4"])
    assert logits.shape == (2, *size, 7)
    assert aux.shape == (*layer4.shape[:3], 7) and aux.dtype == jnp.float32
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_bad_arguments_are_clear_errors():
    x = jnp.zeros((1, 64, 64, 3))
    for kwargs, message in (
        ({"head": "unet"}, "head must be one of"),
        ({"output_stride": 4}, "output_stride must be one of"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"aspp_rates": (6, 12)}, "aspp_rates must be three"),
    ):
        with pytest.raises(ConfigError, match=message):
            abstract(MobileViTv2Segmentation(alpha=0.5, **kwargs))
    model = MobileViTv2Segmentation(alpha=0.5, num_classes=3)
    with pytest.raises(ConfigError, match="return_aux=True needs a model built with aux_head=True"):
        jax.eval_shape(lambda v: model.apply(v, x, return_aux=True), abstract(model))


def torch_adaptive_avg_pool(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PyTorch's adaptive average pooling as its documentation defines the bins, in loops."""
    _, h, w, _ = x.shape
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), np.float64)
    for i in range(out_h):
        y0, y1 = (i * h) // out_h, -(-((i + 1) * h) // out_h)
        for j in range(out_w):
            x0, x1 = (j * w) // out_w, -(-((j + 1) * w) // out_w)
            out[:, i, j] = x[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("size, out", [((12, 12), (6, 6)), ((13, 7), (3, 2)), ((5, 9), (6, 6)), ((8, 8), (1, 1))])
def test_adaptive_pooling_has_pytorch_overlapping_bins(size, out):
    x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), *out)), torch_adaptive_avg_pool(x, *out), atol=1e-6)


# ----------------------------------------------------------------------------- official weights


@pytest.fixture(scope="module")
def fixture_outputs():
    return np.load(SEG_OUTPUTS)


def official_state_dict(head: str) -> dict:
    """The fixture's cvnets state dict of one model: the shared encoder and that model's head."""
    tensors = load_file(str(SEG_WEIGHTS))
    state = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
    state.update({k[len(head) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{head}.")})
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixture models converted through files, as a user would: {head: directory}."""
    out = {}
    for head in ("deeplabv3", "pspnet"):
        src = tmp_path_factory.mktemp("seg") / f"{head}.safetensors"
        save_file(official_state_dict(head), str(src))
        out[head] = convert(str(src), str(src.parent / "model"))
    return out


def test_converted_models_record_what_the_weights_cannot_tell(converted):
    for head, stride, rates, classes in (("deeplabv3", 8, [12, 24, 36], 150), ("pspnet", 16, [6, 12, 18], 21)):
        meta, _, _ = read_config(converted[head])
        model = meta["model"]
        assert meta["task"] == "segmentation" and meta["image_size"] == [512, 512]
        assert (model["head"], model["output_stride"], model["num_classes"], model["aux_head"]) == (head, stride, classes, True)
        assert model["alpha"] == 0.5 and (head != "deeplabv3" or model["aspp_rates"] == rates)
        assert model["aspp_features" if head == "deeplabv3" else "psp_features"] == 64
        names = meta["class_names"]  # the official dataset of that class count
        assert len(names) == classes and names[:2] == (["wall", "building"] if classes == 150 else ["background", "aeroplane"])


def _parity(converted, fixture_outputs, head, size_name):
    model, variables = load_model(converted[head])
    image = fixture_outputs[f"image_{size_name}"].astype(np.float32)[None] / 255.0
    logits, aux = jax.jit(lambda v, x: model.apply(v, x, return_aux=True))(variables, image)
    assert logits.shape == (1, *image.shape[1:3], model.num_classes)
    want = fixture_outputs[f"{head}_{size_name}"]
    np.testing.assert_allclose(np.asarray(logits[0])[ROWS, COLS], want, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(np.asarray(aux[0])[AUX_ROWS, AUX_COLS], fixture_outputs[f"{head}_aux_{size_name}"], atol=TOLERANCE, rtol=0)
    assert float(np.std(want)) > 0.1  # not a degenerate output


@pytest.mark.parametrize("head", ["deeplabv3", "pspnet"])
def test_logits_match_the_official_model_at_a_non_square_size(converted, fixture_outputs, head):
    """360x480: not a multiple of the output stride, as the official evaluation upsamples."""
    _parity(converted, fixture_outputs, head, "360x480")


@pytest.mark.slow
@pytest.mark.parametrize("head", ["deeplabv3", "pspnet"])
def test_logits_match_the_official_model_at_512(converted, fixture_outputs, head):
    _parity(converted, fixture_outputs, head, "512")


def test_hf_transformers_file_converts_and_matches_hf_at_output_stride_32(tmp_path, fixture_outputs):
    """An HF MobileViTV2ForSemanticSegmentation file (names made by HF's own renaming) with
    its config.json: read as DeepLabv3 at the config's output stride, the logits of HF's model
    at 512x512 and output stride 32, where HF equals the official model (at output strides 16
    and 8, and at sizes that give a block an odd-sized map, HF departs from the official
    model, which this code follows: tests/fixtures/make_segmentation_fixture.py prints by how much)."""
    names = json.loads(str(fixture_outputs["hf_names"]))
    cvnets = official_state_dict("deeplabv3")
    save_file({hf: cvnets[old] for hf, old in names.items()}, str(tmp_path / "model.safetensors"))
    id2label = {str(i): f"thing {i}" for i in range(150)}
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "mobilevitv2", "output_stride": 32, "atrous_rates": [12, 24, 36], "id2label": id2label})
    )
    directory = convert(str(tmp_path / "model.safetensors"), str(tmp_path / "converted"))
    assert read_config(directory)[0]["class_names"][149] == "thing 149"
    model, variables = load_model(directory)
    assert (model.head, model.output_stride, model.aux_head, tuple(model.aspp_rates)) == ("deeplabv3", 32, False, (12, 24, 36))
    image = fixture_outputs["image_512"].astype(np.float32)[None] / 255.0
    logits = jax.jit(model.apply)(variables, image)
    np.testing.assert_allclose(np.asarray(logits[0])[ROWS, COLS], fixture_outputs["hf_deeplabv3_os32_512"], atol=TOLERANCE, rtol=0)


def test_flags_override_and_class_count_defaults(tmp_path):
    state = official_state_dict("pspnet")
    model, _ = convert_state_dict(state)
    assert (model.head, model.output_stride, model.num_classes) == ("pspnet", 16, 21)  # PASCAL VOC recipe
    model, _ = convert_state_dict(state, output_stride=8)
    assert model.output_stride == 8
    deeplab = official_state_dict("deeplabv3")
    model, _ = convert_state_dict(deeplab)
    assert (model.output_stride, tuple(model.aspp_rates)) == (8, (12, 24, 36))  # ADE20k recipe
    other = dict(deeplab)
    other["seg_head.classifier.block.conv.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    other["seg_head.classifier.block.conv.bias"] = np.zeros((5,), np.float32)
    other["seg_head.aux_head.2.block.conv.weight"] = np.zeros((5, 128, 1, 1), np.float32)
    other["seg_head.aux_head.2.block.conv.bias"] = np.zeros((5,), np.float32)
    model, _ = convert_state_dict(other, aspp_rates=(1, 2, 3))
    assert (model.num_classes, model.output_stride, tuple(model.aspp_rates)) == (5, 16, (1, 2, 3))


def test_mismatches_are_listed_with_official_names():
    state = official_state_dict("deeplabv3")
    del state["seg_head.aspp.aspp_layer.convs.2.block.norm.running_var"]
    state["seg_head.aspp.aspp_layer.project.block.conv.weight"] = np.zeros((64, 100, 1, 1), np.float32)
    state["seg_head.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(state)
    text = str(e.value)
    assert "MobileViTv2Segmentation(alpha=0.5, head='deeplabv3', num_classes=150, aux_head=True)" in text
    assert "aspp.convs_2.bn.running_var" in text
    assert "seg_head.aspp.aspp_layer.project.block.conv.weight (timm name aspp.project.conv.weight): got (64, 100, 1, 1), expected (64, 320, 1, 1)" in text
    assert "seg_head.extra.weight" in text
    no_head = {k: v for k, v in state.items() if not k.startswith(("seg_head.aspp", "seg_head.classifier"))}
    no_head["seg_head.classifier.block.conv.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    with pytest.raises(ConversionError, match="neither a DeepLabv3 .* nor a PSPNet"):
        convert_state_dict(no_head)


def test_cli_records_flags_and_refuses_bad_ones(tmp_path, capsys):
    from mvit2_jax.convert import main

    src = tmp_path / "psp.safetensors"
    save_file(official_state_dict("pspnet"), str(src))
    assert main([str(src), str(tmp_path / "out"), "--output-stride", "8"]) == 0
    assert read_config(str(tmp_path / "out"))[0]["model"]["output_stride"] == 8
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), str(tmp_path / "out2"), "--output-stride", "4"])
    assert exit_info.value.code == 2 and "invalid choice: 4" in capsys.readouterr().err
