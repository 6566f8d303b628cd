"""MobileViTv1 XXS / XS / S on ImageNet-1k: the official v1 recipe, for the paper's v1-vs-v2 comparison.

    python -m mvit2_jax.main --config=experiments/mobilevit_v1.py:xxs --workdir=/runs/mobilevit_xxs

The recipe of ml-cvnets' MobileViTv1 release configs (config/classification/
mobilevit_{xx_small,x_small,small}.yaml): AdamW (0.9, 0.999), weight decay 0.01, learning
rate warmed up linearly from 2e-4 to 2e-3 over 3,000 steps then cosine to 2e-4 over 300
epochs, batch 1024, label smoothing 0.1, EMA 0.9995, Inception-style random resized crop
(0.08-1) and flip, no Mixup / CutMix / RandAugment / random erasing, no gradient clipping;
transformer dropout 0.05 (XXS) or 0.1 (XS, S), classifier dropout 0.1; evaluation at 256
after a 288 resize. Differences from the official training, all of the engine: one input
size (the official multi-scale sampler draws 160-320 per batch), RGB input (the official
loader read BGR), weight decay on kernels only (the official optimizer decays every
parameter), and the learning rate's cosine runs per step (officially per epoch).
"""

import ml_collections

from experiments import base
from mvit2_jax.models import V1_VARIANTS


def get_config(variant: str = "s") -> ml_collections.ConfigDict:
    if variant not in V1_VARIANTS:
        raise ValueError(f"experiments/mobilevit_v1.py takes a size from {tuple(V1_VARIANTS)}, got {variant!r}")
    c = base.get_config(1.0)
    c.model = ml_collections.ConfigDict()
    c.model.family = "mobilevit"
    c.model.variant = variant
    c.model.attention = "mha"  # MobileViTv1's own unit; any registered unit for ablations
    c.model.num_heads = 4
    c.model.linformer_proj_len = 64
    c.model.dtype = "float32"
    c.model.dropout = V1_VARIANTS[variant].dropout
    c.model.attn_dropout = 0.0
    c.model.ffn_dropout = 0.0
    c.model.drop_path = 0.0
    c.model.head_dropout = 0.1
    c.model.kernels = "auto"

    d = c.data
    d.randaugment = False
    d.erasing_prob = 0.0
    d.mixup_alpha = d.cutmix_alpha = 0.0
    d.mix_prob = 0.0

    o = c.optim
    o.lr, o.min_lr, o.weight_decay = 2e-3, 2e-4, 0.01
    o.warmup_steps, o.warmup_init_lr = 3_000, 2e-4
    o.grad_clip_norm = 0.0
    c.required_fields = ()
    return c
