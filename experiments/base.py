"""The paper's ImageNet classification recipe (cvnets mobilevit_v2.yaml); other configs override it.

Every field can be overridden on the command line: --config.optim.lr=0.001. The per-width
learning rates and weight decay come from the variant table beside the model
(mvit2_jax.models.VARIANTS); a width without a paper recipe must be given them
(--config.optim.lr, --config.optim.min_lr, --config.optim.weight_decay), and a run stops with
a one-line error naming the fields in `required_fields` that have no value.
"""

import ml_collections
from ml_collections import config_dict

from mvit2_jax.models import VARIANTS


def get_config(alpha: float = 1.0) -> ml_collections.ConfigDict:
    """The recipe for width `alpha` (a number, or its text: --config=experiments/base.py:0.6)."""
    alpha = float(alpha)
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    c.required_fields = ()  # dotted names of fields a run needs a value for

    c.model = ml_collections.ConfigDict()
    c.model.alpha = alpha
    c.model.attention = "separable"  # "separable" | "mha" | "linformer"
    c.model.num_heads = 4
    c.model.linformer_proj_len = 64
    c.model.dtype = "float32"  # computation dtype: "float32" | "bfloat16"
    c.model.dropout = 0.0
    c.model.attn_dropout = 0.0
    c.model.ffn_dropout = 0.0
    c.model.drop_path = 0.0
    c.model.head_dropout = 0.0
    c.model.kernels = "auto"  # "auto" | "cpu" | "portable" (library ops only; see mvit2_jax.models.layers)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.num_classes = 1000
    # Image folders (--config.data.dataset=/path/to/folder: one sub-folder per class).
    c.data.folder_val_fraction = 0.1  # without split folders: share of each class held out as "validation"
    c.data.folder_split_seed = 0
    c.data.bad_files = "skip"  # unreadable / non-image files: "skip" (logged and counted) or "error"
    c.data.image_size = 256
    c.data.eval_resize_size = 288
    c.data.shuffle_buffer = 16_384
    c.data.crop_scale = (0.08, 1.0)
    c.data.flip = True
    c.data.randaugment = True
    c.data.randaugment_ops = 2
    c.data.randaugment_magnitude = 9
    c.data.erasing_prob = 0.25
    # Where RandAugment and random erasing run: "host" (tf.data, per example) or "device" (in the
    # train step, on the accelerator: for hosts whose cores cannot feed it the whole recipe).
    c.data.augment_on = "host"
    c.data.mixup_alpha = 0.2
    c.data.cutmix_alpha = 1.0
    c.data.mix_prob = 0.5
    c.data.mix_switch_prob = 0.5

    # Fine-tuning: start from an Orbax checkpoint (a training workdir or mvit2_jax.convert output).
    c.init_from = config_dict.placeholder(str)
    c.init_from_ema = True  # training checkpoints: start from the EMA weights
    c.freeze_backbone = False  # train the head only (backbone params and BN statistics fixed)

    c.batch_size = 1024  # global, over all devices and hosts
    c.eval_batch_size = 1024
    c.grad_accum_steps = 1  # micro-batches per step: batch_size / grad_accum_steps each
    c.num_epochs = 300
    c.label_smoothing = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # "adamw" | "sgd"
    if alpha in VARIANTS:
        recipe = VARIANTS[alpha].recipe
        c.optim.lr, c.optim.min_lr, c.optim.weight_decay = recipe.lr, recipe.min_lr, recipe.weight_decay
    else:  # no paper recipe for this width: the run needs them given
        c.optim.lr = config_dict.placeholder(float)
        c.optim.min_lr = config_dict.placeholder(float)
        c.optim.weight_decay = config_dict.placeholder(float)
        c.required_fields = ("optim.lr", "optim.min_lr", "optim.weight_decay")
    c.optim.schedule = "cosine"  # "cosine" | "constant"
    c.optim.warmup_steps = 20_000
    c.optim.warmup_init_lr = 1e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # sgd
    c.optim.grad_clip_norm = 10.0
    c.optim.backbone_lr_scale = 1.0  # learning-rate factor for everything but the head
    c.ema_decay = 0.9995
    c.max_nonfinite_steps = 20  # stop after this many consecutive non-finite (skipped) updates

    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3  # the latest K, plus the best by EMA eval top-1
    c.prefetch = 2
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The "smoke" variant of the segmentation and detection quickstarts: 2 steps of batch 32
    (64 train examples), an eval of 32 test examples at the end, nothing in between."""
    c.data.train_split, c.data.eval_split = "train[:64]", "test[:32]"
    c.batch_size, c.eval_batch_size = 32, 32
    c.num_epochs = 1
    c.optim.warmup_steps = 1
    c.log_every_steps = 1
    c.eval_every_steps = c.checkpoint_every_steps = 1000
    return c
