"""Class names of the official detection datasets (background first, as the models count them)."""

from __future__ import annotations

from typing import List, Optional

from mvit2_jax.data.seg_datasets import VOC_CLASSES  # the same 20 classes and background

COCO_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]


def detection_class_names(num_classes: int) -> Optional[List[str]]:
    """COCO's names for 81 classes, PASCAL VOC's for 21 (the official datasets of those sizes), else None."""
    return {len(COCO_CLASSES): COCO_CLASSES, len(VOC_CLASSES): VOC_CLASSES}.get(num_classes)
