"""Segmentation data, metrics, loss and the end-to-end task: label maps, mask-aligned
augmentation, the confusion-matrix mIoU against NumPy, the built-in digit scenes, a run on
them through the engine, predict's masks, and the official datasets' builders."""

from __future__ import annotations

import io
import logging
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mvit2_jax.data import segmentation as seg
from mvit2_jax.tasks.segmentation import IGNORE, TASK, confusion_matrix, iou_from_confusion

# ----------------------------------------------------------------------------- label maps and augmentation


def test_label_maps_of_ade20k_and_voc():
    stored = tf.constant([0, 1, 150, 151, 255])
    assert seg.LabelMap(150, reduce_zero_label=True)(stored).numpy().tolist() == [255, 0, 149, 255, 255]
    assert seg.LabelMap(21)(tf.constant([0, 20, 21, 255])).numpy().tolist() == [0, 20, 255, 255]


def blocks(height=60, width=90):
    """Labels in 10x10 blocks (values 0..5, a 255 stripe) and an image whose red channel is 40 * label."""
    rows, cols = np.mgrid[0:height, 0:width]
    label = ((rows // 10 + cols // 10) % 6).astype(np.int32)
    label[:, 40:50] = IGNORE
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.where(label == IGNORE, 250, label * 40)
    image[..., 1] = 128
    return image, label[..., None]


@pytest.mark.parametrize("rotate", [0.0, 10.0])
def test_geometric_ops_keep_labels_on_their_pixels(rotate):
    """Resize, flip, pad, crop and rotation move image and labels together: where a pixel is
    labelled, its colour is its block's (away from block edges, which interpolation blends)."""
    image, label = blocks()
    aug = seg.SegAugmentation(crop_size=80, short_side_min=50, short_side_max=120, max_image_dim=200, class_max_ratio=0.75,
                              blur=False, photometric=False, rotate_degrees=rotate)
    agree = []
    for s in range(8):
        out_image, out_label = seg.train_pair(tf.constant(image), tf.constant(label), tf.constant([s, 7], tf.int64), aug)
        out_image, out_label = np.round(out_image.numpy() * 255), out_label.numpy()
        assert out_image.shape == (80, 80, 3) and out_label.shape == (80, 80) and out_label.dtype == np.int32
        labelled = (out_label != IGNORE) & (out_image[..., 1] > 100)  # not padding or rotation fill
        interior = labelled & (np.abs(out_image[..., 0] - np.round(out_image[..., 0] / 40) * 40) < 3)
        agree.append(np.mean(np.round(out_image[..., 0][interior] / 40) == out_label[interior]))
        assert set(np.unique(out_label)) <= set(range(6)) | {IGNORE}
        padding = out_image[..., 1] == 0
        assert np.all(out_label[padding & (out_image[..., 0] == 0)] == IGNORE)
    assert np.mean(agree) > 0.97


def test_train_pairs_are_a_pure_function_of_the_seed():
    image, label = blocks()
    aug = seg.SegAugmentation(crop_size=64, short_side_min=40, short_side_max=90, max_image_dim=200)
    a = seg.train_pair(tf.constant(image), tf.constant(label), tf.constant([1, 2], tf.int64), aug)
    b = seg.train_pair(tf.constant(image), tf.constant(label), tf.constant([1, 2], tf.int64), aug)
    c = seg.train_pair(tf.constant(image), tf.constant(label), tf.constant([1, 3], tf.int64), aug)
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b))
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_crop_acceptance_rule():
    """A crop is kept when it has labelled pixels, more than one value and no class at
    class_max_ratio or more of the labelled pixels (ml-cvnets' RandomCrop)."""
    one_class = np.zeros((4, 4, 1), np.int32)
    mostly = one_class.copy()
    mostly[0, 0] = 1  # 15/16 of one class
    balanced = np.concatenate([np.zeros((4, 2, 1)), np.ones((4, 2, 1))], 1).astype(np.int32)
    ignored = np.full((4, 4, 1), IGNORE, np.int32)
    half_ignored = balanced.copy()
    half_ignored[:, :1] = IGNORE  # 4 of class 0, 8 of class 1 among 12 labelled: 2/3
    crops = tf.constant(np.stack([one_class, mostly, balanced, ignored, half_ignored]))
    assert seg.crop_is_acceptable(crops, 0.75).numpy().tolist() == [False, False, True, False, True]


def test_eval_resize_and_photometric_ops():
    image, label = blocks()
    encoded = tf.io.encode_png(tf.constant(image))
    out = seg.eval_image(encoded, 32).numpy()
    assert out.shape == (32, 32, 3) and 0.0 <= out.min() and out.max() <= 1.0
    labels = seg.eval_label(tf.constant(label), 32).numpy()
    assert labels.shape == (32, 32) and set(np.unique(labels)) <= set(range(6)) | {IGNORE}
    distorted = seg.photometric_distort(tf.constant(image), tf.constant([3, 4], tf.int64)).numpy()
    assert distorted.shape == image.shape and distorted.dtype == np.uint8
    blurred = seg.gaussian_blur(tf.constant(image), tf.constant(0.8)).numpy()
    assert np.abs(blurred.astype(int) - image).max() > 10 and np.array_equal(seg.gaussian_blur(tf.constant(image), tf.constant(0.0)).numpy(), image)


# ----------------------------------------------------------------------------- metrics and loss


def test_confusion_matrix_miou_equals_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 16, 16))
    labels[0, :4] = IGNORE
    predictions = np.where(rng.random(labels.shape) < 0.6, labels % 5, rng.integers(0, 5, labels.shape))
    weights = np.ones(labels.shape, np.float32)
    weights[2] = 0  # a padding example
    confusion = np.asarray(confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels), 5, jnp.asarray(weights)))
    keep = (labels != IGNORE) & (weights > 0)
    ious = []
    for c in range(5):
        tp = np.sum((predictions == c) & (labels == c) & keep)
        union = np.sum(((predictions == c) | (labels == c)) & keep)
        ious.append(tp / union)
    iou, present = iou_from_confusion(confusion)
    np.testing.assert_allclose(iou, ious)
    assert present.all() and confusion.sum() == keep.sum()
    metrics = TASK.finalize({"confusion": confusion, "loss": np.float32(10.0)}, 2.0)
    assert metrics["miou"] == pytest.approx(np.mean(ious))
    assert metrics["pixel_acc"] == pytest.approx(np.sum((predictions == labels) & keep) / keep.sum())
    assert metrics["iou/3"] == pytest.approx(ious[3])


def test_absent_classes_do_not_count_in_the_miou():
    confusion = np.zeros((4, 4))
    confusion[0, 0], confusion[1, 1], confusion[1, 0] = 5, 3, 2
    metrics = TASK.finalize({"confusion": confusion, "loss": np.float32(0)}, 1.0)
    assert metrics["miou"] == pytest.approx((5 / 7 + 3 / 5) / 2) and "iou/2" not in metrics


def test_loss_ignores_unlabelled_pixels_and_weights_the_aux_head(small_seg_config):
    config = small_seg_config()
    config.class_weights = False
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 11)), jnp.float32)
    labels = rng.integers(0, 11, (2, 8, 8))
    labels[:, :3] = IGNORE
    x = np.asarray(logits, np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    keep = labels != IGNORE
    want = -np.mean(np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep])
    assert float(TASK.loss(logits, jnp.asarray(labels), config)) == pytest.approx(want, rel=1e-5)
    both = float(TASK.loss((logits, logits), jnp.asarray(labels), config))  # aux at full size: resized onto itself
    assert both == pytest.approx(want * (1 + config.aux_loss_weight), rel=1e-5)


def test_class_weights_are_enet_weights_of_the_batch_in_torchs_weighted_cross_entropy(small_seg_config):
    torch = pytest.importorskip("torch")
    config = small_seg_config()
    config.class_weights = True
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 8, 8, 11)).astype(np.float32)
    logits[..., 0] += 2.0  # background favoured: weighting the rare classes up changes the mean
    labels = np.where(rng.random((2, 8, 8)) < 0.7, 0, rng.integers(1, 10, (2, 8, 8)))  # class 10 absent
    labels[:, :2] = IGNORE
    hist = np.bincount(labels[labels != IGNORE], minlength=11).astype(np.float64)
    want_weights = np.where(hist > 0, 1.0 / np.log(hist / hist.sum() + 1.1), 0.0)  # ENet section 5.2, norm 1.1
    from mvit2_jax.tasks.segmentation import enet_class_weights

    np.testing.assert_allclose(enet_class_weights(jnp.asarray(labels), 11), want_weights, rtol=1e-5)
    assert want_weights[0] < want_weights[1:10].min() and want_weights[10] == 0
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels), weight=torch.tensor(want_weights, dtype=torch.float32),
        ignore_index=IGNORE,
    ).item()
    assert float(TASK.loss(jnp.asarray(logits), jnp.asarray(labels), config)) == pytest.approx(want, rel=1e-5)
    both = float(TASK.loss((jnp.asarray(logits),) * 2, jnp.asarray(labels), config))
    assert both == pytest.approx(want * (1 + config.aux_loss_weight), rel=1e-5)
    config.class_weights = False
    assert abs(float(TASK.loss(jnp.asarray(logits), jnp.asarray(labels), config)) - want) > 0.1


# ----------------------------------------------------------------------------- the built-in data


def test_eval_covers_the_split_once_over_processes_and_the_confusion_adds_up():
    """Two processes' shares of test[:11] (batch 4, padded): together every scene once, and
    the confusion matrices of the shares sum to the single-process one."""
    import tensorflow_datasets as tfds

    from mvit2_jax.data import digit_scenes

    labels = seg.LabelMap(11)

    def passes(count):
        out = []
        for index in range(count):
            ds = seg.segmentation_eval_pass(digit_scenes.NAME, "test[:11]", size=32, labels=labels, batch_size=4,
                                            process_index=index, process_count=count)
            out += list(tfds.as_numpy(ds))
        return out

    def confusion(batches):
        total = 0
        for b in batches:
            weights = jnp.asarray(b["mask"])[:, None, None] * jnp.ones(b["label"].shape)
            total = total + np.asarray(confusion_matrix(jnp.asarray(b["label"]), jnp.asarray(b["label"]), 11, weights))
        return total

    one, two = passes(1), passes(2)
    assert sum(b["mask"].sum() for b in one) == sum(b["mask"].sum() for b in two) == 11
    keep = lambda batches: sorted(x.tobytes() for b in batches for x, m in zip(b["label"], b["mask"]) if m)  # noqa: E731
    assert keep(one) == keep(two)
    np.testing.assert_array_equal(confusion(one), confusion(two))
    assert confusion(one).sum() == 11 * 32 * 32


def test_digit_scenes_canvases(assert_boxes_apart):
    from mvit2_jax.data import digit_scenes, digits

    images, labels = digits.digits_as_uint8_rgb()
    ink = images[..., 0] / 255.0
    image, label = digit_scenes.canvas(np.random.default_rng(0), ink, labels)
    again, _ = digit_scenes.canvas(np.random.default_rng(0), ink, labels)
    assert image.shape == (64, 64, 3) and label.shape == (64, 64, 1) and np.array_equal(image, again)
    present = set(np.unique(label)) - {0}
    assert present and present <= set(range(1, 11)) and 0.02 < np.mean(label > 0) < 0.8
    # The digits lie apart (no digit covers part of another), 22-38 pixels, up to four per canvas.
    counts = []
    for seed in range(30):
        same_image, label, objects = digit_scenes.canvas_objects(
            np.random.default_rng(seed), ink, labels, digit_scenes.DIGIT_SIZES, digit_scenes.MAX_DIGITS, apart=True
        )
        scene_image, scene_label = digit_scenes.canvas(np.random.default_rng(seed), ink, labels)
        np.testing.assert_array_equal(same_image, scene_image)
        np.testing.assert_array_equal(label, scene_label)
        counts.append(len(objects))
        for a in range(len(objects)):
            x0, y0, x1, y1, digit = objects[a]
            assert 12 <= max(x1 - x0, y1 - y0) <= 38
            rows, cols = np.nonzero(label[..., 0] == digit + 1)
            inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
            assert (rows[inside].min(), rows[inside].max() + 1, cols[inside].min(), cols[inside].max() + 1) == (y0, y1, x0, x1)
        assert_boxes_apart(objects)
    assert 1 <= min(counts) and max(counts) <= 4 and 1.3 < np.mean(counts) < 2.2


# ----------------------------------------------------------------------------- the official datasets


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_ade20k_from_its_zip_in_the_manual_directory(tmp_path):
    """A miniature ADEChallengeData2016.zip: prepared into train and validation, read with the
    official label shift (0 ignored, v -> v - 1)."""
    import tensorflow_datasets as tfds

    from mvit2_jax.data import DatasetSpec
    from mvit2_jax.data.sources import get_builder

    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    rng = np.random.default_rng(0)
    stored = {}
    with zipfile.ZipFile(manual / "ADEChallengeData2016.zip", "w") as z:
        for split, names in (("training", ["ADE_train_1", "ADE_train_2"]), ("validation", ["ADE_val_1"])):
            for name in names:
                stored[name] = rng.integers(0, 151, (24, 32), np.uint8)
                z.writestr(f"ADEChallengeData2016/images/{split}/{name}.jpg", _jpeg(rng.integers(0, 255, (24, 32, 3), np.uint8)))
                z.writestr(f"ADEChallengeData2016/annotations/{split}/{name}.png", _png(stored[name]))
    spec = DatasetSpec("mvit2_ade20k", str(tmp_path))
    builder = get_builder(spec)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.info.splits["train"].num_examples == 2 and builder.info.splits["validation"].num_examples == 1
    labels = seg.LabelMap(150, reduce_zero_label=True)
    batch = next(iter(tfds.as_numpy(seg.segmentation_eval_pass(spec, "validation", size=16, labels=labels, batch_size=1))))
    want = seg.eval_label(labels(tf.constant(stored["ADE_val_1"][..., None])), 16).numpy()
    assert batch["image"].shape == (1, 16, 16, 3) and np.array_equal(batch["label"][0], want)
    assert np.any(want == IGNORE) and np.all((want < 150) | (want == IGNORE))


def _tar_add(archive, name: str, data: bytes) -> None:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_voc_with_sbd_train_aug_from_their_archives(tmp_path):
    """Miniature VOCtrainval and SBD archives: validation is VOC's segmentation val; train is
    VOC's train plus SBD's train and val minus VOC's val, each image once; palette PNGs read as
    indices (255 borders kept) and SBD's .mat labels as stored."""
    import tarfile

    import scipy.io
    import tensorflow_datasets as tfds

    from mvit2_jax.data import DatasetSpec
    from mvit2_jax.data.sources import get_builder

    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    rng = np.random.default_rng(2)
    stored = {}
    with tarfile.open(manual / "VOCtrainval_11-May-2012.tar", "w") as voc:
        for i in ("a", "b", "c"):
            stored[i] = rng.integers(0, 21, (20, 24), np.uint8)
            stored[i][0] = 255
            _tar_add(voc, f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg", _jpeg(rng.integers(0, 255, (20, 24, 3), np.uint8)))
            _tar_add(voc, f"VOCdevkit/VOC2012/SegmentationClass/{i}.png", _palette_png(stored[i]))
        _tar_add(voc, "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", b"a\nb\n")
        _tar_add(voc, "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", b"c\n")
    with tarfile.open(manual / "benchmark.tgz", "w:gz") as sbd:
        _tar_add(sbd, "benchmark_RELEASE/dataset/train.txt", b"b\nd\n")
        _tar_add(sbd, "benchmark_RELEASE/dataset/val.txt", b"c\ne\n")
        for i in ("b", "c", "d", "e"):
            label = rng.integers(0, 21, (20, 24), np.uint8)
            stored.setdefault(i, label)
            buffer = io.BytesIO()
            scipy.io.savemat(buffer, {"GTcls": {"Segmentation": label}})
            _tar_add(sbd, f"benchmark_RELEASE/dataset/cls/{i}.mat", buffer.getvalue())
            _tar_add(sbd, f"benchmark_RELEASE/dataset/img/{i}.jpg", _jpeg(rng.integers(0, 255, (20, 24, 3), np.uint8)))
    builder = get_builder(DatasetSpec("mvit2_voc_aug", str(tmp_path)))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.info.metadata["class_names"][:2] == ["background", "aeroplane"]
    names = {}
    for split in ("train", "validation"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            names[ex["name"].decode()] = split
            assert np.array_equal(ex["label"][..., 0], stored[ex["name"].decode()]), ex["name"]
    assert names == {"a": "train", "b": "train", "d": "train", "e": "train", "c": "validation"}


# ----------------------------------------------------------------------------- segmentation folders


def _scene(rng, height=16, width=16):
    image = rng.integers(0, 255, (height, width, 3), np.uint8)
    mask = rng.integers(0, 4, (height, width), np.uint8)
    mask[0, :3] = IGNORE
    return image, mask


def _palette_png(mask: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(mask, mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_folder(root, rng, split=""):
    """Good pairs (JPEG and PNG images, grayscale and palette masks, one in a sub-folder) and
    every kind of bad file; returns ({image path: stored mask}, {bad path: reason word})."""
    base = root / split if split else root
    (base / "images" / "sub").mkdir(parents=True)
    (base / "masks" / "sub").mkdir(parents=True)
    good, bad = {}, {}
    for name, fmt in (("a", "png"), ("b", "jpg"), ("sub/c", "png"), ("d", "png")):
        image, mask = _scene(rng)
        (base / "images" / f"{name}.{fmt}").write_bytes(_png(image) if fmt == "png" else _jpeg(image))
        (base / "masks" / f"{name}.png").write_bytes(_palette_png(mask) if name == "b" else _png(mask))
        good[f"{split + '/' if split else ''}images/{name}.{fmt}"] = mask
    prefix = f"{split}/" if split else ""
    image, mask = _scene(rng)
    (base / "images" / "lonely.png").write_bytes(_png(image))
    bad[f"{prefix}images/lonely.png"] = "no mask"
    (base / "masks" / "orphan.png").write_bytes(_png(mask))
    bad[f"{prefix}masks/orphan.png"] = "no image"
    (base / "images" / "rgb.png").write_bytes(_png(image))
    (base / "masks" / "rgb.png").write_bytes(_png(np.stack([mask] * 3, -1)))
    bad[f"{prefix}masks/rgb.png"] = "RGB PNG"
    (base / "images" / "small.png").write_bytes(_png(image))
    (base / "masks" / "small.png").write_bytes(_png(mask[:8]))
    bad[f"{prefix}masks/small.png"] = "16x8 mask"
    (base / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    (base / "masks" / "broken.png").write_bytes(_png(mask))
    bad[f"{prefix}images/broken.jpg"] = "not a decodable image"
    return good, bad


def test_a_folder_of_images_and_masks_is_a_segmentation_dataset(tmp_path):
    """Pairs by file name; stored mask values read back exactly (palette indices, not
    colours); bad files skipped and named; a seeded validation split; classes.txt."""
    import tensorflow_datasets as tfds

    from mvit2_jax.data import DatasetSpec, FolderOptions, skipped_files
    from mvit2_jax.data.sources import get_builder

    root = tmp_path / "scenes"
    good, bad = _mask_folder(root, np.random.default_rng(0))
    (root / "classes.txt").write_text("sky\nroad\ncar\nperson\n")
    spec = DatasetSpec(str(root), str(tmp_path / "tfds"), FolderOptions(val_fraction=0.25))
    skipped = skipped_files(spec)
    assert set(skipped) == set(bad) and all(word in skipped[path] for path, word in bad.items())
    builder = get_builder(spec)
    assert builder.info.metadata["class_names"] == ["sky", "road", "car", "person"]
    assert builder.info.splits["train"].num_examples == 3 and builder.info.splits["validation"].num_examples == 1
    seen = {}
    for split in ("train", "validation"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            seen[ex["file_name"].decode()] = ex["label"][..., 0]
    assert set(seen) == set(good) and all(np.array_equal(seen[k], good[k]) for k in good)
    labels = seg.LabelMap(4)
    batch = next(iter(tfds.as_numpy(seg.segmentation_eval_pass(spec, "validation", size=16, labels=labels, batch_size=4))))
    (val_example,) = tfds.as_numpy(builder.as_dataset(split="validation"))
    assert np.array_equal(batch["label"][0], good[val_example["file_name"].decode()])


def test_split_folders_of_images_and_masks_and_bad_files_as_errors(tmp_path):
    from mvit2_jax.data import BadImageError, DatasetSpec, FolderError, FolderOptions
    from mvit2_jax.data.sources import get_builder, num_examples

    root = tmp_path / "split"
    rng = np.random.default_rng(1)
    _mask_folder(root, rng, "train")
    _mask_folder(root, rng, "val")
    spec = DatasetSpec(str(root), str(tmp_path / "tfds"))
    assert (num_examples(spec, "train"), num_examples(spec, "val")) == (4, 4)
    assert "class_names" not in get_builder(spec).info.metadata
    strict = DatasetSpec(str(root), str(tmp_path / "tfds"), FolderOptions(on_bad_file="error"))
    with pytest.raises(BadImageError, match=r"split/train/\S+: .*fix or remove it"):
        num_examples(strict, "train")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(FolderError, match="has no image with a mask of the same name"):
        get_builder(DatasetSpec(str(tmp_path / "empty")))


def test_segmentation_runs_refuse_folders_without_masks_and_tfds_scene_parse150(tmp_path, small_seg_config):
    from mvit2_jax.errors import DataError

    (tmp_path / "cats").mkdir()
    config = small_seg_config(dataset=str(tmp_path))
    with pytest.raises(DataError, match="is not a segmentation folder: put images in .*/images/"):
        TASK.check_data(config)
    with pytest.raises(DataError, match="use config.data.dataset=mvit2_ade20k"):
        TASK.check_data(small_seg_config(dataset="scene_parse150"))


def test_the_eval_size_can_differ_from_the_train_crops(small_seg_config):
    """config.data.eval_image_size: the eval pass's resize and the size the run records for
    predict and export; unset, the train crop's size; under 32 a one-line ConfigError."""
    from mvit2_jax.errors import ConfigError

    config = small_seg_config(eval_split="test[:3]")
    assert config.data.eval_image_size is None and TASK.run_meta(config)["image_size"] == [64, 64]
    config.data.eval_image_size = 96
    TASK.check_config(config)
    assert TASK.run_meta(config)["image_size"] == [96, 96]
    batch = next(TASK.eval_input(config))
    assert batch["image"].shape[1:] == (96, 96, 3) and batch["label"].shape[1:] == (96, 96)
    config.data.eval_image_size = 16
    with pytest.raises(ConfigError, match=r"^config.data.eval_image_size must be at least 32 .*got 16$"):
        TASK.check_config(config)


# ----------------------------------------------------------------------------- the official recipes


@pytest.mark.parametrize("dataset, head", [("ade20k", "deeplabv3"), ("ade20k", "pspnet"), ("voc", "deeplabv3"), ("voc", "pspnet")])
def test_the_official_recipes_for_every_width_need_a_backbone_checkpoint(dataset, head):
    import importlib

    from mvit2_jax.errors import ConfigError
    from mvit2_jax.models import VARIANTS
    from mvit2_jax.train import checks

    module = importlib.import_module(f"experiments.segmentation.{dataset}_{head}")
    for alpha in VARIANTS:
        c = module.get_config(str(alpha))
        TASK.check_config(c)
        assert (c.task, c.model.head, c.model.alpha, c.model.aux_head, c.aux_loss_weight) == ("segmentation", head, alpha, True, 0.4)
    want = {
        "ade20k": ("mvit2_ade20k", 150, True, 8, (12, 24, 36), "sgd", 0.02, 2e-4, 1e-4, 16, 120),
        "voc": ("mvit2_voc_aug", 21, False, 16, (6, 12, 18), "adamw", 5e-4, 1e-6, 0.05, 128, 50),
    }[dataset]
    got = (c.data.dataset, c.data.num_classes, c.data.reduce_zero_label, c.model.output_stride, tuple(c.model.aspp_rates),
           c.optim.name, c.optim.lr, c.optim.min_lr, c.optim.weight_decay, c.batch_size, c.num_epochs)
    assert got == want
    assert (c.data.image_size, c.optim.grad_clip_norm, c.ema_decay) == (512, 10.0, 0.9995)
    with pytest.raises(ConfigError, match=r"requires config.init_from.*--config.init_from="):
        checks.check_config(c, 1, 1)


# ----------------------------------------------------------------------------- fine-tuning

HEADS = ("['aspp']", "['classifier']", "['aux_head']")


def _reinitialized(caplog) -> list:
    (line,) = [r.getMessage() for r in caplog.records if "re-initialized" in r.getMessage()]
    return re.split(r", (?=\[)", line.split("re-initialized (not in the checkpoint or new shape): ")[1])


def test_the_backbone_starts_from_a_classification_checkpoint(converted_050, small_seg_config, random_like, caplog):
    """init_from a converted ImageNet classifier: every backbone array loaded, the heads (ASPP,
    classifier, aux head) initialized fresh and listed."""
    from mvit2_jax import load_model, train

    config = small_seg_config()
    config.init_from = converted_050
    steps = train.compile_steps(config, TASK, num_steps=2)
    fresh = random_like(jax.eval_shape(steps.init))  # a fresh state's layout (no compiled init)
    caplog.set_level(logging.INFO)
    state = train.init_from_pretrained(fresh, config, TASK, steps.mesh)
    _, source = load_model(converted_050)
    for part in ("params", "batch_stats"):
        src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(source[part])[0]}
        new = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(getattr(fresh, part))[0]}
        for key, value in jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]:
            key = jax.tree_util.keystr(key)
            np.testing.assert_array_equal(value, new[key] if key.startswith(HEADS) else src[key], err_msg=key)
    listed = _reinitialized(caplog)
    assert listed and all(name.startswith(HEADS) for name in listed)
    assert {name.split("]")[0] + "]" for name in listed} == set(HEADS)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.xdist_group("notebook")  # before the notebook, whose segmentation part then loads these compiled steps
def test_a_run_on_the_digit_scenes_then_predict_writes_masks(tmp_path, small_seg_config, random_like, capsys, caplog):
    """The smoke config through the engine: metrics from the confusion matrix, a checkpoint
    that load_model rebuilds, and predict's mask and overlay files for it."""
    from PIL import Image

    from mvit2_jax import load_model, train
    from mvit2_jax.checkpoint import read_config
    from mvit2_jax.data import digit_scenes
    from mvit2_jax.models import MobileViTv2Segmentation
    from mvit2_jax.predict import main as predict_main

    run = tmp_path / "run"
    metrics = train.train_and_evaluate(small_seg_config(), str(run))
    assert metrics["num_examples"] == 32
    assert {"miou", "pixel_acc", "loss", "ema_miou", "ema_pixel_acc"} <= set(metrics)
    assert 0 < metrics["pixel_acc"] <= 1 and 0 <= metrics["miou"] <= 1 and any(k.startswith("iou/") for k in metrics)
    meta = read_config(str(run))[0]
    assert meta["task"] == "segmentation" and meta["class_names"] == digit_scenes.CLASS_NAMES
    model, _ = load_model(str(run))
    assert isinstance(model, MobileViTv2Segmentation) and (model.num_classes, model.output_stride) == (11, 8)

    # Fine-tuning this run to 5 classes: the two classifiers are new and listed, all else loads.
    caplog.set_level(logging.INFO)
    five = small_seg_config(num_classes=5)
    five.init_from = str(run)
    steps = train.compile_steps(five, TASK, num_steps=2)
    train.init_from_pretrained(random_like(jax.eval_shape(steps.init)), five, TASK, steps.mesh)  # (no compiled init)
    assert sorted(name.split(" (")[0] for name in _reinitialized(caplog)) == [
        "['aux_head']['classifier']['bias']", "['aux_head']['classifier']['kernel']",
        "['classifier']['bias']", "['classifier']['kernel']",
    ]

    from mvit2_jax.data import digits

    images, labels = digits.digits_as_uint8_rgb()
    canvas, _ = digit_scenes.canvas(np.random.default_rng(5), images[..., 0] / 255.0, labels)
    Image.fromarray(canvas).save(tmp_path / "scene.png")
    Image.fromarray(np.zeros((40, 90, 3), np.uint8)).save(tmp_path / "wide.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "masks"
    code = predict_main(["--checkpoint", str(run), "--out", str(out), str(tmp_path / "scene.png"), str(tmp_path / "wide.jpg"), str(tmp_path / "broken.png")])
    printed = capsys.readouterr()
    assert code == 1 and "broken.png: not an image file" in printed.err
    for stem, size in (("scene", (64, 64)), ("wide", (40, 90))):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert mask.shape == overlay.shape == (*size, 3)
    shares = [float(line.split("%")[0]) for line in printed.out.splitlines() if line.startswith("  ")]
    assert len(shares) >= 2 and abs(sum(shares[: len(shares)]) - 200.0) < 0.1  # two images, each 100%
