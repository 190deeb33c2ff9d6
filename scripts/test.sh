#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU, about the time given in the README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest tests "$@"
