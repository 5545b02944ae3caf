#!/usr/bin/env bash
# Installs tilert with its test dependencies and runs the CPU test suite
# (GPU tests, marked `gpu`, run on the GPU machines: benchmarks/gpu_run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
ruff check .
python3 -m pytest -m "not gpu" "$@"
