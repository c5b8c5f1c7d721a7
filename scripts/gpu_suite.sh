#!/usr/bin/env bash
# The GPU suite in stages under one deadline, for a lent GPU machine (no internet). See docs/gpu.md.
#
#   bash scripts/gpu_suite.sh              # on the device (carry .gpu-carry, made by scripts/gpu_carry.sh)
#   bash scripts/gpu_suite.sh --dry-run    # here: the same stages on the emulation device, no GPU
#
# Stages, in order, each given at most the time left before DEADLINE seconds (default 540) and writing
# its results to $OUT as it goes (OUT defaults to results/):
#   1 setup    install the repo (editable, --no-deps) and the carried wheels the image lacks (into a
#              --target folder); build a model of SmolLM2's shape with random weights and its real tokenizer
#   2 prewarm  NVRTC-compile every cuda/*.cu in parallel into CuPy's disk cache (tests/gpu/prewarm.py)
#   3 smoke    one JSON line per op, cuBLAS, sampling, staging, swap, graphs, memory (tests/gpu/smoke.py)
#   4 kernels  pytest -m gpu over the NVRTC, kernel grid and CudaOps tests
#   5 engine   pytest -m gpu tests/gpu (most informative first)
#   6 bench    cupaged bench kernels --quick
#   7 real     the real SmolLM2 against the CPU, only when REAL_MODEL_WHEELS names a folder with its wheel
# Each stage's log is $OUT/<n>-<stage>.log (pytest stages add a JUnit .xml); $OUT/stages.jsonl gets one
# line per stage: {"stage", "status" (0 = passed), "seconds"}. The exit status is that of the first
# failed stage, else 0.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=${CARRY:-.gpu-carry}
case "$CARRY" in /*) ;; *) CARRY="$PWD/$CARRY" ;; esac
OUT_DIR=${OUT:-results}
DEADLINE=${DEADLINE:-540}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT_DIR"
START=$(date +%s)
FIRST_FAIL=0
SITE="${TMPDIR:-/tmp}/cupaged-site"
export PYTHONUNBUFFERED=1 CUPAGED_GPU_MODEL_FILES="$CARRY/smollm2-files"
PYTEST=("$PY" -m pytest -m gpu -v -rs -p no:cacheprovider)  # -v: each result is logged as it comes

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

record() {  # record NAME STATUS T0
    printf '{"stage": "%s", "status": %d, "seconds": %d}\n' "$1" "$2" $(( $(date +%s) - $3 )) \
        >>"$OUT_DIR/stages.jsonl"
    if [ "$2" -ne 0 ] && [ "$FIRST_FAIL" -eq 0 ]; then FIRST_FAIL=$2; fi
}

stage() {  # stage N NAME COMMAND...: run COMMAND with the time left, log it, record its status
    local n=$1 name=$2; shift 2
    local log="$OUT_DIR/$n-$name.log" t0 status budget
    budget=$(left)
    t0=$(date +%s)
    if [ "$budget" -le 5 ]; then
        echo "== $n $name: skipped, the deadline has passed" | tee "$log"
        status=124
    else
        echo "== $n $name (at most ${budget}s)" | tee "$log"
        timeout -s INT -k 15 "$budget" "$@" 2>&1 | tee -a "$log"
        status=${PIPESTATUS[0]}
    fi
    [ "$status" -eq 5 ] && status=0  # pytest: nothing selected (the stage's tests are not on this machine)
    record "$name" "$status" "$t0"
}

setup() {  # runs in this shell, so its exports reach the later stages
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: no NVIDIA driver here"
    git rev-parse --short HEAD 2>/dev/null
    local missing=()
    if ! "$PY" -c "import cupaged.weights" 2>/dev/null; then  # editable: the repo's cupaged/ must not shadow it
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 2
    fi
    for mod in hypothesis gguf jinja2 tqdm; do "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing from $CARRY/wheels: ${missing[*]}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$CARRY/wheels" \
            --target "$SITE" "${missing[@]}" || return 2
    fi
    "$PY" -c "
import numpy
try:
    import cupy
    print(f'numpy {numpy.__version__}, cupy {cupy.__version__}, NVRTC {cupy.cuda.nvrtc.getVersion()}, '
          f'runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}')
except Exception as e:
    print(f'numpy {numpy.__version__}; CuPy has no device here: {type(e).__name__}: {e}')"
    if [ ! -f "$CUPAGED_GPU_MODEL_FILES/tokenizer.json" ]; then
        echo "no $CUPAGED_GPU_MODEL_FILES: run scripts/gpu_carry.sh here and carry $CARRY"
        return 2
    fi
    "$PY" -m cupaged.weights.random_model "$CUPAGED_GPU_MODEL_FILES" "${TMPDIR:-/tmp}/cupaged-random-smollm2"
}

setup_stage() {
    local t0 status
    t0=$(date +%s)
    [ -d "$SITE" ] || mkdir -p "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "== 1 setup" | tee "$OUT_DIR/1-setup.log"
    setup >>"$OUT_DIR/1-setup.log" 2>&1
    status=$?
    cat "$OUT_DIR/1-setup.log"
    record setup "$status" "$t0"
}

if [ "$DRY" -eq 1 ]; then
    echo "dry run: the emulation device stands in for the GPU; the device-only tests skip, saying why"
    setup_stage
    stage 2 prewarm "$PY" -m tests.gpu.prewarm --offline sm_90
    stage 3 smoke "$PY" -m tests.gpu.smoke --device emu --out "$OUT_DIR/smoke.jsonl"
else
    setup_stage
    stage 2 prewarm "$PY" -m tests.gpu.prewarm --jobs 16
    stage 3 smoke "$PY" -m tests.gpu.smoke --out "$OUT_DIR/smoke.jsonl"
fi
stage 4 kernels "${PYTEST[@]}" --junitxml="$OUT_DIR/kernels.xml" tests/cuda tests/kernels tests/backend
stage 5 engine "${PYTEST[@]}" --junitxml="$OUT_DIR/engine.xml" tests/gpu
if [ "$DRY" -eq 1 ]; then  # no device to time: check that the command is there
    stage 6 bench "$PY" -m cupaged.cli.main bench kernels --help
else
    stage 6 bench "$PY" -m cupaged.cli.main bench kernels --quick --out "$OUT_DIR/bench-kernels-quick.json"
fi
if [ -n "${REAL_MODEL_WHEELS:-}" ]; then
    stage 7 real env PIP_NO_INDEX=1 PIP_FIND_LINKS="$REAL_MODEL_WHEELS" "${PYTEST[@]}" \
        --junitxml="$OUT_DIR/real.xml" tests/gpu -k smollm2
fi
echo "stages: $(tr '\n' ' ' <"$OUT_DIR/stages.jsonl")"
echo "results in $OUT_DIR (first failed status: $FIRST_FAIL)"
exit "$FIRST_FAIL"
