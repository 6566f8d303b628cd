"""The MobileViTv2 model family: backbone, classifier, segmentation heads, SSDLite detector, blocks, attention units, variant table; MobileViTv1 for the comparison."""

from mvit2_jax.models.attention import (
    ATTENTION,
    ATTENTION_TYPES,
    LinformerSelfAttention,
    MultiHeadSelfAttention,
    SeparableSelfAttention,
    attention_factory,
)
from mvit2_jax.models.layers import KERNELS
from mvit2_jax.models.mobilevitv2 import (
    FEATURES,
    OUTPUT_STRIDES,
    VARIANTS,
    InvertedResidual,
    MobileViTv2,
    MobileViTv2Backbone,
    MobileViTv2Block,
    TransformerLayer,
    Variant,
    Widths,
    make_divisible,
    widths_for,
)
from mvit2_jax.models.mobilevit import V1_VARIANTS, MobileViT, MobileViTBackbone, MobileViTBlock
from mvit2_jax.models.detection import MobileViTv2SSD
from mvit2_jax.models.segmentation import HEADS, MobileViTv2Segmentation

__all__ = [
    "ATTENTION",
    "ATTENTION_TYPES",
    "FEATURES",
    "HEADS",
    "InvertedResidual",
    "KERNELS",
    "LinformerSelfAttention",
    "MobileViT",
    "MobileViTBackbone",
    "MobileViTBlock",
    "MobileViTv2",
    "MobileViTv2Backbone",
    "MobileViTv2Block",
    "MobileViTv2SSD",
    "MobileViTv2Segmentation",
    "MultiHeadSelfAttention",
    "OUTPUT_STRIDES",
    "SeparableSelfAttention",
    "TransformerLayer",
    "V1_VARIANTS",
    "VARIANTS",
    "Variant",
    "Widths",
    "attention_factory",
    "make_divisible",
    "widths_for",
]
