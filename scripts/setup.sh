#!/usr/bin/env bash
# Create .venv (if needed) and install edgesplit with its test dependencies and the [cluster] (Ray) and [litert] extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,cluster,litert]"
# onnxruntime's C API header, so edgesplit can build its Q4Linear operator on first use
# (runtime/kernels.py); without it the engine falls back to MatMulNBits.
bash scripts/ort_headers.sh
