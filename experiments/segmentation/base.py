"""The official segmentation recipes (ml-cvnets config/segmentation/{ade20k,pascal_voc}/*_mobilevitv2.yaml).

    python -m mvit2_jax.main --config=experiments/segmentation/ade20k_deeplabv3.py:1.0 --workdir=DIR \
        --config.init_from=/path/to/imagenet_checkpoint

`get_config(dataset, head, alpha)`: "ade20k" or "voc", "deeplabv3" or "pspnet", any width.
Both recipes train 512x512 crops (random short side 256-768, long side at most 1024, flip,
crop, blur, photometric distortion, rotation +-10 degrees), with the aux head (loss weight
0.4), gradient clipping at 10, EMA decay 0.9995, no weight decay on norms and biases, and
start the backbone from an ImageNet checkpoint (`init_from`, required: a converted official
model or a classification workdir of the same width). The official schedules are cosine
per epoch; here the cosine runs per step.

| | ADE20k | PASCAL VOC |
|---|---|---|
| classes, labels | 150; stored 0 ignored, the rest minus 1 | 21; 255 ignored |
| output stride, ASPP rates | 8, (12, 24, 36) | 16, (6, 12, 18) |
| optimizer | SGD momentum 0.9, weight decay 1e-4 | AdamW, weight decay 0.05 |
| learning rate | cosine 0.02 -> 2e-4, no warmup | cosine 5e-4 -> 1e-6, 500 warmup steps from 5e-5 |
| epochs, global batch | 120, 16 | 50, 128 |
"""

import ml_collections
from ml_collections import config_dict

from experiments import base

RECIPES = {
    # dataset: (TFDS name, classes, reduce_zero_label, output stride, ASPP rates, optimizer, lr, min lr,
    #           weight decay, warmup steps, warmup init lr, epochs, batch)
    "ade20k": ("mvit2_ade20k", 150, True, 8, (12, 24, 36), "sgd", 0.02, 0.0002, 1e-4, 0, 0.0, 120, 16),
    "voc": ("mvit2_voc_aug", 21, False, 16, (6, 12, 18), "adamw", 5e-4, 1e-6, 0.05, 500, 5e-5, 50, 128),
}
HEADS = ("deeplabv3", "pspnet")


def get_config(dataset: str = "ade20k", head: str = "deeplabv3", alpha: float = 1.0) -> ml_collections.ConfigDict:
    if dataset not in RECIPES:
        raise ValueError(f"dataset must be one of {tuple(RECIPES)}, got {dataset!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    name, classes, reduce_zero, stride, rates, opt, lr, min_lr, wd, warmup, warmup_lr, epochs, batch = RECIPES[dataset]
    c = base.get_config(alpha=float(alpha))
    c.task = "segmentation"
    c.required_fields = ("init_from",)
    c.label_smoothing = 0.0  # unused by segmentation
    c.aux_loss_weight = 0.4
    c.class_weights = False  # the official --loss.segmentation.cross-entropy.class-weights (ENet weights per batch)

    m = c.model
    del m["head_dropout"]  # the classifier's; the segmentation head's dropout is below
    m.head = head
    m.output_stride = stride
    m.aux_head = True
    m.aspp_rates = rates
    m.aspp_features = 512
    m.psp_pool_sizes = (1, 2, 3, 6)
    m.psp_features = 512
    m.head_dropout = 0.1
    m.aux_dropout = 0.1

    d = ml_collections.ConfigDict()
    d.dataset = name
    d.train_split = "train"
    d.eval_split = "validation"
    d.data_dir = config_dict.placeholder(str)
    d.num_classes = classes
    d.reduce_zero_label = reduce_zero
    d.folder_val_fraction = 0.1
    d.folder_split_seed = 0
    d.bad_files = "skip"
    d.image_size = 512  # train crops (and the eval resize unless eval_image_size is set)
    d.eval_image_size = config_dict.placeholder(int)  # the eval resize (predict and export use it too); unset: image_size
    d.short_side_min = 256
    d.short_side_max = 768
    d.max_image_dim = 1024
    d.flip = True
    d.class_max_ratio = 0.75
    d.blur = True
    d.photometric = True
    d.rotate_degrees = 10.0
    d.shuffle_buffer = 4096
    c.data = d

    c.batch_size = batch
    c.eval_batch_size = 16
    c.num_epochs = epochs
    o = c.optim
    o.name, o.lr, o.min_lr, o.weight_decay = opt, lr, min_lr, wd
    o.warmup_steps, o.warmup_init_lr = warmup, warmup_lr
    o.grad_clip_norm = 10.0
    c.ema_decay = 0.9995
    c.log_every_steps = 50
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 1_000
    return c
