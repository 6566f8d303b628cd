"""Top-5 predictions for image files with a checkpoint, using the official preprocessing.

    python -m mvit2_jax.predict --checkpoint DIR IMAGE [IMAGE ...]

Preprocessing (as in the official evaluation): shorter side resized to 288 with bicubic
interpolation (scaled as 288/256 of the checkpoint's image size), center crop, RGB in [0, 1].
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

EVAL_RESIZE_RATIO = 288 / 256


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in label order, as shipped inside TFDS."""
    from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST

    return [name.split(",")[0].strip() for name in IMAGENET_LABELS_LIST]


def load_image(path: str, image_size: int, resize_size: Optional[int] = None) -> np.ndarray:
    """Read `path`, resize its shorter side to `resize_size` (bicubic), center crop; [H, W, 3] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if resize_size is None:
        resize_size = int(round(image_size * EVAL_RESIZE_RATIO))
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resize_size / min(w, h)
            new_w, new_h = max(resize_size, round(w * scale)), max(resize_size, round(h * scale))
            im = im.resize((new_w, new_h), Image.BICUBIC)
            left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            return np.asarray(im, np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


def class_names_for(config: dict, num_classes: int) -> List[str]:
    names = config.get("class_names")
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


def predict(checkpoint: str, paths: Sequence[str], top_k: int = 5, ema: bool = True) -> Tuple[List[Tuple[str, List[Tuple[str, float]]]], List[str]]:
    """([(path, [(class name, probability)] * top_k)], [error line per unreadable file])."""
    import jax

    from mvit2_jax.checkpoint import load_model, read_config

    config, _, _ = read_config(checkpoint)
    model, variables = load_model(checkpoint, ema=ema)
    image_size = int(config.get("image_size", (256, 256))[0])
    resize = config.get("eval_resize_size")
    images, good, errors = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, image_size, resize))
            good.append(path)
        except ValueError as e:
            errors.append(str(e))
    results = []
    if images:
        logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, np.stack(images))
        probs = np.asarray(jax.nn.softmax(logits.astype("float32"), axis=-1))
        names = class_names_for(config, probs.shape[-1])
        k = min(top_k, probs.shape[-1])
        for path, p in zip(good, probs):
            top = np.argsort(-p)[:k]
            results.append((path, [(names[i], float(p[i])) for i in top]))
    return results, errors


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Top-5 predictions for images.")
    parser.add_argument("--checkpoint", required=True, help="converted model directory or training workdir")
    parser.add_argument("--raw", action="store_true", help="training workdirs: use raw weights, not EMA")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    try:
        results, errors = predict(args.checkpoint, args.images, args.top_k, ema=not args.raw)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, top in results:
        print(path)
        for name, p in top:
            print(f"  {p:7.2%}  {name}")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
