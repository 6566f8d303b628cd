"""The paper's 384x384 fine-tune of a 256x256 model (reference section 4).

    python -m mvit2_jax.main --config=experiments/finetune_384.py --workdir=DIR \
        --config.init_from=RUN_OR_CONVERTED_DIR --config.model.alpha=1.0

SGD momentum 0.9, weight decay 4e-5, fixed lr 1e-3, 10 epochs, batch 128. Set
config.model.alpha (and the weight decay / lr if you change the recipe) to match init_from:
a different width is refused.
"""

from experiments import base


def get_config():
    c = base.get_config(alpha=1.0)
    c.required_fields = ("init_from",)  # --config.init_from=DIR: the run stops with an error without it
    c.data.image_size = 384
    c.data.eval_resize_size = 432  # 384 * 288 / 256
    c.batch_size = 128
    c.eval_batch_size = 128
    c.num_epochs = 10
    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.lr = 1e-3
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 4e-5
    c.eval_every_steps = 2_500
    c.checkpoint_every_steps = 2_500
    return c
