#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M, offline):
# compress two ways, learn prompts, evaluate with and without them, write runs/demo/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one torch thread unless told otherwise: on a shared machine more threads spin against each other
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# one worker process per core (at most 4): the grid's models, prompts and measurements are shared out
WORKERS=${CTP_WORKERS:-$(python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")}
ctp run demo --workers "$WORKERS" "$@"
