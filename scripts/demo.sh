#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctp eval --model smollm2-135m --datasets c4,wikitext2,ptb --seqlen 1024 --out runs/eval-smollm2-135m.json "$@"
