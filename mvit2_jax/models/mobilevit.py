"""MobileViTv1 (Mehta & Rastegari, ICLR 2022) XXS, XS and S: the paper's v1-vs-v2 comparison.

Built from the MobileViTv2 family's layers: the same stem, inverted residuals (expansion 2
for XXS, 4 for XS and S), unfold / fold and transformer layer, here with LayerNorm per token
and, by default, the registry's multi-head attention ("mha", 4 heads; any registered unit
can replace it). The v1 block: local 3x3 conv (BN, SiLU) and 1x1 to the transformer width,
L transformer layers over the unfolded 2x2 patches, LayerNorm, fold, 1x1 projection (BN,
SiLU), then the block's input and that projection concatenated and fused by a 3x3 conv (BN,
SiLU). A map not divisible by the patch is resized up (bilinear, half-pixel) before the
unfold and back after the fold, as the official code does.

`MobileViTBackbone` returns the same feature dict as `MobileViTv2Backbone` ("stem",
"layer1", ..., "layer5") at output stride 32, 16 or 8: a dilated stage runs its stride-2
inverted residual at stride 1 with the previous dilation, and its v1 block keeps dilation 1
(cvnets builds the v1 block without a dilation). `MobileViT` is the classifier: the backbone,
a 1x1 conv to `num_features` (BN, SiLU), global average pool and a linear head.

Variable names follow timm's `mobilevit_{xxs,xs,s}` (stem, stages_i_j, conv_kxk, conv_1x1,
transformer_t, norm, conv_proj, conv_fusion, final_conv, head), at the model's top level.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvit2_jax.errors import ConfigError
from mvit2_jax.models.attention import AttentionFactory
from mvit2_jax.models.layers import Conv, ConvBN, layer_norm, resize_bilinear, resolve_kernels
from mvit2_jax.models.mobilevitv2 import (
    PATCH_SIZE,
    TRANSFORMER_DEPTHS,
    InvertedResidual,
    MobileViTv2Backbone,
    TransformerLayer,
    checked_backbone_options,
    classifier_head,
    compute_dtype,
    dilations_for,
    fold,
    module_config,
    setup_backbone,
    unfold,
)


@dataclasses.dataclass(frozen=True)
class V1Variant:
    """One MobileViTv1 size: widths, exact trainable parameters (1000 classes), ImageNet-1k
    top-1 (paper), the transformer dropout of its official recipe, and timm's model name."""

    name: str
    stem: int
    stages: Tuple[int, int, int, int, int]  # layer1 .. layer5 channels
    attn_dims: Tuple[int, int, int]  # transformer widths of layer3, layer4, layer5
    expansion: int  # of every inverted residual
    num_features: int  # the 1x1 conv before the pool
    params: int
    top1: float
    dropout: float

    @property
    def timm_name(self) -> str:
        return f"mobilevit_{self.name}"


V1_VARIANTS: Dict[str, V1Variant] = {
    v.name: v
    for v in (
        V1Variant("xxs", 16, (16, 24, 48, 64, 80), (64, 80, 96), 2, 320, 1_272_024, 69.0, 0.05),
        V1Variant("xs", 16, (32, 48, 64, 80, 96), (96, 120, 144), 4, 384, 2_317_848, 74.8, 0.1),
        V1Variant("s", 16, (32, 64, 96, 128, 160), (144, 192, 240), 4, 640, 5_578_632, 78.4, 0.1),
    )
}


def v1_variant(name: str) -> V1Variant:
    if name not in V1_VARIANTS:
        raise ConfigError(f"MobileViTv1 variant must be one of {tuple(V1_VARIANTS)}, got {name!r}")
    return V1_VARIANTS[name]


class MobileViTBlock(nn.Module):
    """The MobileViTv1 block (see the module docstring); `attention` a module factory."""

    features: int
    attn_dim: int
    depth: int
    attention: AttentionFactory
    dilation: int = 1
    dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: Tuple[float, ...] = ()
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x
        _, h, w, c = x.shape
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        y = ConvBN(c, 3, dilation=self.dilation, name="conv_kxk", **kw)(x, train)
        y = Conv(self.attn_dim, 1, name="conv_1x1", **kw)(y)
        p = PATCH_SIZE
        new_h, new_w = math.ceil(h / p) * p, math.ceil(w / p) * p
        rank4 = resolve_kernels(self.kernels) == "portable"  # the export path: every tensor rank 4 or less
        y = unfold(resize_bilinear(y, new_h, new_w), rank4)
        for t in range(self.depth):
            y = TransformerLayer(
                self.attn_dim,
                self.attention,
                self.dropout,
                self.ffn_dropout,
                self.drop_path[t] if self.drop_path else 0.0,
                norm="layer",
                name=f"transformer_{t}",
                **kw,
            )(y, train)
        y = layer_norm(self.dtype, name="norm")(y)
        y = resize_bilinear(fold(y, new_h, new_w, rank4), h, w)
        y = ConvBN(self.features, 1, name="conv_proj", **kw)(y, train)
        fused = jnp.concatenate([shortcut.astype(y.dtype), y], axis=-1)
        return ConvBN(self.features, 3, name="conv_fusion", **kw)(fused, train)


class MobileViTBackbone(nn.Module):
    """MobileViTv1 as a feature extractor. Input: float images in [0, 1], [B, H, W, 3].

    Returns {"stem", "layer1", ..., "layer5"} as `MobileViTv2Backbone` does. Attributes: see
    `MobileViT` (all but num_classes and head_dropout), plus output_stride.
    """

    variant: str = "xxs"
    output_stride: int = 32
    attention: str = "mha"
    num_heads: int = 4
    linformer_proj_len: int = 64
    dtype: str = "float32"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    kernels: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        dtype, make_attention = checked_backbone_options(self, images)
        v = v1_variant(self.variant)
        kw = dict(dtype=dtype, kernels=self.kernels)
        ir = dict(expansion=v.expansion, **kw)

        features = {}
        x = features["stem"] = ConvBN(v.stem, 3, 2, name="stem", **kw)(images, train)
        x = features["layer1"] = InvertedResidual(v.stages[0], 1, name="stages_0_0", **ir)(x, train)
        for b, stride in enumerate((2, 1, 1)):
            x = InvertedResidual(v.stages[1], stride, name=f"stages_1_{b}", **ir)(x, train)
        features["layer2"] = x

        n_layers = sum(TRANSFORMER_DEPTHS)
        rates = [self.drop_path * i / max(n_layers - 1, 1) for i in range(n_layers)]
        stages = dilations_for(self.output_stride)
        for s, (channels, attn_dim, depth, (stride, dilation)) in enumerate(
            zip(v.stages[2:], v.attn_dims, TRANSFORMER_DEPTHS, stages), start=2
        ):
            x = InvertedResidual(channels, stride, dilation, name=f"stages_{s}_0", **ir)(x, train)
            x = MobileViTBlock(
                channels,
                attn_dim,
                depth,
                make_attention,
                1,  # the official v1 block is built without the stage's dilation
                self.dropout,
                self.ffn_dropout,
                tuple(rates[:depth]),
                name=f"stages_{s}_1",
                **kw,
            )(x, train)
            features[f"layer{s + 1}"] = x
            rates = rates[depth:]
        return features


class MobileViT(nn.Module):
    """MobileViTv1 classifier. Input: float images in [0, 1], [B, H, W, 3]; output: logits.

    Attributes:
      variant: "xxs", "xs" or "s" (`V1_VARIANTS`).
      num_classes: size of the classifier head.
      attention: a name from mvit2_jax.models.attention.ATTENTION; "mha" is v1's own unit.
      num_heads: heads of the "mha" and "linformer" units (4 in the official models).
      linformer_proj_len: token length the "linformer" unit projects keys and values to.
      dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
      dropout / attn_dropout / ffn_dropout: as in the official code (the official recipe:
        dropout 0.05 for XXS, 0.1 for XS and S; default 0 here).
      drop_path: stochastic depth of the last transformer layer, rising linearly from 0.
      head_dropout: dropout before the classifier (0.1 in the official recipe).
      kernels: "auto", "cpu" or "portable" (see mvit2_jax.models.layers).
    """

    variant: str = "xxs"
    num_classes: int = 1000
    attention: str = "mha"
    num_heads: int = 4
    linformer_proj_len: int = 64
    dtype: str = "float32"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    head_dropout: float = 0.0
    kernels: str = "auto"

    def config(self) -> Dict[str, Any]:
        """The constructor arguments, JSON-serializable; MobileViT(**config) rebuilds it."""
        return {"family": "mobilevit", **module_config(self)}

    def setup(self) -> None:
        setup_backbone(self, MobileViTBackbone)
        self.final_conv = ConvBN(
            v1_variant(self.variant).num_features, 1, dtype=compute_dtype(self.dtype), kernels=self.kernels
        )
        self.head_drop = nn.Dropout(self.head_dropout)
        self.head = classifier_head(self.num_classes, self.kernels)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = self.final_conv(self.backbone(images, train)["layer5"], train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = self.head_drop(x, deterministic=not train)
        return self.head(x)


BACKBONES = {"mobilevitv2": MobileViTv2Backbone, "mobilevit": MobileViTBackbone}


def setup_any_backbone(host: nn.Module, **fixed: Any) -> None:
    """`setup_backbone` for a task model with a `family` field: MobileViTv2Backbone (its
    `alpha`) or MobileViTBackbone (its `variant`), the segmentation and SSD heads unchanged."""
    if host.family not in BACKBONES:
        raise ConfigError(f"family must be one of {tuple(BACKBONES)}, got {host.family!r}")
    if host.family == "mobilevit":
        v1_variant(host.variant)
    setup_backbone(host, BACKBONES[host.family], **fixed)


def family_config(host: nn.Module) -> Dict[str, Any]:
    """A task model's constructor arguments without the other family's fields: a MobileViTv2
    model records no `family` or `variant` (as before the family existed), a v1 model no `alpha`."""
    config = module_config(host)
    for field in ("family", "variant") if host.family == "mobilevitv2" else ("alpha",):
        config.pop(field, None)
    return config
