#!/usr/bin/env bash
# One check of fastalex on a CUDA machine, offline, in under 8 minutes:
#
#     benchmarks/gpu_check.sh OUTDIR
#
# In order, most telling first, so a short lease still answers the first questions:
# 1. records the machine (nvidia-smi, versions of torch/DALI/simplejpeg/...) and says what is missing;
# 2. installs this checkout with `pip install --no-deps -e .` (nothing is downloaded; if pip cannot
#    build offline the package is used from the source tree through PYTHONPATH instead);
# 3. smoke (benchmarks/gpu_smoke.py): 3 training steps on CUDA for each AMP mode (fp16, and bf16
#    where native) and each loader, compile off, in one process: one line each;
# 4. `benchmarks/throughput.py --device cuda` on a synthetic stand-in, one run per slice in this
#    order: model + e2e at 64 px (model and e2e rows use the same batch of 256, so the e2e row's
#    compile is served by inductor's on-disk cache of the model row's), loader at 64 px, everything
#    at 227 px, then pack. Each slice appends its rows to OUTDIR/throughput.jsonl (as
#    throughput.py records them: append it to benchmarks/results/throughput.jsonl to keep them)
#    and writes OUTDIR/throughput-<slice>.json;
# 5. `pytest -m gpu` with the time left (CUDA train + resume per AMP mode and loader, DALI's GPU
#    hand-off lifetime, NCCL when 2 GPUs are visible). The gpu tests collect without simplejpeg:
#    those that need a pack skip, saying why.
#
# Runs unchanged without DALI (its rows are skipped, with the reason) and says so when simplejpeg
# is missing. Every step has a timeout inside the overall budget (GPU_CHECK_BUDGET_S, default 470 s);
# each step's log is in OUTDIR, the summary in OUTDIR/gpu_check.log. Exit status: 0 when every step
# passed, 1 otherwise.
set -u
set -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
PYTEST_S=${GPU_CHECK_PYTEST_S:-150}
PY=${PYTHON:-$(command -v python3 || command -v python)}
START=$SECONDS
FAILED=0

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
step() {  # step NAME SECONDS CMD...: run CMD under a timeout, log to OUT/NAME.log; returns its status
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 20 ]; then
        log "$name: SKIPPED (only ${limit}s of the budget left)"
        return 124
    fi
    log "$name: start (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        log "$name: ok"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        log "$name: TIMED OUT after ${limit}s (partial output in $OUT/$name.log)"
    else
        log "$name: exit $rc (see $OUT/$name.log)"
    fi
    return $rc
}

: >"$OUT/gpu_check.log"
log "python: $PY; checkout: $(pwd); git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{ nvidia-smi || echo "nvidia-smi failed"; } >"$OUT/nvidia-smi.txt" 2>&1
"$PY" -W ignore - >"$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, platform, sys
print("python", sys.version.replace("\n", " "), platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("nvidia.dali", "simplejpeg", "PIL", "numpy", "click", "tqdm", "pytest", "matplotlib", "webdataset"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:  # report and go on: this file is the inventory
        print(name, "MISSING", f"({type(e).__name__}: {e})")
EOF
log "environment: $(tr '\n' ';' <"$OUT/environment.txt")"
if ! "$PY" -c "import simplejpeg" 2>/dev/null; then
    log "simplejpeg is NOT installed: fastalex pack (and the loaders that decode with it) cannot run;" \
        "the rows that need packed data will be skipped with that reason. Install the simplejpeg wheel to fix."
fi
if ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
    log "nvidia.dali is NOT installed: DALI tests and rows are skipped (with the reason)."
fi

if ! step install 120 "$PY" -m pip install --no-deps --no-input -e .; then
    log "retrying the install without build isolation (offline: setuptools from this environment)"
    if ! step install-no-isolation 120 "$PY" -m pip install --no-deps --no-input --no-build-isolation -e .; then
        log "install failed: using the source tree through PYTHONPATH instead"
        export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

limit=$(left)
[ "$limit" -gt 90 ] && limit=90
step smoke "$limit" "$PY" benchmarks/gpu_smoke.py || FAILED=1
grep '^smoke' "$OUT/smoke.log" | tee -a "$OUT/gpu_check.log"

# GPU_CHECK_THROUGHPUT_ARGS: extra options for every slice, e.g. "--repeats 3" (later ones win).
throughput_slice() {  # throughput_slice NAME SECONDS ARGS...
    local name=$1 limit=$2
    shift 2
    # shellcheck disable=SC2086
    step "throughput-$name" "$limit" "$PY" benchmarks/throughput.py --device cuda "$@" \
        --json "$OUT/throughput-$name.json" --record-to "$OUT/throughput.jsonl" \
        ${GPU_CHECK_THROUGHPUT_ARGS:-} || FAILED=1
    [ -f "$OUT/throughput-$name.json" ] || return 0
    "$PY" - "$OUT/throughput-$name.json" <<'EOF' | tee -a "$OUT/gpu_check.log"
import json, sys
result = json.load(open(sys.argv[1]))
for row in result["rows"]:
    rate = f"{row['images_per_s']:.0f} img/s" if row["images_per_s"] else row["note"]
    print(f"  {row['group']:<7} {row['name']:<14} {row['image_size'] or '':>4} {rate}")
EOF
}
throughput_slice model-e2e-64 $(($(left) * 2 / 5)) --only model --only e2e --image-size 64
throughput_slice loader-64 $(($(left) / 4)) --only loader --image-size 64
throughput_slice all-227 $(($(left) / 3)) --only model --only e2e --only loader --image-size 227
throughput_slice pack $(($(left) / 4)) --only pack

limit=$(($(left) - 5))
[ "$limit" -gt "$PYTEST_S" ] && limit=$PYTEST_S
step pytest-gpu "$limit" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider
case $? in
    0) ;;
    5) log "pytest-gpu: no test is marked gpu (nothing ran)" ;;
    *) FAILED=1 ;;
esac

log "done in $((SECONDS - START))s: $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
