"""Detection input: anchor matching in the pipeline, the SSD crop, flip, the built-in digit
boxes and COCO-format folders."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mvit2_jax.data import detection as det
from mvit2_jax.models import anchors as anchor_lib


def targets_for(size, **kw):
    """The pipeline's targets of the model's anchors at size x size."""
    return det.Targets(
        anchors=anchor_lib.ssd_anchors(size, size), image_size=size, center_variance=anchor_lib.CENTER_VARIANCE,
        size_variance=anchor_lib.SIZE_VARIANCE, iou_eps=anchor_lib.IOU_EPS, **kw,
    )


def _random_boxes(rng, n):
    xy = rng.uniform(0, 0.7, (n, 2))
    wh = rng.uniform(0.03, 0.6, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, 1.0)], 1).astype(np.float32)


@pytest.mark.parametrize("size", [64, 320])
def test_pipeline_matching_equals_the_models_matcher(size):
    """The tf.data matcher gives exactly mvit2_jax.models.anchors.match's targets (tested
    against the official rule in test_anchors.py), also for an image without objects."""
    rng = np.random.default_rng(size)
    targets = targets_for(size)
    anchors = targets.anchors
    for n in (0, 1, 4, 9):
        boxes = _random_boxes(rng, n)
        labels = rng.integers(1, 81, n).astype(np.int32)
        loc, cls = det.match(tf.constant(boxes.reshape(-1, 4)), tf.constant(labels), targets)
        slots = 10
        padded = np.zeros((slots, 4), np.float32)
        padded[:n] = boxes
        padded_labels = np.zeros(slots, np.int32)
        padded_labels[:n] = labels
        ref_loc, ref_cls = anchor_lib.match(jnp.asarray(padded), jnp.asarray(padded_labels), jnp.arange(slots) < n, jnp.asarray(anchors))
        np.testing.assert_array_equal(cls.numpy(), np.asarray(ref_cls))
        np.testing.assert_allclose(loc.numpy(), np.asarray(ref_loc), atol=1e-5)
        assert ((cls.numpy() > 0).sum() > 0) == (n > 0)  # forced anchors: some positive whenever there is an object


def _coordinate_image(height, width):
    """uint8 image whose pixel (y, x) holds (x, y, 0): a crop's offset can be read off it."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)


def test_the_ssd_crop_keeps_the_boxes_whose_centers_it_contains():
    height, width = 200, 240
    image = tf.constant(_coordinate_image(height, width))
    boxes = np.array([[0.1, 0.1, 0.3, 0.4], [0.5, 0.45, 0.9, 0.95], [0.35, 0.6, 0.45, 0.7]], np.float32)
    labels = tf.constant([1, 2, 3])
    scale = np.array([width, height, width, height], np.float32)
    aug = det.DetAugmentation(iou_thresholds=(0.3,), min_crop_pixels=20)
    cropped = 0
    for seed in range(12):
        out_image, out_boxes, out_labels = det.ssd_crop(image, tf.constant(boxes), labels, tf.constant([seed, 7], tf.int64), aug)
        out_image, out_boxes, out_labels = out_image.numpy(), out_boxes.numpy(), out_labels.numpy()
        h, w = out_image.shape[:2]
        left, top = int(out_image[0, 0, 0]), int(out_image[0, 0, 1])
        rect = np.array([left, top, left + w, top + h], np.float32)
        if (h, w) != (height, width):
            cropped += 1
            assert 0.3 * width - 1 <= w and 0.3 * height - 1 <= h and 0.5 <= h / w <= 2.0
        pixels = boxes * scale
        centers = (pixels[:, :2] + pixels[:, 2:]) / 2
        inside = (centers[:, 0] > rect[0]) & (centers[:, 1] > rect[1]) & (centers[:, 0] < rect[2]) & (centers[:, 1] < rect[3])
        np.testing.assert_array_equal(out_labels, np.array([1, 2, 3])[inside])
        expected = np.concatenate([np.maximum(pixels[inside, :2], rect[:2]), np.minimum(pixels[inside, 2:], rect[2:])], 1)
        expected = (expected - np.tile(rect[:2], 2)) / np.array([w, h, w, h])
        np.testing.assert_allclose(out_boxes, expected, atol=1e-5)
        if (h, w) != (height, width):  # the window overlaps some box by the drawn minimum IoU
            x0, y0 = np.maximum(pixels[:, :2], rect[:2]).T
            x1, y1 = np.minimum(pixels[:, 2:], rect[2:]).T
            inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
            union = (pixels[:, 2] - pixels[:, 0]) * (pixels[:, 3] - pixels[:, 1]) + w * h - inter
            assert (inter / union).max() >= 0.3
    assert cropped >= 8  # with minimum 0.3 only, windows are found
    # The same seed gives the same crop; windows smaller than min_crop_pixels never pass.
    again = det.ssd_crop(image, tf.constant(boxes), labels, tf.constant([3, 7], tf.int64), aug)
    first = det.ssd_crop(image, tf.constant(boxes), labels, tf.constant([3, 7], tf.int64), aug)
    np.testing.assert_array_equal(again[1].numpy(), first[1].numpy())
    never = det.DetAugmentation(iou_thresholds=(0.3,), min_crop_pixels=250)
    kept = det.ssd_crop(image, tf.constant(boxes), labels, tf.constant([3, 7], tf.int64), never)
    assert kept[0].shape == (height, width, 3) and np.array_equal(kept[1].numpy(), boxes)


def test_train_examples_flip_and_resize_with_their_boxes():
    """A flipped example's matched boxes are the mirrored boxes; the stream is a pure function of its seed."""
    image = np.zeros((64, 96, 3), np.uint8)
    image[16:48, 8:40] = 255  # the object, where its box says
    encoded = tf.io.encode_png(image)
    record = {"image": encoded, "objects": {"bbox": tf.constant([[0.25, 8 / 96, 0.75, 40 / 96]]), "label": tf.constant([4])}}
    targets = targets_for(64)
    anchors = targets.anchors
    aug = det.DetAugmentation(image_size=64, ssd_crop=False, photometric=False)
    seen = set()
    for seed in range(8):
        ex = det.train_example(tf.constant([seed, 0], tf.int64), record, aug, targets)
        again = det.train_example(tf.constant([seed, 0], tf.int64), record, aug, targets)
        np.testing.assert_array_equal(ex["image"].numpy(), again["image"].numpy())
        assert ex["image"].shape == (64, 64, 3) and ex["loc"].shape == (len(anchors), 4)
        positive = ex["cls"].numpy() > 0
        assert positive.any() and set(ex["cls"].numpy()[positive]) == {5}  # label 4 -> class 5 (0 is background)
        boxes = anchor_lib.center_to_corner(anchor_lib.decode(jnp.asarray(ex["loc"].numpy()), jnp.asarray(anchors)))
        box = np.asarray(boxes)[positive][0]
        flipped = box[0] > 0.5
        seen.add(bool(flipped))
        want = [1 - 40 / 96, 0.25, 1 - 8 / 96, 0.75] if flipped else [8 / 96, 0.25, 40 / 96, 0.75]
        np.testing.assert_allclose(box, want, atol=1e-5)
        white = ex["image"].numpy()[..., 0] > 0.5
        cols = np.nonzero(white.any(0))[0]
        assert (cols.min() > 32) == flipped  # the pixels moved with the box
    assert seen == {True, False}
    np.testing.assert_allclose(det.flip_boxes(det.flip_boxes(tf.constant(_random_boxes(np.random.default_rng(0), 5)))).numpy(),
                               _random_boxes(np.random.default_rng(0), 5), atol=1e-6)


def test_digit_boxes_are_the_ink_extents_of_the_digits(assert_boxes_apart):
    from mvit2_jax.data import digit_scenes, digits

    images, labels = digits.digits_as_uint8_rgb()
    ink = images[..., 0] / 255.0
    for seed in range(5):
        image, label, objects = digit_scenes.canvas_objects(np.random.default_rng(seed), ink, labels)
        assert 1 <= len(objects) <= 3
        x0, y0, x1, y1, digit = objects[-1]  # the last digit is drawn on top: its labelled pixels are all there
        rows, cols = np.nonzero(label[..., 0] == digit + 1)
        mine = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        assert (rows[mine].min(), rows[mine].max() + 1, cols[mine].min(), cols[mine].max() + 1) == (y0, y1, x0, x1)
        assert 10 <= x1 - x0 <= 34 and 10 <= y1 - y0 <= 34
    # The detection canvases (mvit2_digit_boxes): smaller digits, apart from each other.
    from mvit2_jax.data import digit_boxes

    counts = []
    for seed in range(20):
        _, label, objects = digit_scenes.canvas_objects(np.random.default_rng(seed), ink, labels, digit_boxes.DIGIT_SIZES, digit_boxes.MAX_DIGITS, apart=True)
        counts.append(len(objects))
        for a in range(len(objects)):
            x0, y0, x1, y1, digit = objects[a]
            assert 7 <= x1 - x0 <= 24 and 7 <= y1 - y0 <= 24
            rows, cols = np.nonzero(label[..., 0] == digit + 1)
            inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
            assert inside.sum() > 10
        assert_boxes_apart(objects)
    assert max(counts) == 4 and min(counts) >= 1


def _write_coco(tmp_path, images, annotations, categories):
    from PIL import Image

    folder = tmp_path / "val2017"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (name, size) in enumerate(images, start=1):
        if size is None:
            (folder / name).write_bytes(b"not an image")
            size = (10, 10)
        else:
            Image.fromarray(np.full((*size, 3), 40 * k, np.uint8)).save(folder / name)
        entries.append({"id": k, "file_name": name, "height": size[0], "width": size[1]})
    (tmp_path / "annotations").mkdir(exist_ok=True)
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def test_a_coco_format_folder_is_a_detection_dataset_and_bad_entries_are_named(tmp_path, caplog):
    from mvit2_jax.data import coco_folder, sources

    categories = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}]  # sparse ids, any order
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "area": 900.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 25], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 10]},  # no area
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [5, 5, 10, 10]},  # unknown category
        {"id": 5, "image_id": 9, "category_id": 1, "bbox": [5, 5, 10, 10]},  # unknown image
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [70, 10, 20, 20]},  # clipped to the 80-wide image
    ]
    path = _write_coco(tmp_path, [("a.png", (100, 80)), ("b.png", (60, 80)), ("broken.jpg", None)], annotations, categories)
    spec = sources.DatasetSpec(str(tmp_path), str(tmp_path / "tfds"))
    assert coco_folder.is_coco_folder(str(tmp_path)) and coco_folder.is_coco_folder(str(path))
    builder = sources.get_builder(spec)
    assert builder.info.features["objects"]["label"].names == ["person", "car"]
    examples = {ex["image/filename"].decode(): ex for ex in sources.load_split(spec, "val2017").as_numpy_iterator()}
    assert sorted(examples) == ["a.png", "b.png"]
    a, b = examples["a.png"]["objects"], examples["b.png"]["objects"]
    np.testing.assert_allclose(a["bbox"], [[0.2, 10 / 80, 0.6, 40 / 80], [0.0, 0.0, 0.25, 50 / 80]], atol=1e-6)  # ymin xmin ymax xmax
    assert a["label"].tolist() == [0, 1] and a["is_crowd"].tolist() == [False, True] and a["area"].tolist() == [900.0, 1250.0]
    np.testing.assert_allclose(b["bbox"], [[10 / 60, 70 / 80, 30 / 60, 1.0]], atol=1e-6)
    skipped = sources.get_builder(spec).info.metadata["skipped"]
    reasons = " | ".join(f"{k}: {v}" for k, v in skipped.items())
    for expected in ("annotation 3: bbox [5, 5, 0, 10] has no area", "annotation 4: unknown category_id 7",
                     "annotation 5: unknown image_id 9", "broken.jpg: not a decodable image"):
        assert expected in reasons
    # Detection's view of it: boxes in corner form, labels after the background, crowd ignored.
    boxes, labels, ignore, area = det.record_objects({"objects": {k: tf.constant(v) for k, v in examples["a.png"]["objects"].items()}})
    np.testing.assert_allclose(boxes.numpy()[0], [10 / 80, 0.2, 40 / 80, 0.6], atol=1e-6)
    assert labels.numpy().tolist() == [1, 2] and ignore.numpy().tolist() == [False, True] and area.numpy().tolist() == [900.0, 1250.0]

    strict = sources.DatasetSpec(str(path), str(tmp_path / "tfds_strict"), sources.FolderOptions(on_bad_file="error"))
    with pytest.raises(Exception, match="fix or remove it"):
        sources.load_split(strict, "train")
    with pytest.raises(Exception, match="is not a COCO annotation file"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"images": []}))
        coco_folder.check(str(bad))
