"""launch/colab.ipynb runs top to bottom in its reduced CPU mode (fixture weights, 6 steps).

The kernel gets the session's persistent compilation cache (conftest) and runs the training
tests' small config, so with a warm cache its train and eval steps are loaded, not compiled.
"""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from experiments import quickstart
from experiments.segmentation import quickstart as seg_quickstart
from mvit2_jax.checkpoint import read_config
from mvit2_jax.data.label_names import VOC_CLASSES

# One worker runs every test of this module, so the notebook executes once per session.
pytestmark = pytest.mark.xdist_group("notebook")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab.ipynb"


def test_notebook_is_valid_and_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["accelerator"] == "TPU"


@pytest.fixture(scope="module")
def executed(tmp_path_factory, subprocess_env):
    workdir = tmp_path_factory.mktemp("notebook")
    env = subprocess_env(1)
    env.update(MVIT2_NOTEBOOK_SMOKE="1", MVIT2_NOTEBOOK_WORKDIR=str(workdir), MPLBACKEND="agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)  # raises CellExecutionError naming the failing cell
    return nb, workdir


@pytest.mark.slow
def test_notebook_runs_in_reduced_mode_and_saves_the_curves(executed):
    nb, workdir = executed
    curves = workdir / "training_curves.png"
    assert curves.is_file() and curves.stat().st_size > 10_000
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "mode: reduced" in text and "skipping the install" in text
    assert "MobileViTv2-0.5: 1000 classes" in text
    assert text.count("%  ") >= 5  # the top-5 lines
    assert "test top-1:" in text and "digit_0.png: true" in text


@pytest.mark.slow
def test_notebook_fine_tunes_with_the_smoke_config(executed):
    """experiments/quickstart.py:smoke, as the training tests, so the compiled steps are shared through the cache."""
    _, workdir = executed
    recorded = read_config(str(workdir / "finetune_digits"))[0]["config"]
    expected = quickstart.get_config("smoke").to_dict()
    assert recorded["init_from"] == str(workdir / "mobilevitv2_050_in1k")
    recorded.pop("init_from"), expected.pop("init_from")  # loaded into the state: not part of any compiled program
    assert recorded == json.loads(json.dumps(expected))  # (JSON turns tuples into lists)


@pytest.mark.slow
def test_notebook_segments_with_converted_weights_and_fine_tunes(executed):
    """The segmentation part: the fixture's PSPNet converted (PASCAL VOC's class names and
    output stride recorded), masks written, and the segmentation smoke config fine-tuned
    from the converted ImageNet backbone."""
    nb, workdir = executed
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "pspnet on MobileViTv2-0.5: 21 classes, output stride 16" in text
    shares = [line.split("%  ")[1] for line in text.splitlines() if "%  " in line]
    assert any(name in VOC_CLASSES for name in shares)  # the mask's classes, named
    assert "test mIoU:" in text
    for name in ("example_mask.png", "example_overlay.png", "scene_mask.png"):
        assert (workdir / "masks" / name).stat().st_size > 100
    meta = read_config(str(workdir / "segment_digit_scenes"))[0]
    recorded, expected = meta["config"], seg_quickstart.get_config("smoke").to_dict()
    assert meta["task"] == "segmentation" and recorded.pop("init_from") == str(workdir / "mobilevitv2_050_in1k")
    expected.pop("init_from")
    assert recorded == json.loads(json.dumps(expected))


@pytest.mark.slow
def test_notebook_detects_with_converted_weights_and_fine_tunes(executed):
    """The detection part: the fixture's SSDLite converted (COCO's classes), boxes drawn and
    written as JSON, and the detection smoke config fine-tuned from the converted backbone."""
    nb, workdir = executed
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "SSDLite on MobileViTv2-0.5: 81 classes (with the background)" in text
    assert "test mAP:" in text and "VOC07 mAP@0.5" in text
    for name in ("example_boxes.png", "scene_boxes.png"):
        assert (workdir / "boxes" / name).stat().st_size > 100
    assert json.loads((workdir / "boxes" / "example_detections.json").read_text())  # threshold 0: the 200 best
    assert read_config(str(workdir / "detect_digit_boxes"))[0]["config"]["init_from"] == str(workdir / "mobilevitv2_050_in1k")


@pytest.mark.slow
def test_notebook_exports_the_fine_tuned_classifier_to_litert_and_onnx(executed):
    """The export part: the fine-tuned classifier to TFLite and ONNX with uint8 input, both
    within 1e-4 of JAX, and the files on their own classify the digits as the JAX model does."""
    nb, workdir = executed
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for fmt in ("tflite", "onnx"):
        line = next(line for line in text.splitlines() if line.startswith(f"{fmt}: "))
        assert float(line.split("max |export - JAX| = ")[1].split(",")[0]) < 1e-4 and line.endswith("largest tensor rank 4")
        assert (workdir / "exports" / f"digits.{fmt}").stat().st_size > 1_000_000
    rows = [line for line in text.splitlines() if "; JAX " in line]
    assert len(rows) == 4
    for row in rows:
        jax_class, litert, onnxrt = (row.split(f"{name} ")[1].split(",")[0] for name in ("; JAX", "LiteRT", "ONNX Runtime"))
        assert jax_class == litert == onnxrt, row
