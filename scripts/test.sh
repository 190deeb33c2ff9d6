#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU, about the time given in the README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one torch thread: small-op-heavy tests spin with more threads on a shared 2-core machine
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest tests "$@"
