"""Quickstart: MobileViTv2-0.5 on scikit-learn's handwritten digits at 32x32, on a laptop CPU.

The digits ship inside scikit-learn, so this runs on a fresh machine with no download; it
goes through the same input pipeline, train loop and checkpoints as ImageNet.
"""

from experiments import base


def get_config():
    c = base.get_config(alpha=0.5)
    c.data.dataset = "mvit2_digits"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.num_classes = 10
    c.data.image_size = 32
    c.data.eval_resize_size = 32
    c.data.shuffle_buffer = 2048
    c.data.crop_scale = (0.6, 1.0)
    c.data.flip = False  # digits are not mirror-symmetric
    c.data.randaugment = False
    c.data.erasing_prob = 0.0
    c.data.mix_prob = 0.0

    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 30
    c.optim.lr = 0.004
    c.optim.min_lr = 0.0001
    c.optim.warmup_steps = 60
    c.optim.weight_decay = 0.01
    c.ema_decay = 0.99

    c.log_every_steps = 50
    c.eval_every_steps = 220
    c.checkpoint_every_steps = 220
    return c
