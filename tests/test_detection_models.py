"""SSDLite on MobileViTv2 (mvit2_jax.models.detection): structure and counts against the
official models (../shared/reference/downstream.md sections 3 and 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvit2_jax.errors import ConfigError
from mvit2_jax.models import anchors as A
from mvit2_jax.models.detection import MobileViTv2SSD

# Trainable parameters of the official SSDLite COCO models (81 classes), widths 0.5 ... 2.0.
OFFICIAL_PARAMS = {0.5: 2_035_395, 0.75: 3_584_955, 1.0: 5_608_883, 1.25: 8_173_227, 1.5: 11_277_987,
                   1.75: 14_923_163, 2.0: 19_108_755}


def abstract_init(model, size=(64, 64)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))


@pytest.mark.parametrize("alpha", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_equal_the_official_models(alpha):
    variables = abstract_init(MobileViTv2SSD(alpha=alpha))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == OFFICIAL_PARAMS[alpha]
    heads = [variables["params"][f"head_{i}"] for i in range(6)]
    # A level projects only when its input width differs from its projection width.
    assert ("proj" in heads[0]) and (alpha != 0.5) == ("proj" in heads[1])
    assert not any("proj" in h for h in heads[2:])


@pytest.mark.parametrize("size, anchors", [((320, 320), 3232), ((384, 384), 4618), ((320, 448), 4510)])
def test_outputs_follow_the_anchors(size, anchors):
    model = MobileViTv2SSD(alpha=0.5, num_classes=21)
    variables = abstract_init(model)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *size, 3))), variables)
    assert out["loc"].shape == (2, anchors, 4) and out["cls"].shape == (2, anchors, 21)
    assert A.ssd_anchors(*size).shape == (anchors, 4)


def test_a_forward_pass_decodes_into_detections(random_variables):
    model = MobileViTv2SSD(alpha=0.5, num_classes=4)
    images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
    variables = random_variables(model, images)
    out = jax.jit(model.apply)(variables, images)
    assert out["loc"].dtype == jnp.float32 and out["cls"].shape == (2, 142, 4)
    assert np.isfinite(np.asarray(out["loc"])).all() and np.isfinite(np.asarray(out["cls"])).all()
    assert not np.allclose(out["cls"][0], out["cls"][1])
    detections = A.postprocess(out["loc"], out["cls"], A.ssd_anchors(64, 64), max_detections=10)
    assert detections["boxes"].shape == (2, 10, 4) and (np.asarray(detections["count"]) <= 10).all()


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ConfigError, match="divisible by 32"):
        abstract_init(MobileViTv2SSD(alpha=0.5), (48, 64))
    with pytest.raises(ConfigError, match="background too"):
        abstract_init(MobileViTv2SSD(alpha=0.5, num_classes=1))
    with pytest.raises(ConfigError, match="proj_channels needs 6"):
        abstract_init(MobileViTv2SSD(alpha=0.5, proj_channels=(256, 128)))
    config = MobileViTv2SSD(alpha=0.75, num_classes=21).config()
    assert MobileViTv2SSD(**config).config() == config and config["proj_channels"] == [512, 256, 256, 128, 128, 64]
