"""Specification of the model family: widths, parameter counts, the backbone's features and
dilation, the kernel switch, the attention registry, shapes and equations."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvit2_jax.errors import ConfigError
from mvit2_jax.models import (
    ATTENTION,
    VARIANTS,
    MobileViTv2,
    MobileViTv2Backbone,
    MobileViTv2Block,
    SeparableSelfAttention,
    attention_factory,
    widths_for,
)
from mvit2_jax.models import kernels as cpu_kernels
from mvit2_jax.models.kernels import batch_norm_act_train, pointwise
from mvit2_jax.models.layers import Conv, ConvBN, align_corners_matrix, resize_bilinear_align_corners
from mvit2_jax.models.mobilevitv2 import fold, unfold

SEPARABLE = attention_factory("separable")


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def abstract_init(model, shape=(1, 256, 256, 3)):
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("alpha", sorted(VARIANTS))
def test_widths_and_exact_parameter_count(alpha):
    variant = VARIANTS[alpha]
    assert widths_for(alpha) == variant.widths
    variables = abstract_init(MobileViTv2(alpha=alpha))
    assert n_params(variables["params"]) == variant.params
    assert set(variables) == {"params", "batch_stats"}


def test_any_width_and_class_count():
    variables = abstract_init(MobileViTv2(alpha=0.3, num_classes=7), (1, 64, 64, 3))
    assert variables["params"]["head"]["kernel"].shape == (widths_for(0.3).layer5, 7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(attention="performer"), "attention"),
        (dict(dtype="float16"), "dtype"),
        (dict(kernels="xla"), "kernels"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        abstract_init(MobileViTv2(**kwargs), (1, 64, 64, 3))


def test_images_must_be_nhwc_rgb():
    with pytest.raises(ConfigError, match=r"\[batch, height, width, 3\]"):
        abstract_init(MobileViTv2(alpha=0.5), (1, 3, 64, 64))


@pytest.fixture(scope="module")
def small_model(random_variables):
    """alpha 0.5, 10 classes, initialized at 64x64, with a jitted eval apply."""
    model = MobileViTv2(alpha=0.5, num_classes=10)
    variables = random_variables(model, jnp.zeros((2, 64, 64, 3)))
    return model, variables, jax.jit(lambda v, x: model.apply(v, x))


@pytest.mark.parametrize("attention", ["separable", "mha", "linformer"])
def test_three_attention_units_fit_the_same_block(attention, random_variables):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 32))
    block = MobileViTv2Block(features=32, attn_dim=16, depth=2, attention=attention_factory(attention, proj_len=4))
    variables = random_variables(block, x, False, seed=2)
    out = jax.jit(lambda v, x: block.apply(v, x, False))(variables, x)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
    # Outside the attention unit, every parameter has the same shape for all three units.
    reference = MobileViTv2Block(features=32, attn_dim=16, depth=2, attention=SEPARABLE)
    ref_vars = jax.eval_shape(lambda k, x: reference.init(k, x, False), jax.random.key(2), x)

    def backbone(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k): v.shape for k, v in flat if "'attn'" not in jax.tree_util.keystr(k)}

    assert backbone(variables) == backbone(ref_vars)
    assert "attn" in variables["params"]["transformer_0"]


def test_train_mode_updates_batch_stats(small_model):
    model, variables, _ = small_model
    images = jax.random.uniform(jax.random.key(2), (2, 64, 64, 3))
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updates = train_apply(variables, images)
    assert logits.shape == (2, 10)
    before = variables["batch_stats"]["stem"]["bn"]["mean"]
    after = updates["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(before, after)


def test_bfloat16_compute_keeps_float32_params(small_model):
    _, variables, apply_f32 = small_model
    model = MobileViTv2(alpha=0.5, num_classes=10, dtype="bfloat16")
    images = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3))
    ref = apply_f32(variables, images)
    out = jax.jit(model.apply)(variables, images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.15 * float(jnp.abs(ref).max()) + 1e-2)


@pytest.mark.slow
def test_dropout_and_stochastic_depth_are_configurable(small_model):
    _, variables, apply_plain = small_model
    images = jax.random.uniform(jax.random.key(4), (2, 64, 64, 3))
    model = MobileViTv2(alpha=0.5, num_classes=10, dropout=0.2, attn_dropout=0.2, ffn_dropout=0.2, drop_path=0.3)

    @jax.jit
    def run(key):
        return model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]

    np.testing.assert_array_equal(run(jax.random.key(0)), run(jax.random.key(0)))
    assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)))
    # Eval mode ignores dropout entirely.
    np.testing.assert_allclose(jax.jit(model.apply)(variables, images), apply_plain(variables, images), atol=1e-6)


def separable_attention_numpy(x, w_qkv, b_qkv, w_out, b_out):
    """The paper's equations, token by token: x [P, N, d]."""
    d = x.shape[-1]
    out = np.zeros_like(x)
    for p in range(x.shape[0]):
        tokens = x[p]  # [N, d]
        scores = tokens @ w_qkv[:, 0] + b_qkv[0]  # branch I: one score per token
        cs = np.exp(scores - scores.max())
        cs /= cs.sum()
        x_k = tokens @ w_qkv[:, 1 : d + 1] + b_qkv[1 : d + 1]
        x_v = np.maximum(tokens @ w_qkv[:, d + 1 :] + b_qkv[d + 1 :], 0.0)
        cv = sum(cs[i] * x_k[i] for i in range(tokens.shape[0]))  # context vector
        out[p] = (x_v * cv) @ w_out + b_out
    return out


def test_separable_attention_matches_the_paper_equations():
    d = 8
    x = np.asarray(jax.random.normal(jax.random.key(5), (2, 4, 6, d)), np.float64)
    unit = SeparableSelfAttention(d)
    variables = unit.init(jax.random.key(6), jnp.asarray(x, jnp.float32))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    out = np.asarray(unit.apply(variables, jnp.asarray(x, jnp.float32)))
    for b in range(2):
        ref = separable_attention_numpy(
            x[b], p["qkv_proj"]["kernel"], p["qkv_proj"]["bias"], p["out_proj"]["kernel"], p["out_proj"]["bias"]
        )
        np.testing.assert_allclose(out[b], ref, rtol=1e-4, atol=1e-5)


def test_separable_attention_is_linear_in_tokens():
    """Its one context vector: permuting the N tokens permutes the output the same way."""
    d = 8
    x = jax.random.normal(jax.random.key(7), (1, 4, 10, d))
    unit = SeparableSelfAttention(d)
    variables = unit.init(jax.random.key(8), x)
    perm = jax.random.permutation(jax.random.key(9), 10)
    np.testing.assert_allclose(unit.apply(variables, x[:, :, perm]), unit.apply(variables, x)[:, :, perm], atol=1e-5)


def test_unfold_fold_round_trip_and_patch_layout():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    patches = unfold(x)
    assert patches.shape == (2, 4, 6, 3)
    # Pixel position (1, 0) of patch (row 1, col 2) is pixel (3, 4).
    np.testing.assert_array_equal(patches[:, 1 * 2 + 0, 1 * 3 + 2], x[:, 3, 4])
    np.testing.assert_array_equal(fold(patches, 4, 6), x)


def bilinear_align_corners_numpy(img, out_h, out_w):
    h, w = img.shape[:2]
    out = np.zeros((out_h, out_w) + img.shape[2:])
    for i in range(out_h):
        for j in range(out_w):
            y = i * (h - 1) / (out_h - 1)
            x = j * (w - 1) / (out_w - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (
                img[y0, x0] * (1 - fy) * (1 - fx)
                + img[y0, x1] * (1 - fy) * fx
                + img[y1, x0] * fy * (1 - fx)
                + img[y1, x1] * fy * fx
            )
    return out


def test_resize_is_bilinear_with_aligned_corners():
    img = np.asarray(jax.random.uniform(jax.random.key(10), (1, 7, 5, 2)))
    out = np.asarray(resize_bilinear_align_corners(jnp.asarray(img), 8, 6))
    np.testing.assert_allclose(out[0], bilinear_align_corners_numpy(img[0], 8, 6), atol=1e-6)
    np.testing.assert_allclose(out[0, [0, -1]][:, [0, -1]], img[0, [0, -1]][:, [0, -1]], atol=1e-6)
    np.testing.assert_allclose(align_corners_matrix(7, 8).sum(axis=1), 1.0, atol=1e-6)


def test_block_resizes_odd_maps_up_and_not_back(random_variables):
    block = MobileViTv2Block(features=16, attn_dim=8, depth=1, attention=SEPARABLE)
    x = jax.random.normal(jax.random.key(11), (1, 7, 9, 16))
    variables = random_variables(block, x, False, seed=12)
    apply = jax.jit(lambda v, x: block.apply(v, x, False))
    out = apply(variables, x)
    assert out.shape == (1, 8, 10, 16)
    resized = resize_bilinear_align_corners(x, 8, 10)
    np.testing.assert_allclose(out, apply(variables, resized), atol=1e-5)


def test_model_accepts_sizes_not_divisible_by_32(small_model):
    # 72x88: layer3 runs at 9x11, layer4 at 5x6, layer5 at 3x3, each resized up to even sizes.
    _, variables, apply = small_model
    logits = apply(variables, jax.random.uniform(jax.random.key(13), (1, 72, 88, 3)))
    assert logits.shape == (1, 10) and np.isfinite(np.asarray(logits)).all()


def library_conv(x, kernel, stride, dilation, groups):
    """PyTorch's Conv2d(padding=((k-1)//2)*dilation) through lax, the reference for both paths."""
    pad = (kernel.shape[0] - 1) // 2 * dilation
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@pytest.mark.parametrize("stride, groups, dilation", [(1, 8, 1), (2, 8, 1), (2, 1, 1), (1, 1, 1), (1, 8, 2), (1, 8, 4), (2, 8, 2), (1, 1, 2)])
def test_conv_implementations_agree_with_the_library_convolution(stride, groups, dilation):
    x = jax.random.normal(jax.random.key(14), (2, 11, 10, 8))
    k = 3 if groups > 1 or stride > 1 or dilation > 1 else 1
    conv = functools.partial(Conv, 8, k, stride, groups, dilation)
    variables = conv().init(jax.random.key(15), x)
    expected = library_conv(x, variables["params"]["kernel"], stride, dilation, groups)
    pad = (k - 1) // 2 * dilation
    out_shape = (2, (11 + 2 * pad - dilation * (k - 1) - 1) // stride + 1, (10 + 2 * pad - dilation * (k - 1) - 1) // stride + 1, 8)
    for kernels in ("portable", "cpu"):
        y = conv(kernels=kernels).apply(variables, x)
        assert y.shape == expected.shape == out_shape
        np.testing.assert_allclose(y, expected, atol=1e-5, err_msg=kernels)


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2), (1, 4), (2, 2)])
def test_cpu_depthwise_kernel_has_the_library_gradients(stride, dilation):
    x = jax.random.normal(jax.random.key(16), (2, 11, 10, 8))
    variables = Conv(8, 3, stride, 8, dilation).init(jax.random.key(17), x)

    def loss(kernel, x, conv):
        return jnp.sum(jnp.sin(conv(x, kernel)))

    cpu = lambda x, kernel: Conv(8, 3, stride, 8, dilation, kernels="cpu").apply({"params": {"kernel": kernel}}, x)  # noqa: E731
    lib = lambda x, kernel: library_conv(x, kernel, stride, dilation, 8)  # noqa: E731
    kernel = variables["params"]["kernel"]
    g_cpu = jax.grad(loss, argnums=(0, 1))(kernel, x, cpu)
    g_lib = jax.grad(loss, argnums=(0, 1))(kernel, x, lib)
    np.testing.assert_allclose(g_cpu[1], g_lib[1], atol=1e-5)
    np.testing.assert_allclose(g_cpu[0], g_lib[0], atol=1e-4)


@pytest.mark.parametrize("stride, dilation, cin", [(2, 1, 3), (1, 1, 3), (1, 2, 5), (2, 2, 7)])
def test_cpu_patch_conv_has_the_library_values_and_gradients(stride, dilation, cin):
    """Full convs over few input channels (the stems: 3x3 stride 2 over RGB) run on the CPU
    path as one matrix product of their patches: same outputs and gradients as the library conv."""
    x = jax.random.normal(jax.random.key(21), (2, 11, 10, cin))
    conv = Conv(16, 3, stride, 1, dilation, kernels="cpu")
    kernel = conv.init(jax.random.key(22), x)["params"]["kernel"]
    assert 9 * cin <= cpu_kernels.PATCH_CONV_MAX_FEATURES
    assert "custom_vjp_call[" in str(jax.make_jaxpr(lambda x: conv.apply({"params": {"kernel": kernel}}, x))(x))

    def loss(kernel, x, conv):
        return jnp.sum(jnp.sin(conv(x, kernel)))

    cpu = lambda x, kernel: conv.apply({"params": {"kernel": kernel}}, x)  # noqa: E731
    lib = lambda x, kernel: library_conv(x, kernel, stride, dilation, 1)  # noqa: E731
    np.testing.assert_allclose(cpu(x, kernel), lib(x, kernel), atol=1e-5)
    g_cpu = jax.grad(loss, argnums=(0, 1))(kernel, x, cpu)
    g_lib = jax.grad(loss, argnums=(0, 1))(kernel, x, lib)
    np.testing.assert_allclose(g_cpu[1], g_lib[1], atol=1e-5)
    np.testing.assert_allclose(g_cpu[0], g_lib[0], atol=1e-4)


@pytest.mark.parametrize("act", [True, False])
def test_fused_batch_norm_equals_flax_batch_norm(act):
    """The CPU path's BatchNormAct (hand-written backward) against nn.BatchNorm + nn.silu:
    the same variables, outputs, running statistics and gradients, in training and eval mode."""
    x = 3.0 * jax.random.normal(jax.random.key(18), (4, 6, 5, 8)) + 1.0
    fused, library = (ConvBN(8, 3, 1, 8, act="silu" if act else None, kernels=k) for k in ("cpu", "portable"))
    variables = fused.init(jax.random.key(19), x, True)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, library.init(jax.random.key(19), x, True))
    # Non-trivial scale, bias and running statistics.
    variables = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(jax.random.key(20), v.shape), variables)

    def loss(params, x, module):
        y, updates = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * y), updates

    results = {}
    for name, module in (("fused", fused), ("library", library)):
        (value, updates), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x, module)
        results[name] = (value, updates, grads, module.apply(variables, x, False))
    (v1, u1, g1, e1), (v2, u2, g2, e2) = results["fused"], results["library"]
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((u1, g1, e1)), jax.tree.leaves((u2, g2, e2))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The running averages moved (momentum 0.9 towards the batch statistics).
    mean = jnp.mean(jax.lax.conv_general_dilated(
        x, variables["params"]["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=8), axis=(0, 1, 2))
    np.testing.assert_allclose(u1["batch_stats"]["bn"]["mean"], 0.9 * variables["batch_stats"]["bn"]["mean"] + 0.1 * mean, rtol=1e-4, atol=1e-5)


def test_fused_batch_norm_gradient_of_returned_statistics():
    """batch_norm_act_train's backward includes the paths through the returned mean and variance."""
    x = jax.random.normal(jax.random.key(21), (3, 4, 5, 6))
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-0.2, 0.2, 6)

    def reference(x):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x), (0, 1, 2)) - jnp.square(mean)
        y = nn.silu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias)
        return jnp.sum(y**3) + jnp.sum(jnp.cos(mean)) + jnp.sum(var**2)

    def fused(x):
        y, mean, var = batch_norm_act_train(x, scale, bias, 1e-5, True)
        return jnp.sum(y**3) + jnp.sum(jnp.cos(mean)) + jnp.sum(var**2)

    np.testing.assert_allclose(jax.grad(fused)(x), jax.grad(reference)(x), rtol=1e-4, atol=1e-5)


def test_pointwise_in_bfloat16_accumulates_in_float32():
    """The CPU path's products of bfloat16 operands (forward and both backward products) are
    the float32 products of the same bfloat16 values, rounded once to bfloat16."""
    x = jax.random.normal(jax.random.key(22), (2, 8, 8, 96)).astype(jnp.bfloat16)
    k = (jax.random.normal(jax.random.key(23), (96, 40)) / 10).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(24), (2, 8, 8, 40)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(pointwise, x, k)
    dx, dk = vjp(g)
    f32 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
    references = (f32(x) @ f32(k), f32(g) @ f32(k).T, f32(x).reshape(-1, 96).T @ f32(g).reshape(-1, 40))
    for got, want in zip((y, dx, dk), references):
        assert got.dtype == jnp.bfloat16
        # One bfloat16 rounding of the exact sum: at most 2^-8 relative, with room for the
        # float32 accumulation's order.
        np.testing.assert_allclose(f32(got), want, rtol=2.0**-7, atol=1e-6)


def test_mha_heads_are_configurable():
    x = jnp.zeros((1, 64, 64, 3))
    variables = abstract_init(MobileViTv2(alpha=0.5, attention="mha", num_heads=8), x.shape)
    qkv = variables["params"]["stages_2_1"]["transformer_0"]["attn"]["mha"]["query"]["kernel"]
    assert qkv.shape == (64, 8, 8)
    with pytest.raises(ConfigError, match="num_heads"):
        abstract_init(MobileViTv2(alpha=0.5, attention="mha", num_heads=5), x.shape)


def test_linformer_projects_tokens_to_fixed_length():
    variables = abstract_init(MobileViTv2(alpha=0.5, attention="linformer", linformer_proj_len=16), (1, 64, 64, 3))
    attn = variables["params"]["stages_2_1"]["transformer_0"]["attn"]
    # 64x64 input: layer3 runs at 8x8, so N = 16 patches of 2x2.
    assert attn["proj_k"].shape == attn["proj_v"].shape == (16, 16)


# ----------------------------------------------------------------------------- the backbone


@pytest.mark.parametrize("output_stride, strides", [
    (32, (2, 2, 4, 8, 16, 32)), (16, (2, 2, 4, 8, 16, 16)), (8, (2, 2, 4, 8, 8, 8)),
])
def test_backbone_features_at_each_output_stride(output_stride, strides):
    backbone = MobileViTv2Backbone(alpha=0.5, output_stride=output_stride)
    variables = abstract_init(backbone, (2, 128, 64, 3))
    features = jax.eval_shape(lambda v, x: backbone.apply(v, x), variables, jax.ShapeDtypeStruct((2, 128, 64, 3), jnp.float32))
    w = widths_for(0.5)
    names = ["stem", "layer1", "layer2", "layer3", "layer4", "layer5"]
    assert sorted(features) == sorted(names)
    for name, stride, channels in zip(names, strides, (w.stem, *w.stages)):
        assert features[name].shape == (2, 128 // stride, 64 // stride, channels), name
    # Dilation changes no parameter: the classifier's checkpoint serves every output stride.
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, abstract_init(MobileViTv2Backbone(alpha=0.5), (2, 128, 64, 3)))


def conv_layout(module, shape=(1, 64, 64, 3)):
    """{conv path: (kernel size, stride, dilation)} of every 3x3 conv a module calls."""
    found = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, Conv) and context.method_name == "__call__" and m.kernel_size == 3:
            found["/".join(m.scope.path)] = (m.strides, m.dilation)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        abstract_init(module, shape)
    return found


def test_dilated_stages_follow_the_official_code():
    """cvnets _make_mit_layer: a dilated stage's stride-2 block runs at stride 1 with the
    previous dilation; its MobileViTv2 block's local 3x3 conv takes the doubled dilation."""
    expected = {
        32: {"stages_2_0": (2, 1), "stages_2_1": (1, 1), "stages_3_0": (2, 1), "stages_3_1": (1, 1), "stages_4_0": (2, 1), "stages_4_1": (1, 1)},
        16: {"stages_2_0": (2, 1), "stages_2_1": (1, 1), "stages_3_0": (2, 1), "stages_3_1": (1, 1), "stages_4_0": (1, 1), "stages_4_1": (1, 2)},
        8: {"stages_2_0": (2, 1), "stages_2_1": (1, 1), "stages_3_0": (1, 1), "stages_3_1": (1, 2), "stages_4_0": (1, 2), "stages_4_1": (1, 4)},
    }
    for output_stride, stages in expected.items():
        layout = conv_layout(MobileViTv2Backbone(alpha=0.5, output_stride=output_stride))
        for stage, value in stages.items():
            path = f"{stage}/conv2_kxk/conv" if stage.endswith("_0") else f"{stage}/conv_kxk/conv"
            assert layout[path] == value, (output_stride, path)
        assert layout["stem/conv"] == (2, 1) and layout["stages_1_0/conv2_kxk/conv"] == (2, 1)
    with pytest.raises(ConfigError, match="output_stride must be one of"):
        abstract_init(MobileViTv2Backbone(alpha=0.5, output_stride=4))


@pytest.mark.slow
def test_dilated_backbone_runs_the_same_on_both_kernel_paths(random_variables):
    x = jax.random.uniform(jax.random.key(30), (2, 64, 64, 3))
    backbone = MobileViTv2Backbone(alpha=0.5, output_stride=8)
    variables = random_variables(backbone, x, seed=31)
    apply = {k: jax.jit(lambda v, x, k=k: backbone.clone(kernels=k).apply(v, x)) for k in ("cpu", "portable")}
    cpu, portable = apply["cpu"](variables, x), apply["portable"](variables, x)
    for name in cpu:
        np.testing.assert_allclose(cpu[name], portable[name], atol=2e-4, err_msg=name)


def test_classifier_is_the_backbone_and_a_head(small_model):
    model, variables, apply = small_model
    x = jax.random.uniform(jax.random.key(32), (2, 64, 64, 3))
    features = jax.jit(MobileViTv2Backbone(alpha=0.5).apply)(variables, x)["layer5"]
    head = variables["params"]["head"]
    expected = jnp.mean(features, axis=(1, 2)) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(apply(variables, x), expected, atol=1e-5)
    assert "backbone" not in variables["params"]  # the backbone shares the classifier's scope


# ----------------------------------------------------------------------------- kernel switch, attention registry


def custom_kernels_in(model, shape=(2, 64, 64, 3)):
    """How many hand-written (custom_vjp) kernels a train-mode forward pass calls."""
    x = jnp.zeros(shape)
    variables = abstract_init(model, shape)

    def loss(params, batch_stats):
        out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out)

    text = str(jax.make_jaxpr(loss)(variables["params"], variables["batch_stats"]))
    return text.count("custom_vjp_call[")


def test_one_kernel_switch_for_every_layer():
    """"portable" runs library ops only (convs, dense layers, norms alike); "cpu" runs the CPU
    kernels in every conv, dense layer and BatchNorm that has one."""
    assert custom_kernels_in(MobileViTv2(alpha=0.5, num_classes=10, kernels="portable")) == 0
    cpu = custom_kernels_in(MobileViTv2(alpha=0.5, num_classes=10, kernels="cpu"))
    # 9 depthwise convs (6 MV2 blocks, 3 MobileViTv2 blocks), 18 1x1 convs (2 per MV2 block,
    # 2 per MobileViTv2 block), 9 x 4 transformer dense layers and the head, 25 BatchNorms
    # (every ConvBN), and the stem's full 3x3 conv as one product of patches.
    assert cpu == 9 + 18 + (9 * 4 + 1) + 25 + 1


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_registry_builds_each_unit(name):
    unit = attention_factory(name, num_heads=2, proj_len=4)(16)
    assert isinstance(unit, ATTENTION[name].unit)
    x = jax.random.normal(jax.random.key(33), (1, 4, 8, 16))
    y = unit.apply(unit.init(jax.random.key(34), x), x)
    assert y.shape == x.shape
    with pytest.raises(ConfigError, match="attention must be one of"):
        attention_factory("performer")


@pytest.mark.parametrize("height, width", [(8, 8), (4, 10)])
def test_the_rank4_unfold_and_fold_equal_the_transposes(height, width):
    """The portable path's unfold / fold (tensors of rank 4 at most, for mobile runtimes)."""
    from mvit2_jax.models.mobilevitv2 import fold, unfold

    x = jax.random.normal(jax.random.key(40), (2, height, width, 3))
    patches = unfold(x)
    np.testing.assert_array_equal(unfold(x, rank4=True), patches)
    np.testing.assert_array_equal(fold(patches, height, width, rank4=True), x)
    np.testing.assert_array_equal(fold(patches, height, width), x)


def test_the_rank4_group_norm_equals_flax_group_norm():
    from mvit2_jax.models.layers import group_norm1

    x = 3.0 + jax.random.normal(jax.random.key(41), (2, 4, 16, 8))
    flax_norm, ours = group_norm1(jnp.float32, kernels="cpu"), group_norm1(jnp.float32, kernels="portable")
    variables = flax_norm.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda v: v + jax.random.normal(jax.random.key(42), v.shape), variables)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(ours.apply(variables, x), flax_norm.apply(variables, x), atol=2e-6)
