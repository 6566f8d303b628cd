"""MobileViTv2 deeplabv3 on voc, the official recipe (experiments/segmentation/base.py); any width:

    python -m mvit2_jax.main --config=experiments/segmentation/voc_deeplabv3.py:0.5 --workdir=DIR --config.init_from=CKPT
"""

from experiments.segmentation import base


def get_config(alpha: str = "1.0"):
    return base.get_config("voc", "deeplabv3", float(alpha))
