"""Baseline: MobileViTv2-1.0 with standard multi-head self-attention (O(k^2)) in every block.

Everything else is the paper's recipe, so runs compare only the attention unit.
"""

from experiments import base


def get_config():
    config = base.get_config(alpha=1.0)
    config.model.attention = "mha"
    config.model.num_heads = 4
    return config
