#!/usr/bin/env bash
# The GPU benchmark in one call, on a machine with an NVIDIA GPU that has JAX (with CUDA), PyTorch
# and transformers installed. Installs this project's pure-Python deps that the machine lacks, then
# runs bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps -e . 2>/dev/null || true
python -m pip install -q --no-deps -r requirements-embedded.txt 2>/dev/null || true
python bench/gpu.py "$@"
