#!/usr/bin/env bash
# The main job on the embedded default: fetch SmolLM2-135M, convert it, and run a simulated split:
# a cloud worker process serves layers [15, 30) + head over ZeroMQ on loopback, this process runs
# the device front [0, 15) and streams the answer, with an LTE link emulated between them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/edgesplit pull smollm2-135m
.venv/bin/edgesplit simulate --cut 15 --network lte --chat --max-tokens 96 "${@:-Name three uses of a Raspberry Pi.}"
