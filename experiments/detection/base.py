"""The official SSDLite recipe (ml-cvnets config/detection/ssd_coco/mobilevit_v2.yaml), any width.

    python -m mvit2_jax.main --config=experiments/detection/coco.py:1.0 --workdir=DIR \
        --config.init_from=/path/to/imagenet_checkpoint

`get_config(dataset, alpha)`: "coco" (TFDS coco/2017: train on train, evaluate on validation,
81 classes with the background) or "voc" (TFDS voc/2007: train on train+validation, evaluate
on the VOC 2007 test set, 21 classes; the official code has no VOC SSD recipe, this one is
the COCO recipe on VOC). Both: 320x320 inputs; the SSD crop, photometric distortion, flip and
bicubic resize; anchors at output strides 16, 32, 64, 128, 256 and the global level, matched
at IoU 0.5; the multibox loss with 3:1 hard negatives; AdamW (weight decay 0.05; the official
config decays norms and biases too, this engine decays kernels only), cosine 9e-4 -> 1e-6 after 500 warmup steps from 9e-5; 200 epochs of global
batch 128; EMA (decay 0.9995); no gradient clipping; evaluation with score threshold 0.01,
top 400 per class, NMS at IoU 0.5 and 200 detections per image. The backbone starts from an
ImageNet checkpoint (`init_from`, required: a converted official model or a classification
workdir of the same width); the extra layers and heads start fresh.
"""

import ml_collections
from ml_collections import config_dict

from experiments import base

DATASETS = {
    # name: (TFDS name, train split, eval split, classes with the background)
    "coco": ("coco/2017", "train", "validation", 81),
    "voc": ("voc/2007", "train+validation", "test", 21),
}


def get_config(dataset: str = "coco", alpha: float = 1.0) -> ml_collections.ConfigDict:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
    name, train_split, eval_split, classes = DATASETS[dataset]
    c = base.get_config(alpha=float(alpha))
    c.task = "detection"
    c.required_fields = ("init_from",)
    c.label_smoothing = 0.0

    m = c.model
    del m["head_dropout"]  # the classifier's
    m.proj_channels = (512, 256, 256, 128, 128, 64)

    d = ml_collections.ConfigDict()
    d.dataset = name
    d.train_split = train_split
    d.eval_split = eval_split
    d.data_dir = config_dict.placeholder(str)
    d.num_classes = classes
    d.folder_val_fraction = 0.1  # (image folders; unused by detection datasets)
    d.folder_split_seed = 0
    d.bad_files = "skip"  # COCO-format folders: unreadable images and bad annotations skipped and named, or "error"
    d.image_size = 320
    d.max_boxes = 100  # object slots per eval example (COCO has at most 93 per image)
    d.ssd_crop = True
    d.crop_iou_thresholds = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    d.crop_trials = 40
    d.min_crop_pixels = 100
    d.photometric = True
    d.flip = True
    d.shuffle_buffer = 4096
    c.data = d

    p = ml_collections.ConfigDict()
    p.match_iou_threshold = 0.5
    p.neg_pos_ratio = 3
    p.score_threshold = 0.01
    p.top_k = 400
    p.iou_threshold = 0.5  # NMS
    p.max_detections = 200
    c.detection = p

    c.batch_size = 128
    c.eval_batch_size = 32
    c.num_epochs = 200
    o = c.optim
    o.name, o.lr, o.min_lr, o.weight_decay = "adamw", 9e-4, 1e-6, 0.05
    o.warmup_steps, o.warmup_init_lr = 500, 9e-5
    o.grad_clip_norm = 0.0
    c.ema_decay = 0.9995
    c.log_every_steps = 50
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 1_000
    return c
