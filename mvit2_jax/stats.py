"""Model statistics: trainable parameters and GMACs per width, next to the paper's numbers.

    python -m mvit2_jax.stats [--image-size 256] [--attention separable] [--alphas 0.5,1.0]

MACs count the multiply-accumulates of every convolution and linear layer (as the paper
does), found by intercepting those modules while the model is traced, so nothing is run.
"""

from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvit2_jax.models import ATTENTION_TYPES, VARIANTS, MobileViTv2
from mvit2_jax.models.layers import Conv

def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def model_stats(model: MobileViTv2, image_size: int = 256) -> Dict[str, float]:
    """{'params': trainable parameters, 'macs': multiply-accumulates for one image}."""
    macs: List[int] = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
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
    return {"params": count_params(variables["params"]), "macs": sum(macs)}


def _axes(module: nn.Module, ndim: int) -> Sequence[int]:
    axis = getattr(module, "axis", -1)
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return [a % ndim for a in axes]


def stats_table(alphas: Sequence[float], image_size: int, attention: str, num_classes: int) -> str:
    lines = [
        f"MobileViTv2 ({attention} attention, {num_classes} classes) at {image_size}x{image_size}",
        f"{'alpha':>6} {'params':>12} {'paper':>12} {'GMACs':>8} {'paper':>7} {'diff':>7} {'top-1 (paper)':>14}",
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
        lines.append(f"{alpha:>6} {s['params']:>12,} {p_params:>12} {gmacs:>8.3f} {p_macs:>7} {diff:>7} {top1:>14}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", default=",".join(str(a) for a in VARIANTS), help="comma-separated widths")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--attention", default="separable", choices=ATTENTION_TYPES)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        parser.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if any(a <= 0 for a in alphas):
        parser.error("--alphas must be positive width multipliers")
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (the network's stride), got {args.image_size}")
    print(stats_table(alphas, args.image_size, args.attention, args.num_classes))


if __name__ == "__main__":
    main()
