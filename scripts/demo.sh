#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M, offline):
# compress two ways, learn prompts, evaluate with and without them, write runs/demo/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one torch thread unless told otherwise: on a shared machine more threads spin against each other
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ctp run demo "$@"
