"""MobileViTv1 (mvit2_jax.models.mobilevit): parameter counts, timm parity from the committed
fixture (tests/fixtures/make_parity_fixture.py mobilevit_xxs --half), cvnets names, the
feature backbone at every output stride, and conversion into a model directory."""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from mvit2_jax import load_model
from mvit2_jax.checkpoint import read_config
from mvit2_jax.convert import ConversionError, convert, convert_state_dict
from mvit2_jax.models import V1_VARIANTS, MobileViT, MobileViTBackbone

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WEIGHTS = FIXTURES / "mobilevit_xxs_parity.safetensors"
LOGITS = FIXTURES / "mobilevit_xxs_parity.npz"
DEPTHS = {2: 2, 3: 4, 4: 3}  # transformer layers of timm stages 2, 3, 4


def timm_to_cvnets_v1(name: str) -> str:
    """timm mobilevit key -> ml-cvnets MobileViTv1 key, written from cvnets' module names
    (mobilevit.py, mobilevit_block.py): the inverse of the converter's table."""

    def final_norm(m: re.Match) -> str:
        return f"layer_{int(m[1]) + 1}.1.global_rep.{DEPTHS[int(m[1])]}.{m[2]}"

    rules = (
        (r"^stem\.conv\.", "conv_1.block.conv."),
        (r"^stem\.bn\.", "conv_1.block.norm."),
        (r"^final_conv\.conv\.", "conv_1x1_exp.block.conv."),
        (r"^final_conv\.bn\.", "conv_1x1_exp.block.norm."),
        (r"^head\.fc\.", "classifier.fc."),
        (r"^stages\.(\d+)\.1\.norm\.(weight|bias)$", final_norm),
        (r"^stages\.(\d+)\.", lambda m: f"layer_{int(m[1]) + 1}."),
        (r"\.conv1_1x1\.conv\.", ".block.exp_1x1.block.conv."),
        (r"\.conv1_1x1\.bn\.", ".block.exp_1x1.block.norm."),
        (r"\.conv2_kxk\.conv\.", ".block.conv_3x3.block.conv."),
        (r"\.conv2_kxk\.bn\.", ".block.conv_3x3.block.norm."),
        (r"\.conv3_1x1\.conv\.", ".block.red_1x1.block.conv."),
        (r"\.conv3_1x1\.bn\.", ".block.red_1x1.block.norm."),
        (r"\.conv_kxk\.conv\.", ".local_rep.conv_3x3.block.conv."),
        (r"\.conv_kxk\.bn\.", ".local_rep.conv_3x3.block.norm."),
        (r"\.conv_1x1\.weight$", ".local_rep.conv_1x1.block.conv.weight"),
        (r"\.transformer\.(\d+)\.norm1\.", r".global_rep.\1.pre_norm_mha.0."),
        (r"\.transformer\.(\d+)\.attn\.qkv\.", r".global_rep.\1.pre_norm_mha.1.qkv_proj."),
        (r"\.transformer\.(\d+)\.attn\.proj\.", r".global_rep.\1.pre_norm_mha.1.out_proj."),
        (r"\.transformer\.(\d+)\.norm2\.", r".global_rep.\1.pre_norm_ffn.0."),
        (r"\.transformer\.(\d+)\.mlp\.fc1\.", r".global_rep.\1.pre_norm_ffn.1."),
        (r"\.transformer\.(\d+)\.mlp\.fc2\.", r".global_rep.\1.pre_norm_ffn.4."),
        (r"\.conv_proj\.conv\.", ".conv_proj.block.conv."),
        (r"\.conv_proj\.bn\.", ".conv_proj.block.norm."),
        (r"\.conv_fusion\.conv\.", ".fusion.block.conv."),
        (r"\.conv_fusion\.bn\.", ".fusion.block.norm."),
    )
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


@pytest.fixture(scope="module")
def timm_weights():
    return load_file(str(WEIGHTS))


@pytest.fixture(scope="module")
def converted(timm_weights):
    return convert_state_dict(timm_weights)


@pytest.mark.parametrize("variant", list(V1_VARIANTS))
def test_parameter_counts_equal_the_official_models(variant):
    shapes = jax.eval_shape(lambda: MobileViT(variant=variant).init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == V1_VARIANTS[variant].params
    # 32 BatchNorms (stem, 7 inverted residuals x 3, 3 blocks x 3, the final conv), as timm's.
    assert len(jax.tree.leaves(shapes["batch_stats"])) == 2 * 32


@pytest.mark.parametrize("size", ["256", "224", "250x270"])
def test_logits_match_timm(converted, size):
    model, variables = converted
    assert (model.variant, model.num_classes) == ("xxs", 1000)
    fixture = np.load(LOGITS)
    images, expected = fixture[f"images_{size}"], fixture[f"logits_{size}"]
    logits = np.asarray(jax.jit(model.apply)(variables, images))
    assert np.abs(expected).max() > 1.0  # logits of order 1: the tolerance means something
    assert np.abs(logits - expected).max() < 1e-4


def test_cvnets_names_give_the_same_variables(timm_weights, converted):
    cvnets = {timm_to_cvnets_v1(k): v for k, v in timm_weights.items()}
    assert "conv_1x1_exp.block.conv.weight" in cvnets and not any(k.startswith("stages.") for k in cvnets)
    model, variables = convert_state_dict(cvnets)
    assert model == converted[0]
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(converted[1])):
        np.testing.assert_array_equal(a, b)


def test_a_wrong_attention_width_is_listed(timm_weights):
    broken = dict(timm_weights)
    broken["stages.2.1.transformer.0.attn.qkv.weight"] = broken["stages.2.1.transformer.0.attn.qkv.weight"][:-3]
    with pytest.raises(ConversionError, match=r"stages\.2\.1\.transformer\.0\.attn\.qkv\.weight: got \(189, 64\)"):
        convert_state_dict(broken)


def test_a_converted_directory_records_and_rebuilds_the_model(tmp_path, converted):
    dst = convert(WEIGHTS, tmp_path / "mobilevit_xxs")
    meta = read_config(dst)[0]
    assert meta["model"]["family"] == "mobilevit" and meta["model"]["variant"] == "xxs"
    model, variables = load_model(dst)
    assert isinstance(model, MobileViT) and model == converted[0]
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(converted[1])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_the_backbone_gives_the_v2_feature_dict_at_every_output_stride(output_stride):
    backbone = MobileViTBackbone(variant="xs", output_stride=output_stride, kernels="portable")
    shapes = jax.eval_shape(lambda: backbone.init_with_output(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))[0]
    strides = {"stem": 2, "layer1": 2, "layer2": 4, "layer3": 8, "layer4": min(16, output_stride), "layer5": output_stride}
    channels = dict(zip(strides, (16, *V1_VARIANTS["xs"].stages)))
    assert {k: v.shape for k, v in shapes.items()} == {k: (1, 64 // s, 64 // s, channels[k]) for k, s in strides.items()}


def test_any_registered_attention_fits_the_v1_block(random_variables):
    model = MobileViT(variant="xxs", num_classes=10, attention="separable")
    images = jnp.zeros((2, 32, 32, 3))
    logits = jax.jit(model.apply)(random_variables(model, images), images)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_the_v1_recipe_config_builds_the_v1_model_and_checks_its_fields():
    from experiments import mobilevit_v1
    from mvit2_jax import tasks
    from mvit2_jax.errors import ConfigError

    task = tasks.get("classification")
    config = mobilevit_v1.get_config("xs")
    task.check_backbone_config(config)
    fields = task.model_config(config)
    assert (fields["family"], fields["variant"], fields["dropout"], fields["head_dropout"]) == ("mobilevit", "xs", 0.1, 0.1)
    assert task.create_model(fields) == MobileViT(**{k: v for k, v in fields.items() if k != "family"})
    assert (config.optim.lr, config.optim.min_lr, config.optim.weight_decay, config.optim.warmup_steps) == (2e-3, 2e-4, 0.01, 3000)
    assert mobilevit_v1.get_config("xxs").model.dropout == 0.05

    config.model.variant = "xl"
    with pytest.raises(ConfigError, match=r"config.model.variant must be one of \('xxs', 'xs', 's'\)"):
        task.check_backbone_config(config)
    # A MobileViTv2 checkpoint cannot start a v1 run, and evaluating a v1 checkpoint with a v2
    # config takes the checkpoint's model fields.
    with pytest.raises(ConfigError, match="holds a MobileViTv2 model but config.model describes a MobileViTv1 one"):
        task.check_pretrained({"alpha": 0.5, "attention": "separable"}, config, "/some/v2")
    from experiments import quickstart

    evaluated = task.config_from_checkpoint(quickstart.get_config(), {**fields, "num_classes": 1000})
    assert task.model_config(evaluated) == {**fields, "num_classes": 1000}


def test_the_segmentation_and_ssd_heads_take_the_v1_backbone():
    from mvit2_jax import tasks
    from mvit2_jax.models import MobileViTv2Segmentation, MobileViTv2SSD

    images = jnp.zeros((1, 64, 64, 3))
    v1 = dict(family="mobilevit", attention="mha")  # (the task models' default unit is v2's separable one)
    seg = MobileViTv2Segmentation(variant="xxs", num_classes=21, output_stride=16, aux_head=True, **v1)
    logits, variables = jax.eval_shape(lambda: seg.init_with_output(jax.random.key(0), images))
    assert logits.shape == (1, 64, 64, 21)
    # The v1 backbone's variables (its final conv and head excluded) under the same names.
    classifier = jax.eval_shape(lambda: MobileViT(variant="xxs").init(jax.random.key(0), images))
    backbone = {k: v for k, v in classifier["params"].items() if k not in ("final_conv", "head")}
    shapes = functools.partial(jax.tree.map, lambda a: a.shape)
    assert shapes({k: variables["params"][k] for k in backbone}) == shapes(backbone)
    ssd = MobileViTv2SSD(variant="s", num_classes=21, **v1)
    out = jax.eval_shape(lambda: ssd.init_with_output(jax.random.key(0), images))[0]
    assert out["loc"].shape == (1, 142, 4) and out["cls"].shape == (1, 142, 21)
    # Recorded without the other family's width field, and rebuilt from the record.
    for task, model in (("segmentation", seg), ("detection", ssd)):
        record = model.config()
        assert record["family"] == "mobilevit" and "alpha" not in record
        assert tasks.get(task).create_model(record) == model
    assert "family" not in MobileViTv2Segmentation(alpha=0.5).config()
