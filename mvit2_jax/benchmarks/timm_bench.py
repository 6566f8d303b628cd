"""timm's mobilevitv2_* on this machine, for the model benchmark to compare against.

Run by `mvit2_jax.benchmarks.model` with whatever Python has torch and timm (it imports
nothing else, and nothing from mvit2_jax):

    /path/to/python timm_bench.py --model mobilevitv2_100 --mode infer --batch 16 --size 256

Prints one JSON line. Best eager settings: channels_last memory format; inference under
torch.inference_mode in eval mode; training = model.train(), forward, cross-entropy,
backward, AdamW step, with set_to_none gradients. `--recipe paper` (what the model benchmark
runs) makes the training step the one mvit2_jax's step is: timm's Mixup/CutMix (alpha 0.2 /
1.0, switched per batch) with label smoothing 0.1 into soft-target cross-entropy, gradients
clipped to norm 10, and an EMA of the weights (ModelEmaV3, decay 0.9995) after each update;
`--recipe plain` is the bare AdamW step. The first call (warm-up) is timed
separately as time to first step; then --warmup more untimed calls (PyTorch's CPU kernels
take a few calls to reach their speed), then the median of the timed calls.

On a GPU (`--device cuda`): `--precision bfloat16` runs the forward pass and the loss under
torch.autocast (bfloat16), `--compile` wraps the model in torch.compile (its compile is in the
first step), TF32 stays off unless `--tf32`, and each timed call ends with
torch.cuda.synchronize; `device_peak_MiB` is torch.cuda.max_memory_allocated.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def peak_rss_mib():
    """VmHWM (this program's own peak; ru_maxrss would include the parent's after fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilevitv2_100")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after the first (oneDNN settles after ~3)")
    parser.add_argument("--min-time", type=float, default=5.0)
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--recipe", choices=("plain", "paper"), default="plain", help="training step: bare AdamW or the paper's")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32", help="bfloat16: torch.autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiled in the first step)")
    parser.add_argument("--tf32", action="store_true", help="CUDA: TF32 in matrix products and convolutions (default: off)")
    args = parser.parse_args()

    import timm
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    model = timm.create_model(args.model, pretrained=False).to(device=args.device, memory_format=fmt)
    images = torch.rand(args.batch, 3, args.size, args.size).to(args.device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (args.batch,)).to(args.device)
    net = torch.compile(model) if args.compile else model
    bf16 = args.precision == "bfloat16"

    def autocast():
        return torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16)

    if args.mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                net(images)

    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        paper = args.recipe == "paper"
        if paper:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy
            from timm.utils import ModelEmaV3

            mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
            loss_fn = SoftTargetCrossEntropy()
            ema = ModelEmaV3(model, decay=0.9995)
        else:
            loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def step():
            x, y = mixup(images.clone(), labels) if paper else (images, labels)  # Mixup mixes in place
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(net(x), y)
            loss.backward()
            if paper:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            if paper:
                ema.update(model)

    def synced_step():
        step()
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    synced_step()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        synced_step()
    load_before = os.getloadavg()[0]
    times = []
    cpu0 = time.process_time()
    while len(times) < args.repeats or (sum(times) < args.min_time and len(times) < 50):
        t0 = time.perf_counter()
        synced_step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    cpu = (time.process_time() - cpu0) / len(times)
    print(
        json.dumps(
            {
                "impl": "timm",
                "model": args.model,
                "mode": args.mode,
                "batch": args.batch,
                "size": args.size,
                "memory_format": args.memory_format,
                "recipe": args.recipe if args.mode == "train" else None,
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "precision": args.precision,
                "compiled": args.compile,
                "tf32": args.tf32 if cuda else None,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "first_step_s": round(first, 2),
                "step_ms": round(1000 * median, 1),
                "min_step_ms": round(1000 * min(times), 1),
                "cpu_ms": round(1000 * cpu, 1),
                "repeats": len(times),
                "images_per_s": round(args.batch / median, 2),
                "peak_rss_MiB": peak_rss_mib(),
                "device_peak_MiB": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                "load": round(max(load_before, os.getloadavg()[0]), 2),
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
