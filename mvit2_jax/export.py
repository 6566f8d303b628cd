"""Export a model to TensorFlow SavedModel, TFLite / LiteRT or ONNX, checked in the target runtime.

    python -m mvit2_jax.export --checkpoint DIR_OR_HUB_NAME --format tflite|onnx|savedmodel --out PATH
        [--image-size N] [--batch N | --dynamic-batch] [--quantize none|float16|dynamic|int8]
        [--calibration IMAGE_DIR] [--uint8-input] [--raw] [--evaluate]

Every task exports: a classifier gives "logits" [B, classes], a segmentation model "logits"
[B, H, W, classes] at the input size, an SSD its raw "loc" [B, A, 4] and "cls" [B, A,
classes] (no NMS in the graph) with its anchors written beside the file (OUT_anchors.npy,
center form, normalized); `decode_detections` is the NumPy decoding and class-aware NMS of
those outputs. Inputs are float NHWC RGB in [0, 1] of the recorded image size, or with
`--uint8-input` uint8 pixels that the graph scales by 1/255 (the official preprocessing:
the resize and crop stay outside, as in `mvit2_jax.predict`).

The model runs on its portable path (`kernels="portable"`: library ops only), where the
MobileViT blocks' unfold and fold, the one-group GroupNorm and the attention heads keep every
tensor at rank 4 or below, the same values as the default path. SavedModel and TFLite: the
graph is made by jax2tf (one StableHLO module in a SavedModel) and the TFLite converter turns
it into builtin LiteRT ops. ONNX: jax2onnx converts the jaxpr to ONNX operators (opset 23;
input "images", outputs named as above). Quantization (TFLite and ONNX): "float16" weights
(ONNX: float16 compute inside, float32 inputs and outputs), "dynamic" (int8 weights,
activations quantized at run time; ONNX Runtime's integer convolutions are slow on x86),
"int8" (int8 weights and activations, calibrated on `--calibration` images with the task's
eval preprocessing: a folder, or a split of a training workdir's dataset such as
"train[:64]"; inputs and outputs stay float; ONNX: QDQ format, per-channel weights, by
onnxruntime.quantization). After writing, the command runs the export in its runtime
(TensorFlow for a SavedModel, ai-edge-litert's interpreter for TFLite, onnxruntime for ONNX)
on a few random inputs and prints the largest difference from the JAX model; a float32
export further than 1e-4 from it is an error. `--evaluate` (a training workdir) runs the
export over the run's eval split with the task's own metric (top-1, mIoU or COCO mAP) and
prints it beside the JAX model's: what quantization costs, measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging as std_logging
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mvit2_jax import compile_cache
from mvit2_jax.errors import ConfigError, DataError, usage_errors_exit

FORMATS = ("savedmodel", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
FLOAT32_TOLERANCE = 1e-4
ONNX_OPSET = 23


def load_exportable(checkpoint: str, ema: bool = True):
    """(model on the portable path, variables, config record) of a directory or hub name."""
    from mvit2_jax.checkpoint import load_model, read_config
    from mvit2_jax.hub import local_path

    path = local_path(checkpoint)
    meta = read_config(path)[0]
    model, variables = load_model(path, ema=ema, kernels="portable")
    return model, variables, meta


def inference_function(model, variables, task: str, uint8_input: bool = False) -> Callable[[Any], Dict[str, Any]]:
    """images -> {output name: array}, the exported computation (eval mode)."""
    import jax.numpy as jnp

    def run(images):
        x = images.astype(jnp.float32) / 255.0 if uint8_input else images
        out = model.apply(variables, x, train=False)
        if task == "detection":
            return {"loc": out["loc"], "cls": out["cls"]}
        return {"logits": out}

    return run


@contextlib.contextmanager
def _log_levels_kept() -> Iterator[None]:
    """TensorFlow's SavedModel writer and the TFLite converter set the root and absl loggers
    to WARNING; put back the levels the program had (its INFO logs, the tests' captures)."""
    names = ("", "absl")
    levels = {name: std_logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        for name, level in levels.items():
            std_logging.getLogger(name).setLevel(level)


def to_savedmodel(fn: Callable, input_shape: Tuple[Optional[int], int, int, int], input_dtype: str, out: str) -> str:
    """A TensorFlow SavedModel at `out` whose "serving_default" signature runs `fn`."""
    with _log_levels_kept():
        return _to_savedmodel(fn, input_shape, input_dtype, out)


def _to_savedmodel(fn: Callable, input_shape: Tuple[Optional[int], int, int, int], input_dtype: str, out: str) -> str:
    import tensorflow as tf
    from jax.experimental import jax2tf

    polymorphic = None if input_shape[0] is not None else ["(b, _, _, _)"]
    converted = jax2tf.convert(fn, with_gradient=False, polymorphic_shapes=polymorphic)
    signature = tf.function(converted, input_signature=[tf.TensorSpec(input_shape, tf.as_dtype(input_dtype), name="images")],
                            autograph=False)
    module = tf.Module()
    module.serve = signature
    tf.saved_model.save(module, out, signatures={"serving_default": signature.get_concrete_function()})
    return out


def to_tflite(saved_model: str, quantize: str = "none", calibration: Optional[np.ndarray] = None) -> bytes:
    """The TFLite flatbuffer of a SavedModel, builtin ops only, quantized as asked."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if calibration is None or not len(calibration):
            raise ConfigError("--quantize int8 needs --calibration IMAGE_DIR (images to calibrate the activations on)")

        def representative():
            for image in calibration:
                yield [image[None]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        with _log_levels_kept():
            return converter.convert()
    except Exception as e:  # the converter's errors carry MLIR locations over many lines
        raise RuntimeError(f"the TFLite converter failed: {str(e).strip().splitlines()[0]}") from e


def tflite_runner(model: bytes, threads: Optional[int] = None) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """images -> {output name: array} of a TFLite model (its serving signature) in ai-edge-litert, built once."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model, num_threads=threads).get_signature_runner()
    ((name, detail),) = runner.get_input_details().items()
    fixed = int(detail["shape_signature"][0])

    def run(inputs: np.ndarray) -> Dict[str, np.ndarray]:
        if fixed != -1 and len(inputs) != fixed:
            raise ValueError(f"this TFLite file takes batches of {fixed} (exported with --batch {fixed}), got {len(inputs)} images: "
                             "run them in batches of that size, or export with --dynamic-batch")
        return {k: np.asarray(v) for k, v in runner(**{name: inputs}).items()}

    return run


def run_tflite(model: bytes, inputs: np.ndarray, threads: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Outputs of a TFLite model (its serving signature) on `inputs`, with ai-edge-litert."""
    return tflite_runner(model, threads)(inputs)


def run_savedmodel(path: str, inputs: np.ndarray) -> Dict[str, np.ndarray]:
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    return {k: v.numpy() for k, v in serve(images=tf.constant(inputs)).items()}


def tflite_max_rank(model: bytes) -> int:
    """The largest rank of any tensor in a TFLite model."""
    from ai_edge_litert.interpreter import Interpreter

    return max(len(t["shape"]) for t in Interpreter(model_content=model).get_tensor_details())


def to_onnx(fn: Callable, input_shape: Tuple[Optional[int], int, int, int], input_dtype: str) -> Any:
    """The ONNX model (onnx.ModelProto) of `fn` by jax2onnx: input "images" (batch None: a
    symbolic "batch" dimension), one output per key of `fn`'s result dict."""
    import jax
    from jax2onnx import to_onnx as jax_to_onnx

    from mvit2_jax.models import layers

    batch = "batch" if input_shape[0] is None else input_shape[0]
    shape = jax.export.symbolic_shape(", ".join(str(d) for d in (batch, *input_shape[1:])))
    abstract = jax.ShapeDtypeStruct(shape, np.dtype(input_dtype))
    names = sorted(jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *input_shape[1:]), np.dtype(input_dtype))))  # jax's dict order
    # jax2onnx prints a line per convolution, logs its progress at INFO, and logs a traceback
    # for each of its optional plugins that does not import with this jax (dm_pix and
    # jax.numpy wrappers, unused here: the lax-level ones convert these models).
    quiet = {"jax2onnx": std_logging.WARNING, "jax2onnx.plugins.plugin_system": std_logging.ERROR}
    levels = {name: std_logging.getLogger(name).level for name in quiet}
    try:
        for name, level in quiet.items():
            std_logging.getLogger(name).setLevel(level)
        with _log_levels_kept(), contextlib.redirect_stdout(io.StringIO()), layers.onnx_graph():
            model = jax_to_onnx(fn, [abstract], model_name="mvit2_jax", opset=ONNX_OPSET)
    finally:
        for name, level in levels.items():
            std_logging.getLogger(name).setLevel(level)
    graph = model.graph
    (old_input,) = [i.name for i in graph.input]
    graph.input[0].name = "images"
    for node in graph.node:
        node.input[:] = ["images" if name == old_input else name for name in node.input]
    # Named outputs: an Identity per output (jax2onnx numbers its tensors).
    import onnx

    for value, name in zip(list(graph.output), names):
        graph.node.append(onnx.helper.make_node("Identity", [value.name], [name]))
        value.name = name
    # jax2onnx annotates some intermediate tensors with their NHWC shapes where its graph holds
    # NCHW ones (ONNX Runtime warns, then ignores them): keep only the inputs' and outputs'.
    del graph.value_info[:]
    return model


def quantize_onnx(model: Any, quantize: str, calibration: Optional[np.ndarray] = None) -> Any:
    """`model` (onnx.ModelProto) with float16 weights and compute, or int8 by onnxruntime.quantization."""
    import onnx

    if quantize == "none":
        return model
    if quantize == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(model, keep_io_types=True)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch, _log_levels_kept():
        src, pre, dst = (os.path.join(scratch, f"{name}.onnx") for name in ("src", "pre", "dst"))
        onnx.save(model, src)
        quant_pre_process(src, pre)  # shape inference and graph optimization, as onnxruntime recommends
        if quantize == "dynamic":
            quantize_dynamic(pre, dst, weight_type=QuantType.QInt8)
        else:
            if calibration is None or not len(calibration):
                raise ConfigError("--quantize int8 needs --calibration IMAGE_DIR (images to calibrate the activations on)")

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter([{"images": image[None]} for image in calibration])

                def get_next(self):
                    return next(self.batches, None)

            # InstanceNormalization's scale is a vector: its channels are axis 0 (the quantizer's
            # default axis 1 does not exist there, and it warned once per node).
            quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            extra_options={"QDQOpTypePerChannelSupportToAxis": {"InstanceNormalization": 0}})
        return onnx.load(dst)


def onnx_session(model: Any, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of a model (bytes, path or onnx.ModelProto), all graph
    optimizations on, `threads` intra-op threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnx_runner(model: Any, threads: Optional[int] = None) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """images -> {output name: array} of an ONNX model (bytes, path or ModelProto), its session built once."""
    session = onnx_session(model, threads)
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(names, {"images": inputs})))


def run_onnx(model: Any, inputs: np.ndarray, threads: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Outputs of an ONNX model on `inputs` (its "images"), with onnxruntime on the CPU."""
    return onnx_runner(model, threads)(inputs)


def onnx_max_rank(model: Any) -> int:
    """The largest rank of any tensor in an ONNX model (after ONNX shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    values = list(graph.input) + list(graph.value_info) + list(graph.output)
    ranks = [len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")]
    ranks += [len(t.dims) for t in graph.initializer]
    return max(ranks)


def calibration_images(task: str, meta: Dict[str, Any], source: str, size: int, count: int = 64) -> np.ndarray:
    """Up to `count` images to calibrate on, through the task's eval preprocessing: the images
    of a folder (as predict reads them), or, for a training workdir, a split of its dataset."""
    from mvit2_jax import predict

    if not os.path.isdir(source):
        if "config" not in meta:
            raise DataError(f"--calibration must be a folder of images (or, for a training workdir, a split of its dataset), got {source}")
        if size != meta["image_size"][0]:
            raise ConfigError(f"--calibration {source} (a split of the run's dataset) comes at the run's image size "
                              f"{meta['image_size'][0]}: drop --image-size or calibrate on a folder")
        return split_images(meta, source, count)
    paths = sorted(os.path.join(source, f) for f in os.listdir(source) if not f.startswith("."))[:count]
    if task == "classification":
        images, _, _ = predict.load_images(paths, size, meta.get("eval_resize_size"))
    else:
        from mvit2_jax.data import detection as det_data, segmentation as seg_data

        eval_image = (seg_data if task == "segmentation" else det_data).eval_image
        images = [image for _, _, image in predict._each_image(paths, lambda data: eval_image(data, size), [])]
    if not len(images):
        raise DataError(f"no readable image in {source} to calibrate on")
    return np.asarray(images, np.float32)


def split_images(meta: Dict[str, Any], split: str, count: int) -> np.ndarray:
    """The first `count` images of `split` of a training run's dataset (its config record),
    through the run's eval preprocessing: float [N, S, S, 3] in [0, 1]."""
    import ml_collections

    from mvit2_jax import tasks

    config = ml_collections.ConfigDict(meta["config"])
    task = tasks.get(meta["task"])
    task.check_data(config, splits=[split])
    images: List[np.ndarray] = []
    for batch in task.eval_input(config, split):
        images += list(np.asarray(task.inputs(batch))[np.asarray(batch["mask"]) > 0])
        if len(images) >= count:
            break
    return np.asarray(images[:count], np.float32)


def export(
    checkpoint: str,
    fmt: str,
    out: str,
    image_size: Optional[int] = None,
    batch: Optional[int] = 1,
    quantize: str = "none",
    calibration: Optional[Any] = None,
    uint8_input: bool = False,
    ema: bool = True,
    check_inputs: int = 2,
    evaluate: bool = False,
) -> Dict[str, Any]:
    """Export `checkpoint` to `out`; returns {"path", "outputs", "max_abs_diff", "max_rank", ...}.

    `batch` None exports a dynamic batch dimension. `calibration`: a folder of images, or
    images already preprocessed (float [N, S, S, 3] in [0, 1]). `evaluate` (a training workdir) adds
    "eval": the export's metric on the run's eval split beside the JAX model's (evaluate_export)."""
    import jax

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"--quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if quantize != "none" and fmt == "savedmodel":
        raise ConfigError(f"--quantize {quantize} applies to --format tflite or onnx (a SavedModel keeps float32 weights)")
    if quantize == "int8" and calibration is None:
        raise ConfigError("--quantize int8 needs --calibration IMAGE_DIR (images to calibrate the activations on)")
    if os.path.exists(out) and (os.path.isfile(out) or os.listdir(out)):
        raise ConfigError(f"{out} exists: choose a new output path")
    model, variables, meta = load_exportable(checkpoint, ema)
    if evaluate and "config" not in meta:
        raise ConfigError(f"--evaluate needs a training workdir (its config names the dataset); {checkpoint} records none")
    if evaluate and image_size and image_size != meta["image_size"][0]:
        raise ConfigError(f"--evaluate runs the run's eval pipeline at its image size {meta['image_size'][0]}: drop --image-size")
    task = meta["task"]
    size = int(image_size or meta.get("image_size", (256, 256))[0])
    if task == "detection" and size % 32:
        raise ConfigError(f"an SSD's input side must be divisible by 32, got {size}")
    images = calibration_images(task, meta, calibration, size) if isinstance(calibration, str) else calibration
    if images is not None and uint8_input:
        images = np.round(images * 255.0).astype(np.uint8)
    fn = inference_function(model, variables, task, uint8_input)
    dtype = "uint8" if uint8_input else "float32"
    rng = np.random.default_rng(0)
    n = batch or 2
    samples = [rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8) if uint8_input else rng.random((n, size, size, 3), np.float32)
               for _ in range(max(check_inputs, 1))]
    forward = jax.jit(fn)
    expected = [jax.device_get(forward(x)) for x in samples]

    result: Dict[str, Any] = {"task": task, "format": fmt, "image_size": size, "batch": batch, "quantize": quantize, "input_dtype": dtype}
    if fmt == "onnx":
        onnx_model = quantize_onnx(to_onnx(fn, (batch, size, size, 3), dtype), quantize, images)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "wb") as f:
            f.write(onnx_model.SerializeToString())
        result["max_rank"] = onnx_max_rank(onnx_model)
        run = onnx_runner(out)
        got = [run(x) for x in samples]
    else:
        got = _export_tf(fn, fmt, out, batch, size, dtype, quantize, images, samples, result)
    if task == "detection":
        from mvit2_jax.models import anchors as anchor_lib

        anchors_path = os.path.splitext(out.rstrip("/"))[0] + "_anchors.npy"
        np.save(anchors_path, np.asarray(anchor_lib.ssd_anchors(size, size), np.float32))
        result["anchors"] = anchors_path
    diffs = {k: max(float(np.abs(g[k].astype(np.float32) - e[k]).max()) for g, e in zip(got, expected)) for k in expected[0]}
    result.update(path=out, outputs={k: list(np.shape(v)) for k, v in expected[0].items()}, max_abs_diff=diffs)
    scale = {k: max(float(np.abs(e[k]).max()) for e in expected) for k in expected[0]}
    result["max_abs_output"] = scale
    if task == "classification":
        top1 = [np.argmax(g["logits"], -1) == np.argmax(e["logits"], -1) for g, e in zip(got, expected)]
        result["top1_agreement"] = float(np.mean(np.concatenate(top1)))
    if quantize == "none" and max(diffs.values()) > FLOAT32_TOLERANCE:
        raise RuntimeError(f"the float32 export differs from the JAX model by {max(diffs.values()):.3g} (> {FLOAT32_TOLERANCE}): {diffs}")
    if evaluate:
        result["eval"] = evaluate_export(checkpoint, fmt, out, batch, uint8_input, ema=ema)
    return result


def _export_tf(fn, fmt, out, batch, size, dtype, quantize, images, samples, result) -> List[Dict[str, np.ndarray]]:
    """Write a SavedModel or TFLite export; the runtime's outputs on `samples`."""
    with tempfile.TemporaryDirectory() as scratch:
        saved = to_savedmodel(fn, (batch, size, size, 3), dtype, out if fmt == "savedmodel" else os.path.join(scratch, "savedmodel"))
        if fmt == "tflite":
            flatbuffer = to_tflite(saved, quantize, images)
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "wb") as f:
                f.write(flatbuffer)
            result["max_rank"] = tflite_max_rank(flatbuffer)
            run = tflite_runner(flatbuffer)
            return [run(x) for x in samples]
        return [run_savedmodel(out, x) for x in samples]


def runtime_runner(fmt: str, path: str, threads: Optional[int] = None) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """inputs -> {output name: array} of an exported file in its runtime (built once)."""
    if fmt == "onnx":
        return onnx_runner(path, threads)
    if fmt == "tflite":
        with open(path, "rb") as f:
            return tflite_runner(f.read(), threads)
    return lambda x: run_savedmodel(path, x)


def evaluate_outputs(checkpoint: str, run: Callable[[np.ndarray], Dict[str, np.ndarray]], batch: Optional[int] = None,
                     uint8_input: bool = False, split: Optional[str] = None) -> Tuple[Dict[str, float], np.ndarray]:
    """(the task's metrics, per-example argmax of the first output) of `run` (an exported
    model, or the JAX model) over the eval split of a training workdir's dataset: the
    engine's eval input and the task's own sums and metrics, in one process. `batch`: the
    export's fixed batch size (None: any); uint8 exports get the preprocessed images as
    rounded 0-255 pixels."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from mvit2_jax import tasks
    from mvit2_jax.checkpoint import read_config
    from mvit2_jax.hub import local_path

    meta = read_config(local_path(checkpoint))[0]
    if "config" not in meta:
        raise ConfigError(f"{checkpoint} records no training config (no dataset to evaluate on): give a training workdir")
    task = tasks.get(meta["task"])
    config = ml_collections.ConfigDict(meta["config"])
    task.check_data(config, splits=[split or config.data.eval_split])
    sums_fn = jax.jit(lambda outputs, b: task.eval_sums(outputs, b, config))
    examples_fn = jax.jit(lambda outputs, b: task.eval_examples(outputs, b, config)) if hasattr(task, "eval_examples") else None
    totals, gathered, argmaxes, count = None, [], [], 0.0
    for b in task.eval_input(config, split):
        images = np.asarray(task.inputs(b))
        if uint8_input:
            images = np.round(images * 255.0).astype(np.uint8)
        step = batch or len(images)
        parts = []
        for i in range(0, len(images), step):
            chunk = images[i:i + step]
            pad = step - len(chunk)
            out = run(np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk)
            parts.append({k: np.asarray(v, np.float32)[:len(chunk)] for k, v in out.items()})
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        outputs = {"loc": jnp.asarray(out["loc"]), "cls": jnp.asarray(out["cls"])} if meta["task"] == "detection" else jnp.asarray(out["logits"])
        sums = jax.device_get(sums_fn(outputs, b))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        real = np.asarray(b["mask"]) > 0
        count += float(real.sum())
        if examples_fn is not None:
            gathered.append({k: np.asarray(v)[real] for k, v in jax.device_get(examples_fn(outputs, b)).items()})
        first = out["cls"] if meta["task"] == "detection" else out["logits"]
        argmaxes.append(np.argmax(first, -1)[real])
    extra = {"examples": {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]}} if gathered else {}
    return task.finalize(totals, count, **extra), np.concatenate(argmaxes)


def evaluate_export(checkpoint: str, fmt: str, path: str, batch: Optional[int] = 1, uint8_input: bool = False,
                    split: Optional[str] = None, ema: bool = True) -> Dict[str, Any]:
    """The task's headline metric (top1, miou or map) of an export and of the JAX model it
    came from, on the workdir's eval split, with the change and the argmax agreement
    (classification: top-1 agreement; segmentation: pixel agreement; detection: per-anchor
    class agreement)."""
    import jax

    from mvit2_jax import tasks

    model, variables, meta = load_exportable(checkpoint, ema)
    metric = tasks.get(meta["task"]).best_metric.removeprefix("ema_")
    forward = jax.jit(inference_function(model, variables, meta["task"], uint8_input))
    exported, export_argmax = evaluate_outputs(checkpoint, runtime_runner(fmt, path), batch, uint8_input, split)
    reference, jax_argmax = evaluate_outputs(checkpoint, lambda x: jax.device_get(forward(x)), None, uint8_input, split)
    return {"metric": metric, "export": exported[metric], "jax": reference[metric], "change": exported[metric] - reference[metric],
            "agreement": float(np.mean(export_argmax == jax_argmax)), "examples": int(len(export_argmax)),
            "dataset": meta["config"]["data"]["dataset"], "split": split or meta["config"]["data"]["eval_split"]}


def decode_detections(loc: np.ndarray, cls_logits: np.ndarray, anchors: np.ndarray, score_threshold: float = 0.01,
                      iou_threshold: float = 0.5, max_detections: int = 200, top_k: int = 400) -> List[Dict[str, np.ndarray]]:
    """Per image {"boxes" [D, 4] corner form (normalized), "scores" [D], "classes" [D]} from an
    exported SSD's raw outputs, as `mvit2_jax.models.anchors.postprocess` computes them:
    softmax, per class the `top_k` scores above the threshold, greedy NMS per class, the best
    `max_detections` over all classes."""
    from mvit2_jax.models.anchors import CENTER_VARIANCE, SIZE_VARIANCE

    results = []
    for image_loc, logits in zip(np.asarray(loc, np.float32), np.asarray(cls_logits, np.float32)):
        centers = image_loc[:, :2] * CENTER_VARIANCE * anchors[:, 2:] + anchors[:, :2]
        sizes = np.exp(image_loc[:, 2:] * SIZE_VARIANCE) * anchors[:, 2:]
        boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], -1)
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        found = []
        for c in range(1, probs.shape[1]):
            order = np.argsort(-probs[:, c], kind="stable")[:top_k]
            order = order[probs[order, c] > score_threshold]
            kept: List[int] = []
            for i in order:
                if all(_iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
                    kept.append(i)
            found += [(probs[i, c], c, i) for i in kept]
        found.sort(key=lambda t: -t[0])
        found = found[:max_detections]
        results.append({
            "boxes": np.array([boxes[i] for _, _, i in found], np.float32).reshape(-1, 4),
            "scores": np.array([s for s, _, _ in found], np.float32),
            "classes": np.array([c for _, c, _ in found], np.int32),
        })
    return results


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    wh = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0.0, None)
    overlap = wh[0] * wh[1]
    area = lambda box: max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)  # noqa: E731
    union = area(a) + area(b) - overlap
    return float(overlap / union) if union > 0 else 0.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit2_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model directory, training workdir or hub name (hf-hub:...)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output file (tflite, onnx) or new directory (savedmodel)")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the recorded image size)")
    parser.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    parser.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS, help="tflite / onnx weights and activations")
    parser.add_argument("--calibration", default=None,
                        help="int8: a folder of images to calibrate on, or (a training workdir) a split of its dataset, e.g. train[:64]")
    parser.add_argument("--uint8-input", action="store_true", help="the graph takes uint8 pixels and scales them by 1/255")
    parser.add_argument("--raw", action="store_true", help="training workdirs: the raw weights, not EMA")
    parser.add_argument("--evaluate", action="store_true",
                        help="training workdirs: the export's metric on the run's eval split, beside the JAX model's")
    args = parser.parse_args(argv)
    compile_cache.enable()  # $MVIT2_COMPILATION_CACHE: on (default), off or a directory
    with usage_errors_exit(f"{parser.prog}: error"):
        if args.batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {args.batch}")
        result = export(args.checkpoint, args.format, args.out, args.image_size, None if args.dynamic_batch else args.batch,
                        args.quantize, args.calibration, args.uint8_input, not args.raw, evaluate=args.evaluate)
    print(f"wrote {result['path']}: {result['task']}, {result['image_size']}x{result['image_size']} {result['input_dtype']} input, "
          f"batch {result['batch'] or 'dynamic'}, quantize {result['quantize']}")
    for name, shape in result["outputs"].items():
        print(f"  {name} {shape}: max |export - JAX| = {result['max_abs_diff'][name]:.3g} (outputs up to {result['max_abs_output'][name]:.3g})")
    if "top1_agreement" in result:
        print(f"  top-1 agreement with the JAX model on the check inputs: {result['top1_agreement']:.0%}")
    if "max_rank" in result:
        print(f"  largest tensor rank in the graph: {result['max_rank']}")
    if "anchors" in result:
        print(f"  anchors: {result['anchors']} (decode with mvit2_jax.export.decode_detections)")
    if "eval" in result:
        e = result["eval"]
        print(f"  {e['dataset']}[{e['split']}], {e['examples']} examples: {e['metric']} {e['export']:.4f} exported, {e['jax']:.4f} JAX "
              f"({e['change']:+.4f}); argmax agreement {e['agreement']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
