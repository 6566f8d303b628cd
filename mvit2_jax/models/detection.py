"""Object detection on MobileViTv2: SSDLite, as ml-cvnets builds it (models/detection/ssd.py,
modules/ssd_heads.py, layers/conv_layer.py's SeparableConv2d).

`MobileViTv2SSD(alpha, num_classes=81)` runs the backbone at output stride 32 and predicts
from six levels: layer4 (stride 16), layer5 (32), three extra layers (64, 128, 256: each a
separable 3x3 stride-2 convolution, i.e. depthwise + BN, then pointwise + BN + ReLU, chained
from layer5) and a global level (mean over the map, then a 1x1 convolution without bias and
ReLU). Each level's head projects to `proj_channels[k]` (1x1, BN, ReLU) when its input has
another width, then predicts anchors x (4 + num_classes) channels with a separable 3x3
(depthwise + BN, pointwise with bias) or, at the global level, a plain 1x1 with bias. The
channels are interleaved per anchor (anchor c // (4 + C), field c % (4 + C)); the maps are
flattened row-major, levels concatenated, so the anchors come in the order of
mvit2_jax.models.anchors.ssd_anchors.

Input: float NHWC RGB images in [0, 1] whose sides are divisible by 32. Output: {"loc"
[B, A, 4], "cls" [B, A, num_classes]}, float32, the raw regression and logits (class 0 is
background). mvit2_jax.models.anchors.postprocess turns them into detections.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvit2_jax.errors import ConfigError
from mvit2_jax.models import anchors as anchor_lib
from mvit2_jax.models.layers import Conv, ConvBN
from mvit2_jax.models.mobilevit import family_config, setup_any_backbone
from mvit2_jax.models.mobilevitv2 import compute_dtype

Dtype = Any
EXTRA_STRIDES = (64, 128, 256)


class SeparableConv(nn.Module):
    """Depthwise k x k (stride) + BN without activation, then pointwise 1x1: with BN and ReLU
    (`norm_act`, the extra layers) or with a bias alone (the prediction layers)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    norm_act: bool = True
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        x = ConvBN(x.shape[-1], self.kernel_size, self.strides, groups=x.shape[-1], act=None, name="dw", **kw)(x, train)
        if self.norm_act:
            return ConvBN(self.features, 1, act="relu", name="pw", **kw)(x, train)
        return Conv(self.features, 1, use_bias=True, name="pw", **kw)(x)


class SSDHead(nn.Module):
    """One level's predictions: [B, h * w * anchors, 4 + num_classes]."""

    num_anchors: int
    num_classes: int
    proj_channels: int
    global_level: bool = False
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        out = self.num_anchors * (4 + self.num_classes)
        if self.global_level:
            y = Conv(out, 1, use_bias=True, name="loc_cls", **kw)(x)
        else:
            if x.shape[-1] != self.proj_channels:
                x = ConvBN(self.proj_channels, 1, act="relu", name="proj", **kw)(x, train)
            y = SeparableConv(out, 3, norm_act=False, name="loc_cls", **kw)(x, train)
        return y.reshape(y.shape[0], -1, 4 + self.num_classes)


class MobileViTv2SSD(nn.Module):
    """SSDLite on MobileViTv2. Input: float images in [0, 1], [B, H, W, 3], H and W divisible by 32.

    Attributes:
      alpha, attention, num_heads, linformer_proj_len, dtype, dropout, attn_dropout,
        ffn_dropout, drop_path, kernels: the backbone's (see `MobileViTv2`).
      family: the backbone, "mobilevitv2" (default; its width `alpha`) or "mobilevit"
        (MobileViTv1, its size `variant`: "xxs", "xs", "s"; with attention="mha", v1's own unit).
      num_classes: classes including background (81 for COCO, 21 for VOC).
      proj_channels: the six levels' projection widths (the extra layers' widths for levels
        2-5), officially (512, 256, 256, 128, 128, 64).
    """

    alpha: float = 1.0
    num_classes: int = 81
    proj_channels: Tuple[int, ...] = (512, 256, 256, 128, 128, 64)
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
        """The constructor arguments, JSON-serializable; MobileViTv2SSD(**config) rebuilds it."""
        config = family_config(self)
        config["proj_channels"] = [int(v) for v in config["proj_channels"]]
        return config

    def setup(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"num_classes counts the background too: at least 2, got {self.num_classes}")
        if len(self.proj_channels) != len(anchor_lib.OUTPUT_STRIDES):
            raise ConfigError(f"proj_channels needs {len(anchor_lib.OUTPUT_STRIDES)} widths, got {tuple(self.proj_channels)}")
        dtype = compute_dtype(self.dtype)
        setup_any_backbone(self, output_stride=32)
        kw = dict(dtype=dtype, kernels=self.kernels)
        self.extras = [
            SeparableConv(self.proj_channels[i], 3, 2, name=f"extra_os_{os}", **kw) for i, os in enumerate(EXTRA_STRIDES, start=2)
        ]
        self.global_conv = Conv(self.proj_channels[-1], 1, name="extra_os_global", **kw)
        self.heads = [
            SSDHead(anchor_lib.anchors_per_cell(ratios), self.num_classes, proj, global_level=os == -1, name=f"head_{i}", **kw)
            for i, (os, ratios, proj) in enumerate(zip(anchor_lib.OUTPUT_STRIDES, anchor_lib.ASPECT_RATIOS, self.proj_channels))
        ]

    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        if images.shape[1] % 32 or images.shape[2] % 32:
            raise ConfigError(f"SSD input sides must be divisible by 32, got {images.shape[1]}x{images.shape[2]}")
        features = self.backbone(images, train)
        levels = [features["layer4"], features["layer5"]]
        for extra in self.extras:
            levels.append(extra(levels[-1], train))
        pooled = jnp.mean(levels[-1].astype(jnp.float32), axis=(1, 2), keepdims=True).astype(levels[-1].dtype)
        levels.append(nn.relu(self.global_conv(pooled)))
        out = jnp.concatenate([head(x, train) for head, x in zip(self.heads, levels)], axis=1).astype(jnp.float32)
        return {"loc": out[..., :4], "cls": out[..., 4:]}
