"""mvit2_jax.export: SavedModel, TFLite and ONNX exports of every task, checked in their
runtimes (TensorFlow, ai-edge-litert, onnxruntime), every tensor at rank 4 or below, and the
NumPy decoding of an exported SSD's outputs against the model's own post-processing."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from mvit2_jax import export as export_lib
from mvit2_jax.convert import convert
from mvit2_jax.errors import ConfigError
from mvit2_jax.models import anchors as anchor_lib

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_classifier_exports_to_tflite_with_float32_parity(converted_050, tmp_path, capsys):
    import logging

    out = tmp_path / "classifier.tflite"
    absl_level = logging.getLogger("absl").level
    assert export_lib.main(["--checkpoint", converted_050, "--format", "tflite", "--out", str(out), "--image-size", "128"]) == 0
    assert logging.getLogger("absl").level == absl_level  # TensorFlow's writer set it to WARNING: undone
    text = capsys.readouterr().out
    assert out.stat().st_size > 1_000_000 and "largest tensor rank in the graph: 4" in text
    diff = float(text.split("max |export - JAX| = ")[1].split()[0])
    assert diff < 1e-4 and "top-1 agreement with the JAX model on the check inputs: 100%" in text
    # The file runs in LiteRT on its own, its input fixed at 1 x 128 x 128 x 3.
    logits = export_lib.run_tflite(out.read_bytes(), np.zeros((1, 128, 128, 3), np.float32))["logits"]
    assert logits.shape == (1, 1000)


def test_a_classifier_exports_to_onnx_with_a_dynamic_batch_of_uint8_images(converted_050, tmp_path, capsys):
    out = tmp_path / "classifier.onnx"
    assert export_lib.main(["--checkpoint", converted_050, "--format", "onnx", "--out", str(out), "--image-size", "64",
                            "--dynamic-batch", "--uint8-input"]) == 0
    text = capsys.readouterr().out
    assert "64x64 uint8 input, batch dynamic" in text and "largest tensor rank in the graph: 4" in text
    assert float(text.split("max |export - JAX| = ")[1].split()[0]) < 1e-4
    # The file on its own in onnxruntime: named input and output, any batch, the model's logits.
    pixels = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    logits = export_lib.run_onnx(str(out), pixels)["logits"]
    model, variables, _ = export_lib.load_exportable(converted_050)
    expected = jax.jit(lambda x: model.apply(variables, x / 255.0))(jnp.asarray(pixels, jnp.float32))
    assert logits.shape == (3, 1000)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    # ONNX's own operators where it has them: one InstanceNormalization per one-group GroupNorm
    # (2 per transformer layer and 1 per MobileViTv2 block: 9 layers in 3 blocks), one Split per
    # separable attention's fused projection; no reduction besides the global pooling.
    import onnx

    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert ops.count("InstanceNormalization") == 2 * 9 + 3 and ops.count("Split") == 9
    assert ops.count("ReduceMean") <= 1 and "ReduceSum" not in ops


def test_bad_export_requests_are_one_line_errors(converted_050, tmp_path, capsys):
    cases = [
        (["--format", "savedmodel", "--quantize", "int8"], "applies to --format tflite or onnx"),
        (["--format", "onnx", "--quantize", "int8"], "needs --calibration IMAGE_DIR"),
        (["--format", "tflite", "--quantize", "int8"], "needs --calibration IMAGE_DIR"),
        (["--format", "tflite", "--batch", "0"], "--batch must be at least 1"),
        (["--format", "onnx", "--quantize", "int8", "--calibration", "train[:8]"], "must be a folder of images (or, for a training workdir"),
        (["--format", "onnx", "--evaluate"], "--evaluate needs a training workdir"),
        (["--format", "onnx", "--checkpoint", str(tmp_path / "nothing")], "no checkpoint directory at"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            export_lib.main(["--checkpoint", converted_050, "--out", str(tmp_path / "x.tflite"), "--image-size", "64", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    with pytest.raises(SystemExit) as exit_info:  # argparse: its usage line, then the error
        export_lib.main(["--checkpoint", converted_050, "--out", str(tmp_path / "x.mlmodel"), "--format", "coreml"])
    assert exit_info.value.code == 2 and "argument --format: invalid choice: 'coreml'" in capsys.readouterr().err


@pytest.mark.slow
def test_savedmodel_with_a_dynamic_batch_and_quantized_tflite(converted_050, tmp_path, caplog):
    result = export_lib.export(converted_050, "savedmodel", str(tmp_path / "sm"), image_size=128, batch=None)
    assert result["max_abs_diff"]["logits"] < 1e-4 and result["outputs"]["logits"] == [2, 1000]
    logits = export_lib.run_savedmodel(str(tmp_path / "sm"), np.zeros((3, 128, 128, 3), np.float32))["logits"]
    assert logits.shape == (3, 1000)

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (150, 200, 3), np.uint8)).save(calibration / f"{i}.jpg")
    sizes = {}
    for quantize in ("float16", "dynamic", "int8"):
        out = tmp_path / f"{quantize}.tflite"
        result = export_lib.export(converted_050, "tflite", str(out), image_size=128, quantize=quantize,
                                   calibration=str(calibration), uint8_input=quantize == "dynamic")
        sizes[quantize] = out.stat().st_size
        assert result["max_rank"] <= 4 and 0.0 <= result["top1_agreement"] <= 1.0
        assert 0 < result["max_abs_diff"]["logits"] < result["max_abs_output"]["logits"]
    assert sizes["dynamic"] < sizes["float16"]  # int8 weights against float16 ones

    onnx_sizes = {}
    for quantize in ("float16", "dynamic", "int8"):
        out = tmp_path / f"{quantize}.onnx"
        result = export_lib.export(converted_050, "onnx", str(out), image_size=64, batch=None, quantize=quantize,
                                   calibration=str(calibration), uint8_input=quantize == "int8")
        onnx_sizes[quantize] = out.stat().st_size
        assert result["max_rank"] <= 4 and result["outputs"]["logits"] == [2, 1000]
        assert 0 < result["max_abs_diff"]["logits"] < result["max_abs_output"]["logits"]
    assert onnx_sizes["dynamic"] < onnx_sizes["float16"] < (tmp_path / "float16.tflite").stat().st_size * 1.5
    assert onnx_sizes["int8"] < onnx_sizes["float16"]
    assert "out-of-range" not in caplog.text  # the quantizer's per-channel axes fit every weight


@pytest.mark.slow
def test_segmentation_and_detection_export_with_parity_and_decoding(tmp_path):
    tensors = load_file(str(FIXTURES / "segmentation_parity.safetensors"))
    pspnet = {k.removeprefix("pspnet."): v for k, v in tensors.items() if k.startswith(("encoder.", "pspnet."))}
    save_file(pspnet, str(tmp_path / "pspnet.safetensors"))
    segmenter = convert(tmp_path / "pspnet.safetensors", tmp_path / "segmenter", image_size=128)
    for fmt in ("tflite", "onnx", "savedmodel"):
        result = export_lib.export(segmenter, fmt, str(tmp_path / f"seg.{fmt}"))
        assert result["outputs"]["logits"] == [1, 128, 128, 21] and result["max_abs_diff"]["logits"] < 1e-4
        assert result.get("max_rank", 4) <= 4  # (a SavedModel's StableHLO is not inspected)

    detector = convert(FIXTURES / "detection_parity.safetensors", tmp_path / "detector", image_size=128)
    with pytest.raises(ConfigError, match="an SSD's input side must be divisible by 32, got 100"):
        export_lib.export(detector, "onnx", str(tmp_path / "bad.onnx"), image_size=100)
    result = export_lib.export(detector, "savedmodel", str(tmp_path / "ssd_savedmodel"))
    assert max(result["max_abs_diff"].values()) < 1e-4
    out = tmp_path / "ssd.tflite"
    result = export_lib.export(detector, "tflite", str(out))
    assert max(result["max_abs_diff"].values()) < 1e-4 and result["max_rank"] <= 4
    anchors = np.load(result["anchors"])
    np.testing.assert_array_equal(anchors, anchor_lib.ssd_anchors(128, 128))
    images = np.random.default_rng(1).random((1, 128, 128, 3), np.float32)
    raw = export_lib.run_tflite(out.read_bytes(), images)
    (found,) = export_lib.decode_detections(raw["loc"], raw["cls"], anchors, score_threshold=0.02)
    expected = jax.device_get(anchor_lib.postprocess(jnp.asarray(raw["loc"]), jnp.asarray(raw["cls"]), jnp.asarray(anchors), 0.02))
    count = int(expected["count"][0])
    assert count > 0 and len(found["scores"]) == count
    np.testing.assert_allclose(found["scores"], expected["scores"][0, :count], rtol=1e-5)
    np.testing.assert_array_equal(found["classes"], expected["classes"][0, :count])
    np.testing.assert_allclose(found["boxes"], expected["boxes"][0, :count], atol=1e-5)

    result = export_lib.export(detector, "onnx", str(tmp_path / "ssd.onnx"))
    assert max(result["max_abs_diff"].values()) < 1e-4 and result["max_rank"] <= 4
    assert result["outputs"] == {"cls": [1, len(anchors), 81], "loc": [1, len(anchors), 4]}
    raw_onnx = export_lib.run_onnx(str(tmp_path / "ssd.onnx"), images)
    for name in ("loc", "cls"):
        np.testing.assert_allclose(raw_onnx[name], raw[name], atol=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_an_export_is_evaluated_on_the_runs_eval_split_beside_the_jax_model(reference_run, tmp_path, capsys):
    """--evaluate: the JAX side reproduces the engine's own final eval of the run (raw
    weights), the float32 ONNX export agrees with it, and an int8 LiteRT export calibrated on
    the run's train split reports its change."""
    workdir, metrics = reference_run
    # The raw weights: after the run's 88 steps its EMA still predicts one class.
    assert export_lib.main(["--checkpoint", str(workdir), "--format", "onnx", "--out", str(tmp_path / "f32.onnx"), "--evaluate", "--raw"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "examples: top1" in x][0]
    assert line.strip().startswith("mvit2_digits[test], 360 examples: top1")
    exported, reference = (float(line.split(" top1 ")[1].split()[0]), float(line.split(" exported, ")[1].split()[0]))
    assert metrics["top1"] > 0.5 and reference == pytest.approx(metrics["top1"], abs=1e-4) and exported == pytest.approx(reference, abs=1e-4)
    assert "argmax agreement 100.00%" in line

    result = export_lib.export(str(workdir), "tflite", str(tmp_path / "int8.tflite"), quantize="int8", calibration="train[:32]",
                               uint8_input=True, ema=False, evaluate=True)
    e = result["eval"]
    assert e["metric"] == "top1" and e["examples"] == 360 and e["jax"] == pytest.approx(metrics["top1"], abs=0.02)
    assert e["change"] == pytest.approx(e["export"] - e["jax"]) and 0 <= e["export"] <= 1 and 0 < e["agreement"] <= 1
    # No accuracy floor: the int8 accuracy of this 88-step model depends on the machine that
    # trained it (15% on 2026-12-02's AMD VM, 33% calibrated on 128 images there, above 30% on
    # the VMs before); a trained classifier's is measured by the quantized benchmark (the
    # quickstart's on that VM: 98.06% against 98.89%). The file is a calibrated int8 model
    # taking uint8 pixels:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=(tmp_path / "int8.tflite").read_bytes())
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    dtypes = [np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()]
    assert dtypes.count(np.dtype(np.int8)) > len(dtypes) / 2  # weights and activations

