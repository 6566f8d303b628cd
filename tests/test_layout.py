"""The package's structure: no import cycle, layers that import only downwards, no package
code importing experiments/, no test module importing another."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mvit2_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    """Every module `path` imports, at module level or inside functions (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            # "from mvit2_jax.data import sources" names a module; "from mvit2_jax.models import X" a package.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            # A package imports its own submodules from __init__: that edge is not a cycle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    graph = package_graph()
    # Imports of a package's parent __init__ happen anyway when a submodule loads; leave them out.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module, forbidden", [
    ("mvit2_jax.checkpoint", ("mvit2_jax.train", "mvit2_jax.data", "mvit2_jax.convert")),
    ("mvit2_jax.models", ("mvit2_jax.train", "mvit2_jax.data", "mvit2_jax.tasks", "mvit2_jax.checkpoint")),
    ("mvit2_jax.data", ("mvit2_jax.train", "mvit2_jax.tasks", "mvit2_jax.models", "mvit2_jax.checkpoint")),
    ("mvit2_jax.tasks", ("mvit2_jax.train",)),
])
def test_layers_import_only_downwards(module, forbidden):
    graph = package_graph()
    for name, targets in graph.items():
        if name == module or name.startswith(module + "."):
            bad = {t for t in targets if t.startswith(forbidden)}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_no_data_module_shadows_a_name_the_data_package_loads_lazily():
    """`mvit2_jax.data` resolves names such as `class_names` on first use; a submodule of the
    same name would replace the function with the module once anything imported it."""
    from mvit2_jax import data

    modules = {p.stem for p in (PACKAGE / "data").glob("*.py")}
    assert not modules & set(data._MODULES), modules & set(data._MODULES)


def test_package_code_does_not_import_experiments():
    for path in PACKAGE.rglob("*.py"):
        assert not any(m == "experiments" or m.startswith("experiments.") for m in imports_of(path)), path


def test_no_test_module_imports_another():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")} | {"conftest"}
    for path in (ROOT / "tests").rglob("*.py"):
        assert not {m.split(".")[0] for m in imports_of(path)} & tests, path


@pytest.mark.slow  # a subprocess
def test_the_models_train_step_and_benchmarks_import_without_tensorflow():
    """TensorFlow (tf.data, TFDS, the TensorBoard writer) costs about 4 s and 0.6 GB on import:
    the model, the task hooks, the compiled steps and the train-step benchmark load, and the
    train step (Mixup, and RandAugment where it runs in the step, from mvit2_jax.data) traces, without it, and so does the converter's
    naming of classes (a GPU machine may have no TensorFlow);
    a training run imports it when it reads its data or opens its writer."""
    import subprocess
    import sys

    code = (
        "import sys, jax; from mvit2_jax import train, tasks, models, load_model; "
        "from mvit2_jax.benchmarks import train_step, model; "
        "from experiments import quickstart; c = quickstart.get_config(); c.model.alpha = 0.1; c.data.image_size = 32; "
        "s = train.compile_steps(c, tasks.get(c.task), 4); "
        "jax.eval_shape(s.train, jax.eval_shape(s.init), train_step.synthetic_batch(s, c, 2)); "  # traced, as before a compile
        "c.data.augment_on = 'device'; s = train.compile_steps(c, tasks.get(c.task), 4); "  # RandAugment in the step
        "jax.eval_shape(s.train, jax.eval_shape(s.init), train_step.synthetic_batch(s, c, 2)); "
        "from mvit2_jax import convert; from mvit2_jax.data.label_names import detection_class_names; "
        "assert len(convert.segmentation_class_names(150, {})) == 150 and len(detection_class_names(81)) == 81; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    # and a run's data does import it
    code = "import sys; from mvit2_jax.data import sources; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
