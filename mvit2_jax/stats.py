"""Model statistics: trainable parameters and GMACs, MobileViTv2 per width and MobileViTv1
per size, next to the papers' numbers.

    python -m mvit2_jax.stats [--image-size 256] [--attention separable] [--alphas 0.5,1.0] [--v1 xxs,xs,s]

MACs count the multiply-accumulates of every convolution and linear layer (as the paper
does), found by intercepting those modules while the model is traced, so nothing is run.
The attention units' own products (multi-head: Q K^T and the weighted sum of V; Linformer:
the token projections and both products at the projected length; separable: the context
vector) are counted apart, in the "attn" column: the paper's GMACs leave them out.
"""

from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvit2_jax.models import (ATTENTION_TYPES, V1_VARIANTS, VARIANTS, LinformerSelfAttention, MobileViT, MobileViTv2,
                              MultiHeadSelfAttention, SeparableSelfAttention)
from mvit2_jax.models.layers import Conv


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def attention_macs(module: nn.Module, x_shape: Sequence[int]) -> int:
    """Multiply-accumulates of an attention unit's own products for tokens [B, P, N, d]."""
    if not isinstance(module, (MultiHeadSelfAttention, LinformerSelfAttention, SeparableSelfAttention)):
        return 0
    p, n, d = x_shape[-3:]
    if isinstance(module, MultiHeadSelfAttention):
        return 2 * p * n * n * d
    if isinstance(module, LinformerSelfAttention):
        return 4 * p * n * module.proj_len * d
    if isinstance(module, SeparableSelfAttention):
        return p * n * d


def model_stats(model: nn.Module, image_size: int = 256) -> Dict[str, float]:
    """{'params': trainable parameters, 'macs': conv and linear multiply-accumulates for one
    image, 'attn_macs': those of the attention units' own products}."""
    macs: List[int] = []
    attn: List[int] = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__":
            attn.append(attention_macs(module, args[0].shape) if args else 0)
        if context.method_name == "__call__" and isinstance(module, (Conv, nn.Dense, nn.DenseGeneral)):
            x = args[0]
            if isinstance(module, Conv):
                k = module.kernel_size
                fan_in = k * k * x.shape[-1] // module.groups
            else:
                fan_in = math.prod(x.shape[a] for a in _axes(module, x.ndim))
            macs.append(math.prod(out.shape[1:]) * fan_in)
        return out

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    with nn.intercept_methods(count):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
    return {"params": count_params(variables["params"]), "macs": sum(macs), "attn_macs": sum(attn)}


def _axes(module: nn.Module, ndim: int) -> Sequence[int]:
    axis = getattr(module, "axis", -1)
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return [a % ndim for a in axes]


def stats_table(alphas: Sequence[float], image_size: int, attention: str, num_classes: int) -> str:
    lines = [
        f"MobileViTv2 ({attention} attention, {num_classes} classes) at {image_size}x{image_size}",
        f"{'alpha':>6} {'params':>12} {'paper':>12} {'GMACs':>8} {'paper':>7} {'diff':>7} {'attn':>7} {'top-1 (paper)':>14}",
    ]
    for alpha in alphas:
        s = model_stats(MobileViTv2(alpha=alpha, num_classes=num_classes, attention=attention), image_size)
        gmacs = s["macs"] / 1e9
        ref = VARIANTS.get(alpha)
        paper_ok = ref is not None and image_size == 256 and num_classes == 1000
        p_params = f"{ref.params:,}" if paper_ok else "-"
        p_macs = f"{ref.gmacs:.3f}" if paper_ok else "-"
        diff = f"{100 * (gmacs - ref.gmacs) / ref.gmacs:+.2f}%" if paper_ok else "-"
        top1 = f"{ref.top1:.2f}" if ref else "-"
        lines.append(f"{alpha:>6} {s['params']:>12,} {p_params:>12} {gmacs:>8.3f} {p_macs:>7} {diff:>7} {s['attn_macs'] / 1e9:>7.3f} {top1:>14}")
    return "\n".join(lines)


def v1_stats_table(variants: Sequence[str], image_size: int, num_classes: int) -> str:
    """MobileViTv1 rows: parameters (exact against the official models), GMACs, top-1 (paper)."""
    lines = [
        f"MobileViTv1 (multi-head attention, {num_classes} classes) at {image_size}x{image_size}",
        f"{'size':>6} {'params':>12} {'official':>12} {'GMACs':>8} {'attn':>7} {'top-1 (paper)':>14}",
    ]
    for name in variants:
        s = model_stats(MobileViT(variant=name, num_classes=num_classes), image_size)
        ref = V1_VARIANTS[name]
        official = f"{ref.params:,}" if num_classes == 1000 else "-"
        lines.append(f"{name.upper():>6} {s['params']:>12,} {official:>12} {s['macs'] / 1e9:>8.3f} {s['attn_macs'] / 1e9:>7.3f} {ref.top1:>14.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", default=",".join(str(a) for a in VARIANTS), help="comma-separated widths")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--attention", default="separable", choices=ATTENTION_TYPES)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--v1", default=",".join(V1_VARIANTS), help="comma-separated MobileViTv1 sizes (empty: none)")
    args = parser.parse_args(argv)
    v1 = [v for v in args.v1.split(",") if v]
    if any(v not in V1_VARIANTS for v in v1):
        parser.error(f"--v1 takes sizes from {','.join(V1_VARIANTS)}, got {args.v1!r}")
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        parser.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if any(a <= 0 for a in alphas):
        parser.error("--alphas must be positive width multipliers")
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (the network's stride), got {args.image_size}")
    print(stats_table(alphas, args.image_size, args.attention, args.num_classes))
    if v1:
        print()
        print(v1_stats_table(v1, args.image_size, args.num_classes))


if __name__ == "__main__":
    main()
