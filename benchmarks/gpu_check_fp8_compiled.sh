#!/usr/bin/env bash
# GPU check that compiled FP8 blocks keep their FP8 copies (#18; results go into benchmarks/results/fp8_compiled.md
# by hand). Estimated, not measured, on one H100/H200: the CUDA tests ~1-2 min (Triton compiles), each bench ~1-2 min.
#   bash benchmarks/gpu_check_fp8_compiled.sh            # then, for issue 18's memory target (~5 min at 300 steps):
#   python3 benchmarks/bench_coat_gpu.py --steps 300 --configs bf16_adamw,coat --compile
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$(pwd)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 300 ${PY:-python3} -m pytest -q tests/unit/test_fp8_compiled_model.py -k "cuda or quantisers" 2>&1 | tail -3
timeout 240 ${PY:-python3} benchmarks/bench_fp8_compiled_saved.py llama512 --device cuda
timeout 240 ${PY:-python3} benchmarks/bench_fp8_compiled_saved.py llama512 --device cuda --fp8-gemm
