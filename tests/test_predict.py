"""`python -m mvit2_jax.predict`: official preprocessing, top-5 ImageNet names, bad files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvit2_jax.convert import convert
from mvit2_jax.predict import imagenet_class_names, load_image, predict

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mobilevitv2_050_parity.safetensors"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return convert(str(FIXTURE), str(tmp_path_factory.mktemp("ckpt") / "mobilevitv2_050"))


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


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path, images):
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.predict", "--checkpoint", str(tmp_path / "nope"), str(images / "photo.jpg")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2 and "no checkpoint directory" in proc.stderr
