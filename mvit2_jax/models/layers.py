"""Building blocks shared by the model family: convolutions, dense layers, norms, resize.

Parameters keep one layout everywhere (Flax's HWIO conv kernels, [in, out] dense kernels,
nn.BatchNorm's variables). One switch, `kernels`, picks how every layer computes:

- "portable": library ops only (lax.conv_general_dilated, jnp.dot, nn.BatchNorm). The fast
  path on GPUs and TPUs, and the one export needs; any backend can choose it.
- "cpu": the hand-written kernels of mvit2_jax.models.kernels (depthwise convolutions as
  shifted multiply-adds, 1x1 convolutions and dense layers as matrix products with a copy-free
  backward, full convolutions over few input channels (the stems) as one product of patches,
  training-mode BatchNorm+SiLU that recomputes instead of storing), which XLA:CPU runs several
  times faster. Same functions, same variables.
- "auto": "cpu" on the CPU backend, "portable" elsewhere.

GroupNorm, LayerNorm and the bilinear resizes have one implementation, library ops, on every path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvit2_jax.errors import ConfigError
from mvit2_jax.models import kernels as cpu_kernels

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default for conv and linear weights: kaiming_uniform(a=sqrt(5)), which is
# uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

KERNELS = ("auto", "cpu", "portable")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def resolve_kernels(kernels: str) -> str:
    """"cpu" or "portable": 'auto' picks the CPU kernels on the CPU backend only."""
    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "portable"
    return kernels


def portable_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's product [..., k] @ [k, n] for the portable path: on a rank-4 input a 1x1
    convolution, on rank 3 a matrix product of the flattened rows; the same values through
    the ops mobile runtimes take (their matrix products stop at rank 3, and converters fold
    reshapes around a product back into it)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2:
        if lhs.ndim == 4:
            return pointwise_conv(lhs, rhs, precision, preferred_element_type)
        if lhs.ndim == 3:
            out = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision,
                                      preferred_element_type=preferred_element_type)
            return out.reshape(*lhs.shape[:-1], rhs.shape[-1])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)


def pointwise_conv(x: jax.Array, kernel: jax.Array, precision=None, preferred_element_type=None) -> jax.Array:
    """x [B, H, W, k] @ kernel [k, n] as a 1x1 convolution."""
    return jax.lax.conv_general_dilated(
        x, kernel[None, None], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
        preferred_element_type=preferred_element_type,
    )


class Conv(nn.Module):
    """2-D convolution, NHWC, HWIO kernel, symmetric padding ((k-1)//2) * dilation as in PyTorch."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    groups: int = 1
    dilation: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        if cin % self.groups:
            raise ConfigError(f"{cin} input channels do not split into {self.groups} groups")
        k, d = self.kernel_size, self.dilation
        kernel = self.param(
            "kernel", torch_default_kernel_init, (k, k, cin // self.groups, self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        cpu = resolve_kernels(self.kernels) == "cpu"
        pad = (k - 1) // 2 * d
        if k == 1 and self.strides == 1 and self.groups == 1:
            y = cpu_kernels.pointwise(x, kernel[0, 0]) if cpu else pointwise_conv(x, kernel[0, 0])
        elif cpu and self.groups == cin == self.features:
            y = cpu_kernels.depthwise_conv(x, kernel, self.strides, pad, d)
        elif cpu and self.groups == 1 and k * k * cin <= cpu_kernels.PATCH_CONV_MAX_FEATURES:
            y = cpu_kernels.patch_conv(x, kernel, self.strides, pad, d)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.strides, self.strides),
                padding=((pad, pad), (pad, pad)),
                rhs_dilation=(d, d),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if self.use_bias:
            fan_in = k * k * cin // self.groups
            bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(
    features: int,
    *,
    dtype: Dtype,
    kernels: str,
    in_features: Optional[int] = None,
    kernel_init: Optional[Initializer] = None,
    bias_init: Optional[Initializer] = None,
    name: Optional[str] = None,
) -> nn.Dense:
    """nn.Dense over the last axis, float32 parameters, its product per `kernels`.

    Initialized like a PyTorch linear / 1x1 conv (needs `in_features` for the bias) unless
    `kernel_init` and `bias_init` are given.
    """
    cpu = resolve_kernels(kernels) == "cpu"
    extra = {"dot_general": cpu_kernels.pointwise_dot_general if cpu else portable_dot_general}
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init or torch_default_kernel_init,
        bias_init=bias_init or torch_default_bias_init(in_features),
        name=name,
        **extra,
    )


class BatchNormAct(nn.Module):
    """BatchNorm over all but the last axis (+ optional SiLU), with Flax BatchNorm's variables.

    Variables, initial values, the running-average update (momentum 0.9 on the biased batch
    variance) and eval mode are those of `nn.BatchNorm(momentum=0.9, epsilon=1e-5)`, so
    checkpoints and converted weights load either way; training mode runs
    `kernels.batch_norm_act_train`.
    """

    act: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        x = x.astype(self.dtype)
        if not train:  # Flax's formula, in float32, cast to dtype
            z = ((x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias).astype(self.dtype)
            return nn.silu(z) if self.act else z
        y, mean, var = cpu_kernels.batch_norm_act_train(x, scale, bias, self.epsilon, self.act)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
        return y


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-5, PyTorch momentum 0.1) + optional activation.

    `act`: "silu" (the backbone), "relu" (the task heads of the official code) or None.
    """

    features: int
    kernel_size: int = 1
    strides: int = 1
    groups: int = 1
    dilation: int = 1
    act: Optional[str] = "silu"
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(
            self.features,
            self.kernel_size,
            self.strides,
            self.groups,
            self.dilation,
            dtype=self.dtype,
            kernels=self.kernels,
            name="conv",
        )(x)
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"act must be one of {tuple(ACTIVATIONS)}, got {self.act!r}")
        if resolve_kernels(self.kernels) == "cpu" and self.act in ("silu", None):
            return BatchNormAct(self.act == "silu", dtype=self.dtype, name="bn")(x, train)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn",
        )(x)
        return ACTIVATIONS[self.act](x)


ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu, None: lambda x: x}


_ONNX_GRAPH = contextvars.ContextVar("mvit2_jax_onnx_graph", default=False)


@contextlib.contextmanager
def onnx_graph() -> Iterator[None]:
    """While tracing for ONNX (mvit2_jax.export.to_onnx): the portable path's layers that
    ONNX has one operator for are written so that jax2onnx emits that operator."""
    token = _ONNX_GRAPH.set(True)
    try:
        yield
    finally:
        _ONNX_GRAPH.reset(token)


def group_norm1(dtype: Dtype, name: Optional[str] = None, kernels: str = "auto") -> nn.Module:
    """GroupNorm with one group: statistics over every non-batch axis, per-channel affine.

    nn.GroupNorm, whose statistics pass through a rank-5 view of a [B, P, N, d] input; on the
    portable path `GroupNorm1`, the same variables and formula with every tensor at rank 4."""
    if resolve_kernels(kernels) == "portable":
        return GroupNorm1(epsilon=1e-5, dtype=dtype, name=name)
    return nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class GroupNorm1(nn.Module):
    """One-group GroupNorm as nn.GroupNorm computes it (float32 statistics, the variance as
    E[x^2] - E[x]^2, (x - mean) * (rsqrt(var + eps) * scale) + bias), reducing over the
    non-batch axes directly; variables "scale" and "bias" as nn.GroupNorm's."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        if _ONNX_GRAPH.get():
            # One InstanceNormalization over [B, 1, L] (jax2onnx's nn.InstanceNorm lowering)
            # instead of a dozen small ops: the same formula in ONNX Runtime.
            flat = nn.InstanceNorm(epsilon=self.epsilon, dtype=jnp.float32, use_bias=False, use_scale=False, feature_axes=1)(
                xf.reshape(x.shape[0], 1, -1))
            return (flat.reshape(x.shape) * scale + bias).astype(self.dtype)
        axes = tuple(range(1, x.ndim))
        mean = jnp.mean(xf, axes, keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(xf), axes, keepdims=True) - jnp.square(mean), 0.0)
        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def layer_norm(dtype: Dtype, name: Optional[str] = None, kernels: str = "auto") -> nn.LayerNorm:
    """LayerNorm over the last axis (per token), eps 1e-5 as PyTorch's."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


@functools.lru_cache(maxsize=None)
def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights with align_corners=True."""
    return bilinear_matrix(n_in, n_out, True)


@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights as PyTorch's F.interpolate computes them
    (align_corners=False: half-pixel centres, sources below 0 clamped to 0; no antialiasing)."""
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or (align_corners and n_out == 1):
        m[:, 0] = 1.0
        return m
    dst = np.arange(n_out, dtype=np.float64)
    src = dst * (n_in - 1) / (n_out - 1) if align_corners else np.maximum((dst + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def resize_bilinear_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of NHWC `x` with align_corners=True (PyTorch's F.interpolate)."""
    return resize_bilinear(x, height, width, align_corners=True)


def resize_bilinear(x: jax.Array, height: int, width: int, align_corners: bool = False) -> jax.Array:
    """Bilinear resize of NHWC `x` as PyTorch's F.interpolate(mode="bilinear", align_corners=...)."""
    _, h, w, _ = x.shape
    if (h, w) == (height, width):
        return x
    ry = jnp.asarray(bilinear_matrix(h, height, align_corners), x.dtype)
    rx = jnp.asarray(bilinear_matrix(w, width, align_corners), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", ry, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", rx, x, precision=jax.lax.Precision.HIGHEST)
