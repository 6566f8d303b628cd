"""MobileViTv2 model family."""

from mvit2_jax.models.attention import (
    ATTENTION_TYPES,
    LinformerSelfAttention,
    MultiHeadSelfAttention,
    SeparableSelfAttention,
)
from mvit2_jax.models.mobilevitv2 import (
    InvertedResidual,
    MobileViTv2,
    MobileViTv2Block,
    TransformerLayer,
    Widths,
    make_divisible,
    widths_for,
)

__all__ = [
    "ATTENTION_TYPES",
    "InvertedResidual",
    "LinformerSelfAttention",
    "MobileViTv2",
    "MobileViTv2Block",
    "MultiHeadSelfAttention",
    "SeparableSelfAttention",
    "TransformerLayer",
    "Widths",
    "make_divisible",
    "widths_for",
]
