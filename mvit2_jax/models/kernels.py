"""CPU kernels: the same functions as library ops, written so that XLA:CPU runs them fast.

XLA:CPU runs grouped (depthwise), 1x1 and few-channel full convolutions far slower than the
same arithmetic written as shifted multiply-adds and matrix products, and differentiates the
memory-bound BatchNorm into several full-size intermediates. The functions here have
hand-written backward passes (`patch_conv` differentiates through `pointwise`'s);
tests/test_models.py checks values and gradients against the library ops.
They are chosen by the `kernels` switch of mvit2_jax.models.layers ("cpu"); GPUs, TPUs and
exported graphs use the library ops ("portable").
"""

from __future__ import annotations

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- depthwise conv


def _windows(xp: jax.Array, k: int, stride: int, dilation: int):
    """The k*k shifted (strided, dilated) views of the padded NHWC input that a k x k conv
    reads, in (row, column) order: tap (i, j) is what kernel[i, j] multiplies."""
    reach = (k - 1) * dilation
    out_h = (xp.shape[1] - reach - 1) // stride + 1
    out_w = (xp.shape[2] - reach - 1) // stride + 1
    for i in range(k):
        for j in range(k):
            top, left = i * dilation, j * dilation
            yield i, j, jax.lax.slice(
                xp,
                (0, top, left, 0),
                (xp.shape[0], top + (out_h - 1) * stride + 1, left + (out_w - 1) * stride + 1, xp.shape[3]),
                (1, stride, stride, 1),
            )


def _depthwise_forward(xp: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
    """Depthwise conv of the padded input as a sum of k*k shifted multiply-adds (NHWC, kernel [k, k, 1, C])."""
    out = None
    for i, j, patch in _windows(xp, kernel.shape[0], stride, dilation):
        term = patch * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


# Elements of one block of rows (per channel set) in the depthwise kernel gradient: small
# enough that the k*k shifted copies of a block stay in cache.
_DK_BLOCK_ELEMENTS = 262144


def _pad_hw(x: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int, dilation: int) -> jax.Array:
    """Depthwise conv (NHWC, HWIO kernel [k, k, 1, C], symmetric `pad`) as multiply-adds.

    Differentiating the multiply-adds directly would keep all k*k shifted copies of the
    input for the kernel gradient and materialize k*k padded copies of the output gradient;
    this backward keeps only the padded input and computes both gradients with fused passes.
    (Keeping the padded rather than the unpadded input lets XLA write it once, fused into
    the producer of x, instead of writing x and a padded copy.)
    """
    return _depthwise_forward(_pad_hw(x, pad), kernel, stride, dilation)


def _depthwise_fwd(x, kernel, stride, pad, dilation):
    xp = _pad_hw(x, pad)
    return _depthwise_forward(xp, kernel, stride, dilation), (xp, kernel)


def _depthwise_bwd(stride, pad, dilation, residuals, g):
    xp, kernel = residuals
    k, d = kernel.shape[0], dilation
    b, h, w, c = xp.shape[0], xp.shape[1] - 2 * pad, xp.shape[2] - 2 * pad, xp.shape[3]
    out_h, out_w = g.shape[1], g.shape[2]
    zero = jnp.zeros((), g.dtype)
    # Input gradient: the transposed convolution, i.e. the output gradient dilated by the
    # stride, padded, and correlated with the flipped (dilated) kernel.
    lo = (k - 1) * d - pad
    span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
    reach = (k - 1) * d
    gp = jax.lax.pad(
        g, zero,
        ((0, 0, 0), (lo, h + reach - lo - span_h, stride - 1), (lo, w + reach - lo - span_w, stride - 1), (0, 0, 0)),
    )
    dx = None
    for i in range(k):
        for j in range(k):
            term = jax.lax.slice(gp, (0, i * d, j * d, 0), (b, i * d + h, j * d + w, c)) * kernel[k - 1 - i, k - 1 - j, 0]
            dx = term if dx is None else dx + term
    # Kernel gradient: per tap, the sum over batch and space of shifted input * gradient,
    # accumulated over blocks of output rows (all images at once, so that a batch-sharded
    # input stays sharded) small enough that the k*k shifted copies of a block stay in
    # cache (taken over the whole input they would be materialized in memory).
    rows = max(1, min(out_h, _DK_BLOCK_ELEMENTS // (b * out_w * c)))
    while out_h % rows:
        rows -= 1
    in_rows = (rows - 1) * stride + reach + 1

    def accumulate(r, acc):
        xs = jax.lax.dynamic_slice_in_dim(xp, r * rows * stride, in_rows, axis=1)
        gs = jax.lax.dynamic_slice_in_dim(g, r * rows, rows, axis=1).astype(jnp.float32)
        taps = []
        for i in range(k):
            for j in range(k):
                patch = jax.lax.slice(
                    xs, (0, i * d, j * d, 0), (b, i * d + (rows - 1) * stride + 1, j * d + span_w, c), (1, stride, stride, 1)
                )
                taps.append(jnp.sum(patch.astype(jnp.float32) * gs, axis=(0, 1, 2)))
        return acc + jnp.stack(taps)

    dk = jax.lax.fori_loop(0, out_h // rows, accumulate, jnp.zeros((k * k, c), jnp.float32))
    dk = dk.reshape(kernel.shape).astype(kernel.dtype)
    return dx.astype(xp.dtype), dk


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


# ----------------------------------------------------------------------------- 1x1 conv / dense


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A matrix product over the channel axis (kernel [C_in, C_out]): 1x1 convs, dense layers.

    The backward pass computes the kernel gradient as one product contracting the
    flattened batch and spatial axes of both operands, which XLA:CPU runs without copies;
    differentiating jnp.dot directly lets XLA fold a transpose into the producer of the
    output gradient, which then writes it transposed, several times slower.
    """
    return _dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dot(a: jax.Array, b: jax.Array, dimension_numbers) -> jax.Array:
    """dot_general accumulating in float32, the result in the operands' dtype: for bfloat16
    the form XLA:CPU runs on native bfloat16 units (a bfloat16 result takes a path that ran
    2.2x slower on an AVX512_BF16 EPYC); for float32 the plain product."""
    return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32).astype(a.dtype)


def _pointwise_fwd(x, kernel):
    return _dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))), (x, kernel)


def _pointwise_bwd(residuals, g):
    x, kernel = residuals
    cin, cout = kernel.shape
    dkernel = _dot(x.reshape(-1, cin), g.reshape(-1, cout).astype(x.dtype), (((0,), (0,)), ((), ())))
    dx = _dot(g.astype(x.dtype), kernel, (((g.ndim - 1,), (1,)), ((), ())))
    return dx, dkernel.astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def pointwise_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A `dot_general` for nn.Dense that runs its usual product through `pointwise`."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2 and precision is None:
        return pointwise(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------- full conv, few inputs


# Largest k*k*C_in that `patch_conv` takes: the stems (3x3 over RGB: 27). Its patch matrix is
# k*k times the input; for wide inputs the library convolution is the better trade.
PATCH_CONV_MAX_FEATURES = 64


def patch_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int, dilation: int) -> jax.Array:
    """A full conv (NHWC, HWIO kernel [k, k, C_in, C_out]) as one matrix product of its patches.

    The k*k shifted (strided, dilated) slices of the padded input are concatenated over the
    channel axis in the kernel's (row, column, channel) order and multiplied by the kernel
    reshaped to [k*k*C_in, C_out] through `pointwise`. XLA:CPU runs the stem's 3x3 stride-2
    conv over RGB (C_in = 3) at about a tenth of its matrix-product speed; as one product of
    27 features it takes about half the time. Gradients by differentiation of the slices and
    `pointwise`'s backward.
    """
    patches = [patch for _, _, patch in _windows(_pad_hw(x, pad), kernel.shape[0], stride, dilation)]
    return pointwise(jnp.concatenate(patches, axis=-1), kernel.reshape(-1, kernel.shape[-1]))


# ----------------------------------------------------------------------------- BatchNorm + SiLU


def _bn_act_forward(x, scale, bias, eps, act) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Batch statistics (float32) and act(batch_norm(x)); statistics over all but the last axis."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    # Two passes: the variance as E[(x - mean)^2], not E[x^2] - E[x]^2. The one-pass form
    # cancels when a channel's mean is large against its spread, and the rounding of its
    # large sums then depends on how the batch is laid out: with Mixup/CutMix batches,
    # gradients on 1 device differed from those on 4 by 4e-3 (relative), even with the sums
    # shifted by an estimate of the mean. The extra read of x is cheap next to the convs.
    mean = jnp.mean(xf, axes)
    var = jnp.mean(jnp.square(xf - mean), axes)
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
