"""MobileViTv2-1.75 on ImageNet-1k at 256x256 with the paper's recipe."""

from experiments import base


def get_config():
    return base.get_config(alpha=1.75)
