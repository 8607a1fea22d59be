#!/usr/bin/env bash
# Every GPU check of issues 16-18 in one call (about 7-8 minutes on one H100/H200), for sessions whose GPU
# time is short: each part has its own timeout and writes its JSON under $OUT as soon as it is done.
#   bash benchmarks/gpu_all.sh            # on the GPU machine (python3 with torch+CUDA; torchao from .whl if carried)
#   bash benchmarks/gpu_all.sh cpu        # the same plumbing on CPU, tiny sizes (a minute or two)
# Parts: CUDA tests (with Gemma 2's compiled flex attention vs the materialised path, forward + gradients); gpu_check (trainer vs plain compiled loop on gpt2-small, 1.3B llama MFU, the planner's
# llama2-7b layout, predictions beside measurements); the CoatAdamW optimizer step; COAT vs bf16 vs torchao
# training; `train --plan auto` predicted vs measured; optional (not in the default PARTS): headloss, precision
# (bench_precision_policy.py), blocks (bench_coat_block_variants.py: COAT's FP8 choices on one compiled block). Set PARTS to run a subset, STEPS for the COAT runs,
# COAT_COMPILE=1 to torch.compile every COAT configuration (FP8 casts fuse only there; torchao expects it),
# COAT_COMPILE_SCOPE=blocks to compile per transformer block (the trainer's default: one compilation for all blocks),
# COAT_CONFIGS, COAT_STEPS_FOR (e.g. torchao_float8=100), BLOCK_VARIANTS, COAT_TIMEOUT, BLOCKS_TIMEOUT, TESTS_TIMEOUT, PLANNER_TIMEOUT and PRECISION_TIMEOUT
# (seconds) to fit the call. Optional parts: casts (bench_fp8_casts_gpu.py: COAT's FP8
# casts, Triton vs inductor), loss (check_coat_loss.py: COAT's loss against AdamW's on a small llama, LOSS_TIMEOUT).
set -u
MODE=${1:-gpu}
OUT=${OUT:-/tmp/gpu_all}; mkdir -p "$OUT"
PY=${PY:-python3}
PARTS=${PARTS:-tests,check,optim,coat,planner,trace}
STEPS=${STEPS:-120}
CHECK=${CHECK:-gpt2_trainer_compiled,gpt2_plain_compiled,llama1b_trainer_compiled,llama7b_planned}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MESHWRIGHT_CACHE_DIR=${MESHWRIGHT_CACHE_DIR:-/tmp/mw-profiles}
# the log is written as it goes (a call cut short by its time limit keeps it): no caller-side tee, and every
# filter here is line-buffered (a block-buffered grep lost the whole log of the second H200 call)
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s); stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (torchao): installed out of the image's way
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
stamp env
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>/dev/null
$PY -c "import torch;print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
if [ "$MODE" = cpu ]; then SMOKE=--cpu-smoke; COAT="--smoke"; OPT="--device cpu --model tiny --steps 2"; PL=--cpu-smoke
else SMOKE=; COAT="--steps $STEPS"; OPT="--device cuda --model llama-1.3b --steps 5"; PL="--cases gpt2-small --steps 30"; fi
if has tests && [ "$MODE" != cpu ]; then
  stamp CUDA tests
  timeout ${TESTS_TIMEOUT:-150} $PY -m pytest -q -p no:cacheprovider tests/unit/test_fp8_activations.py tests/unit/test_coat_planner.py \
    tests/unit/test_wta_crs_sync_free.py tests/unit/test_coat_optimizer.py tests/unit/test_fp8_tp.py tests/unit/test_fp8_compiled_model.py \
    tests/unit/test_capped_flex.py \
    -k "cuda or fp8_gpus" 2>&1 | tail -2
  timeout ${TESTS_TIMEOUT:-200} $PY -m pytest -q -p no:cacheprovider tests/unit/test_fp8_triton_cast.py tests/unit/test_coat_triton.py tests/unit/test_coat_triton_edges.py tests/unit/test_coat_nonfinite.py \
    tests/unit/test_keyed_init.py tests/unit/test_meta_init.py tests/unit/test_fp8_passes.py \
    tests/unit/test_fp8_quant_finite_unchanged.py 2>&1 | tail -8
fi
if has casts; then  # not in the default PARTS: COAT's FP8 casts, Triton kernels vs inductor's quantisers (about 30 s)
  stamp "FP8 casts: Triton vs compiled"
  if [ "$MODE" = cpu ]; then FC=--smoke; else FC=; fi
  timeout ${CASTS_TIMEOUT:-90} $PY benchmarks/bench_fp8_casts_gpu.py $FC --out "$OUT/fp8_casts.json" 2>&1 >/dev/null \
    | grep --line-buffered '^{' | cut -c1-260
fi
if has loss; then  # not in the default PARTS: COAT's loss against AdamW's on a small llama, 300 steps each (#18)
  stamp "COAT loss: small llama, 300 steps"
  if [ "$MODE" = cpu ]; then LS="--steps 2 --vocab 256"; DEV=cpu; else LS="--autocast"; DEV=cuda; fi
  RUNS=("adamw,coat_states,coat reference" "coat_states,coat triton")  # CPU: the Triton step interpreted takes minutes
  [ "$MODE" = cpu ] && RUNS=("${RUNS[0]}")
  for RUN in "${RUNS[@]}"; do set -- $RUN
    timeout ${LOSS_TIMEOUT:-60} $PY benchmarks/check_coat_loss.py $1 --device $DEV --fused $2 $LS 2>> "$OUT/coat_loss.err" \
      | tee -a "$OUT/coat_loss.jsonl"
  done
fi
if has check; then
  stamp gpu_check "$CHECK"
  timeout 330 $PY benchmarks/gpu_check.py $SMOKE --out "$OUT/gpu_check.json" --only "$CHECK" 2>&1 | grep --line-buffered "^\["
fi
if has optim; then
  stamp CoatAdamW optimizer step
  timeout 90 $PY benchmarks/bench_coat_optim.py $OPT > "$OUT/coat_optim.json" 2> "$OUT/coat_optim.err"; tail -c 700 "$OUT/coat_optim.json"
fi
if has coat; then
  stamp COAT training
  timeout ${COAT_TIMEOUT:-240} $PY benchmarks/bench_coat_gpu.py $COAT ${COAT_COMPILE:+--compile} \
    ${COAT_COMPILE_SCOPE:+--compile-scope $COAT_COMPILE_SCOPE} ${COAT_STEPS_FOR:+--steps-for $COAT_STEPS_FOR} \
    --configs ${COAT_CONFIGS:-bf16_adamw,coat,torchao_float8} --out "$OUT/coat_train.json" > /dev/null 2> "$OUT/coat_train.err"
  $PY -c "import json,sys;d=json.load(open(sys.argv[1]));print(json.dumps(d['vs_bf16_adamw']))" "$OUT/coat_train.json" 2>&1 | tail -3
fi
if has blocks; then  # not in the default PARTS: COAT's FP8 choices on one compiled block (bench_coat_block_variants.py)
  stamp "COAT block variants"
  if [ "$MODE" = cpu ]; then BV="--smoke --variants bf16,coat,coat_act"; else BV="--variants ${BLOCK_VARIANTS:-bf16,coat,coat_fused,coat_mlp_gemm,torchao_float8,coat_act}"; fi
  timeout ${BLOCKS_TIMEOUT:-300} $PY benchmarks/bench_coat_block_variants.py $BV --out "$OUT/coat_blocks.json" \
    2> "$OUT/coat_blocks.err" > /dev/null; grep --line-buffered '^{' "$OUT/coat_blocks.err" | cut -c1-300
fi
if has planner; then
  stamp "train --plan auto: predicted vs measured"
  timeout ${PLANNER_TIMEOUT:-150} $PY benchmarks/bench_planner_gpu.py $PL --out "$OUT/planner_gpu.md" 2>&1 | tail -3
fi
if has headloss && [ "$MODE" != cpu ]; then  # not in the default PARTS: DistributedRuntime (world 1), eager head vs head in the compiled loss
  stamp "head in the loss (DistributedRuntime, world 1)"
  timeout ${HEADLOSS_TIMEOUT:-300} torchrun --standalone --nproc-per-node 1 benchmarks/bench_head_loss_gpu.py --steps 10 \
    --only eager_head,head_in_loss,plain_compiled > "$OUT/head_loss.json" 2> "$OUT/head_loss.err"; tail -c 600 "$OUT/head_loss.json"
fi
if has precision; then  # not in the default PARTS: autocast (meshwright ZeRO-0/1) vs FSDP2 mixed precision, planner beside
  stamp "precision policy: autocast vs FSDP2 mixed precision"
  if [ "$MODE" = cpu ]; then PP="--cpu-smoke"; else PP=; fi
  timeout ${PRECISION_TIMEOUT:-200} $PY benchmarks/bench_precision_policy.py $PP --out "$OUT/precision_policy.json" \
    2> "$OUT/precision_policy.err" | tail -8
fi
if has trace; then  # last: where the trainer's step time goes, beside the plain loop's (torch.profiler)
  stamp traced steps
  timeout 120 $PY benchmarks/gpu_check.py $SMOKE --out "$OUT/gpu_trace.json" --only gpt2_trainer_traced,gpt2_plain_traced 2>&1 | grep --line-buffered "^\["
fi
stamp done
