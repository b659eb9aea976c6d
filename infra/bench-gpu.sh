#!/usr/bin/env bash
# One GPU machine, one short lease: the DeepSpeed engine path, the plain-PyTorch path beside it, and the
# training loader's rate on that machine's CPU, in at most 9 minutes, offline. One summary table at the end.
#
#   make gpu-wheels                     # here, where the package index is reachable: the wheels the GPU
#                                       # image lacks (DeepSpeed, WebDataset, pydantic, ...) -> .gpu-wheels/
#   infra/bench-gpu.sh                  # there, from the repository root, no network: every default step
#   infra/bench-gpu.sh ds-l16 torch     # only these steps (after wheels, which always runs)
#   infra/bench-gpu.sh --dry-run-cpu    # the whole script on the CPU with a debug-size model (CI)
#
# Needs python3 with torch (and torchvision, pyyaml, pillow, numpy, fsspec, which GPU images carry). Each
# step is its own process with its own time limit, so a step that runs out of memory or time costs only
# itself; the limits of the default steps add up to 8.5 minutes, and a step never gets more than what is
# left of $BUDGET_S (540). Logs and each step's figures (JSON) go to $LOGS (default bench-gpu-logs/).
#
#   step     limit  what
#   wheels    30 s  pip install --no-index --no-deps the wheels in $WHEELS (default .gpu-wheels) into $SITE,
#                   put it first on PYTHONPATH, check that deepspeed and webdataset are importable
#   ds-b16   105 s  the engine as pretraining runs it: DeepSpeed ZeRO-1, bf16 weights + fp32 master copies,
#                   torch's fused AdamW, compiled blocks (model.compile: true): B/16 at 224 px, batch 256
#   ds-l16   135 s  the same for L/16, batch 128
#   torch    165 s  plain PyTorch (fp32 weights, bf16 autocast, fused AdamW), compiled blocks: B/16 256, L/16 128
#   loader    60 s  the training loader (WebDataset shards -> decode, crop, flip, normalise) on one CPU thread,
#                   beside torchvision's ImageFolder + DataLoader: images/s per core
#
# Not in the default run (the README's kernel profile and compile-mode figures; about 2 to 3 minutes each):
#   profile  DeepSpeed ZeRO-0 (BF16_Optimizer), L/16 batch 256, compiled blocks, where the device time goes
#   model    plain PyTorch, L/16 batch 256, the whole model compiled
#   autotune plain PyTorch, L/16 batch 256, compiled blocks with max-autotune (Triton matmul templates)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${LOGS:-bench-gpu-logs}
WHEELS=${WHEELS:-.gpu-wheels}
SITE=${SITE:-/tmp/vitscale-gpu-site}
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1

dry=0
steps=()
for arg in "$@"; do
    case $arg in
        --dry-run-cpu) dry=1 ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "bench-gpu.sh: unknown option $arg (options: --dry-run-cpu)" >&2; exit 2 ;;
        *) steps+=("$arg") ;;
    esac
done
[ ${#steps[@]} -gt 0 ] || steps=(ds-b16 ds-l16 torch loader)

if ((dry)); then  # the same steps on the CPU: DeepSpeed's CPU accelerator, a 16-px debug model, dynamo
    # tracing without code generation (inductor's C++ build would take minutes on a small CPU)
    export DS_ACCELERATOR=cpu
    B16=mu/4:2 L16=mu/4:4 L16_BIG=mu/4:4
    GPU_ARGS=(--device cpu --img 16 --seconds 0.3 --warmup 1 --peak-tflops 1 --compile-backend eager)
    LOADER_ARGS=(--images 48 --short-side 48 --img-size 32 --batch 8 --batches 2 --rounds 1)
else
    B16=B/16:256 L16=L/16:128 L16_BIG=L/16:256
    GPU_ARGS=(--seconds 6)
    LOADER_ARGS=(--images 512 --batches 12 --rounds 1)
fi
mkdir -p "$LOGS"
rm -f "$LOGS"/*.json "$LOGS"/*.rc "$LOGS"/*.txt "$LOGS"/*.count
start=$SECONDS

run() {  # run NAME LIMIT_S COMMAND...: one step, its output shown and kept, its exit code in $LOGS/NAME.rc
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET_S - (SECONDS - start)))
    if ((left < 10)); then
        echo "=== $name: skipped, the ${BUDGET_S}s budget is spent"
        echo skipped > "$LOGS/$name.rc"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | grep --line-buffered -v -e '^\[20' -e 'Warning' | tee "$LOGS/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "$rc" > "$LOGS/$name.rc"
    echo "=== $name: exit $rc after $((SECONDS - start))s in all"
}

bench() {  # bench NAME LIMIT_S ARGS...: vitscale bench train --gpu, figures to $LOGS/NAME.json
    local name=$1 limit=$2
    shift 2
    run "$name" "$limit" "$PY" -m pipelines.bench.train --gpu "${GPU_ARGS[@]}" --json "$LOGS/$name.json" "$@"
}

wheels() {
    local found=("$WHEELS"/*.whl)
    if [ ! -e "${found[0]}" ]; then
        echo "=== wheels: none in $WHEELS/ (make gpu-wheels); using what $PY has"
        echo "none" > "$LOGS/wheels.rc"
    else
        run wheels 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${found[@]}"
        echo "${#found[@]}" > "$LOGS/wheels.count"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # find_spec, not import: importing DeepSpeed takes seconds, and the steps below do it anyway
    "$PY" -c 'import importlib.util as u, sys
missing = [m for m in ("deepspeed", "webdataset", "pydantic", "hjson", "braceexpand") if not u.find_spec(m)]
sys.exit(f"missing: {missing}: make gpu-wheels, and carry .gpu-wheels" if missing else 0)' \
        || echo "missing" > "$LOGS/wheels.rc"
}

"$PY" -c 'import os, torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device", "|", os.cpu_count(), "CPUs")' \
    | tee "$LOGS/machine.txt"
wheels
for step in "${steps[@]}"; do
    case $step in
        wheels) ;;
        ds-b16) bench ds-b16 105 --engine deepspeed --stage 1 --compile on --cases "$B16" ;;
        ds-l16) bench ds-l16 135 --engine deepspeed --stage 1 --compile on --cases "$L16" ;;
        torch) bench torch 165 --engine torch --compile on --cases "$B16,$L16" ;;
        loader) run loader 60 "$PY" -m pipelines.bench.loader "${LOADER_ARGS[@]}" --json "$LOGS/loader.json" ;;
        profile) bench profile 150 --engine deepspeed --stage 0 --compile on --cases "$L16_BIG" --profile 3 ;;
        model) bench model 150 --engine torch --compile model --cases "$L16_BIG" ;;
        autotune) bench autotune 180 --engine torch --compile on --cases "$L16_BIG" \
            --compile-mode max-autotune-no-cudagraphs ;;
        *) echo "bench-gpu.sh: no step $step (steps: wheels ds-b16 ds-l16 torch loader profile model autotune)" >&2
           exit 2 ;;
    esac
done

"$PY" - "$LOGS" "$((SECONDS - start))" "$BUDGET_S" wheels "${steps[@]}" << 'EOF'
import json
import math
import sys
from pathlib import Path

logs, elapsed, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
steps = list(dict.fromkeys(sys.argv[4:]))  # wheels once, first


def status(step):
    rc_file = logs / f"{step}.rc"
    rc = rc_file.read_text().strip() if rc_file.exists() else "not run"
    if step == "wheels":
        count = (logs / "wheels.count").read_text().strip() if (logs / "wheels.count").exists() else "0"
        return {"0": f"ok ({count} wheels)", "none": "ok (no wheels: installed)",
                "missing": "MISSING PACKAGES"}.get(rc, f"failed (exit {rc})"), rc in ("0", "none")
    if rc == "0":
        return "ok", True
    if rc in ("124", "137"):
        return "time limit", False
    if rc in ("skipped", "not run"):
        return rc, False
    return f"failed (exit {rc})", False


def number(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) and not math.isnan(value) else "-"


print(f"\n=== summary: {(logs / 'machine.txt').read_text().strip()}; {elapsed} s of the {budget} s budget")
print(f"{'step':9s}{'status':19s}{'case':28s}{'batch':>6s}{'images/s':>10s}{'TFLOP/s':>9s}{'MFU':>7s}{'peak GiB':>9s}")
all_ok = True
for step in steps:
    text, ok = status(step)
    all_ok &= ok
    figures = logs / f"{step}.json"
    rows = json.loads(figures.read_text()) if figures.exists() else []
    if step == "loader" and rows:
        rows = [{"case": name, "img_per_s": rate} for name, rate in rows["images_per_s_per_core"].items()]
        text += " (per core)"
    if not rows:
        print(f"{step:9s}{text}")
    for i, r in enumerate(rows):
        print(f"{step if i == 0 else '':9s}{text if i == 0 else '':19s}{r['case'][:27]:28s}"
              f"{number(r.get('batch'), 'd'):>6s}{number(r.get('img_per_s'), ',.1f'):>10s}"
              f"{number(r.get('tflops'), '.1f'):>9s}{number(r.get('mfu'), '.1%'):>7s}{number(r.get('mem_gib'), '.1f'):>9s}")
print(f"logs: {logs}/STEP.txt")
sys.exit(0 if all_ok else 1)
EOF
