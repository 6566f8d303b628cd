"""SSDLite on MobileViTv2 on VOC, the official recipe (experiments/detection/base.py); any width:

    python -m mvit2_jax.main --config=experiments/detection/voc.py:0.75 --workdir=DIR --config.init_from=CKPT
"""

from experiments.detection import base


def get_config(alpha: str = "1.0"):
    return base.get_config("voc", float(alpha))
