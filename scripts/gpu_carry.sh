#!/usr/bin/env bash
# Make .gpu-carry/, what scripts/gpu_suite.sh needs on a GPU machine that has no internet (~5 MB):
#   wheels/          pure-Python wheels the device image lacks (gguf, hypothesis and its two dependencies)
#   smollm2-files/   SmolLM2's config.json and tokenizer files (the suite builds random weights of its shape)
# Run it here, where the registries are reachable; it converts the default model first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=${CARRY:-.gpu-carry}
mkdir -p "$CARRY/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" gguf hypothesis attrs sortedcontainers
model=$("$PY" -c "from cupaged.weights.store import resolve_model; print(resolve_model('smollm2-135m-instruct'))")
"$PY" -m cupaged.weights.random_model --export "$model" "$CARRY/smollm2-files" >/dev/null
du -sh "$CARRY"
