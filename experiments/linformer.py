"""Baseline: MobileViTv2-1.0 with Linformer attention (keys/values projected to 64 tokens)."""

from experiments import base


def get_config():
    config = base.get_config(alpha=1.0)
    config.model.attention = "linformer"
    config.model.num_heads = 4
    config.model.linformer_proj_len = 64
    return config
