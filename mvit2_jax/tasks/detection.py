"""Object detection: SSDLite on MobileViTv2 (MobileViTv2SSD), trained and evaluated as the official code does.

The model is built from `config.model` (backbone fields as in classification, plus
proj_channels) and `config.data.num_classes` (background included: 81 for COCO, 21 for VOC).

Loss: `multibox_loss` is ml-cvnets' SSD multibox loss (loss_fn/detection/ssd_multibox_loss.py):
smooth L1 (beta 1) over the positive anchors' locations plus cross-entropy over the positive
anchors and the hardest negatives (the `neg_pos_ratio` times as many per image as it has
positives, ranked by their background loss), both summed over the batch and divided by the
batch's number of positives (at least 1). The anchors' targets are matched in the input
pipeline (mvit2_jax.data.detection).

Evaluation: the eval step decodes and post-processes the outputs (per-class score threshold,
class-aware NMS, `config.detection.max_detections` per image; mvit2_jax.models.anchors.postprocess)
and hands each example's detections and ground truth to the host (replicated over the
processes: every example of the split exactly once); `finalize` scores them with
pycocotools' COCOeval (mAP over IoU 0.5:0.95, at 0.5 and 0.75, for small, medium and large
objects, in the original image's pixels; crowd and VOC-difficult objects ignored) and
with the PASCAL VOC 2007 protocol (AP at IoU 0.5, 11-point interpolation, difficult objects
ignored). The best checkpoint is the one with the highest EMA mAP.

Data (`config.data`): a TFDS detection dataset ("image" and "objects" with "bbox" and
"label": coco/2017, voc/2007, voc/2012, the built-in mvit2_digit_boxes) or a COCO-format
annotation file with its image folder (mvit2_jax.data.coco_folder). Augmentation: the
official SSD recipe (mvit2_jax.data.detection.DetAugmentation from config.data).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvit2_jax.errors import ConfigError, DataError
from mvit2_jax.models import MobileViTv2SSD
from mvit2_jax.models import anchors as anchor_lib
from mvit2_jax.tasks.base import ImageTask

Config = ml_collections.ConfigDict


def multibox_loss(
    loc_pred: jax.Array,
    cls_logits: jax.Array,
    loc_target: jax.Array,
    labels: jax.Array,
    neg_pos_ratio: int = 3,
    label_smoothing: float = 0.0,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(total, location, classification) losses of a batch.

    loc_pred, loc_target [B, A, 4]; cls_logits [B, A, C] (class 0 is background); labels
    [B, A] int (0 background). Label smoothing is the official loss's option (off by default).
    """
    positive = labels > 0
    num_pos = jnp.maximum(positive.sum(), 1).astype(jnp.float32)
    diff = (loc_pred - loc_target).astype(jnp.float32)
    smooth_l1 = jnp.where(jnp.abs(diff) < 1.0, 0.5 * diff**2, jnp.abs(diff) - 0.5).sum(-1)
    location = jnp.where(positive, smooth_l1, 0.0).sum()

    log_probs = jax.nn.log_softmax(cls_logits.astype(jnp.float32), axis=-1)
    background = jnp.where(positive, -jnp.inf, jax.lax.stop_gradient(-log_probs[..., 0]))
    rank = jnp.argsort(jnp.argsort(-background, axis=1, stable=True), axis=1, stable=True)  # 0: hardest negative
    keep = positive | (rank < neg_pos_ratio * positive.sum(axis=1, keepdims=True))
    num_classes = cls_logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
    cross_entropy = -(targets * log_probs).sum(-1)
    classification = jnp.where(keep, cross_entropy, 0.0).sum()
    return (location + classification) / num_pos, location / num_pos, classification / num_pos


# ----------------------------------------------------------------------------- evaluation


def _per_image(examples: Mapping[str, np.ndarray]):
    """(image index, gt boxes [n, 4] pixels xyxy, gt labels, gt ignore, gt area, det boxes
    [m, 4] pixels xyxy (clipped to the image), det scores, det classes) for each example."""
    for i in range(len(examples["count"])):
        h, w = (float(v) for v in examples["size"][i])
        scale = np.array([w, h, w, h], np.float64)
        gt_valid = examples["gt_labels"][i] > 0
        n = int(examples["count"][i])
        yield (
            i,
            examples["gt_boxes"][i][gt_valid] * scale,
            examples["gt_labels"][i][gt_valid],
            examples["gt_ignore"][i][gt_valid],
            examples["gt_area"][i][gt_valid],
            np.clip(examples["boxes"][i][:n], 0.0, 1.0) * scale,
            examples["scores"][i][:n],
            examples["classes"][i][:n],
        )


COCO_METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def _classes(examples: Mapping[str, np.ndarray]) -> List[int]:
    """The classes (1..) of the ground truth and the detections."""
    found = np.concatenate([examples["gt_labels"].reshape(-1), examples["classes"].reshape(-1)])
    return sorted(int(c) for c in np.unique(found) if c > 0)


def coco_map(examples: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """COCO mAP (pycocotools' COCOeval, bbox) of gathered eval examples (see Detection.eval_examples).

    Boxes are scored in the original image's pixels; the area ranges use the objects' "area"
    (COCO's annotation area where the dataset has it, else the box's); ignored objects are
    iscrowd. Metrics with no object in their range are -1, as COCOeval reports them.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for i, gt_boxes, gt_labels, gt_ignore, gt_area, boxes, scores, classes in _per_image(examples):
        images.append({"id": i})
        for box, label, ignore, area in zip(gt_boxes, gt_labels, gt_ignore, gt_area):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(area) if area > 0 else (x1 - x0) * (y1 - y0), "iscrowd": int(bool(ignore)),
            })
        for box, score, cls in zip(boxes, scores, classes):
            x0, y0, x1, y1 = (float(v) for v in box)
            detections.append({"image_id": i, "category_id": int(cls), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    if not detections or not annotations:
        return {k: 0.0 if annotations else -1.0 for k in COCO_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in _classes(examples)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(COCO_METRICS, evaluator.stats[:6])}


def _voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """The VOC 2007 11-point interpolated average precision."""
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]))


def voc07_map(examples: Mapping[str, np.ndarray], iou_threshold: float = 0.5) -> Dict[str, float]:
    """PASCAL VOC 2007 mAP at IoU 0.5 (the devkit's rule: pixel boxes with inclusive ends,
    detections of a class by decreasing score, each matched to the unclaimed object of best
    IoU; a match to a difficult (ignored) object counts neither way; classes without
    objects are left out of the mean). Returns {"voc07_map50", "ap50/<class>"...}."""
    categories = _classes(examples)
    per_class: Dict[int, List[Tuple[float, int, np.ndarray]]] = {c: [] for c in categories}
    gts: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}
    positives = {c: 0 for c in categories}
    for i, gt_boxes, gt_labels, gt_ignore, _, boxes, scores, classes in _per_image(examples):
        for c in np.unique(gt_labels):
            mine = gt_labels == c
            gts[(i, int(c))] = (gt_boxes[mine], gt_ignore[mine].astype(bool))
            positives[int(c)] += int((~gt_ignore[mine].astype(bool)).sum())
        for box, score, cls in zip(boxes, scores, classes):
            per_class[int(cls)].append((float(score), i, box))
    aps = {}
    for c in categories:
        if positives[c] == 0:
            continue
        dets = sorted(per_class[c], key=lambda d: -d[0])
        claimed = {key: np.zeros(len(v[0]), bool) for key, v in gts.items() if key[1] == c}
        tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
        for k, (_, i, box) in enumerate(dets):
            gt_boxes, ignore = gts.get((i, c), (np.zeros((0, 4)), np.zeros(0, bool)))
            if len(gt_boxes):
                iw = np.clip(np.minimum(gt_boxes[:, 2], box[2]) - np.maximum(gt_boxes[:, 0], box[0]) + 1.0, 0.0, None)
                ih = np.clip(np.minimum(gt_boxes[:, 3], box[3]) - np.maximum(gt_boxes[:, 1], box[1]) + 1.0, 0.0, None)
                inter = iw * ih
                union = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0) + (gt_boxes[:, 2] - gt_boxes[:, 0] + 1.0) * (gt_boxes[:, 3] - gt_boxes[:, 1] + 1.0) - inter
                iou = inter / union
                j = int(np.argmax(iou))
                if iou[j] > iou_threshold:
                    if ignore[j]:
                        continue
                    if not claimed[(i, c)][j]:
                        claimed[(i, c)][j] = True
                        tp[k] = 1.0
                        continue
            fp[k] = 1.0
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / positives[c]
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[c] = _voc07_ap(recall, precision)
    out = {"voc07_map50": float(np.mean(list(aps.values()))) if aps else -1.0}
    out.update({f"ap50/{c}": v for c, v in aps.items()})
    return out


# ----------------------------------------------------------------------------- the task


def _dataset(config: Config):
    from mvit2_jax import data as data_lib

    return data_lib, data_lib.DatasetSpec.from_config(config.data)


class Detection(ImageTask):
    name = "detection"
    best_metric = "ema_map"
    head_prefixes = tuple(f"extra_os_{s}" for s in (64, 128, 256, "global")) + tuple(f"head_{i}" for i in range(len(anchor_lib.OUTPUT_STRIDES)))

    # ------------------------------------------------------------------------- configuration

    def check_config(self, config: Config) -> None:
        self.check_backbone_config(config)
        m, d, p = config.model, config.data, config.detection
        if d.image_size % 32:
            raise ConfigError(f"config.data.image_size must be divisible by 32 (the SSD's feature maps), got {d.image_size}")
        if d.num_classes < 2:
            raise ConfigError(f"config.data.num_classes counts the background too: at least 2, got {d.num_classes}")
        if len(m.proj_channels) != len(anchor_lib.OUTPUT_STRIDES):
            raise ConfigError(f"config.model.proj_channels needs {len(anchor_lib.OUTPUT_STRIDES)} widths, got {tuple(m.proj_channels)}")
        if d.max_boxes < 1:
            raise ConfigError(f"config.data.max_boxes must be >= 1, got {d.max_boxes}")
        if not 0 < p.iou_threshold <= 1 or not 0 < p.match_iou_threshold <= 1:
            raise ConfigError("config.detection.iou_threshold and match_iou_threshold must be in (0, 1]")
        if p.max_detections < 1 or p.top_k < 1:
            raise ConfigError(f"config.detection.max_detections and top_k must be >= 1, got {p.max_detections} and {p.top_k}")
        if p.neg_pos_ratio < 1:
            raise ConfigError(f"config.detection.neg_pos_ratio must be >= 1, got {p.neg_pos_ratio}")

    def check_data(self, config: Config, splits: Optional[Sequence[str]] = None) -> None:
        data_lib, spec = _dataset(config)
        from mvit2_jax.data import coco_folder

        if coco_folder.is_coco_folder(spec.name):
            coco_folder.check(spec.name)
        features = data_lib.get_builder(spec).info.features
        objects = features["objects"] if "objects" in features.keys() else None
        if "image" not in features.keys() or objects is None or not all(k in objects.feature.keys() for k in ("bbox", "label")):
            raise DataError(
                f"{spec.name} is not a detection dataset: its examples need an 'image' and 'objects' with 'bbox' and 'label', "
                f"they have {sorted(features.keys())}"
            )
        for split in splits or (config.data.train_split, config.data.eval_split):
            data_lib.check_split(spec, split)
        names = self.class_names(config)
        if names is not None and len(names) != config.data.num_classes:
            raise DataError(
                f"{spec.name} has {len(names) - 1} classes and the background: set config.data.num_classes={len(names)} (got {config.data.num_classes})"
            )

    def class_names(self, config: Config) -> Optional[List[str]]:
        """"background" and the dataset's object classes (its "label" feature's names)."""
        data_lib, spec = _dataset(config)
        info = data_lib.get_builder(spec).info
        label = info.features["objects"].feature["label"]
        names = getattr(label, "names", None)
        return ["background", *names] if names else None

    def run_meta(self, config: Config) -> Dict[str, Any]:
        size = config.data.image_size
        return {"image_size": [size, size], "dataset": config.data.dataset, "class_names": self.class_names(config)}

    # ------------------------------------------------------------------------- model

    def model_config(self, config: Config) -> Dict[str, Any]:
        return self.create_model({**config.model.to_dict(), "num_classes": config.data.num_classes}).config()

    def create_model(self, model_config: Mapping[str, Any]) -> MobileViTv2SSD:
        fields = dict(model_config)
        fields["proj_channels"] = tuple(int(v) for v in fields.get("proj_channels", MobileViTv2SSD.proj_channels))
        return MobileViTv2SSD(**fields)

    # ------------------------------------------------------------------------- input

    def _targets(self, config: Config):
        from mvit2_jax.data.detection import Targets

        size = config.data.image_size
        return Targets(
            anchors=anchor_lib.ssd_anchors(size, size),
            image_size=size,
            center_variance=anchor_lib.CENTER_VARIANCE,
            size_variance=anchor_lib.SIZE_VARIANCE,
            iou_eps=anchor_lib.IOU_EPS,
            iou_threshold=config.detection.match_iou_threshold,
            max_boxes=config.data.max_boxes,
        )

    def train_input(self, config: Config, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
        from mvit2_jax.data.detection import DetAugmentation, detection_train_stream

        data_lib, spec = _dataset(config)
        d = config.data
        aug = DetAugmentation(
            image_size=d.image_size,
            ssd_crop=d.ssd_crop,
            iou_thresholds=tuple(d.crop_iou_thresholds),
            crop_trials=d.crop_trials,
            min_crop_pixels=d.min_crop_pixels,
            photometric=d.photometric,
            flip=d.flip,
        )
        stream = detection_train_stream(spec, d.train_split, augmentation=aug, targets=self._targets(config), **self.train_stream_args(config, start_step))
        return data_lib.as_numpy(stream)

    def eval_input(self, config: Config, split: Optional[str] = None) -> Iterator[Dict[str, np.ndarray]]:
        from mvit2_jax.data.detection import detection_eval_pass

        data_lib, spec = _dataset(config)
        batches = detection_eval_pass(spec, split or config.data.eval_split, targets=self._targets(config), **self.eval_pass_args(config))
        return data_lib.as_numpy(batches)

    # ------------------------------------------------------------------------- in the steps

    def inputs(self, batch: Mapping[str, Any]) -> jax.Array:
        return batch["image"]

    def prepare_batch(self, key: jax.Array, batch: Mapping[str, Any], config: Config) -> Tuple[jax.Array, Any]:
        del key  # augmentation and matching happen in the input pipeline
        return batch["image"], (batch["loc"], batch["cls"])

    def loss(self, outputs: Mapping[str, jax.Array], targets: Any, config: Config) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        loc, cls = targets
        total, loc_loss, cls_loss = multibox_loss(
            outputs["loc"], outputs["cls"], loc, cls, config.detection.neg_pos_ratio, config.label_smoothing
        )
        return total, {"loc_loss": loc_loss, "cls_loss": cls_loss}

    def train_metrics(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> Dict[str, jax.Array]:
        return {"positives": jnp.mean(jnp.sum(batch["cls"] > 0, axis=1).astype(jnp.float32))}

    def eval_sums(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any], config: Config) -> Dict[str, jax.Array]:
        """The loss as trained (the config's hard-negative ratio), without label smoothing."""
        labels = jnp.where(batch["mask"][:, None] > 0, batch["cls"], 0)  # padding examples: no positives, no negatives
        _, loc, cls = multibox_loss(outputs["loc"], outputs["cls"], batch["loc"], labels, config.detection.neg_pos_ratio)
        positives = jnp.sum(labels > 0).astype(jnp.float32)
        scale = jnp.maximum(positives, 1.0)
        return {"loc_loss": loc * scale, "cls_loss": cls * scale, "positives": positives}

    def eval_examples(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, Any], config: Config) -> Dict[str, jax.Array]:
        """Per example: its detections (normalized corner boxes) and ground truth, for `finalize`."""
        p = config.detection
        size = batch["image"].shape[1:3]
        anchors = jnp.asarray(anchor_lib.ssd_anchors(*size))
        found = anchor_lib.postprocess(
            outputs["loc"], outputs["cls"], anchors, p.score_threshold, p.top_k, p.iou_threshold, p.max_detections
        )
        gt = {f"gt_{k}": batch[k] for k in ("boxes", "labels", "ignore", "area")}
        return {**found, **gt, "size": batch["size"]}

    def finalize(self, sums: Mapping[str, np.ndarray], count: float, examples: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, float]:
        positives = max(float(sums["positives"]), 1.0)
        metrics = {"loc_loss": float(sums["loc_loss"]) / positives, "cls_loss": float(sums["cls_loss"]) / positives}
        metrics["loss"] = metrics["loc_loss"] + metrics["cls_loss"]
        if examples is not None:
            metrics.update(coco_map(examples))
            metrics.update(voc07_map(examples))
        return metrics


TASK = Detection()
