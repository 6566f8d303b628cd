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
with AdamW, an ASPP of 128 channels instead of 512, and the official class weighting of the
loss (`class_weights`, ENet weights of each batch: the background covers 84% of the pixels);
5 epochs of batch 16 (935 steps).

Measured on 2 cores (AMD EPYC with AVX-512, 2026-12-01): test mIoU 0.372 (EMA 0.371), pixel
accuracy 0.876, in 5 min 7 s with compiles; the curve at steps 187 / 374 / 561 / 748 / 935:
0.11 / 0.15 / 0.26 / 0.35 / 0.37 (without the class weights, the same machine: 0.311 in
4 min 33 s; on an earlier, slower EPYC it took 9 min 26 s). The 0.70 target is out of reach
here: what limits it is the digits' classes (the best run within 10 minutes, these scenes
at 128x128, reached 0.54 mIoU: it finds the digits' pixels well, foreground IoU 0.78, and gives
76% of them the right digit; with the right digit on those pixels it would score 0.80), and
resolution (DeepLabv3's logits come at output stride 8, an
8x8 grid on a 64x64 canvas, while the strokes are 3-6 pixels wide). The README's
Segmentation section has the probes.
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
    c.class_weights = True
    c.ema_decay = 0.99
    c.log_every_steps = 50
    c.eval_every_steps = 187
    c.checkpoint_every_steps = 187
    return experiments_base.smoke(c) if variant == "smoke" else c
