#!/usr/bin/env bash
# shellcheck disable=SC2329  # the part_* functions run by name, under timeout, below
# The GPU checks of one session, on a machine with one NVIDIA GPU, in one call of a few minutes:
# correctness (the tests that need no TensorFlow, in float32 without TF32), the whole model
# beside timm (eager / torch.compile, float32 / bfloat16 autocast), the attention benchmark and
# the input pipeline (the host's cores per image; RandAugment and erasing on the GPU).
#
#   bash launch/gpu_check.sh OUT_DIR [PART ...]     # from the repository root
#
# PART: env, tests, model, attention, data (default: all five, in that order); each runs under its
# own time limit (GPU_CHECK_LIMIT_S, default 150 s) so that one slow part leaves the others
# their time. Writes OUT_DIR/gpu_check.log and OUT_DIR/gpu_check.tar.gz (every table, plot and
# log). Needs jax with its CUDA plugin, flax, optax, orbax-checkpoint, torch and timm; wheels in
# .whl/ (ml_collections and clu, for a machine that cannot reach a package index) are installed
# into /tmp/site first. Model settings: MODEL_ALPHAS (default 1.0), MODEL_BATCH (default 256),
# TIMM_SETTINGS (default "eager eager-bf16 compile-bf16"). GPU_CHECK_TINY=1: a short run
# of each part (the benchmarks' --tiny, one test file) to check the script on any machine.
set -euo pipefail

USAGE="usage: bash launch/gpu_check.sh OUT_DIR [env|tests|model|attention|data ...]"
if [[ $# -lt 1 ]]; then
  echo "$USAGE" >&2
  exit 2
fi
OUT_DIR=$1
shift
PARTS=("$@")
[[ ${#PARTS[@]} -eq 0 ]] && PARTS=(env tests model attention data)
for part in "${PARTS[@]}"; do
  case $part in
    env | tests | model | attention | data) ;;
    *) printf 'error: unknown part %s\n%s\n' "$part" "$USAGE" >&2; exit 2 ;;
  esac
done
LIMIT=${GPU_CHECK_LIMIT_S:-150}
PY=${PYTHON:-python3}
export PY WORK=$OUT_DIR/gpu_check
mkdir -p "$WORK"
LOG=$OUT_DIR/gpu_check.log
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

part_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version 2>/dev/null | tail -1
  "$PY" - <<'EOF'
import jax, flax, optax, torch, timm
print("jax", jax.__version__, "devices", jax.devices())
print("flax", flax.__version__, "optax", optax.__version__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "timm", timm.__version__)
EOF
}

part_tests() {
  local files=(tests/test_stats.py)
  [[ -z ${GPU_CHECK_TINY:-} ]] && files=(tests/test_models.py tests/test_mobilevit.py tests/test_convert.py
    tests/test_segmentation_models.py tests/test_detection_models.py tests/test_anchors.py tests/test_stats.py
    tests/test_hub.py tests/test_checkpoint.py)
  # float32 products in full precision (no TF32) for the parity tests, as on a CPU; the one
  # test of these files that reads images through the eval pipeline needs TensorFlow
  JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -m "not slow" -p no:cacheprovider -n 4 "${files[@]}" \
    --deselect tests/test_hub.py::test_predict_and_init_from_take_hub_names
}

part_model() {
  local alphas=${MODEL_ALPHAS:-1.0} batch=${MODEL_BATCH:-256} tiny=()
  [[ -n ${GPU_CHECK_TINY:-} ]] && tiny=(--tiny)
  # shellcheck disable=SC2086  # word lists
  "$PY" -m mvit2_jax.benchmarks.model --out "$WORK/model_bfloat16" --alphas $alphas --batch "$batch" --dtype bfloat16 \
    --min-time 3 --timm-python "$PY" --timm-settings ${TIMM_SETTINGS:-eager eager-bf16 compile-bf16} "${tiny[@]}"
  # shellcheck disable=SC2086
  JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m mvit2_jax.benchmarks.model --out "$WORK/model_float32" --alphas $alphas \
    --batch "$batch" --dtype float32 --min-time 3 --timm-python "$PY" --timm-settings eager "${tiny[@]}"
}

part_attention() {
  if [[ -n ${GPU_CHECK_TINY:-} ]]; then
    "$PY" -m mvit2_jax.benchmarks.attention --out "$WORK/attention" --tiny
  else
    "$PY" -m mvit2_jax.benchmarks.attention --out "$WORK/attention" --batch 8 --ks 256 1024 4096 16384 65536 --min-time 0.5
  fi
}

part_data() {
  local args=(--out "$WORK/data" --device-batch 256)
  [[ -n ${GPU_CHECK_TINY:-} ]] && args+=(--tiny)
  # the host rows need TensorFlow (tf.data); without it, the device half alone
  "$PY" -c "import tensorflow" 2>/dev/null || args+=(--device-only)
  "$PY" -m mvit2_jax.benchmarks.data "${args[@]}"
}

status=0
for part in "${PARTS[@]}"; do
  say "$part: start (limit ${LIMIT} s)"
  start=$SECONDS
  rc=0
  timeout --kill-after=10 "$LIMIT" bash -c "$(declare -f "part_$part"); part_$part" >"$WORK/$part.log" 2>&1 || rc=$?
  tail -n 25 "$WORK/$part.log" | tee -a "$LOG"
  say "$part: exit $rc after $((SECONDS - start)) s"
  [[ $rc -eq 0 ]] || status=1
done
tar -czf "$OUT_DIR/gpu_check.tar.gz" -C "$OUT_DIR" gpu_check
exit $status
