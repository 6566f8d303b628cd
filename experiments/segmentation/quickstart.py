"""Segmentation quickstart: DeepLabv3 on MobileViTv2-0.5 over the built-in digit scenes, on a laptop CPU.

mvit2_digit_scenes (mvit2_jax.data.digit_scenes) places scikit-learn's handwritten digits on
64x64 canvases with a label per pixel (background + 10 digits), so this runs on a fresh
machine with no download, through the same engine, input pipeline and checkpoints as ADE20k:

    python -m mvit2_jax.main --config=experiments/segmentation/quickstart.py --workdir=DIR
    python -m mvit2_jax.main --config=experiments/segmentation/quickstart.py:smoke --workdir=DIR   # 2 steps

The official recipe (experiments/segmentation/base.py) scaled to the canvases and to about
10 minutes on 2 CPU cores: random short side 56-96 and 64x64 crops; no flip (digits are not
mirror-symmetric), blur, photometric distortion or rotation (the canvases already vary in
colour, and these cost time); trained from scratch (there is no ImageNet checkpoint offline),
with AdamW and an ASPP of 128 channels instead of 512; 5 epochs of batch 16 (935 steps).

Measured on 2 cores (AMD EPYC): test mIoU 0.32 (EMA 0.31), pixel accuracy 0.89, in 9 min 26 s
with compiles; the curve at steps 187 / 374 / 561 / 748 / 935: 0.09 / 0.11 / 0.17 / 0.27 /
0.32. The 0.70 target is out of reach here: DeepLabv3's logits come at output stride 8 (8x8
on a 64x64 canvas), and labels that are the exact 8x8 shares of each class, upsampled as
the model upsamples, score only 0.687 mIoU against the ink-level masks (strokes are 3-6
pixels wide). Training longer helps: 12 epochs of batch 32 with the full augmentation
reached 0.49 in 22 minutes. The README's Segmentation section has the probes of what limits
it: the digits' classes are learned slowly at 64x64 (neither a higher learning rate nor a
digit-classifying backbone helped), much faster per image at 128x128 (0.36 after 2 epochs),
where the model runs 4x slower (11 images/s).
"""

from experiments import base as experiments_base
from experiments.segmentation import base


def get_config(variant: str = ""):
    if variant not in ("", "smoke"):
        raise ValueError(f"experiments/segmentation/quickstart.py has the variant 'smoke' only, got {variant!r}")
    c = base.get_config("voc", "deeplabv3", 0.5)
    c.required_fields = ()
    c.model.output_stride = 8
    c.model.aspp_rates = (2, 4, 6)
    c.model.aspp_features = 128
    d = c.data
    d.dataset = "mvit2_digit_scenes"
    d.train_split, d.eval_split = "train", "test"
    d.num_classes = 11
    d.reduce_zero_label = False
    d.image_size = 64
    d.short_side_min, d.short_side_max, d.max_image_dim = 56, 96, 128
    d.flip = False
    d.class_max_ratio = 1.0  # background covers most of a canvas: no re-drawn crops
    d.blur = d.photometric = False
    d.rotate_degrees = 0.0
    d.shuffle_buffer = 4096

    c.batch_size = 16
    c.eval_batch_size = 100
    c.num_epochs = 5
    o = c.optim
    o.name, o.lr, o.min_lr, o.weight_decay = "adamw", 0.002, 1e-5, 0.01
    o.warmup_steps, o.warmup_init_lr = 100, 1e-5
    c.ema_decay = 0.99
    c.log_every_steps = 50
    c.eval_every_steps = 187
    c.checkpoint_every_steps = 187
    return experiments_base.smoke(c) if variant == "smoke" else c
