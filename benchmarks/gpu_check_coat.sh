#!/usr/bin/env bash
# One prepared GPU check for #18 (needs a CUDA GPU; the figures go into benchmarks/results/coat.md by hand).
#   bash benchmarks/gpu_check_coat.sh [STEPS] [CONFIGS]   # defaults 300, bf16_adamw,coat,torchao_float8
# Results in ${OUT:-.}/coat_gpu_*.json. Estimated (not measured) on one H100/H200: CUDA tests ~1 min, the
# optimizer micro-benchmark ~1 min, each training configuration ~2-3 min at 300 steps (compile warm-up
# included). Where one command may run 10 minutes at most, run the configurations in two calls, e.g.
# `bash benchmarks/gpu_check_coat.sh 300 bf16_adamw,coat` then `... 300 bf16_adamw,torchao_float8`.
# torchao must be installed (pip install 'meshwright[fp8]' or carry its wheel), else it reports "skipped".
set -euo pipefail
STEPS=${1:-300}
CONFIGS=${2:-bf16_adamw,coat,torchao_float8}
OUT=${OUT:-.}
export PYTHONPATH=${PYTHONPATH:-$(pwd)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 300 python -m pytest -q tests/unit/test_fp8_activations.py tests/unit/test_coat_planner.py tests/unit/test_coat_triton.py -k "cuda or fp8_gpus" 2>&1 | tail -3
timeout 300 python benchmarks/bench_coat_optim.py --device cuda --model llama-1.3b --steps 5 > "$OUT/coat_gpu_optim.json"
timeout 1500 python benchmarks/bench_coat_gpu.py --steps "$STEPS" --configs "$CONFIGS" > "$OUT/coat_gpu_train.json"
cat "$OUT/coat_gpu_optim.json" "$OUT/coat_gpu_train.json"
