"""Quickstart: MobileViTv2-0.5 on scikit-learn's handwritten digits at 32x32, on a laptop CPU.

The digits ship inside scikit-learn, so this runs on a fresh machine with no download; it
goes through the same input pipeline, train loop and checkpoints as ImageNet.

    python -m mvit2_jax.main --config=experiments/quickstart.py --workdir=DIR         # 30 epochs
    python -m mvit2_jax.main --config=experiments/quickstart.py:smoke --workdir=DIR   # 6 steps

The "smoke" variant checks in seconds that everything runs: one epoch of 192 digits in
batches of 32, with Mixup/CutMix and RandAugment on; the test suite and the notebook's
reduced mode use it, so they share its compiled steps.
"""

from experiments import base


def get_config(variant: str = ""):
    if variant not in ("", "smoke"):
        raise ValueError(f"experiments/quickstart.py has the variant 'smoke' only, got {variant!r}")
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
    if variant == "smoke":
        c.data.train_split = "train[:192]"
        c.data.eval_split = "test[:100]"
        c.data.mix_prob = 0.5  # exercise Mixup/CutMix and RandAugment
        c.data.randaugment = True
        c.batch_size = 32
        c.eval_batch_size = 64
        c.num_epochs = 1
        # A constant schedule does not depend on the run's length, so runs of any length
        # share one compiled train step (through the persistent compilation cache).
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 2
        c.log_every_steps = 2
        c.eval_every_steps = 1000
        c.checkpoint_every_steps = 1000
    return c
