#!/usr/bin/env bash
# The test suites under another torch (default: the GPU image's 2.11 with its triton), on this CPU machine, in a
# throwaway venv outside the repo: behaviour that changed inside unchanged signatures (DTensor sharding rules,
# triton lowerings) shows here before it costs GPU time. Like the GPU image, the venv has no deepspeed,
# megatron-core, codecarbon, fabric or peft, so tests of those stacks fail there by design; the summary lists the
# other failures (exit 1 if any).
#   bash benchmarks/torch_compat.sh [unit|distributed|all|gpu-smoke|files PATH...]   (TORCH=2.11.0 VENV=/tmp/meshwright-torch-compat-$TORCH)
# gpu-smoke: benchmarks/gpu_all.sh's CPU mode (every part of the prepared GPU call, tiny shapes) under that torch
# files: only the named test files or folders, e.g. the ones changed since a commit (minutes, not the suites' 30):
#   bash benchmarks/torch_compat.sh files $(git diff --name-only 179d954 -- tests/unit tests/distributed | grep 'test_.*\.py$')
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
VENV=${VENV:-/tmp/meshwright-torch-compat-$TORCH}
WHAT=${1:-all}
case "$WHAT" in
  unit|distributed|all|gpu-smoke|files) ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [unit|distributed|all|gpu-smoke|files PATH...]; got '$WHAT'" >&2; exit 2 ;;
esac
if [ "$WHAT" = files ] && [ $# -lt 2 ]; then
  echo "$0 files: name at least one test file or folder" >&2; exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # deliberately not constraints.txt: this venv exists to hold another torch than the project's pin
  "$VENV/bin/pip" install -q "torch==$TORCH" numpy pyyaml tqdm matplotlib pytest pytest-timeout psutil \
      "transformers>=4.40" tokenizers safetensors nvidia-ml-py
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
if [ "$WHAT" = gpu-smoke ]; then
  OUT=${OUT:-$(mktemp -d)} PY="$VENV/bin/python" PYTHONPATH=$PWD timeout 1800 bash benchmarks/gpu_all.sh cpu
  exit $?
fi
suites=()
case "$WHAT" in
  unit) suites=(tests/unit) ;;
  distributed) suites=(tests/distributed) ;;
  all) suites=(tests/unit tests/distributed) ;;
  files) shift; suites=("$@") ;;
esac
log=$(mktemp)
COLUMNS=400 PYTHONPATH=$PWD timeout 3600 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" -rfE --continue-on-collection-errors "${suites[@]}" \
  > "$log" 2>&1 || true
tail -1 "$log"
# a failure is the optional stacks' when its test names them or its report says the module is missing (peft: only
# the latter, so a PEFT-export test that fails because our code imports peft needlessly still counts)
# ERROR lines (a collection error interrupts the whole run: nothing after it is tested) count as failures too
others=$(grep -E '^(FAILED|ERROR) [^ ]|^!+ Interrupted' "$log" | grep -viE "deepspeed|megatron|codecarbon|fabric|No module named '(deepspeed|megatron|codecarbon|fabric|paramiko|peft)" || true)
if [ -n "$others" ]; then
  echo "failures not explained by the absent optional stacks (full log: $log):"
  echo "$others"
  exit 1
fi
echo "every failure names an absent optional stack (deepspeed, megatron-core, codecarbon, fabric, peft); log: $log"
