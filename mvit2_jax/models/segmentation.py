"""Semantic segmentation on MobileViTv2: DeepLabv3 (ASPP) and PSPNet heads, as ml-cvnets builds them.

`MobileViTv2Segmentation(alpha, num_classes, head="deeplabv3"|"pspnet", output_stride=8|16|32,
aux_head=...)` runs the backbone (`MobileViTv2Backbone`, dilated for output stride 16 and
8), the head on layer5 and a 1x1 classifier, and upsamples the logits to the input size
(bilinear, align_corners=True). Input: float NHWC RGB images in [0, 1]; output: float32
logits [B, H, W, num_classes]. In training with `aux_head` on, it returns
(logits, aux_logits): the auxiliary head's logits from layer4, at layer4's resolution (the
loss resizes them to the mask).

The heads follow the official code: ReLU after every BatchNorm, channel dropout (PyTorch's
Dropout2d) after ASPP's projection, after PSPNet's fusion conv and inside the aux head;
ASPP's pooled branch is a global mean and a 1x1 conv broadcast back over the map; PSPNet
pools with PyTorch's adaptive average pooling (overlapping bins) and upsamples with
align_corners=True. The backbone shares the model's scope, as in the classifier, so its
variables sit at the top level (params/stem, params/stages_*) and a classification
checkpoint starts a segmentation run path for path.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvit2_jax.errors import ConfigError
from mvit2_jax.models.layers import Conv, ConvBN, resize_bilinear_align_corners
from mvit2_jax.models.mobilevit import family_config, setup_any_backbone
from mvit2_jax.models.mobilevitv2 import compute_dtype

Dtype = Any
HEADS = ("deeplabv3", "pspnet")


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's adaptive average pooling along one axis: bin i
    averages [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)), so bins overlap when
    n_in is not a multiple of n_out."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, height: int, width: int) -> jax.Array:
    """PyTorch's AdaptiveAvgPool2d((height, width)) of NHWC `x`."""
    _, h, w, _ = x.shape
    ry = jnp.asarray(adaptive_pool_matrix(h, height), x.dtype)
    rx = jnp.asarray(adaptive_pool_matrix(w, width), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", ry, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", rx, x, precision=jax.lax.Precision.HIGHEST)


def channel_dropout(rate: float) -> nn.Dropout:
    """PyTorch's Dropout2d for NHWC maps: whole channels of a sample dropped together."""
    return nn.Dropout(rate, broadcast_dims=(1, 2))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): a 1x1 branch, three dilated 3x3 branches,
    a global-pool branch, concatenated and projected to `features`, then channel dropout."""

    features: int = 512
    rates: Tuple[int, int, int] = (6, 12, 18)
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(act="relu", dtype=self.dtype, kernels=self.kernels)
        branches = [ConvBN(self.features, 1, name="convs_0", **kw)(x, train)]
        for i, rate in enumerate(self.rates, start=1):
            branches.append(ConvBN(self.features, 3, dilation=rate, name=f"convs_{i}", **kw)(x, train))
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        pooled = ConvBN(self.features, 1, name=f"convs_{len(self.rates) + 1}", **kw)(pooled, train)
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))  # bilinear from 1x1
        y = ConvBN(self.features, 1, name="project", **kw)(jnp.concatenate(branches, axis=-1), train)
        return channel_dropout(self.dropout)(y, deterministic=not train)


class PyramidPooling(nn.Module):
    """Pyramid pooling (PSPNet): adaptive average pools of `pool_sizes`, each 1x1-reduced to
    ((C // len(pool_sizes)) // 16) * 16 channels and upsampled back, concatenated with the
    input; a 3x3 fusion conv to `features`, then channel dropout."""

    features: int = 512
    pool_sizes: Tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _, h, w, c = x.shape
        reduced = (c // len(self.pool_sizes)) // 16 * 16
        kw = dict(act="relu", dtype=self.dtype, kernels=self.kernels)
        outs = [x]
        for i, size in enumerate(self.pool_sizes):
            y = ConvBN(reduced, 1, name=f"branches_{i}", **kw)(adaptive_avg_pool(x, size, size), train)
            outs.append(resize_bilinear_align_corners(y, h, w))
        y = ConvBN(self.features, 3, name="fusion", **kw)(jnp.concatenate(outs, axis=-1), train)
        return channel_dropout(self.dropout)(y, deterministic=not train)


class AuxHead(nn.Module):
    """The auxiliary head on layer4: 3x3 conv to max(C4 // 4, 128) (BN, ReLU), channel
    dropout, 1x1 conv with bias to the classes."""

    num_classes: int
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        inner = max(x.shape[-1] // 4, 128)
        y = ConvBN(inner, 3, act="relu", dtype=self.dtype, kernels=self.kernels, name="conv")(x, train)
        y = channel_dropout(self.dropout)(y, deterministic=not train)
        return Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, kernels=self.kernels, name="classifier")(y)


class MobileViTv2Segmentation(nn.Module):
    """MobileViTv2 with a DeepLabv3 or PSPNet head. Input: float images in [0, 1], [B, H, W, 3].

    Attributes:
      alpha, attention, num_heads, linformer_proj_len, dtype, dropout, attn_dropout,
        ffn_dropout, drop_path, kernels: the backbone's (see `MobileViTv2`).
      family: the backbone, "mobilevitv2" (default; its width `alpha`) or "mobilevit"
        (MobileViTv1, its size `variant`: "xxs", "xs", "s"; with attention="mha", v1's own unit).
      num_classes: classes of the classifier (and of the aux head).
      head: "deeplabv3" or "pspnet".
      output_stride: 8, 16 or 32 (the backbone's dilation).
      aux_head: add the auxiliary head on layer4 (its logits come out in training only).
      aspp_rates / aspp_features: DeepLabv3's atrous rates and channels.
      psp_pool_sizes / psp_features: PSPNet's pool sizes and channels.
      head_dropout: the channel dropout after ASPP / the PSP fusion conv.
      aux_dropout: the channel dropout inside the aux head.
    """

    alpha: float = 1.0
    num_classes: int = 21
    head: str = "deeplabv3"
    output_stride: int = 16
    aux_head: bool = False
    aspp_rates: Tuple[int, ...] = (6, 12, 18)
    aspp_features: int = 512
    psp_pool_sizes: Tuple[int, ...] = (1, 2, 3, 6)
    psp_features: int = 512
    head_dropout: float = 0.1
    aux_dropout: float = 0.1
    attention: str = "separable"
    num_heads: int = 4
    linformer_proj_len: int = 64
    dtype: str = "float32"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    kernels: str = "auto"
    family: str = "mobilevitv2"
    variant: str = "xxs"

    def config(self) -> Dict[str, Any]:
        """The constructor arguments, JSON-serializable; MobileViTv2Segmentation(**config) rebuilds it."""
        config = family_config(self)
        for field in ("aspp_rates", "psp_pool_sizes"):
            config[field] = [int(v) for v in config[field]]
        return config

    def setup(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {self.num_classes}")
        if self.head == "deeplabv3" and len(self.aspp_rates) != 3:
            raise ConfigError(f"aspp_rates must be three dilation rates such as (6, 12, 18), got {tuple(self.aspp_rates)}")
        dtype = compute_dtype(self.dtype)
        setup_any_backbone(self)
        kw = dict(dropout=self.head_dropout, dtype=dtype, kernels=self.kernels)
        if self.head == "deeplabv3":
            self.context = ASPP(self.aspp_features, tuple(self.aspp_rates), name="aspp", **kw)
        else:
            self.context = PyramidPooling(self.psp_features, tuple(self.psp_pool_sizes), name="psp", **kw)
        self.classifier = Conv(self.num_classes, 1, use_bias=True, dtype=dtype, kernels=self.kernels)
        if self.aux_head:
            self.aux = AuxHead(self.num_classes, self.aux_dropout, dtype=dtype, kernels=self.kernels, name="aux_head")

    def __call__(
        self, images: jax.Array, train: bool = False, return_aux: Optional[bool] = None
    ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
        """Logits at the input size; (logits, aux_logits) when `return_aux` (default: in
        training, when the aux head is on). aux_logits are at layer4's resolution."""
        if return_aux is None:
            return_aux = train and self.aux_head
        if return_aux and not self.aux_head:
            raise ConfigError("return_aux=True needs a model built with aux_head=True")
        features = self.backbone(images, train)
        x = self.classifier(self.context(features["layer5"], train)).astype(jnp.float32)
        logits = resize_bilinear_align_corners(x, images.shape[1], images.shape[2])
        if self.aux_head and (return_aux or self.is_initializing()):
            aux = self.aux(features["layer4"], train).astype(jnp.float32)
            return (logits, aux) if return_aux else logits
        return logits
