#!/usr/bin/env bash
# The GPU test suite in one call, for a lent GPU machine (no internet): `bash scripts/gpu_suite.sh`.
#
# Installs the repo (editable, no dependencies) and whatever test-time packages the machine lacks from a
# carried wheel folder ($WHEELS, default .wheels), prints the cards, then runs `pytest -m gpu` (the kernel
# grid on the device through CuPy, and NVRTC compiles of every cuda/*.cu). Writes a JUnit XML and the log
# to ${OUT:-results}, named by the GPU, and exits with pytest's status. See docs/gpu.md.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=${WHEELS:-.wheels}
OUT_DIR=${OUT:-results}
mkdir -p "$OUT_DIR"

offline_pip() {  # pip install from the carried wheel folder only
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$@"
}

echo "== devices"
nvidia-smi -L || echo "nvidia-smi not found: no NVIDIA driver here"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
slug=$(echo "${gpu:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')

echo "== packages"
if ! "$PY" -c "import cupaged.weights" 2>/dev/null; then
    # Build with the machine's setuptools; without one, build in isolation from the wheel folder.
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . \
        || { [ -d "$WHEELS" ] && offline_pip --no-deps -e .; } \
        || { echo "cannot install the repo (pip install -e . --no-deps failed)"; exit 2; }
fi
missing=()
for mod in hypothesis jinja2 gguf tqdm; do
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ -d "$WHEELS" ]; then
        echo "installing from $WHEELS: ${missing[*]}"
        offline_pip "${missing[@]}" || echo "warning: could not install ${missing[*]} from $WHEELS"
    else
        echo "warning: missing ${missing[*]} and no wheel folder $WHEELS (see docs/gpu.md)"
    fi
fi
"$PY" - <<'EOF'
import numpy
try:
    import cupy
    print(f"numpy {numpy.__version__}, cupy {cupy.__version__}, CUDA runtime "
          f"{cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}, "
          f"NVRTC {cupy.cuda.nvrtc.getVersion()}")
except Exception as e:  # the suite then skips, saying why
    print(f"numpy {numpy.__version__}, cupy unavailable: {type(e).__name__}: {e}")
EOF

echo "== pytest -m gpu ($gpu)"
log="$OUT_DIR/gpu-suite-$slug.log"
xml="$OUT_DIR/gpu-suite-$slug.xml"
{
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo unknown-commit)"
    nvidia-smi -L 2>/dev/null
} >"$log"
"$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$xml" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "pytest exit status $status; results in $log and $xml"
exit "$status"
