"""MobileViTv2 (Mehta & Rastegari, TMLR 2023) for any width multiplier alpha, NHWC.

Module and parameter names follow timm's state-dict names (stem, stages_i_j, conv1_1x1,
transformer_t, head) so that official checkpoints map onto them one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvit2_jax.models.attention import ATTENTION_TYPES, make_attention
from mvit2_jax.models.layers import (
    Conv,
    ConvBN,
    group_norm1,
    resize_bilinear_align_corners,
    torch_dense,
)

Dtype = Any

PATCH_SIZE = 2
MV2_EXPANSION = 2
FFN_MULTIPLIER = 2
TRANSFORMER_DEPTHS = (2, 4, 3)  # layer3, layer4, layer5
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round `value` to a multiple of `divisor`, never going down by more than 10%."""
    if min_value is None:
        min_value = divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


@dataclasses.dataclass(frozen=True)
class Widths:
    """Channel widths of one MobileViTv2 width multiplier."""

    stem: int
    layer1: int
    layer2: int
    layer3: int
    layer4: int
    layer5: int
    attn3: int
    attn4: int
    attn5: int

    @property
    def stages(self) -> Tuple[int, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5)

    @property
    def attn_dims(self) -> Tuple[int, ...]:
        return (self.attn3, self.attn4, self.attn5)


def widths_for(alpha: float) -> Widths:
    """The reference width table (section 2) for width multiplier `alpha`."""
    if not alpha > 0:
        raise ValueError(f"alpha must be a positive width multiplier, got {alpha}")
    stem = make_divisible(min(max(32 * alpha, 16), 64), 8, min_value=16)
    return Widths(
        stem=stem,
        layer1=make_divisible(64 * alpha, 16),
        layer2=make_divisible(128 * alpha, 8),
        layer3=make_divisible(256 * alpha, 8),
        layer4=make_divisible(384 * alpha, 8),
        layer5=make_divisible(512 * alpha, 8),
        attn3=make_divisible(128 * alpha, 8),
        attn4=make_divisible(192 * alpha, 8),
        attn5=make_divisible(256 * alpha, 8),
    )


class InvertedResidual(nn.Module):
    """MV2 block: 1x1 expand (BN, SiLU), 3x3 depthwise (BN, SiLU), 1x1 project (BN)."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cin = x.shape[-1]
        hidden = make_divisible(round(cin * MV2_EXPANSION), 8)
        kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        y = ConvBN(hidden, 1, name="conv1_1x1", **kw)(x, train)
        y = ConvBN(hidden, 3, self.strides, groups=hidden, name="conv2_kxk", **kw)(y, train)
        y = ConvBN(self.features, 1, act=False, name="conv3_1x1", **kw)(y, train)
        if self.strides == 1 and cin == self.features:
            y = y + x
        return y


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + Attn(GN(x)), then x + FFN(GN(x)); GN is one-group GroupNorm."""

    dim: int
    attention: str = "separable"
    num_heads: int = 4
    linformer_proj_len: int = 64
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        det = not train
        # Stochastic depth: drop the whole residual branch per sample.
        drop_branch = nn.Dropout(self.drop_path, broadcast_dims=tuple(range(1, x.ndim)))
        y = group_norm1(self.dtype, name="norm1")(x)
        y = make_attention(
            self.attention,
            self.dim,
            num_heads=self.num_heads,
            linformer_proj_len=self.linformer_proj_len,
            attn_dropout=self.attn_dropout,
            dtype=self.dtype,
            name="attn",
        )(y, train)
        y = nn.Dropout(self.dropout)(y, deterministic=det)
        x = x + drop_branch(y, deterministic=det)

        hidden = int(FFN_MULTIPLIER * self.dim // 16 * 16)
        y = group_norm1(self.dtype, name="norm2")(x)
        y = torch_dense(hidden, self.dim, self.dtype, name="fc1")(y)
        y = nn.silu(y)
        y = nn.Dropout(self.ffn_dropout)(y, deterministic=det)
        y = torch_dense(self.dim, hidden, self.dtype, name="fc2")(y)
        y = nn.Dropout(self.dropout)(y, deterministic=det)
        return x + drop_branch(y, deterministic=det)


def unfold(x: jax.Array) -> jax.Array:
    """[B, H, W, d] -> [B, P, N, d]: P pixel positions in a patch, N patches (row-major)."""
    b, h, w, d = x.shape
    p = PATCH_SIZE
    x = x.reshape(b, h // p, p, w // p, p, d).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, p * p, (h // p) * (w // p), d)


def fold(x: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `unfold`: [B, P, N, d] -> [B, H, W, d]."""
    b, _, _, d = x.shape
    p = PATCH_SIZE
    x = x.reshape(b, p, p, height // p, width // p, d).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, height, width, d)


class MobileViTv2Block(nn.Module):
    """Local 3x3 depthwise + 1x1, global attention over unfolded patches, fold, 1x1 + BN."""

    features: int
    attn_dim: int
    depth: int
    attention: str = "separable"
    num_heads: int = 4
    linformer_proj_len: int = 64
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: Tuple[float, ...] = ()
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _, h, w, c = x.shape
        p = PATCH_SIZE
        new_h, new_w = math.ceil(h / p) * p, math.ceil(w / p) * p
        # Sizes not divisible by the patch are resized up and not resized back.
        x = resize_bilinear_align_corners(x, new_h, new_w)
        kw = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        x = ConvBN(c, 3, groups=c, name="conv_kxk", **kw)(x, train)
        x = Conv(self.attn_dim, 1, dtype=self.dtype, impl=self.conv_impl, name="conv_1x1")(x)
        x = unfold(x)
        for t in range(self.depth):
            x = TransformerLayer(
                self.attn_dim,
                self.attention,
                self.num_heads,
                self.linformer_proj_len,
                self.dropout,
                self.attn_dropout,
                self.ffn_dropout,
                self.drop_path[t] if self.drop_path else 0.0,
                self.dtype,
                name=f"transformer_{t}",
            )(x, train)
        x = group_norm1(self.dtype, name="norm")(x)
        x = fold(x, new_h, new_w)
        return ConvBN(self.features, 1, act=False, name="conv_proj", **kw)(x, train)


class MobileViTv2(nn.Module):
    """MobileViTv2 classifier. Input: float images in [0, 1], [B, H, W, 3]; output: logits.

    Attributes:
      alpha: width multiplier (0.5 to 2.0 in the paper; any positive value works).
      num_classes: size of the classifier head.
      attention: "separable" (the paper's), "mha" or "linformer".
      num_heads: heads of the "mha" and "linformer" units.
      linformer_proj_len: token length the "linformer" unit projects keys and values to.
      dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
      dropout / attn_dropout / ffn_dropout: as in the official code (default 0).
      drop_path: stochastic depth of the last transformer layer, rising linearly from 0.
      head_dropout: dropout before the classifier.
      conv_impl: "auto" (per backend), "xla" (library convs) or "unrolled" (multiply-adds).
    """

    alpha: float = 1.0
    num_classes: int = 1000
    attention: str = "separable"
    num_heads: int = 4
    linformer_proj_len: int = 64
    dtype: str = "float32"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    head_dropout: float = 0.0
    conv_impl: str = "auto"

    def config(self) -> Dict[str, Any]:
        """The constructor arguments, JSON-serializable; MobileViTv2(**config) rebuilds it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("parent", "name")}

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3] (NHWC RGB), got shape {images.shape}")
        dtype = DTYPES[self.dtype]
        widths = widths_for(self.alpha)
        kw = dict(dtype=dtype, conv_impl=self.conv_impl)

        x = ConvBN(widths.stem, 3, 2, name="stem", **kw)(images, train)
        x = InvertedResidual(widths.layer1, 1, name="stages_0_0", **kw)(x, train)
        x = InvertedResidual(widths.layer2, 2, name="stages_1_0", **kw)(x, train)
        x = InvertedResidual(widths.layer2, 1, name="stages_1_1", **kw)(x, train)

        n_layers = sum(TRANSFORMER_DEPTHS)
        rates = [self.drop_path * i / max(n_layers - 1, 1) for i in range(n_layers)]
        for s, (features, attn_dim, depth) in enumerate(
            zip(widths.stages[2:], widths.attn_dims, TRANSFORMER_DEPTHS), start=2
        ):
            x = InvertedResidual(features, 2, name=f"stages_{s}_0", **kw)(x, train)
            x = MobileViTv2Block(
                features,
                attn_dim,
                depth,
                self.attention,
                self.num_heads,
                self.linformer_proj_len,
                self.dropout,
                self.attn_dropout,
                self.ffn_dropout,
                tuple(rates[:depth]),
                name=f"stages_{s}_1",
                **kw,
            )(x, train)
            rates = rates[depth:]

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dropout(self.head_dropout)(x, deterministic=not train)
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.zeros,
            name="head",
        )(x)
