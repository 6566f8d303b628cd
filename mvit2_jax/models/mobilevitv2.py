"""MobileViTv2 (Mehta & Rastegari, TMLR 2023) for any width multiplier alpha, NHWC.

`VARIANTS` is the one table of the paper's widths: channel widths, exact parameter counts,
GMACs, ImageNet top-1 and the training recipe. `MobileViTv2Backbone` returns the feature
maps of every stage, at output stride 32, 16 or 8 (dilation as in the official code);
`MobileViTv2` is the classifier on top of it.

Module and parameter names follow timm's state-dict names (stem, stages_i_j, conv1_1x1,
transformer_t, head) so that official checkpoints map onto them one to one; the classifier
shares its backbone's scope, so its variables sit at the top level (params/stem/...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvit2_jax.errors import ConfigError
from mvit2_jax.models.attention import AttentionFactory, attention_factory, check_attention
from mvit2_jax.models.layers import (
    Conv,
    ConvBN,
    dense,
    group_norm1,
    layer_norm,
    resize_bilinear_align_corners,
    resolve_kernels,
)

Dtype = Any

PATCH_SIZE = 2
MV2_EXPANSION = 2
FFN_MULTIPLIER = 2
TRANSFORMER_DEPTHS = (2, 4, 3)  # layer3, layer4, layer5
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OUTPUT_STRIDES = (32, 16, 8)
FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4", "layer5")
FEATURE_STRIDES = {"stem": 2, "layer1": 2, "layer2": 4, "layer3": 8, "layer4": 16, "layer5": 32}


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
    """The official width rules (cvnets mobilevit_v2 config) for width multiplier `alpha`."""
    if not alpha > 0:
        raise ConfigError(f"alpha must be a positive width multiplier such as 1.0, got {alpha}")
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The paper's ImageNet-1k recipe of one width (cvnets config): AdamW, cosine from lr to min_lr."""

    lr: float
    min_lr: float
    weight_decay: float


@dataclasses.dataclass(frozen=True)
class Variant:
    """One width of the paper: widths, exact trainable parameters (1000 classes), GMACs at
    256x256, ImageNet-1k top-1 at 256x256, the recipe, and timm's model name."""

    alpha: float
    widths: Widths
    params: int
    gmacs: float
    top1: float
    recipe: Recipe
    timm_name: str


def _variant(alpha, widths, params, gmacs, top1, lr, min_lr, wd) -> Variant:
    return Variant(alpha, Widths(*widths), params, gmacs, top1, Recipe(lr, min_lr, wd), f"mobilevitv2_{round(alpha * 100):03d}")


VARIANTS: Dict[float, Variant] = {
    v.alpha: v
    for v in (
        # alpha, (stem, l1..l5, attn3..attn5), params, GMACs, top-1, lr, min lr, weight decay
        _variant(0.5, (16, 32, 64, 128, 192, 256, 64, 96, 128), 1_370_593, 0.465, 70.18, 0.0090, 0.00090, 0.004),
        _variant(0.75, (24, 48, 96, 192, 288, 384, 96, 144, 192), 2_866_009, 1.028, 75.56, 0.0090, 0.00090, 0.008),
        _variant(1.0, (32, 64, 128, 256, 384, 512, 128, 192, 256), 4_901_841, 1.812, 78.09, 0.0075, 0.00075, 0.013),
        _variant(1.25, (40, 80, 160, 320, 480, 640, 160, 240, 320), 7_478_089, 2.817, 79.65, 0.0049, 0.00049, 0.020),
        _variant(1.5, (48, 96, 192, 384, 576, 768, 192, 288, 384), 10_594_753, 4.042, 80.38, 0.0035, 0.00035, 0.029),
        _variant(1.75, (56, 112, 224, 448, 672, 896, 224, 336, 448), 14_251_833, 5.489, 80.84, 0.0026, 0.00026, 0.039),
        _variant(2.0, (64, 128, 256, 512, 768, 1024, 256, 384, 512), 18_449_329, 7.156, 81.17, 0.0020, 0.00020, 0.050),
    )
}


def dilations_for(output_stride: int) -> Tuple[Tuple[int, int], ...]:
    """(stride of the first block, dilation) of layer3, layer4, layer5 for an output stride.

    As cvnets' _make_mit_layer: a dilated stage runs its stride-2 block at stride 1 with the
    previous dilation, and its MobileViTv2 block's local 3x3 conv with the doubled one.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    dilated = {32: (), 16: (5,), 8: (4, 5)}[output_stride]
    out, dilation = [], 1
    for layer in (3, 4, 5):
        if layer in dilated:
            out.append((1, dilation))
            dilation *= 2
        else:
            out.append((2, dilation))
    return tuple(out)


class InvertedResidual(nn.Module):
    """MV2 block: 1x1 expand (BN, SiLU), 3x3 depthwise (BN, SiLU), 1x1 project (BN)."""

    features: int
    strides: int = 1
    dilation: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "auto"
    expansion: float = MV2_EXPANSION

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cin = x.shape[-1]
        hidden = make_divisible(round(cin * self.expansion), 8)
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        y = ConvBN(hidden, 1, name="conv1_1x1", **kw)(x, train)
        y = ConvBN(hidden, 3, self.strides, groups=hidden, dilation=self.dilation, name="conv2_kxk", **kw)(y, train)
        y = ConvBN(self.features, 1, act=None, name="conv3_1x1", **kw)(y, train)
        if self.strides == 1 and cin == self.features:
            y = y + x
        return y


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + Attn(N(x)), then x + FFN(N(x)); N is one-group GroupNorm over a
    whole patch-position sequence (MobileViTv2, `norm="group"`) or LayerNorm per token
    (MobileViTv1, `norm="layer"`)."""

    dim: int
    attention: AttentionFactory
    dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    kernels: str = "auto"
    norm: str = "group"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        det = not train
        # Stochastic depth: drop the whole residual branch per sample.
        drop_branch = nn.Dropout(self.drop_path, broadcast_dims=tuple(range(1, x.ndim)))
        norm = TOKEN_NORMS[self.norm]
        y = norm(self.dtype, name="norm1", kernels=self.kernels)(x)
        y = self.attention(self.dim, name="attn")(y, train)
        y = nn.Dropout(self.dropout)(y, deterministic=det)
        x = x + drop_branch(y, deterministic=det)

        hidden = int(FFN_MULTIPLIER * self.dim // 16 * 16)
        y = norm(self.dtype, name="norm2", kernels=self.kernels)(x)
        y = dense(hidden, in_features=self.dim, dtype=self.dtype, kernels=self.kernels, name="fc1")(y)
        y = nn.silu(y)
        y = nn.Dropout(self.ffn_dropout)(y, deterministic=det)
        y = dense(self.dim, in_features=hidden, dtype=self.dtype, kernels=self.kernels, name="fc2")(y)
        y = nn.Dropout(self.dropout)(y, deterministic=det)
        return x + drop_branch(y, deterministic=det)


TOKEN_NORMS = {"group": group_norm1, "layer": layer_norm}


def unfold(x: jax.Array, rank4: bool = False) -> jax.Array:
    """[B, H, W, d] -> [B, P, N, d]: P pixel positions in a patch, N patches (row-major).

    `rank4`: the same values through tensors of rank 4 at most (reshapes, slices and
    concatenations), the form mobile runtimes accept; the default is one rank-6 transpose."""
    b, h, w, d = x.shape
    p = PATCH_SIZE
    if rank4:
        # [B, H/p, p*W, d]: row r*p + i of x is row r, columns i*W ... (i+1)*W - 1; then the
        # same for the columns inside each row, through the channels.
        rows = x.reshape(b, h // p, p * w, d)
        parts = []
        for i in range(p):
            cols = rows[:, :, i * w:(i + 1) * w, :].reshape(b, h // p, w // p, p * d)
            parts += [cols[..., j * d:(j + 1) * d].reshape(b, 1, (h // p) * (w // p), d) for j in range(p)]
        return jnp.concatenate(parts, axis=1)
    x = x.reshape(b, h // p, p, w // p, p, d).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, p * p, (h // p) * (w // p), d)


def fold(x: jax.Array, height: int, width: int, rank4: bool = False) -> jax.Array:
    """Inverse of `unfold`: [B, P, N, d] -> [B, H, W, d] (`rank4`: as in `unfold`)."""
    b, _, _, d = x.shape
    p = PATCH_SIZE
    if rank4:
        rows = []
        for i in range(p):
            cols = [x[:, i * p + j].reshape(b, height // p, width // p, d) for j in range(p)]
            rows.append(jnp.concatenate(cols, axis=-1).reshape(b, height // p, width, d))
        return jnp.concatenate(rows, axis=2).reshape(b, height, width, d)
    x = x.reshape(b, p, p, height // p, width // p, d).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, height, width, d)


class MobileViTv2Block(nn.Module):
    """Local 3x3 depthwise + 1x1, global attention over unfolded patches, fold, 1x1 + BN.

    `attention` is a module factory (mvit2_jax.models.attention.attention_factory); the local
    3x3 conv takes the stage's `dilation`.
    """

    features: int
    attn_dim: int
    depth: int
    attention: AttentionFactory
    dilation: int = 1
    dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: Tuple[float, ...] = ()
    dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _, h, w, c = x.shape
        p = PATCH_SIZE
        new_h, new_w = math.ceil(h / p) * p, math.ceil(w / p) * p
        # Sizes not divisible by the patch are resized up and not resized back.
        x = resize_bilinear_align_corners(x, new_h, new_w)
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        x = ConvBN(c, 3, groups=c, dilation=self.dilation, name="conv_kxk", **kw)(x, train)
        x = Conv(self.attn_dim, 1, name="conv_1x1", **kw)(x)
        rank4 = resolve_kernels(self.kernels) == "portable"  # the export path: every tensor rank 4 or less
        x = unfold(x, rank4)
        for t in range(self.depth):
            x = TransformerLayer(
                self.attn_dim,
                self.attention,
                self.dropout,
                self.ffn_dropout,
                self.drop_path[t] if self.drop_path else 0.0,
                name=f"transformer_{t}",
                **kw,
            )(x, train)
        x = group_norm1(self.dtype, name="norm", kernels=self.kernels)(x)
        x = fold(x, new_h, new_w, rank4)
        return ConvBN(self.features, 1, act=None, name="conv_proj", **kw)(x, train)


def check_images(images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"images must be [batch, height, width, 3] (NHWC RGB), got shape {images.shape}")


def compute_dtype(name: str) -> Dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def checked_backbone_options(backbone: nn.Module, images: jax.Array) -> Tuple[Dtype, AttentionFactory]:
    """(compute dtype, attention factory) of a backbone's fields (attention, num_heads,
    linformer_proj_len, attn_dropout, dtype, kernels), each checked, and the images checked."""
    check_images(images)
    check_attention(backbone.attention)
    resolve_kernels(backbone.kernels)
    dtype = compute_dtype(backbone.dtype)
    make_attention = attention_factory(
        backbone.attention,
        num_heads=backbone.num_heads,
        proj_len=backbone.linformer_proj_len,
        attn_dropout=backbone.attn_dropout,
        dtype=dtype,
        kernels=backbone.kernels,
    )
    return dtype, make_attention


def classifier_head(num_classes: int, kernels: str) -> nn.Dense:
    """The classifiers' linear head (float32; Xavier-uniform kernel, zero bias, as cvnets)."""
    return dense(
        num_classes,
        dtype=jnp.float32,
        kernels=kernels,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros,
    )


class MobileViTv2Backbone(nn.Module):
    """MobileViTv2 as a feature extractor. Input: float images in [0, 1], [B, H, W, 3].

    Returns {"stem", "layer1", ..., "layer5"}: NHWC feature maps at strides 2, 2, 4, 8, 16,
    32, or with output_stride 16 (layer5 dilated) or 8 (layer4 and layer5 dilated) the
    dilated stages keep the resolution of the stage before them.

    Attributes: see `MobileViTv2` (all but the classifier's num_classes and head_dropout),
    plus output_stride.
    """

    alpha: float = 1.0
    output_stride: int = 32
    attention: str = "separable"
    num_heads: int = 4
    linformer_proj_len: int = 64
    dtype: str = "float32"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0
    kernels: str = "auto"

    @property
    def widths(self) -> Widths:
        return widths_for(self.alpha)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        dtype, make_attention = checked_backbone_options(self, images)
        stages = dilations_for(self.output_stride)
        widths = self.widths
        kw = dict(dtype=dtype, kernels=self.kernels)

        features = {}
        x = features["stem"] = ConvBN(widths.stem, 3, 2, name="stem", **kw)(images, train)
        x = features["layer1"] = InvertedResidual(widths.layer1, 1, name="stages_0_0", **kw)(x, train)
        x = InvertedResidual(widths.layer2, 2, name="stages_1_0", **kw)(x, train)
        x = features["layer2"] = InvertedResidual(widths.layer2, 1, name="stages_1_1", **kw)(x, train)

        n_layers = sum(TRANSFORMER_DEPTHS)
        rates = [self.drop_path * i / max(n_layers - 1, 1) for i in range(n_layers)]
        for s, (features_out, attn_dim, depth, (stride, dilation)) in enumerate(
            zip(widths.stages[2:], widths.attn_dims, TRANSFORMER_DEPTHS, stages), start=2
        ):
            x = InvertedResidual(features_out, stride, dilation, name=f"stages_{s}_0", **kw)(x, train)
            block_dilation = dilation * 2 if stride == 1 else dilation
            x = MobileViTv2Block(
                features_out,
                attn_dim,
                depth,
                make_attention,
                block_dilation,
                self.dropout,
                self.ffn_dropout,
                tuple(rates[:depth]),
                name=f"stages_{s}_1",
                **kw,
            )(x, train)
            features[f"layer{s + 1}"] = x
            rates = rates[depth:]
        return features


class MobileViTv2(nn.Module):
    """MobileViTv2 classifier. Input: float images in [0, 1], [B, H, W, 3]; output: logits.

    Attributes:
      alpha: width multiplier (0.5 to 2.0 in the paper; any positive value works).
      num_classes: size of the classifier head.
      attention: a name from mvit2_jax.models.attention.ATTENTION ("separable", "mha", "linformer").
      num_heads: heads of the "mha" and "linformer" units.
      linformer_proj_len: token length the "linformer" unit projects keys and values to.
      dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
      dropout / attn_dropout / ffn_dropout: as in the official code (default 0).
      drop_path: stochastic depth of the last transformer layer, rising linearly from 0.
      head_dropout: dropout before the classifier.
      kernels: "auto", "cpu" or "portable" (see mvit2_jax.models.layers).
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
    kernels: str = "auto"

    def config(self) -> Dict[str, Any]:
        """The constructor arguments, JSON-serializable; MobileViTv2(**config) rebuilds it."""
        return module_config(self)

    def setup(self) -> None:
        setup_backbone(self)
        self.head_drop = nn.Dropout(self.head_dropout)
        self.head = classifier_head(self.num_classes, self.kernels)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = self.backbone(images, train)["layer5"]
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = self.head_drop(x, deterministic=not train)
        return self.head(x)


def setup_backbone(host: nn.Module, backbone: type = MobileViTv2Backbone, **fixed: Any) -> None:
    """In `host.setup`: `host.backbone`, the `backbone` (MobileViTv2Backbone by default) of the
    host's fields of the same names (alpha, attention, dtype, kernels, ...; `fixed` overrides
    them), its variables at the host's top level ("stem", "stages_0_0", ...) as in the
    classifier and timm, so that the classifiers, segmentation and detection models share one
    backbone layout."""
    fields = {f.name for f in dataclasses.fields(backbone)} - {"parent", "name"}
    host.backbone = backbone(**{**{k: v for k, v in module_config(host).items() if k in fields}, **fixed})
    nn.share_scope(host, host.backbone)


def module_config(module: nn.Module, exclude: Optional[Tuple[str, ...]] = None) -> Dict[str, Any]:
    """A module's dataclass fields (constructor arguments) as a dict."""
    skip = {"parent", "name", *(exclude or ())}
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in skip}
