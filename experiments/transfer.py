"""Transfer: converted official ImageNet-1k weights fine-tuned on another dataset.

    python -m mvit2_jax.convert mobilevitv2_100.safetensors /tmp/mvit2_100
    python -m mvit2_jax.main --config=experiments/transfer.py --workdir=DIR --config.init_from=/tmp/mvit2_100

The head is re-initialized for the new class count (logged); everything else starts from the
checkpoint. Defaults: Oxford Flowers-102 from TFDS; for your own images use a folder:
--config.data.dataset=/path/to/folder --config.data.num_classes=N.
"""

from experiments import base


def get_config():
    c = base.get_config(alpha=1.0)
    c.required_fields = ("init_from",)  # --config.init_from=DIR: the run stops with an error without it
    c.data.dataset = "oxford_flowers102"
    c.data.train_split = "train+validation"
    c.data.eval_split = "test"
    c.data.num_classes = 102
    c.data.mix_prob = 0.0
    c.data.randaugment = False
    c.data.erasing_prob = 0.0
    c.batch_size = 64
    c.eval_batch_size = 64
    c.num_epochs = 30
    c.optim.lr = 5e-4
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05
    c.ema_decay = 0.999
    c.log_every_steps = 20
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    return c
