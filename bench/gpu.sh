#!/usr/bin/env bash
# Every GPU check and benchmark in one call (a lent GPU's time is short), each step under its own time limit:
#   1. the test suite's GPU tests (packed CUDA kernels, block offload during compression);
#   2. bench.compress_speed --device cuda: kernels, Hessians, the 7B-shaped layer and whole-model compression;
#   3. bench.inference --device cuda: one linear per format (bf16, int8, int4 tinygemm, 2:4 semi-structured)
#      and ctp's packed runtime on a random Llama of 7B-like layer width;
#   4. bench.prompt_train --device cuda: prompt-training throughput.
# Results: OUTDIR/*.json and OUTDIR/gpu.log.
#
#   bash bench/gpu.sh OUTDIR [MODEL]           # MODEL: a name or directory ctp loads (default smollm2-135m)
#
# With CTP_GPU_SHAPE_ONLY=1, MODEL is a directory holding only config.json and the tokenizer: it is filled with
# random weights of that shape first (timings depend on shapes, not values; for machines the weights cannot
# reach).
set -uo pipefail
OUT=${1:?usage: bash bench/gpu.sh OUTDIR [MODEL]}
MODEL=${2:-smollm2-135m}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, its output into the log, a one-line summary
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "=== $name: $*" >>"$LOG"
  timeout -s INT -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name rc=$rc $(($(date +%s) - t0))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } >>"$LOG" 2>&1

if [ "${CTP_GPU_SHAPE_ONLY:-0}" = 1 ]; then
  step shape-only-weights 60 $PY -c "
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
d = sys.argv[1]
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32)
for p in m.parameters():
    torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
m.save_pretrained(d)
print('random weights of shape', sum(p.numel() for p in m.parameters()), 'params')" "$MODEL"
fi

step tests 100 $PY -m pytest -q -p no:cacheprovider -k "cuda" tests/compress/test_packed.py tests/compress/test_driver.py
step inference 150 $PY -m bench.inference --device cuda --json "$OUT/inference_cuda.json" --sections linear,runtime \
  --shapes 576x576,1536x576,4096x4096,11008x4096,4096x11008 --tokens 1,16,2048 --repeats 3 --model "$MODEL" \
  --random-llama 4096:4 --decode 32 --model-repeats 5
step compress_speed 150 $PY -m bench.compress_speed --device cuda --json "$OUT/compress_speed_cuda.json" \
  --shapes 576x576,1536x576,576x1536,11008x4096,4096x11008 --big 4096x4096 --big-rows 4096 \
  --model "$MODEL" --nsamples 32 --seqlen 512
step prompt_train 80 $PY -m bench.prompt_train --device cuda --json "$OUT/prompt_train_cuda.json" --model "$MODEL" \
  --configs fp32,bf16,fp32+ckpt --steps 10 --warmup 2 --memory-steps 0 --trainer-steps 3
exit 0
