#!/usr/bin/env bash
# The single-GPU benchmark sequence behind the README's GPU figures (ViT-B/16 and L/16, bf16, 224 px).
#
#   infra/bench-gpu.sh [STEP ...]      # default: every step; the steps' time limits add up to 11 minutes
#
# Needs only python3 with torch (and deepspeed for steps 1 and 2) on a machine with one CUDA GPU; run
# from the repository root. Each step is its own process with its own time limit, so a step that runs
# out of memory or time costs only itself. Logs go to $LOGS (default bench-gpu-logs/), one per step.
# $EXTRA is appended to every bench command (the last value of a flag wins), e.g. EXTRA="--seconds 15".
#
#   1  the engine as pretraining runs it: DeepSpeed ZeRO-1, bf16 weights + fp32 master copies;
#      B/16 and L/16, eager and with compiled blocks (model.compile: true)
#   2  DeepSpeed ZeRO-0 (its BF16_Optimizer), L/16 batch 256, compiled blocks, and a kernel profile
#   3  plain PyTorch (fp32 weights, bf16 autocast), L/16 batch 256, compiled blocks, cuDNN attention
#   4  plain PyTorch, L/16 batch 256, the whole model compiled
#   5  plain PyTorch, L/16 batch 256, compiled blocks with max-autotune (Triton matmul templates)
set -u
cd "$(dirname "$0")/.."
LOGS=${LOGS:-bench-gpu-logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step N LIMIT_S ARGS...: one bench run, shown and kept in $LOGS/stepN.txt; $EXTRA flags go last
    local n=$1 limit=$2
    shift 2
    echo "=== step $n: bench train --gpu $* ${EXTRA:-} (limit ${limit}s)"
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    timeout "$limit" "$PY" -m pipelines.bench.train --gpu --seconds 6 "$@" ${EXTRA:-} 2>&1 \
        | grep -v -e '^\[20' -e 'Warning' | tee "$LOGS/step$n.txt"
    echo "=== step $n: exit ${PIPESTATUS[0]}"
}

steps=${*:-1 2 3 4 5}
"$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
for n in $steps; do
    case $n in
        1) step 1 200 --engine deepspeed --stage 1 --cases B/16:256,L/16:128 --compile both ;;
        2) step 2 100 --engine deepspeed --stage 0 --cases L/16:256 --compile on --profile 3 ;;
        3) step 3 90 --engine torch --cases L/16:256 --compile on --attention cudnn ;;
        4) step 4 100 --engine torch --cases L/16:256 --compile model ;;
        5) step 5 180 --engine torch --cases L/16:256 --compile on --compile-mode max-autotune-no-cudagraphs ;;
        *) echo "no step $n (steps: 1 to 5)" >&2; exit 2 ;;
    esac
done
