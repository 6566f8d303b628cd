"""`python -m mvit2_jax.predict`: the eval pipeline's preprocessing, top-5 ImageNet names, bad files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvit2_jax import data, load_model
from mvit2_jax.predict import classify, imagenet_class_names, load_image, load_images, predict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(converted_050):
    return converted_050


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 420, 3), np.uint8)).save(d / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (256, 256), np.uint8), mode="L").save(d / "gray.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_imagenet_class_names_ship_with_tfds():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"


def test_preprocessing_resizes_shorter_side_and_center_crops(tmp_path):
    # Left third black, middle white, right third black: after resize 288 and center crop
    # 256 of a 288x864 image, only the white middle remains.
    img = np.zeros((288, 864, 3), np.uint8)
    img[:, 288:576] = 255
    Image.fromarray(img).save(tmp_path / "bars.png")
    x = load_image(str(tmp_path / "bars.png"), 256)
    assert x.shape == (256, 256, 3) and x.dtype == np.float32
    assert x.min() >= 0.99 and x.max() <= 1.0


def test_predict_returns_sorted_probabilities_of_the_model(checkpoint, images):
    results, errors = predict(checkpoint, [str(images / "photo.jpg"), str(images / "gray.png")])
    assert errors == []
    names = set(imagenet_class_names())
    for _, top in results:
        probs = [p for _, p in top]
        assert len(top) == 5 and probs == sorted(probs, reverse=True)
        assert all(name in names for name, _ in top) and 0 < sum(probs) <= 1.0 + 1e-6


@pytest.mark.slow
def test_cli_prints_top5_and_names_bad_files(checkpoint, images):
    files = [images / "photo.jpg", images / "missing.jpg", images / "notes.txt", images / "gray.png"]
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.predict", "--checkpoint", checkpoint, *map(str, files)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(images / "photo.jpg") and lines[6] == str(images / "gray.png")
    assert len(lines) == 12 and all(line.strip().split("%")[0].replace(".", "").isdigit() for line in lines[1:6])
    assert f"{images / 'missing.jpg'}: no such file" in proc.stderr
    assert f"{images / 'notes.txt'}: not an image file" in proc.stderr


@pytest.mark.slow  # a subprocess
def test_cli_missing_checkpoint_is_a_clear_error(tmp_path, images):
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.predict", "--checkpoint", str(tmp_path / "nope"), str(images / "photo.jpg")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2 and "no checkpoint directory" in proc.stderr


def test_predict_gives_the_logits_of_the_eval_pipeline(checkpoint, tmp_path):
    """The same files through predict and through the eval pass of a folder dataset: the same
    preprocessed pixels, bit for bit, and so the same logits."""
    rng = np.random.default_rng(1)
    files = []
    for name, size, fmt in (("a", (300, 420), "JPEG"), ("b", (256, 256), "PNG"), ("c", (500, 333), "JPEG")):
        path = tmp_path / "images" / "val" / name / f"{name}.{fmt.lower()}"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(path, format=fmt)
        files.append(str(path))
    images, good, errors = load_images(files, 256)
    assert good == files and errors == []
    folder = data.DatasetSpec(str(tmp_path / "images"), str(tmp_path / "tfds"))
    batches = list(data.as_numpy(data.labeled_eval_pass(folder, "val", image_size=256, resize_size=288, batch_size=4)))
    (batch,) = batches
    assert batch["mask"].tolist() == [1, 1, 1, 0] and sorted(batch["label"][:3]) == [0, 1, 2]
    pipeline = np.zeros_like(images)
    pipeline[batch["label"][:3]] = batch["image"][:3]  # one image per class folder: a, b, c
    np.testing.assert_array_equal(images, pipeline)
    model, variables = load_model(checkpoint)
    np.testing.assert_array_equal(classify(model, variables, images), classify(model, variables, pipeline))
