"""What export and quantization cost in accuracy, on the built-in datasets.

    python -m mvit2_jax.benchmarks.quantized --out mvit2_jax/benchmarks/results \
        --workdirs /tmp/mvit2_quickstart /tmp/seg_quickstart /tmp/det_quickstart

Each training workdir (a classifier, a segmentation model, a detector: the quickstarts on the
digits, digit scenes and digit boxes) is exported to TFLite (LiteRT) and ONNX in float32,
float16, dynamic-range and int8 (weights and activations, calibrated on 32 images of the
run's train split through its eval preprocessing), each with uint8 input (the deployment
form), and each export runs over the run's whole eval split in its runtime (ai-edge-litert,
onnxruntime) with the task's own metric: top-1 (classifier), mIoU (segmentation), COCO mAP
(detection), beside the JAX model's on the same uint8 pixels, with the argmax agreement
(top-1 / per-pixel / per-anchor class). Writes quantized.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from mvit2_jax.benchmarks import common

FORMATS = ("tflite", "onnx")
QUANTIZE = ("none", "float16", "dynamic", "int8")


def measure(workdir: str, formats: Sequence[str], quantizations: Sequence[str], ema: bool = True) -> List[Dict[str, Any]]:
    import jax

    from mvit2_jax import export as export_lib, tasks

    model, variables, meta = export_lib.load_exportable(workdir, ema)
    metric = tasks.get(meta["task"]).best_metric.removeprefix("ema_")
    forward = jax.jit(export_lib.inference_function(model, variables, meta["task"], uint8_input=True))
    t0 = time.perf_counter()
    reference, reference_argmax = export_lib.evaluate_outputs(workdir, lambda x: jax.device_get(forward(x)), None, uint8_input=True)
    print(f"{workdir}: JAX {metric} {reference[metric]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    calibration = export_lib.split_images(meta, meta["config"]["data"]["train_split"], 32)  # float: the export scales it to uint8
    rows = [{"task": meta["task"], "model": model_label(meta), "format": "JAX (float32)", "quantize": "", "metric": metric,
             "value": f"{reference[metric]:.4f}", "change": "", "agreement": 1.0, "examples": len(reference_argmax)}]
    with tempfile.TemporaryDirectory() as scratch:
        for fmt in formats:
            for quantize in quantizations:
                path = os.path.join(scratch, f"{fmt}_{quantize}.{fmt}")
                t0 = time.perf_counter()
                export_lib.export(workdir, fmt, path, quantize=quantize, calibration=calibration if quantize == "int8" else None,
                                  uint8_input=True, ema=ema, check_inputs=1)
                exported, argmax = export_lib.evaluate_outputs(workdir, export_lib.runtime_runner(fmt, path), 1, uint8_input=True)
                row = {"task": meta["task"], "model": model_label(meta), "format": fmt, "quantize": quantize, "metric": metric,
                       "value": f"{exported[metric]:.4f}", "change": f"{exported[metric] - reference[metric]:+.4f}",
                       "agreement": float(np.mean(argmax == reference_argmax)), "examples": len(argmax),
                       "file_MB": os.path.getsize(path) / 1e6, "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"  {fmt} {quantize}: {metric} {row['value']} ({row['change']}), agreement {row['agreement']:.2%}, "
                      f"{row['file_MB']:.1f} MB", flush=True)
    return rows


def model_label(meta: Dict[str, Any]) -> str:
    model, data = meta["model"], meta["config"]["data"]
    head = {"segmentation": f"{model.get('head')} on ", "detection": "SSDLite on "}.get(meta["task"], "")
    return f"{head}MobileViTv2-{model['alpha']}, {data['dataset']}[{data['eval_split']}], {meta['image_size'][0]}px"


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for quantized.{md,csv,json}")
    parser.add_argument("--workdirs", nargs="+", required=True, help="training workdirs (any task)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--quantize", nargs="+", default=list(QUANTIZE), choices=QUANTIZE)
    parser.add_argument("--raw", action="store_true", help="the runs' raw weights, not EMA (short runs: EMA still near the init)")
    args = parser.parse_args(argv)
    info = common.machine_info()
    rows: List[Dict[str, Any]] = []
    for workdir in args.workdirs:
        rows += measure(workdir, args.formats, args.quantize, ema=not args.raw)
    notes = [
        f"the runs' {'raw' if args.raw else 'EMA'} weights",
        "every export takes uint8 pixels (--uint8-input); the JAX row runs the same pixels; metric over the whole eval split, "
        "in the export's runtime (ai-edge-litert, onnxruntime), at batch 1",
        "int8: weights and activations, calibrated on 32 train-split images; dynamic: int8 weights; float16: float16 weights "
        "(ONNX: float16 compute)",
        "agreement: share of equal argmax with the JAX model (top-1 per image; per pixel; per anchor, background included)",
    ]
    columns = ["task", "model", "format", "quantize", "metric", "value", "change", "agreement", "examples", "file_MB", "seconds"]
    common.write_table(rows, columns, args.out, "quantized", "Exports' accuracy against the float32 JAX model", notes, info)
    return rows


if __name__ == "__main__":
    main()
