"""Predictions for image files with a checkpoint, using the eval pipeline's own preprocessing.

    python -m mvit2_jax.predict --checkpoint DIR IMAGE [IMAGE ...]                 # classification
    python -m mvit2_jax.predict --checkpoint DIR IMAGE [IMAGE ...] --out OUTDIR    # segmentation, detection

Classification prints the top-5 classes. Preprocessing is mvit2_jax.data.eval_image: shorter
side resized to the checkpoint's eval resize (288 for 256 crops, bicubic), center crop, RGB
in [0, 1]; so predict gives the logits that evaluation gives for the same files.

Segmentation writes, per image, OUTDIR/<name>_mask.png (each class in its colour, the PASCAL
VOC colour map) and OUTDIR/<name>_overlay.png (the image and the mask blended half and half),
and prints the classes present with their share of the pixels. The image goes through the
eval pipeline's resize (mvit2_jax.data.segmentation.eval_image: image_size x image_size,
bicubic); the logits are resized back to the file's size (bilinear, align_corners=True), as
the official evaluation upsamples to the original size.

Detection writes, per image, OUTDIR/<name>_boxes.png (the image with a labelled box and its
score per detection, a colour per class) and OUTDIR/<name>_detections.json (a list of
{"box": [x0, y0, x1, y1] in the file's pixels, "score", "class", "class_id"}), and prints the
detections. The image goes through the eval resize (image_size x image_size, bicubic); the
detections are the evaluation's (mvit2_jax.models.anchors.postprocess with the checkpoint's
settings), those with a score of at least --score-threshold (default 0.3) kept.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from mvit2_jax import compile_cache
from mvit2_jax.errors import ConfigError, DataError, usage_errors_exit


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in label order, as shipped inside TFDS."""
    from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST

    return [name.split(",")[0].strip() for name in IMAGENET_LABELS_LIST]


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    return data


def _decoded(path: str, preprocess):
    """preprocess(encoded bytes tensor) as numpy; DataError naming the file if TF cannot decode it."""
    import tensorflow as tf

    data = _read_bytes(path)
    try:
        return preprocess(tf.constant(data))
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        reason = str(getattr(e, "message", e)).strip().splitlines()
        raise DataError(f"{path}: not an image file TensorFlow can decode ({reason[0] if reason else type(e).__name__})") from None


def load_image(path: str, image_size: int, resize_size: Optional[int] = None) -> np.ndarray:
    """The eval preprocessing of the file at `path`: float32 [image_size, image_size, 3] in [0, 1].

    Raises DataError naming the file when it is missing or not a decodable image.
    """
    from mvit2_jax.data import eval_image
    from mvit2_jax.tasks.classification import default_eval_resize

    return _decoded(path, lambda data: eval_image(data, image_size, resize_size or default_eval_resize(image_size)).numpy())


def load_images(paths: Sequence[str], image_size: int, resize_size: Optional[int] = None) -> Tuple[np.ndarray, List[str], List[str]]:
    """(images [N, S, S, 3], the paths that loaded, an error line per file that did not)."""
    images, good, errors = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, image_size, resize_size))
            good.append(path)
        except DataError as e:
            errors.append(str(e))
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.float32)
    return stacked, good, errors


def classify(model, variables, images: np.ndarray) -> np.ndarray:
    """float32 logits [N, classes] of preprocessed images, in eval mode."""
    import jax

    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    return np.asarray(logits, np.float32)


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
    from mvit2_jax.hub import local_path

    checkpoint = local_path(checkpoint)  # a hub name: its converted directory
    meta, _, _ = read_config(checkpoint)
    if meta["task"] != "classification":
        raise ConfigError(f"{checkpoint} holds a {meta['task']} model: predict prints classes of classification models (segmentation, detection: pass --out DIR)")
    model, variables = load_model(checkpoint, ema=ema)
    image_size = int(meta.get("image_size", (256, 256))[0])
    images, good, errors = load_images(paths, image_size, meta.get("eval_resize_size"))
    results = []
    if len(good):
        probs = np.asarray(jax.nn.softmax(classify(model, variables, images), axis=-1))
        names = class_names_for(meta, probs.shape[-1])
        k = min(top_k, probs.shape[-1])
        for path, p in zip(good, probs):
            top = np.argsort(-p)[:k]
            results.append((path, [(names[i], float(p[i])) for i in top]))
    return results, errors


def _each_image(paths: Sequence[str], eval_image, errors: List[str]):
    """(path, decoded uint8 image, eval_image(encoded) as numpy) of each file that loads; an
    error line in `errors` for each that does not."""
    from mvit2_jax.data import preprocess

    for path in paths:
        try:
            original = _decoded(path, lambda data: preprocess.decode(data).numpy())
            image = _decoded(path, lambda data: eval_image(data).numpy())
        except DataError as e:
            errors.append(str(e))
            continue
        yield path, original, image


def color_map(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: class c's colour spreads the bits of c over R, G and B."""
    colors = np.zeros((n, 3), np.uint8)
    for c in range(n):
        r = g = b = 0
        value = c
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors[c] = (r, g, b)
    return colors


def segment(checkpoint: str, paths: Sequence[str], out_dir: str, ema: bool = True) -> Tuple[List[Tuple[str, List[Tuple[str, float]]]], List[str]]:
    """Write each image's mask and overlay PNGs into `out_dir`; returns ([(path, [(class name,
    pixel share)] in decreasing share)], [error line per unreadable file])."""
    import os

    import jax
    from PIL import Image

    from mvit2_jax.checkpoint import load_model, read_config
    from mvit2_jax.hub import local_path
    from mvit2_jax.data.segmentation import eval_image
    from mvit2_jax.models.layers import resize_bilinear_align_corners

    checkpoint = local_path(checkpoint)  # a hub name: its converted directory
    meta, _, _ = read_config(checkpoint)
    if meta["task"] != "segmentation":
        raise ConfigError(f"{checkpoint} holds a {meta['task']} model: --out writes masks of segmentation models")
    model, variables = load_model(checkpoint, ema=ema)
    size = int(meta.get("image_size", (512, 512))[0])
    names = class_names_for(meta, model.num_classes)
    os.makedirs(out_dir, exist_ok=True)

    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    results, errors, colors = [], [], color_map()
    for path, original, image in _each_image(paths, lambda data: eval_image(data, size), errors):
        logits = resize_bilinear_align_corners(apply(variables, image[None]), *original.shape[:2])[0]
        ids = np.asarray(jax.numpy.argmax(logits, -1))
        mask = colors[ids]
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(mask).save(os.path.join(out_dir, f"{stem}_mask.png"))
        overlay = np.round(0.5 * original + 0.5 * mask).astype(np.uint8)
        Image.fromarray(overlay).save(os.path.join(out_dir, f"{stem}_overlay.png"))
        counts = np.bincount(ids.reshape(-1), minlength=model.num_classes)
        shares = [(names[c], counts[c] / ids.size) for c in np.argsort(-counts) if counts[c]]
        results.append((path, shares))
    return results, errors


def draw_detections(image: np.ndarray, detections: Sequence[dict], num_classes: int):
    """A PIL image of uint8 RGB `image` with each detection's box and "class score" label."""
    from PIL import Image, ImageDraw, ImageFont

    from mvit2_jax.data.detection import box_colors

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    colors = box_colors(num_classes)
    width = max(1, round(max(image.shape[:2]) / 200))
    for det in detections:
        x0, y0, x1, y1 = det["box"]
        color = colors[det["class_id"] % num_classes]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        text = f"{det['class']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle([x0, y, x0 + right - left + 2, y + bottom - top + 2], fill=color)
        draw.text((x0 + 1, y + 1 - (top - y0)), text, fill=(0, 0, 0), font=font)
    return canvas


def detect(checkpoint: str, paths: Sequence[str], out_dir: str, ema: bool = True, score_threshold: float = 0.3) -> Tuple[List[Tuple[str, List[dict]]], List[str]]:
    """Write each image's boxes PNG and detections JSON into `out_dir`; returns ([(path,
    [detection dict] by decreasing score)], [error line per unreadable file])."""
    import json
    import os

    import jax
    import jax.numpy as jnp

    from mvit2_jax.checkpoint import load_model, read_config
    from mvit2_jax.hub import local_path
    from mvit2_jax.data.detection import eval_image
    from mvit2_jax.models import anchors as anchor_lib

    checkpoint = local_path(checkpoint)  # a hub name: its converted directory
    meta, _, _ = read_config(checkpoint)
    if meta["task"] != "detection":
        raise ConfigError(f"{checkpoint} holds a {meta['task']} model: detect draws the boxes of detection models")
    model, variables = load_model(checkpoint, ema=ema)
    size = int(meta.get("image_size", (320, 320))[0])
    names = class_names_for(meta, model.num_classes)
    settings = (meta.get("config") or {}).get("detection") or {}
    threshold = float(settings.get("score_threshold", 0.01))
    os.makedirs(out_dir, exist_ok=True)
    anchors = jnp.asarray(anchor_lib.ssd_anchors(size, size))

    @jax.jit
    def run(v, x):
        out = model.apply(v, x, train=False)
        return anchor_lib.postprocess(
            out["loc"], out["cls"], anchors, threshold, int(settings.get("top_k", 400)),
            float(settings.get("iou_threshold", 0.5)), int(settings.get("max_detections", 200)),
        )

    results, errors = [], []
    for path, original, image in _each_image(paths, lambda data: eval_image(data, size), errors):
        found = jax.device_get(run(variables, image[None]))
        h, w = original.shape[:2]
        detections = []
        for k in range(int(found["count"][0])):
            score = float(found["scores"][0, k])
            if score < score_threshold:
                break  # sorted by decreasing score
            box = np.clip(found["boxes"][0, k], 0.0, 1.0) * np.array([w, h, w, h])
            cls = int(found["classes"][0, k])
            detections.append({"box": [round(float(v), 2) for v in box], "score": round(score, 4), "class": names[cls], "class_id": cls})
        stem = os.path.splitext(os.path.basename(path))[0]
        draw_detections(original, detections, model.num_classes).save(os.path.join(out_dir, f"{stem}_boxes.png"))
        with open(os.path.join(out_dir, f"{stem}_detections.json"), "w") as f:
            json.dump(detections, f, indent=1)
        results.append((path, detections))
    return results, errors


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Top-5 classes of images (classification), their masks (segmentation, --out) or their detections (detection, --out)."
    )
    parser.add_argument("--checkpoint", required=True, help="converted model directory, training workdir, or hub name (hf-hub:timm/mobilevitv2_100.cvnets_in1k)")
    parser.add_argument("--raw", action="store_true", help="training workdirs: use raw weights, not EMA")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--out", default=None, help="segmentation and detection: directory for the mask and overlay PNGs, or the boxes PNGs and detections JSON")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="detection: the lowest score drawn and written")
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    compile_cache.enable()  # $MVIT2_COMPILATION_CACHE: on (default), off or a directory
    with usage_errors_exit():
        task = None
        if args.out:
            from mvit2_jax.checkpoint import read_config
            from mvit2_jax.hub import local_path

            args.checkpoint = local_path(args.checkpoint)
            task = read_config(args.checkpoint)[0]["task"]
        if task == "detection":
            found, errors = detect(args.checkpoint, args.images, args.out, ema=not args.raw, score_threshold=args.score_threshold)
            results = [(path, [(f"{d['class']} at {d['box']}", d["score"]) for d in dets]) for path, dets in found]
        elif args.out:
            results, errors = segment(args.checkpoint, args.images, args.out, ema=not args.raw)
        else:
            results, errors = predict(args.checkpoint, args.images, args.top_k, ema=not args.raw)
    for path, top in results:
        print(path)
        for name, p in top:
            print(f"  {p:7.2%}  {name}")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
