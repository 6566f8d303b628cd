"""The paper's ImageNet recipe (cvnets mobilevit_v2.yaml); width configs override it.

Every field can be overridden on the command line: --config.optim.lr=0.001.
"""

import ml_collections

# alpha: (max lr, min lr, weight decay), reference section 4.
PER_WIDTH = {
    0.5: (0.0090, 0.00090, 0.004),
    0.75: (0.0090, 0.00090, 0.008),
    1.0: (0.0075, 0.00075, 0.013),
    1.25: (0.0049, 0.00049, 0.020),
    1.5: (0.0035, 0.00035, 0.029),
    1.75: (0.0026, 0.00026, 0.039),
    2.0: (0.0020, 0.00020, 0.050),
}


def get_config(alpha: float = 1.0) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

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
    c.model.conv_impl = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)
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
    c.data.mixup_alpha = 0.2
    c.data.cutmix_alpha = 1.0
    c.data.mix_prob = 0.5
    c.data.mix_switch_prob = 0.5

    # Fine-tuning: start from an Orbax checkpoint (a training workdir or mvit2_jax.convert output).
    c.init_from = ml_collections.config_dict.placeholder(str)
    c.init_from_ema = True  # training checkpoints: start from the EMA weights
    c.freeze_backbone = False  # train the head only (backbone params and BN statistics fixed)

    c.batch_size = 1024  # global, over all devices and hosts
    c.eval_batch_size = 1024
    c.grad_accum_steps = 1  # micro-batches per step: batch_size / grad_accum_steps each
    c.num_epochs = 300
    c.label_smoothing = 0.1

    max_lr, min_lr, wd = PER_WIDTH.get(alpha, PER_WIDTH[1.0])
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # "adamw" | "sgd"
    c.optim.lr = max_lr
    c.optim.min_lr = min_lr
    c.optim.schedule = "cosine"  # "cosine" | "constant"
    c.optim.warmup_steps = 20_000
    c.optim.warmup_init_lr = 1e-6
    c.optim.weight_decay = wd
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
    c.keep_checkpoints = 3  # the latest K, plus the best by eval top-1
    c.prefetch = 2
    return c
