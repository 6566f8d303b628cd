"""The benchmarks run end to end in --tiny mode and write their table and plot.

No timing assertions: speed depends on the machine and its load. timm is not needed
(the model benchmark skips it, and says so, without --timm-python).
"""

import csv
import json
import os

import pytest

pytest.importorskip("matplotlib")

from mvit2_jax.benchmarks import attention, data, model, v1_vs_v2  # noqa: E402


def _check_outputs(out, name, min_rows):
    for ext in ("md", "csv", "json", "png"):
        path = os.path.join(out, f"{name}.{ext}")
        assert os.path.getsize(path) > 0, path
    with open(os.path.join(out, f"{name}.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, f"{name}.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= min_rows
    return rows


@pytest.mark.slow
def test_attention_tiny(tmp_path):
    out = str(tmp_path)
    attention.main(["--tiny", "--out", out])
    rows = _check_outputs(out, "attention", 12)  # 3 units x 2 token counts x (fwd, fwd+bwd)
    assert {r["unit"] for r in rows} == {"separable", "mha", "linformer"}
    assert all(float(r["ms"]) > 0 for r in rows)


def test_attention_records_skips(tmp_path):
    out = str(tmp_path)
    attention.main(["--tiny", "--out", out, "--units", "mha", "--memory-budget-gb", "1e-9"])
    rows = _check_outputs(out, "attention", 4)
    assert all(r["skipped"].startswith("needs") and not r["ms"] for r in rows)


@pytest.mark.slow
def test_model_tiny_without_timm(tmp_path):
    out = str(tmp_path)
    model.main(["--tiny", "--out", out, "--timm-python", str(tmp_path / "no-such-python")])
    rows = _check_outputs(out, "model", 2)
    assert {(r["alpha"], r["mode"]) for r in rows} == {("0.5", "infer"), ("0.5", "train")}
    assert all(float(r["images_per_s"]) > 0 and not r["error"] for r in rows)
    flops = {mode: model.model_flops(0.5, 64, mode) for mode in ("infer", "train")}
    for r in rows:  # the model's FLOP rate and its fraction of this run's matmul peak
        assert float(r["GFLOP_s"]) == pytest.approx(flops[r["mode"]] * float(r["images_per_s"]) / 1e9, rel=0.01)  # the CSV keeps 3 digits
        assert float(r["of_matmul_peak"]) > 0
    with open(os.path.join(out, "model.md")) as f:
        text = f.read()
    assert "timm skipped" in text and "matmul_float32_GFLOP_s" in text and "matmul_bfloat16_GFLOP_s" in text


def test_model_flops_are_the_papers_multiply_accumulates():
    from mvit2_jax.models import VARIANTS

    infer = model.model_flops(1.0, 256, "infer")
    assert infer == pytest.approx(2 * VARIANTS[1.0].gmacs * 1e9, rel=2e-3)
    assert model.model_flops(1.0, 256, "train") == 3 * infer


def test_cpu_features_are_read_from_the_flags_line(tmp_path):
    from mvit2_jax.benchmarks import common

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx512_bf16 fma avx2 avx512f\n")
    assert common.cpu_features(str(cpuinfo)) == ["avx2", "fma", "avx512f", "avx512_bf16"]  # in CPU_FEATURES' order
    assert common.cpu_features(str(tmp_path / "missing")) == []


@pytest.mark.slow
def test_v1_vs_v2_tiny(tmp_path):
    out = str(tmp_path)
    v1_vs_v2.main(["--tiny", "--out", out])
    rows = _check_outputs(out, "v1_vs_v2", 2)
    assert [r["model"] for r in rows] == ["MobileViTv1-XXS", "MobileViTv2-0.5"]
    assert [r["params_M"] for r in rows] == ["1.27", "1.37"]  # exact counts, rounded by the table
    assert all(float(r["latency_p10_ms"]) <= float(r["latency_ms"]) <= float(r["latency_p90_ms"]) for r in rows)
    assert all(float(r["images_per_s"]) > 0 and float(r["gmacs"]) > 0 for r in rows)
    assert float(rows[0]["attn_gmacs"]) > 10 * float(rows[1]["attn_gmacs"])  # multi-head against separable attention


def test_data_tiny(tmp_path):
    out = str(tmp_path)
    returned = data.main(["--tiny", "--out", out, "--threads", "1"])
    rows = _check_outputs(out, "data", 3)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    with open(os.path.join(out, "data_device.csv")) as f:
        (device,) = list(csv.DictReader(f))
    assert os.path.getsize(os.path.join(out, "data_device.md")) > 0
    assert device["backend"] == "cpu" and device["batch"] == "4" and float(device["images_per_s"]) > 0
    assert len(returned) == 4


def test_synthetic_jpegs_decode():
    from PIL import Image
    import io

    images = data.synthetic_jpegs(2, 50, 40)
    assert all(Image.open(io.BytesIO(b)).size == (50, 40) for b in images)


def test_ratio_rows_pair_each_width_and_mode_with_timm():
    rows = [
        {"alpha": 1.0, "impl": "mvit2_jax", "mode": "infer", "images_per_s": 30.0, "load": 1.0},
        {"alpha": 1.0, "impl": "timm 1.0", "mode": "infer", "images_per_s": 20.0, "load": 1.5},
        {"alpha": 1.0, "impl": "mvit2_jax", "mode": "train", "images_per_s": 8.0},
        {"alpha": 0.5, "impl": "mvit2_jax", "mode": "infer", "images_per_s": 90.0},  # no timm row
        {"alpha": 1.0, "impl": "timm 1.0", "mode": "train", "error": "exit 1"},  # timm failed
    ]
    (ratio,) = model.ratio_rows(rows)
    assert (ratio["alpha"], ratio["mode"], ratio["ours_over_timm"], ratio["load"]) == (1.0, "infer", 1.5, 1.5)
    # timm in several settings: the ratio is against its fastest row, which it names
    rows += [
        {"alpha": 1.0, "impl": "timm 1.0", "timm_setting": "compile-bf16", "mode": "infer", "images_per_s": 40.0, "device_peak_MiB": 900},
        {"alpha": 1.0, "impl": "timm 1.0", "timm_setting": "eager-bf16", "mode": "infer", "images_per_s": 25.0},
        {"alpha": 1.0, "impl": "timm 1.0", "timm_setting": "compile", "mode": "train", "images_per_s": 4.0},
    ]
    infer, train = model.ratio_rows(rows)
    assert (infer["ours_over_timm"], infer["timm_setting"], infer["timm_device_peak_MiB"]) == (0.75, "compile-bf16", 900)
    assert (train["ours_over_timm"], train["timm_setting"]) == (2.0, "compile")


TINY_TIMM = """
import os

import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 1000)

    def forward(self, x):
        y = self.conv(x)
        with open(os.environ["TINY_TIMM_DTYPES"], "a") as f:  # the dtype the convolution ran in
            f.write(str(y.dtype) + "\\n")
        return self.head(torch.nn.functional.silu(self.bn(y)).mean((2, 3)))


def create_model(name, pretrained=False):
    assert name == "mobilevitv2_050" and not pretrained
    return Tiny()


__version__ = "stub"
"""


@pytest.mark.slow  # a subprocess
def test_timm_bench_runs_each_precision_and_reports_its_setting(tmp_path):
    """timm_bench.py (run by the model benchmark with a Python that has timm) on a stand-in
    timm module: eager float32 and bfloat16 autocast, a plain training step, one JSON line each."""
    import subprocess
    import sys

    (tmp_path / "timm.py").write_text(TINY_TIMM)
    for precision in ("float32", "bfloat16"):
        proc = subprocess.run(
            [sys.executable, model.TIMM_SCRIPT, "--model", "mobilevitv2_050", "--mode", "train", "--batch", "2", "--size", "16",
             "--repeats", "2", "--min-time", "0", "--warmup", "0", "--precision", precision],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": str(tmp_path), "TINY_TIMM_DTYPES": str(tmp_path / precision)},
        )
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        # every forward pass (the first, the timed ones) ran in the requested precision
        assert set((tmp_path / precision).read_text().split()) == {f"torch.{precision}"}
        assert (out["precision"], out["compiled"], out["device"], out["device_peak_MiB"]) == (precision, False, "cpu", None)
        assert out["repeats"] >= 2 and out["images_per_s"] > 0 and out["timm"] == "stub"


@pytest.mark.slow
def test_mobile_tiny(tmp_path):
    from mvit2_jax.benchmarks import mobile

    out = str(tmp_path)
    mobile.main(["--tiny", "--out", out])
    rows = _check_outputs(out, "mobile", 8)  # 2 attention units x (float32, int8) x (LiteRT, ONNX Runtime)
    assert {(r["model"], r["quantize"], r["runtime"]) for r in rows} == {
        (f"MobileViTv2-0.5 {a}", q, rt) for a in ("separable", "mha") for q in ("none", "int8") for rt in ("litert", "onnxruntime")}
    assert all(float(r["p10_ms"]) <= float(r["latency_ms"]) <= float(r["p90_ms"]) for r in rows)
    sizes = {(r["model"], r["quantize"], r["runtime"]): float(r["file_MB"]) for r in rows}
    for runtime in ("litert", "onnxruntime"):
        assert sizes[("MobileViTv2-0.5 separable", "int8", runtime)] < sizes[("MobileViTv2-0.5 separable", "none", runtime)] / 2


def test_mobile_ratios_pair_timm_with_our_onnx_export():
    from mvit2_jax.benchmarks import mobile

    base = {"model": "MobileViTv2-0.5 separable", "size": 256, "quantize": "none", "threads": 1}
    rows = [{**base, "impl": "ours", "runtime": "litert", "latency_ms": 5.0}, {**base, "impl": "ours", "runtime": "onnxruntime", "latency_ms": 10.0},
            {**base, "impl": "timm", "runtime": "onnxruntime", "latency_ms": 12.0}, {**base, "threads": 2, "impl": "ours", "runtime": "onnxruntime", "latency_ms": 6.0},
            {**base, "threads": 2, "impl": "timm", "runtime": "onnxruntime", "latency_ms": 5.4}]
    ratios = mobile.ratio_rows(rows)
    assert [(r["threads"], r["ours_ms"], r["timm_ms"], round(r["timm_over_ours"], 6)) for r in ratios] == [(1, 10.0, 12.0, 1.2), (2, 6.0, 5.4, 0.9)]
    paired = {**rows[2], "paired": {"ratio": 1.1, "ci95_low": 1.05, "ci95_high": 1.15, "pairs": 40}}
    (ratio,) = mobile.ratio_rows([rows[1], paired])
    assert (ratio["timm_over_ours"], ratio["ci95"], ratio["pairs"], ratio["timm_ms"]) == (1.1, "1.050-1.150", 40, 12.0)
    assert mobile.timm_name({"family": "v1", "variant": "xs"}) == "mobilevit_xs"
    assert mobile.timm_name({"family": "v2", "alpha": 1.25, "attention": "separable"}) == "mobilevitv2_125"
    assert mobile.timm_name({"family": "v2", "alpha": 1.0, "attention": "mha"}) is None


def test_paired_timing_takes_turns_and_its_ratio_is_the_median_of_the_rounds():
    import numpy as np
    from onnx import TensorProto, helper

    from mvit2_jax.benchmarks import mobile

    def matmul(n):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["images", "w"], ["out"])], "mm",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor("w", TensorProto.FLOAT, [n, n], np.ones(n * n, np.float32))])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    calls, rounds = mobile.time_onnx_paired([matmul(8), matmul(16)], threads=1, min_repeats=7, min_time=0.0, block_time=0.0)
    assert [len(c) for c in calls] == [8, 8] and [len(r) for r in rounds] == [4, 4]  # blocks of 2 timed calls
    assert min(map(min, calls)) > 0 and rounds[1][0] == np.median(calls[1][:2])
    # The ratio of rounds, not of medians: rounds (2, 1), (4, 2), (3, 3) -> ratios 2, 2, 1.
    stats = mobile.paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 3.0])
    assert stats["ratio"] == 2.0 and stats["pairs"] == 3 and 1.0 <= stats["ci95_low"] <= 2.0 == stats["ci95_high"]
    with pytest.raises(ValueError):
        mobile.paired_ratio([1.0, 2.0], [1.0])
