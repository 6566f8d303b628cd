"""The training engine on the classification task: config checks, schedules, parameter groups,
sharding invariance, exact resume, learning, fine-tuning and evaluating checkpoints.

All runs use the digits (built offline from scikit-learn) at 32x32 with alpha 0.5 and the
smoke config (experiments/quickstart.py:smoke), so one compile serves most tests.
"""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from mvit2_jax import load_model, tasks, train
from mvit2_jax.checkpoint import read_config
from mvit2_jax.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
CLASSIFICATION = tasks.get("classification")


# ----------------------------------------------------------------------------- config checks


def check(config, device_count=4, process_count=1):
    train.check_config(config, device_count, process_count)
    CLASSIFICATION.check_config(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.alpha", 0.0, "alpha must be > 0"),
        ("model.attention", "performer", "config.model.attention must be one of"),
        ("model.kernels", "fast", "config.model.kernels must be one of"),
        ("data.image_size", 16, "at least 32"),
        ("batch_size", 30, "divisible by the 4 devices"),
        ("grad_accum_steps", 3, "divisible by config.grad_accum_steps"),
        ("optim.name", "lamb", "adamw"),
        ("optim.schedule", "linear", "config.optim.schedule must be one of"),
        ("ema_decay", 1.0, "ema_decay"),
        ("task", "captioning", "config.task must be one of"),
    ],
)
def test_bad_config_is_one_clear_line(small_config, field, value, message):
    config = small_config()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=message) as err:
        tasks.get(config.task)
        check(config)
    assert "\n" not in str(err.value)


def test_required_fields_stop_the_run_naming_them():
    from experiments import alpha_1, base, finetune_384, transfer

    for module in (finetune_384, transfer):
        config = module.get_config()
        with pytest.raises(ConfigError, match=r"requires config.init_from .*--config.init_from="):
            train.check_config(config, 1, 1)
        config.init_from = "/some/run"
        train.check_config(config, 1, 1)
    # A width without a paper recipe needs its learning rate and weight decay.
    config = base.get_config(alpha=0.6)
    with pytest.raises(ConfigError, match=r"config.optim.lr, config.optim.min_lr, config.optim.weight_decay \(this width has no paper recipe\)"):
        train.check_config(config, 1, 1)
    config.optim.lr, config.optim.min_lr, config.optim.weight_decay = 0.01, 0.001, 0.01
    train.check_config(config, 1, 1)
    # A paper width takes its recipe from the variant table.
    assert alpha_1.get_config().optim.lr == 0.0075 and base.get_config(alpha=2.0).optim.weight_decay == 0.05


def test_dataset_with_another_class_count_is_a_clear_error(small_config):
    config = small_config()
    config.data.num_classes = 7
    with pytest.raises(DataError, match="mvit2_digits has 10 classes: set config.data.num_classes=10"):
        CLASSIFICATION.check_data(config)


def test_learning_rate_schedule_warms_up_then_decays_to_min_lr(small_config):
    config = small_config()
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 10
    schedule = train.learning_rate_schedule(config, 100)
    o = config.optim
    assert float(schedule(0)) == pytest.approx(o.warmup_init_lr, rel=1e-3)
    assert float(schedule(10)) == pytest.approx(o.lr, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(o.min_lr, rel=1e-3)
    assert float(schedule(5)) < float(schedule(10)) and float(schedule(60)) < float(schedule(20))


def test_weight_decay_skips_one_dimensional_parameters():
    mask = train.decay_mask({"kernel": np.zeros((3, 3)), "bias": np.zeros(3), "scale": np.zeros(3)})
    assert mask == {"kernel": True, "bias": False, "scale": False}


def test_parameter_groups_by_path_prefix():
    params = {"head": {"kernel": 1}, "seg_head": {"aux_head": {"kernel": 2}, "classifier": {"bias": 3}}, "stem": {"conv": {"kernel": 4}}}
    labels = train.param_groups(params, {"aux": ("seg_head/aux_head",), "head": ("head", "seg_head")}, "backbone")
    assert labels == {"head": {"kernel": "head"}, "seg_head": {"aux_head": {"kernel": "aux"}, "classifier": {"bias": "head"}},
                      "stem": {"conv": {"kernel": "backbone"}}}


def test_frozen_and_slower_backbone(small_config):
    params = {"head": {"kernel": np.ones((2, 2), np.float32)}, "stem": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}
    grads = jax.tree.map(np.ones_like, params)
    config = small_config()
    config.optim.name, config.optim.weight_decay = "sgd", 0.0
    updates = {}
    for name, freeze, scale in (("plain", False, 1.0), ("frozen", True, 1.0), ("slow", False, 0.1)):
        config.freeze_backbone, config.optim.backbone_lr_scale = freeze, scale
        tx = train.create_optimizer(config, optax.constant_schedule(1.0), CLASSIFICATION.head_prefixes)
        updates[name] = tx.update(grads, tx.init(params), params)[0]
    np.testing.assert_allclose(updates["frozen"]["head"]["kernel"], updates["plain"]["head"]["kernel"])
    assert not np.any(updates["frozen"]["stem"]["kernel"]) and not np.any(updates["frozen"]["stem"]["bias"])
    np.testing.assert_allclose(updates["slow"]["stem"]["kernel"], 0.1 * updates["plain"]["stem"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(updates["slow"]["head"]["kernel"], updates["plain"]["head"]["kernel"])


@pytest.mark.parametrize("name, freeze, backbone_scale, clip", [("adamw", False, 1.0, 1.0), ("sgd", False, 0.1, 0.0), ("adamw", True, 1.0, 10.0)])
def test_raveled_optimizer_equals_optax_per_tensor(small_config, name, freeze, backbone_scale, clip):
    """The engine's optimizer (all parameters as one vector, decay and group scales per element)
    against the same optimizer per tensor (optax's masks and multi_transform), over 4 steps that
    clip (gradient norms about 12 against limits of 1 and 10), decay kernels only, and warm up the rate."""
    rng = np.random.default_rng(0)
    shapes = {"head": {"kernel": (6, 3), "bias": (3,)}, "stem": {"conv": {"kernel": (3, 3, 2, 6)}, "bn": {"scale": (6,), "bias": (6,)}}}
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
    config = small_config()
    config.optim.update(name=name, weight_decay=0.05, grad_clip_norm=clip, backbone_lr_scale=backbone_scale)
    config.freeze_backbone = freeze
    schedule = optax.linear_schedule(0.01, 0.1, 3)
    final = {}
    for raveled in (False, True):
        tx = train.create_optimizer(config, schedule, CLASSIFICATION.head_prefixes, raveled_state=raveled)
        p, opt_state, update = params, tx.init(params), jax.jit(tx.update)
        for step in range(4):
            grads = jax.tree.map(lambda x: np.random.default_rng(step).normal(size=x.shape).astype(np.float32), params)
            updates, opt_state = update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
        final[raveled] = p
        if raveled:  # one vector per moment, of all parameters
            sizes = {leaf.shape for leaf in jax.tree.leaves(opt_state) if leaf.ndim}
            assert sizes == {(sum(x.size for x in jax.tree.leaves(params)),)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), final[True], final[False])
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), final[True], params)
    assert moved["head"] == {"kernel": True, "bias": True}
    assert set(jax.tree.leaves(moved["stem"])) == {not freeze}


def test_a_checkpoint_with_per_tensor_optimizer_state_resumes(small_config, tmp_path):
    """A checkpoint written before the optimizer was raveled (its moments per tensor, in optax's
    parameter groups) is read as it is: moments merged and raveled, count kept, the rest equal."""
    from mvit2_jax import checkpoint
    from mvit2_jax.train.loop import restore_latest
    from mvit2_jax.train.optim import Layout

    config = small_config()
    config.freeze_backbone, config.optim.backbone_lr_scale = False, 0.5  # two groups: moments in two trees
    task = tasks.get(config.task)
    steps = train.compile_steps(config, task, num_steps=4)
    abstract = jax.eval_shape(steps.init)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), abstract.params)
    per_tensor = train.create_optimizer(config, optax.constant_schedule(0.1), task.head_prefixes, raveled_state=False)
    old_opt = jax.tree.map(lambda x: np.full(x.shape, 7, x.dtype) if x.dtype == np.int32 else rng.normal(size=x.shape).astype(x.dtype),
                           jax.eval_shape(per_tensor.init, params))
    fill = lambda tree: jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype) if x.dtype != np.int32 else np.full(x.shape, 3, x.dtype), tree)
    old = train.TrainState(step=np.int32(3), params=params, batch_stats=fill(abstract.batch_stats), opt_state=old_opt,
                           ema_params=fill(abstract.params), ema_batch_stats=fill(abstract.batch_stats),
                           rng=np.zeros(abstract.rng.shape, abstract.rng.dtype), bad_steps=np.int32(0))
    mngr = checkpoint.train_manager(str(tmp_path), keep=2, best_metric=task.best_metric)
    checkpoint.save_state(mngr, 3, old, {"format": checkpoint.FORMAT})
    mngr.wait_until_finished()

    state = restore_latest(mngr, steps)
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    for field in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(state, field)), getattr(old, field))
    layout = Layout(params)
    head, backbone = old_opt[1].inner_states["head"].inner_state[0], old_opt[1].inner_states["backbone"].inner_state[0][0]
    for name in ("mu", "nu"):
        merged = jax.tree.map(lambda h, b: b if isinstance(h, optax.MaskedNode) else h, getattr(head, name), getattr(backbone, name),
                              is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        vectors = [getattr(s, name) for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, name)) if hasattr(s, name)]
        assert len(vectors) == 1
        np.testing.assert_array_equal(jax.device_get(vectors[0]), jax.device_get(layout.ravel(merged)))
    counts = [int(x) for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert counts and set(counts) == {7}
    assert not (tmp_path / "corrupt_checkpoints").exists()
    mngr.close()


@pytest.mark.slow  # two compiles of the train step
def test_the_cpu_train_step_is_compiled_for_memory(small_config):
    """On the CPU the engine's train step is scheduled for memory (steps.CPU_TRAIN_OPTIONS):
    fewer temporaries than XLA:CPU's default schedule of the same program, which runs
    independent work side by side."""
    from mvit2_jax.train.steps import CPU_TRAIN_OPTIONS

    config = small_config()
    steps = train.compile_steps(config, tasks.get(config.task), num_steps=4)
    size, batch = config.data.image_size, config.batch_size
    inputs = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), np.float32), "label": jax.ShapeDtypeStruct((batch,), np.int32)}
    lowered = steps.train.lower(jax.eval_shape(steps.init), inputs)
    temporaries = lambda compiled: compiled.memory_analysis().temp_size_in_bytes
    quick = {"xla_backend_optimization_level": 0}  # LLVM's work, not the schedule: a third of the compile
    engine = temporaries(lowered.compile(quick))  # added to the jit's own options
    concurrent = temporaries(lowered.compile({**quick, "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}))
    assert CPU_TRAIN_OPTIONS == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert engine < 0.95 * concurrent, (engine, concurrent)


def test_a_loss_with_parts_logs_them_averaged_over_micro_batches(small_config):
    """A task's loss may return (loss, {name: part}): the step logs the parts beside the loss,
    as means over the micro-batches when gradients are accumulated, and the update is the
    same with or without them."""
    import flax.linen as nn
    import jax.numpy as jnp

    from mvit2_jax.train.state import init_state

    class Toy:
        parts = True

        def prepare_batch(self, key, batch, config):
            return batch["x"], batch["y"]

        def loss(self, outputs, targets, config):
            squared, absolute = jnp.mean((outputs - targets) ** 2), jnp.mean(jnp.abs(outputs - targets))
            return (squared, {"abs": absolute, "squared": squared}) if self.parts else squared

        def train_metrics(self, outputs, batch):
            return {"mean_output": jnp.mean(outputs)}

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(1)(x)

    model = Linear()
    x = np.linspace(-1, 1, 8, dtype=np.float32)[:, None]
    batch = {"x": x, "y": 3 * x + 1}
    tx = optax.sgd(0.1)
    state = init_state(model, tx, x[:1], 0)
    config = small_config()
    results = {}
    for parts, accum in ((True, 1), (True, 2), (False, 2)):
        task = Toy()
        task.parts = parts
        config.grad_accum_steps = accum
        step = jax.jit(lambda s, b: train.train_step(s, b, task=task, model=model, tx=tx, schedule=optax.constant_schedule(0.1), config=config))
        results[parts, accum] = step(state, batch)
    (one, m1), (two, m2), (plain, m0) = results[True, 1], results[True, 2], results[False, 2]
    out = np.asarray(model.apply({"params": state.params}, x))
    err = out - batch["y"]
    np.testing.assert_allclose(m1["abs"], np.abs(err).mean(), rtol=1e-6)
    halves = [np.abs(err[j::2]).mean() for j in range(2)]  # micro-batch j: rows j, j+2, ...
    np.testing.assert_allclose(m2["abs"], np.mean(halves), rtol=1e-6)
    np.testing.assert_allclose([m1["squared"], m2["squared"]], [m1["loss"], m2["loss"]], rtol=1e-6)
    assert "abs" not in m0 and "mean_output" in m0
    jax.tree.map(np.testing.assert_array_equal, two.params, plain.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), one.params, two.params)


# A child process with 4 CPU devices runs one train step of the engine on a 1-device mesh and
# on a 4-device mesh, from the same state on the same batch, and saves both results.
_ONE_VS_FOUR = """
import sys
import jax, numpy as np
from conftest import small_config
from mvit2_jax import tasks, train
config = small_config(train_split="train[:32]", randaugment=False)
config.optim.update(name="sgd", lr=0.1, warmup_steps=0)
task = tasks.get(config.task)
batch = next(task.train_input(config, 0))
results, initial = {}, None
for n in (1, 4):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))
    steps = train.compile_steps(config, task, num_steps=1, mesh=mesh)
    initial = jax.device_get(steps.init()) if initial is None else initial  # one init, placed on each mesh
    state = jax.device_put(initial, jax.NamedSharding(mesh, jax.P()))
    state, _ = steps.train(state, train.to_global(batch, jax.NamedSharding(mesh, jax.P("data"))))
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))[0]
    results.update({f"{n}{jax.tree_util.keystr(k)}": v for k, v in flat})
np.savez(sys.argv[1], **results)
"""


@pytest.mark.slow
def test_a_step_on_one_device_equals_a_step_on_four(tmp_path, subprocess_env):
    """The same step on 1 and on 4 simulated devices: the same parameters and BatchNorm
    statistics (over the global batch).

    One step of SGD, whose update is linear in the gradient, so float reduction-order noise
    stays noise (Adam would turn a 1e-9 gradient into a full +-lr step of either sign, and a
    second step amplifies the first one's noise through nearly constant BatchNorm channels
    about a thousandfold, whatever the kernels).
    """
    out = tmp_path / "steps.npz"
    proc = subprocess.run([sys.executable, "-c", _ONE_VS_FOUR, str(out)], env=subprocess_env(4, quick_compile=True),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = np.load(out)
    names = sorted(k[1:] for k in results.files if k.startswith("1"))
    assert len(names) > 100 and any("batch_stats" in n for n in names)
    for name in names:
        one, four = results["1" + name], results["4" + name]
        np.testing.assert_allclose(one, four, rtol=2e-4, atol=2e-5, err_msg=name)
    assert not np.allclose(results["1['params']['head']['kernel']"], 0)


# ----------------------------------------------------------------------------- resume and learning


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_the_reference_run_learns_and_records_what_load_model_needs(reference_run):
    workdir, metrics = reference_run
    assert metrics["num_examples"] == 360
    assert metrics["top1"] > 0.5  # chance is 0.1
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard log"
    model, raw = load_model(str(workdir), ema=False)
    _, ema = load_model(str(workdir), ema=True)
    assert model.num_classes == 10 and model.alpha == 0.5
    assert not np.allclose(raw["params"]["head"]["kernel"], ema["params"]["head"]["kernel"])
    meta, step, _ = read_config(str(workdir))
    assert step == 88 and meta["class_names"] == [str(i) for i in range(10)]
    assert (meta["format"], meta["task"], meta["config"]["task"]) == (2, "classification", "classification")


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_resume_equals_uninterrupted_run(reference_run, reference_config, tmp_path, monkeypatch):
    """N steps equal N/2 + N/4 + N/4, bit for bit (raw and EMA weights): the reference run's
    own checkpoint at step 44, resumed for 22 steps (stop_after_steps), resumed to the end.
    On the CPU the loop waits for every step before it dispatches the next (a queued step
    holds its own temporaries on fresh pages: twice the time and memory)."""
    import shutil

    finished = []
    wait = jax.block_until_ready

    def spy(x):
        finished.extend([int(x.step)] if isinstance(x, train.TrainState) else [])
        return wait(x)

    monkeypatch.setattr(jax, "block_until_ready", spy)

    reference, _ = reference_run
    workdir = tmp_path / "resumed"
    shutil.copytree(reference, workdir)
    for later in ("66", "88"):
        shutil.rmtree(workdir / "checkpoints" / later)
    assert read_config(str(workdir))[1] == 44
    train.train_and_evaluate(reference_config(), str(workdir), stop_after_steps=22)
    assert read_config(str(workdir))[1] == 66
    assert finished == list(range(45, 67))
    train.train_and_evaluate(reference_config(), str(workdir))
    assert read_config(str(workdir))[1] == 88
    for ema in (False, True):
        _, a = load_model(str(reference), ema=ema)
        _, b = load_model(str(workdir), ema=ema)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_eval_mode_evaluates_the_latest_checkpoint(reference_run, subprocess_env):
    workdir, metrics = reference_run
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--workdir={workdir}",
         "--mode=eval", "--config.batch_size=32", "--config.eval_batch_size=64"],
        env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("ema_loss=")][-1]
    printed = dict(kv.split("=") for kv in line.split())
    assert float(printed["top1"]) == pytest.approx(metrics["top1"], abs=1e-6)
    assert float(printed["ema_top1"]) == pytest.approx(metrics["ema_top1"], abs=1e-6)


@pytest.mark.slow
def test_eval_mode_without_a_checkpoint_is_a_clear_error(tmp_path, subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--workdir={tmp_path}", "--mode=eval"],
        env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2 and "no checkpoint in" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- fine-tuning


def test_init_from_restores_backbone_and_reinitializes_new_head(converted_050, small_config, random_like):
    config = small_config()
    config.init_from = converted_050
    steps = train.compile_steps(config, CLASSIFICATION, num_steps=6)
    fresh = random_like(jax.eval_shape(steps.init))  # a fresh state's layout (no compiled init)
    state = train.init_from_pretrained(fresh, config, CLASSIFICATION, steps.mesh)
    _, source = load_model(converted_050)
    assert source["params"]["head"]["kernel"].shape == (256, 1000)
    assert state.params["head"]["kernel"].shape == (256, 10)
    np.testing.assert_array_equal(state.params["head"]["kernel"], fresh.params["head"]["kernel"])
    for part in ("params", "batch_stats"):
        src = dict(jax.tree_util.tree_flatten_with_path(source[part])[0])
        got = jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]
        backbone = [(k, v) for k, v in got if "head" not in jax.tree_util.keystr(k)]
        assert len(backbone) == len(src) - (2 if part == "params" else 0)
        for key, value in backbone:
            np.testing.assert_array_equal(value, src[key], err_msg=jax.tree_util.keystr(key))
    np.testing.assert_array_equal(state.ema_params["stem"]["conv"]["kernel"], source["params"]["stem"]["conv"]["kernel"])


@pytest.mark.parametrize("field, value", [("alpha", 0.75), ("attention", "mha")])
def test_init_from_a_different_model_is_a_clear_error(converted_050, small_config, field, value):
    config = small_config()
    config.init_from = converted_050
    config.model[field] = value
    with pytest.raises(ConfigError, match=f"holds a {field}=.*config.model.{field}="):
        train.init_from_pretrained(None, config, CLASSIFICATION, None)


@pytest.mark.slow
@pytest.mark.xdist_group("reference")
def test_finetuning_a_converted_checkpoint_learns_the_digits(converted_050, reference_config, tmp_path):
    """The reference run's config (and compiled steps) started from converted in1k weights."""
    config = reference_config()
    config.init_from = converted_050
    metrics = train.train_and_evaluate(config, str(tmp_path / "ft"))
    assert metrics["top1"] > 0.3  # chance is 0.1


@pytest.mark.slow
def test_evaluating_a_converted_checkpoint_needs_its_data(converted_050, subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "mvit2_jax.main", "--config=experiments/quickstart.py", f"--checkpoint={converted_050}",
         "--mode=eval", "--config.eval_batch_size=64", "--config.data.dataset=imagenet2012"],
        env=subprocess_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    # No ImageNet here: the run stops with the data error before compiling anything.
    assert proc.returncode == 2 and "ILSVRC2012_img_val.tar" in proc.stderr


@pytest.mark.slow
def test_evaluate_checkpoint_of_a_model_directory(tmp_path, small_config, random_variables):
    """A model directory (one set of weights, no EMA) is evaluated once, with no train state
    made up for it; top-1 equals the argmax accuracy of the model on the eval pipeline."""
    import jax.numpy as jnp

    from mvit2_jax.checkpoint import save_model
    from mvit2_jax.models import MobileViTv2

    model = MobileViTv2(alpha=0.5, num_classes=10)
    variables = random_variables(model, jnp.zeros((1, 32, 32, 3)), seed=3)
    save_model(str(tmp_path / "model"), model, variables, meta={"image_size": [32, 32]})
    config = small_config(eval_split="test[:100]")
    metrics = train.evaluate_checkpoint(config, str(tmp_path / "model"))
    assert set(metrics) == {"loss", "top1", "top5", "num_examples"} and metrics["num_examples"] == 100
    correct = count = 0
    apply = jax.jit(model.apply)
    for batch in CLASSIFICATION.eval_input(config, None):
        logits = np.asarray(apply(variables, batch["image"]))
        correct += float(((logits.argmax(-1) == batch["label"]) * batch["mask"]).sum())
        count += float(batch["mask"].sum())
    assert metrics["top1"] == pytest.approx(correct / count, abs=1e-6)
    with pytest.raises(DataError, match="has 10 classes"):  # a 1000-class model on the digits
        config.data.num_classes = 1000
        CLASSIFICATION.check_data(config, splits=[config.data.eval_split])


@pytest.mark.slow
def test_training_on_an_image_folder_with_a_corrupt_file(tmp_path, small_config):
    """A folder with one sub-folder per class trains by path; a corrupt file is skipped and named."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from mvit2_jax.data import skipped_files

    digits = load_digits()
    root = tmp_path / "digits_folder"
    for c in range(10):
        (root / f"digit_{c}").mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(digits.target == c)[:12]):
            Image.fromarray((digits.images[idx] * 255 / 16).astype(np.uint8)).save(root / f"digit_{c}" / f"{i}.png")
    (root / "digit_3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = small_config(dataset=str(root), train_split="train", eval_split="validation", data_dir=str(tmp_path / "tfds"))
    metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["num_examples"] == 12  # 10% of the 120 readable images
    assert list(skipped_files(train_spec(config))) == ["digit_3/broken.png"]
    assert read_config(str(tmp_path / "run"))[0]["class_names"] == [f"digit_{c}" for c in range(10)]


def train_spec(config):
    from mvit2_jax.data import DatasetSpec

    return DatasetSpec.from_config(config.data)
