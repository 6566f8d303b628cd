"""MobileViTv2 pspnet on ade20k, the official recipe (experiments/segmentation/base.py); any width:

    python -m mvit2_jax.main --config=experiments/segmentation/ade20k_pspnet.py:0.5 --workdir=DIR --config.init_from=CKPT
"""

from experiments.segmentation import base


def get_config(alpha: str = "1.0"):
    return base.get_config("ade20k", "pspnet", float(alpha))
