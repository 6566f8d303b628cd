"""Building blocks shared by the MobileViTv2 family: convolutions, norms, resize.

Parameters keep one layout on every backend (Flax's HWIO conv kernels); only the
implementation of the forward pass is chosen per backend, because XLA:CPU runs grouped
and 1x1 convolutions far slower than the same arithmetic written as multiply-adds and
matrix products, while GPUs and TPUs are fastest with the library convolution.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default for conv and linear weights: kaiming_uniform(a=sqrt(5)), which is
# uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

CONV_IMPLS = ("auto", "xla", "unrolled")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def resolve_conv_impl(impl: str) -> str:
    """'auto' picks multiply-adds on CPU and the library convolution elsewhere."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "unrolled" if jax.default_backend() == "cpu" else "xla"
    return impl


def _depthwise_unrolled_forward(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv of the padded input as a sum of k*k shifted multiply-adds (NHWC, kernel [k, k, 1, C])."""
    k = kernel.shape[0]
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            patch = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (xp.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, xp.shape[3]),
                (1, stride, stride, 1),
            )
            term = patch * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


# Elements of one block of rows (per channel set) in the depthwise kernel gradient: small
# enough that the k*k shifted copies of a block stay in cache.
_DK_BLOCK_ELEMENTS = 262144


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_unrolled(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """Depthwise conv as multiply-adds, with a hand-written backward pass.

    Differentiating the multiply-adds directly would keep all k*k shifted copies of the
    input for the kernel gradient and materialize k*k padded copies of the output gradient;
    this backward keeps only the padded input and computes both gradients with fused passes.
    (Keeping the padded rather than the unpadded input lets XLA write it once, fused into
    the producer of x, instead of writing x and a padded copy.)
    """
    return _depthwise_unrolled_forward(_pad_hw(x, pad), kernel, stride)


def _pad_hw(x: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _depthwise_unrolled_fwd(x, kernel, stride, pad):
    xp = _pad_hw(x, pad)
    return _depthwise_unrolled_forward(xp, kernel, stride), (xp, kernel)


def _depthwise_unrolled_bwd(stride, pad, residuals, g):
    xp, kernel = residuals
    k = kernel.shape[0]
    b, h, w, c = xp.shape[0], xp.shape[1] - 2 * pad, xp.shape[2] - 2 * pad, xp.shape[3]
    out_h, out_w = g.shape[1], g.shape[2]
    zero = jnp.zeros((), g.dtype)
    # Input gradient: the transposed convolution, i.e. the output gradient dilated by the
    # stride, padded, and correlated with the flipped kernel.
    lo = k - 1 - pad
    span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
    gp = jax.lax.pad(
        g, zero, ((0, 0, 0), (lo, h + k - 1 - lo - span_h, stride - 1), (lo, w + k - 1 - lo - span_w, stride - 1), (0, 0, 0))
    )
    dx = None
    for i in range(k):
        for j in range(k):
            term = jax.lax.slice(gp, (0, i, j, 0), (b, i + h, j + w, c)) * kernel[k - 1 - i, k - 1 - j, 0]
            dx = term if dx is None else dx + term
    # Kernel gradient: per tap, the sum over batch and space of shifted input * gradient,
    # accumulated over blocks of output rows (all images at once, so that a batch-sharded
    # input stays sharded) small enough that the k*k shifted copies of a block stay in
    # cache (taken over the whole input they would be materialized in memory).
    rows = max(1, min(out_h, _DK_BLOCK_ELEMENTS // (b * out_w * c)))
    while out_h % rows:
        rows -= 1
    in_rows = (rows - 1) * stride + k

    def accumulate(r, acc):
        xs = jax.lax.dynamic_slice_in_dim(xp, r * rows * stride, in_rows, axis=1)
        gs = jax.lax.dynamic_slice_in_dim(g, r * rows, rows, axis=1).astype(jnp.float32)
        taps = []
        for i in range(k):
            for j in range(k):
                patch = jax.lax.slice(xs, (0, i, j, 0), (b, i + (rows - 1) * stride + 1, j + span_w, c), (1, stride, stride, 1))
                taps.append(jnp.sum(patch.astype(jnp.float32) * gs, axis=(0, 1, 2)))
        return acc + jnp.stack(taps)

    dk = jax.lax.fori_loop(0, out_h // rows, accumulate, jnp.zeros((k * k, c), jnp.float32))
    dk = dk.reshape(kernel.shape).astype(kernel.dtype)
    return dx.astype(xp.dtype), dk


_depthwise_unrolled.defvjp(_depthwise_unrolled_fwd, _depthwise_unrolled_bwd)


@jax.custom_vjp
def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution as a matrix product over the channel axis (kernel [C_in, C_out]).

    The backward pass computes the kernel gradient as one product contracting the
    flattened batch and spatial axes of both operands, which XLA:CPU runs without copies;
    differentiating jnp.dot directly lets XLA fold a transpose into the producer of the
    output gradient, which then writes it transposed, several times slower.
    """
    return jnp.dot(x, kernel)


def _pointwise_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, g):
    x, kernel = residuals
    cin, cout = kernel.shape
    dkernel = jax.lax.dot_general(x.reshape(-1, cin), g.reshape(-1, cout), (((0,), (0,)), ((), ())))
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class Conv(nn.Module):
    """2-D convolution, NHWC, symmetric padding (k-1)//2 as in PyTorch, HWIO kernel."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        if cin % self.groups:
            raise ValueError(f"{cin} input channels do not split into {self.groups} groups")
        k = self.kernel_size
        kernel = self.param(
            "kernel", torch_default_kernel_init, (k, k, cin // self.groups, self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        impl = resolve_conv_impl(self.impl)
        pad = (k - 1) // 2
        if k == 1 and self.strides == 1 and self.groups == 1:
            y = _pointwise(x, kernel[0, 0]) if impl == "unrolled" else jnp.dot(x, kernel[0, 0])
        elif impl == "unrolled" and self.groups == cin == self.features:
            y = _depthwise_unrolled(x, kernel, self.strides, pad)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.strides, self.strides),
                padding=((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if self.use_bias:
            fan_in = k * k * cin // self.groups
            bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's product through `_pointwise` (same result, faster backward on XLA:CPU)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2 and precision is None:
        return _pointwise(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)


def torch_dense(features: int, in_features: int, dtype: Dtype, name: Optional[str] = None) -> nn.Dense:
    """Linear map over the last axis, initialized like a PyTorch 1x1 conv with bias."""
    extra = {"dot_general": _dense_dot_general} if resolve_conv_impl("auto") == "unrolled" else {}
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(in_features),
        name=name,
        **extra,
    )


def _bn_act_forward(x, scale, bias, eps, act):
    """Batch statistics (float32) and act(batch_norm(x)); statistics over all but the last axis."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    # One pass for both sums, E[d^2] - E[d]^2 with d = x - shift, shifted by one value of
    # each channel (the first pixel) so that the difference does not cancel when the mean
    # is large against the spread (unshifted, that cancellation made gradients of nearly
    # constant channels differ between 1 and 4 devices at the 1e-3 level).
    shift = jax.lax.stop_gradient(xf[(0,) * (x.ndim - 1)])
    d = xf - shift
    dmean = jnp.mean(d, axes)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(d), axes) - jnp.square(dmean))
    mean = shift + dmean
    rstd = jax.lax.rsqrt(var + eps)
    # (x - mean) * a + bias, not x * a + (bias - mean * a): with a nearly constant channel
    # rstd is large and the folded form loses the difference to cancellation.
    z = (xf - mean) * (scale * rstd) + bias
    y = nn.silu(z) if act else z
    return y.astype(x.dtype), mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_act_train(x, scale, bias, eps, act):
    """Training-mode batch norm, optionally followed by SiLU: (y, batch mean, batch variance).

    The same function as Flax's BatchNorm (+ nn.silu) with batch statistics, with a
    hand-written backward pass that keeps only the input and the statistics and recomputes
    the normalized values: the automatic one materializes several full-size intermediates,
    which makes the memory-bound normalization a large part of a CPU training step.
    """
    y, mean, var, _ = _bn_act_forward(x, scale, bias, eps, act)
    return y, mean, var


def _bn_act_fwd(x, scale, bias, eps, act):
    y, mean, var, rstd = _bn_act_forward(x, scale, bias, eps, act)
    return (y, mean, var), (x, scale, bias, mean, rstd)


def _bn_act_bwd(eps, act, residuals, cotangents):
    x, scale, bias, mean, rstd = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dz = dy.astype(jnp.float32)
    if act:  # d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
        z = xhat * scale + bias
        s = jax.nn.sigmoid(z)
        dz = dz * (s * (1.0 + z * (1.0 - s)))
    dbias = jnp.sum(dz, axes)
    dscale = jnp.sum(dz * xhat, axes)
    # d/dx of the normalization with batch statistics, plus the paths through the returned
    # statistics (d mean / dx = 1/n, d var / dx = 2 (x - mean) / n).
    dx = (scale * rstd) * (dz - (dbias + xhat * dscale) / n) + (dmean + 2.0 * dvar * xhat / rstd) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_act_train.defvjp(_bn_act_fwd, _bn_act_bwd)


class BatchNormAct(nn.Module):
    """BatchNorm over all but the last axis (+ optional SiLU), with Flax BatchNorm's variables.

    Variables, initial values, the running-average update (momentum 0.9 on the biased batch
    variance) and eval mode are those of `nn.BatchNorm(momentum=0.9, epsilon=1e-5)`, so
    checkpoints and converted weights load either way; training mode runs
    `batch_norm_act_train`.
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
        y, mean, var = batch_norm_act_train(x, scale, bias, self.epsilon, self.act)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(var)
        return y


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-5, PyTorch momentum 0.1) + optional SiLU."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    groups: int = 1
    act: bool = True
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(
            self.features,
            self.kernel_size,
            self.strides,
            self.groups,
            dtype=self.dtype,
            impl=self.conv_impl,
            name="conv",
        )(x)
        if resolve_conv_impl(self.conv_impl) == "unrolled":
            return BatchNormAct(self.act, dtype=self.dtype, name="bn")(x, train)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn",
        )(x)
        return nn.silu(x) if self.act else x


def group_norm1(dtype: Dtype, name: Optional[str] = None) -> nn.GroupNorm:
    """GroupNorm with one group: statistics over every non-batch axis, per-channel affine."""
    return nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


@functools.lru_cache(maxsize=None)
def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights with align_corners=True."""
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def resize_bilinear_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of NHWC `x` with align_corners=True (PyTorch's F.interpolate)."""
    _, h, w, _ = x.shape
    if (h, w) == (height, width):
        return x
    ry = jnp.asarray(align_corners_matrix(h, height), x.dtype)
    rx = jnp.asarray(align_corners_matrix(w, width), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", ry, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", rx, x, precision=jax.lax.Precision.HIGHEST)
