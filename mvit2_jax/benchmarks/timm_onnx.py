"""timm's mobilevitv2_* / mobilevit_* exported to ONNX, for the mobile benchmark to time.

Run by `mvit2_jax.benchmarks.mobile` with whatever Python has torch and timm (it imports
nothing from mvit2_jax):

    /path/to/python timm_onnx.py --out DIR --size 256 mobilevitv2_100 mobilevit_s ...

Each model (random weights, eval mode) is exported as timm's own `timm.utils.onnx`
exporter does it: `torch.onnx.export` of the traced model (the TorchScript exporter,
`dynamo=False`, opset 17), here with a fixed batch of 1 (timm's helper makes the batch
dynamic). Writes DIR/NAME_SIZE.onnx and prints one JSON line: the versions and the files.
"""

import argparse
import json
import os
import time
import warnings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()

    import timm
    import torch

    warnings.filterwarnings("ignore")  # the tracer's warnings about Python branches on shapes
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    files = {}
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        path = os.path.join(args.out, f"{name}_{args.size}.onnx")
        t0 = time.perf_counter()
        with torch.no_grad():
            torch.onnx.export(model, (torch.rand(1, 3, args.size, args.size),), path, dynamo=False, opset_version=args.opset,
                              input_names=["images"], output_names=["logits"])
        files[name] = {"path": path, "export_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps({"timm": timm.__version__, "torch": torch.__version__, "opset": args.opset, "files": files}))


if __name__ == "__main__":
    main()
