"""Detection evaluation (COCO mAP, VOC07 mAP on cases with known answers), the task's loss
sums, and an end-to-end run on the built-in digit boxes with predict's outputs."""

from __future__ import annotations

import json
import logging
import re

import jax
import numpy as np
import pytest

from mvit2_jax.tasks.detection import TASK, coco_map, voc07_map


def _examples(gt, dets, size=(100, 200), slots=4, max_det=5):
    """Gathered eval examples (the eval step's per-example arrays) from per-image lists of
    ground truth (box in pixels, label, ignore) and detections (box in pixels, score, class)."""
    n = len(gt)
    h, w = size
    scale = np.array([w, h, w, h], np.float32)
    out = {
        "gt_boxes": np.zeros((n, slots, 4), np.float32), "gt_labels": np.zeros((n, slots), np.int32),
        "gt_ignore": np.zeros((n, slots), bool), "gt_area": np.zeros((n, slots), np.float32),
        "boxes": np.zeros((n, max_det, 4), np.float32), "scores": np.zeros((n, max_det), np.float32),
        "classes": np.zeros((n, max_det), np.int32), "count": np.zeros(n, np.int32), "size": np.tile([h, w], (n, 1)),
    }
    for i, (objects, found) in enumerate(zip(gt, dets)):
        for k, (box, label, ignore) in enumerate(objects):
            out["gt_boxes"][i, k], out["gt_labels"][i, k], out["gt_ignore"][i, k] = np.array(box) / scale, label, ignore
        for k, (box, score, cls) in enumerate(sorted(found, key=lambda d: -d[1])):
            out["boxes"][i, k], out["scores"][i, k], out["classes"][i, k] = np.array(box) / scale, score, cls
        out["count"][i] = len(found)
    return out


def test_coco_map_of_known_cases():
    box = [20.0, 10.0, 120.0, 60.0]  # 100 x 50 pixels
    perfect = coco_map(_examples([[(box, 1, False)]], [[(box, 0.9, 1)]]))
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0) and perfect["map_medium"] == pytest.approx(1.0)
    # IoU 0.62: a match at the thresholds 0.50, 0.55 and 0.60 of ten, at 0.5 but not at 0.75.
    shifted = [20.0, 10.0, 120.0 + 100 * (1 / 0.62 - 1), 60.0]
    partial = coco_map(_examples([[(box, 1, False)]], [[(shifted, 0.9, 1)]]))
    assert partial["map"] == pytest.approx(0.3) and partial["map50"] == pytest.approx(1.0) and partial["map75"] == pytest.approx(0.0)
    # The wrong class finds nothing; a detection on a crowd region is not a false positive.
    assert coco_map(_examples([[(box, 1, False)]], [[(box, 0.9, 2)]]))["map"] == pytest.approx(0.0)
    crowd = coco_map(_examples([[(box, 1, False), ([150.0, 70.0, 190.0, 95.0], 1, True)]], [[(box, 0.5, 1), ([150.0, 70.0, 190.0, 95.0], 0.9, 1)]]))
    assert crowd["map"] == pytest.approx(1.0)
    # No detections at all: zero, not an error.
    assert coco_map(_examples([[(box, 1, False)]], [[]]))["map"] == 0.0


def test_voc07_map_of_known_cases():
    box = [20.0, 10.0, 120.0, 60.0]
    other = [150.0, 60.0, 190.0, 95.0]
    # A false positive scored above the true one: precision 1/2 at recall 1 -> 11-point AP 0.5.
    ranked = voc07_map(_examples([[(box, 1, False)]], [[(other, 0.9, 1), (box, 0.8, 1)]]))
    assert ranked["voc07_map50"] == pytest.approx(0.5) and ranked["ap50/1"] == pytest.approx(0.5)
    # The true one first: AP 1; a false positive after it does not lower it.
    assert voc07_map(_examples([[(box, 1, False)]], [[(box, 0.9, 1), (other, 0.1, 1)]]))["voc07_map50"] == pytest.approx(1.0)
    # Half the objects found (two images): recall 0.5 -> the points 0, 0.1, ..., 0.5 -> 6/11.
    half = voc07_map(_examples([[(box, 1, False)], [(box, 1, False)]], [[(box, 0.9, 1)], []]))
    assert half["voc07_map50"] == pytest.approx(6 / 11)
    # A difficult object neither counts as missed nor makes its detection false; classes average.
    difficult = voc07_map(_examples([[(box, 1, False), (other, 1, True)], [(box, 2, False)]], [[(box, 0.9, 1), (other, 0.95, 1)], [(other, 0.9, 2)]]))
    assert difficult["ap50/1"] == pytest.approx(1.0) and difficult["ap50/2"] == pytest.approx(0.0) and difficult["voc07_map50"] == pytest.approx(0.5)


def test_the_task_finalizes_losses_per_positive_and_both_maps():
    box = [20.0, 10.0, 120.0, 60.0]
    examples = _examples([[(box, 3, False)]], [[(box, 0.7, 3)]])
    metrics = TASK.finalize({"loc_loss": np.float32(6.0), "cls_loss": np.float32(12.0), "positives": np.float32(4.0)}, 1.0, examples=examples)
    assert metrics["loc_loss"] == 1.5 and metrics["cls_loss"] == 3.0 and metrics["loss"] == 4.5
    assert metrics["map"] == pytest.approx(1.0) and metrics["voc07_map50"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.xdist_group("notebook")  # before the notebook, whose detection part then loads these compiled steps
def test_a_detection_run_on_the_digit_boxes_then_predict_draws_them(tmp_path, random_like, capsys, caplog):
    """The smoke config through the engine: COCO and VOC metrics over the whole eval split, a
    checkpoint that load_model rebuilds, fine-tuning to another class count (the class
    predictors re-initialized and listed), and predict's boxes image and JSON."""
    from PIL import Image

    from experiments.detection import quickstart
    from mvit2_jax import load_model, train
    from mvit2_jax.checkpoint import read_config
    from mvit2_jax.data import digit_scenes, digits
    from mvit2_jax.models import MobileViTv2SSD
    from mvit2_jax.predict import main as predict_main

    run = tmp_path / "run"
    config = quickstart.get_config("smoke")
    metrics = train.train_and_evaluate(config, str(run))
    assert metrics["num_examples"] == 32
    # The loop dropped its init's compiled program once the state was made (CPU host memory).
    assert train.compile_steps(config, TASK, train.num_train_steps(config)).init._cache_size() == 0
    for key in ("map", "map50", "map75", "voc07_map50", "loss", "loc_loss", "cls_loss"):
        assert key in metrics and f"ema_{key}" in metrics
    assert 0 <= metrics["map"] <= metrics["map50"] <= 1 and metrics["loss"] > 0
    meta = read_config(str(run))[0]
    assert meta["task"] == "detection" and meta["class_names"] == ["background"] + [str(d) for d in range(10)]
    model, _ = load_model(str(run))
    assert isinstance(model, MobileViTv2SSD) and model.num_classes == 11

    caplog.set_level(logging.INFO)
    five = quickstart.get_config("smoke")
    five.data.num_classes = 5
    five.init_from = str(run)
    steps = train.compile_steps(five, TASK, num_steps=2)
    train.init_from_pretrained(random_like(jax.eval_shape(steps.init)), five, TASK, steps.mesh)  # (no compiled init)
    message = next(r.getMessage() for r in caplog.records if "re-initialized" in r.getMessage())
    fresh = sorted(set(re.findall(r"\['(head_\d)'\]\['loc_cls'\]", message)))
    assert fresh == [f"head_{i}" for i in range(6)] and "stages" not in message and "extra_os" not in message

    images, labels = digits.digits_as_uint8_rgb()
    canvas, _, objects = digit_scenes.canvas_objects(np.random.default_rng(5), images[..., 0] / 255.0, labels)
    Image.fromarray(canvas).save(tmp_path / "scene.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "boxes"
    code = predict_main(["--checkpoint", str(run), "--out", str(out), "--score-threshold", "0", str(tmp_path / "scene.png"), str(tmp_path / "broken.png")])
    printed = capsys.readouterr()
    assert code == 1 and "broken.png: not an image file" in printed.err
    drawn = np.asarray(Image.open(out / "scene_boxes.png"))
    assert drawn.shape == (64, 64, 3) and not np.array_equal(drawn, canvas)
    found = json.loads((out / "scene_detections.json").read_text())
    assert found and all(set(d) == {"box", "score", "class", "class_id"} for d in found)
    assert all(0 <= d["box"][0] <= d["box"][2] <= 64 and 1 <= d["class_id"] <= 10 and d["class"] == str(d["class_id"] - 1) for d in found)
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
    assert "scene.png" in printed.out


@pytest.mark.parametrize("dataset", ["coco", "voc"])
def test_the_official_recipes_for_every_width_need_a_backbone_checkpoint(dataset):
    import importlib

    from mvit2_jax.errors import ConfigError
    from mvit2_jax.models import VARIANTS
    from mvit2_jax.train import checks

    module = importlib.import_module(f"experiments.detection.{dataset}")
    for alpha in VARIANTS:
        c = module.get_config(str(alpha))
        TASK.check_config(c)
        assert (c.task, c.model.alpha, tuple(c.model.proj_channels)) == ("detection", alpha, (512, 256, 256, 128, 128, 64))
    want = {"coco": ("coco/2017", "train", "validation", 81), "voc": ("voc/2007", "train+validation", "test", 21)}[dataset]
    assert (c.data.dataset, c.data.train_split, c.data.eval_split, c.data.num_classes) == want
    o, p = c.optim, c.detection
    assert (o.name, o.lr, o.min_lr, o.weight_decay, o.warmup_steps, o.warmup_init_lr, o.grad_clip_norm) == ("adamw", 9e-4, 1e-6, 0.05, 500, 9e-5, 0.0)
    assert (c.batch_size, c.num_epochs, c.ema_decay, c.data.image_size, c.label_smoothing) == (128, 200, 0.9995, 320, 0.0)
    assert (p.match_iou_threshold, p.neg_pos_ratio, p.score_threshold, p.top_k, p.iou_threshold, p.max_detections) == (0.5, 3, 0.01, 400, 0.5, 200)
    assert tuple(c.data.crop_iou_thresholds) == (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0) and (c.data.crop_trials, c.data.min_crop_pixels) == (40, 100)
    with pytest.raises(ConfigError, match=r"requires config.init_from.*--config.init_from="):
        checks.check_config(c, 1, 1)
    bad = module.get_config("1.0")
    bad.data.image_size = 300
    with pytest.raises(ConfigError, match="divisible by 32"):
        TASK.check_config(bad)
    bad = module.get_config("1.0")
    bad.data.num_classes = 1
    with pytest.raises(ConfigError, match="counts the background too"):
        TASK.check_config(bad)
