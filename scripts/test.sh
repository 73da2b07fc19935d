#!/usr/bin/env bash
# Set up, fetch the real model (the tests marked `model` use it), and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/edgesplit pull smollm2-135m
.venv/bin/python -m pytest -q "$@"
