#!/usr/bin/env bash
# Set up, fetch the real model (the tests marked `model` use it), type-check, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# A cache inside the checkout: a fresh clone fetches and converts the model (and builds the
# Q4Linear operator) for real.
export EDGESPLIT_CACHE="${EDGESPLIT_CACHE:-$PWD/.cache}"
bash scripts/setup.sh
.venv/bin/edgesplit pull smollm2-135m
bash scripts/typecheck.sh
.venv/bin/python -m pytest -q "$@"
