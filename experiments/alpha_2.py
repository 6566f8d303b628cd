"""MobileViTv2-2.0 on ImageNet-1k at 256x256 with the paper's recipe."""

from experiments import base


def get_config():
    return base.get_config(alpha=2.0)
