#!/usr/bin/env bash
# The main job on the embedded default: fetch SmolLM2-135M, convert it, and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/edgesplit pull smollm2-135m
.venv/bin/edgesplit generate --chat --max-tokens 96 "${@:-Name three uses of a Raspberry Pi.}"
