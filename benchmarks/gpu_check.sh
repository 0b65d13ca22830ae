#!/usr/bin/env bash
# One check of fastalex on the lent CUDA machine, offline, in <= 300 s of script time (the lease is
# 15 min in all, cold start included, so this leaves room for one rerun). That machine has Python
# 3.12, torch with CUDA, numpy, pillow, click, tqdm and pytest; no simplejpeg, no DALI (never: ~800
# MB), no webdataset, no matplotlib, no network.
#
# BEFORE THE LEASE, once, in the checkout that the device call sends (.whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_17_x86_64 -d .whl simplejpeg==1.9.0
# It saves .whl/simplejpeg-1.9.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.
# manylinux_2_28_x86_64.whl (one file name; 407,547 bytes), which needs only numpy.
#
# THE DEVICE CALL (the `run` tool), exactly:
#     command:   bash benchmarks/gpu_check.sh
#     carry:     [".whl"]
#     timeout_s: 360
# Everything comes back as two files in $OUT: gpu_check.log (the summary) and gpu_check.tar.gz
# (every step's log, pytest's junit XML, each throughput slice's JSON and their rows in
# throughput.jsonl: append those to benchmarks/results/throughput.jsonl to keep them). Both are
# rewritten after every step and by an EXIT trap, so a timeout still returns what was done.
#
# Steps, most telling first:
#  1. simplejpeg from .whl/ (pip --no-index --no-deps --target a temp dir); the checkout through
#     PYTHONPATH (no pip install: no build isolation to stall offline); then records the machine
#     (nvidia-smi, versions) with `timeout` around every probe;
#  2. one synthetic pack (200 classes x 64 train + 8 val), passed to every later step;
#  3. smoke (gpu_smoke.py smoke): 3 CUDA training steps per AMP mode and loader; `dali` is
#     SKIPPED with its one-line error where DALI does not import, not a failure;
#  4. `pytest -m "gpu and not slow"`, failed when nothing ran (gpu_smoke.py verdict);
#  5. throughput.py --device cuda --repeats 3 --data/--tree the pack: model + e2e at 64 px, loader
#     at 64 px, then everything at 227 px last (cold compile of the larger model). No pack slice
#     (packing never touches the GPU).
# Exit status 0 when every step passed; skips (DALI, FFCV) are listed, not failures.
#
# REHEARSAL on a CPU box (CUDA faked absent; a small pack, --quick rows, amp off): a .whl/ wheel
# for the rehearsing Python (the same download with --python-version 3.11 for 3.11), then
#     CUDA_VISIBLE_DEVICES= GPU_CHECK_REHEARSAL=1 PYTHON=/tmp/gpuvenv/bin/python \
#         bash benchmarks/gpu_check.sh /tmp/gpu_check_out
# Other knobs: OUTDIR as $1 (default $OUT), GPU_CHECK_BUDGET_S (300; rehearsal 900),
# GPU_CHECK_THROUGHPUT_ARGS (extra options for every slice), PYTHON.
set -u
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TQDM_DISABLE=1

OUTDIR=${1:-${OUT:?usage: bash benchmarks/gpu_check.sh [OUTDIR] (default \$OUT)}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd)
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
if [ "$REHEARSAL" = 1 ]; then
    BUDGET_S=${GPU_CHECK_BUDGET_S:-900}
    DEVICE=cpu
    STANDIN=(--classes 4 --train-per-class 32 --val-per-class 8)
    SLICE_ARGS=(--quick)
    SCALE=4  # step caps x4: a shared 2-core box is far slower than the lent machine
else
    BUDGET_S=${GPU_CHECK_BUDGET_S:-300}
    DEVICE=cuda
    STANDIN=(--classes 200 --train-per-class 64 --val-per-class 8)
    SLICE_ARGS=(--repeats 3)
    SCALE=1
fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOGS=$WORK/gpu_check
mkdir -p "$LOGS"
START=$SECONDS
FAILED=()
SKIPPED=()

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$LOGS/gpu_check.log"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
cap() {  # cap SECONDS [DIVISOR]: min(SECONDS x SCALE, what is left / DIVISOR)
    local c=$(($1 * SCALE)) l=$(($(left) / ${2:-1}))
    echo $((c < l ? c : l))
}
snapshot() {  # the logs so far into OUTDIR: one tar + the summary (the device returns 8 files)
    tar -czf "$OUTDIR/gpu_check.tar.gz.part" -C "$WORK" gpu_check 2>/dev/null &&
        mv "$OUTDIR/gpu_check.tar.gz.part" "$OUTDIR/gpu_check.tar.gz"
    cp "$LOGS/gpu_check.log" "$OUTDIR/gpu_check.log" 2>/dev/null
}
finish() {
    local rc=$?
    if [ ${#FAILED[@]} -eq 0 ] && [ "$rc" -eq 0 ]; then
        log "done in $((SECONDS - START))s: every step passed${SKIPPED[*]:+; skipped: ${SKIPPED[*]}}"
    else
        log "done in $((SECONDS - START))s: SOME STEPS FAILED: ${FAILED[*]:-exit $rc}" \
            "${SKIPPED[*]:+; skipped: ${SKIPPED[*]}}"
    fi
    snapshot
    rm -rf "$WORK"
}
trap finish EXIT
trap 'log "interrupted"; exit 130' INT TERM
step() {  # step NAME SECONDS CMD...: CMD under a timeout, output in LOGS/NAME.log; its status
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 15 ]; then
        log "$name: NOT RUN (only ${limit}s of the budget left)"
        return 124
    fi
    log "$name: start (timeout ${limit}s): $*"
    timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        log "$name: ok"
    else
        [ $rc -eq 124 ] || [ $rc -eq 137 ] && log "$name: TIMED OUT after ${limit}s" ||
            log "$name: exit $rc"
        tail -n 25 "$LOGS/$name.log" | sed "s/^/    $name| /"
    fi
    snapshot
    return $rc
}

# 1. simplejpeg from the carried wheel, before anything imports fastalex.
SITE=$WORK/site
if ls .whl/simplejpeg-*.whl >/dev/null 2>&1; then
    if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" --find-links .whl simplejpeg \
        >"$LOGS/install.log" 2>&1; then
        log "simplejpeg installed from .whl/: $(cd "$SITE" && echo simplejpeg-*.dist-info)"
    else
        log "simplejpeg: no wheel in .whl/ installs here (see install.log)"
    fi
else
    log "simplejpeg: no .whl/simplejpeg-*.whl carried (the header says how to fetch it)"
fi
export PYTHONPATH="$SITE:$CHECKOUT${PYTHONPATH:+:$PYTHONPATH}"
log "mode: $([ "$REHEARSAL" = 1 ] && echo 'REHEARSAL (CPU, quick settings)' || echo 'CUDA');" \
    "python $PY; budget ${BUDGET_S}s; checkout $CHECKOUT;" \
    "git $(timeout 5 git rev-parse --short HEAD 2>/dev/null || echo '?')"
{ timeout 20 nvidia-smi || echo "nvidia-smi failed or absent"; } >"$LOGS/nvidia-smi.txt" 2>&1
timeout 90 "$PY" -W ignore - "$DEVICE" >"$LOGS/environment.txt" 2>&1 <<'EOF'
import importlib, platform, sys
print("python", sys.version.replace("\n", " "), platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("simplejpeg", "nvidia.dali", "PIL", "numpy", "click", "tqdm", "pytest", "fastalex"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:  # report and go on: this file is the inventory
        print(name, "MISSING", f"({type(e).__name__}: {e})")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
EOF
env_rc=$?
log "environment: $(tr '\n' ';' <"$LOGS/environment.txt")"
if [ $env_rc -ne 0 ]; then
    FAILED+=("environment")
    log "environment probe failed (exit $env_rc): the CUDA steps below will fail"
fi
if grep -q "^simplejpeg MISSING" "$LOGS/environment.txt"; then
    FAILED+=("simplejpeg")
    log "simplejpeg does NOT import: no pack can be made; every step that needs one fails"
fi
grep -q "^nvidia.dali MISSING" "$LOGS/environment.txt" && SKIPPED+=("dali(not-installed)")

# 2. One pack for every later step.
DATA=$WORK/data
if step pack "$(cap 120)" bash -c "'$PY' -m fastalex synth '$DATA/tree' ${STANDIN[*]} &&
        '$PY' -m fastalex pack '$DATA/tree' '$DATA/shards' --shard-size 5000"; then
    DATA_ARGS=(--data "$DATA/shards" --tree "$DATA/tree")
else
    FAILED+=("pack")
    DATA_ARGS=()
fi

# 3. Smoke: train steps on the device, each loader and AMP mode.
if [ ${#DATA_ARGS[@]} -gt 0 ]; then
    step smoke "$(cap 90)" "$PY" benchmarks/gpu_smoke.py smoke --data "$DATA/shards" \
        --device "$DEVICE" || FAILED+=("smoke")
    grep '^smoke' "$LOGS/smoke.log" | tee -a "$LOGS/gpu_check.log"
fi

# 4. The quick CUDA tests (the compiled, slow ones do not fit the lease).
step pytest-gpu "$(cap 90)" "$PY" -m pytest -m "gpu and not slow" -q -rs -p no:cacheprovider \
    --junitxml "$LOGS/pytest-gpu.xml"
pytest_rc=$?
if [ -f "$LOGS/pytest-gpu.xml" ]; then
    "$PY" benchmarks/gpu_smoke.py verdict "$LOGS/pytest-gpu.xml" \
        $([ "$REHEARSAL" = 1 ] && echo --rehearsal) | tee -a "$LOGS/gpu_check.log"
    verdict_rc=$?
else
    log "pytest-gpu: no junit report (pytest exit $pytest_rc)"
    verdict_rc=1
fi
[ $pytest_rc -eq 0 ] && [ $verdict_rc -eq 0 ] || FAILED+=("pytest-gpu")

# 5. Throughput, the 227 px slice last.
throughput_slice() {  # throughput_slice NAME SECONDS ARGS...
    local name=$1 limit=$2
    shift 2
    # shellcheck disable=SC2086
    step "throughput-$name" "$limit" "$PY" benchmarks/throughput.py --device "$DEVICE" \
        "${DATA_ARGS[@]}" "${SLICE_ARGS[@]}" "$@" --json "$LOGS/throughput-$name.json" \
        --record-to "$LOGS/throughput.jsonl" ${GPU_CHECK_THROUGHPUT_ARGS:-} ||
        FAILED+=("throughput-$name")
    [ -f "$LOGS/throughput-$name.json" ] || return 0
    "$PY" - "$LOGS/throughput-$name.json" <<'EOF' | tee -a "$LOGS/gpu_check.log"
import json, sys
result = json.load(open(sys.argv[1]))
for row in result["rows"]:
    rate = f"{row['images_per_s']:.0f} img/s" if row["images_per_s"] else row["note"]
    print(f"  {row['group']:<7} {row['name']:<14} {row['image_size'] or '':>4} {rate}")
EOF
    snapshot
}
# Caps: at most half of what is left for model + e2e (two cold compiles at 64 px), a third of the
# rest for the loaders, and the 227 px slice (a cold compile of the larger model) all the rest.
throughput_slice model-e2e-64 "$(cap 110 2)" --only model --only e2e --image-size 64
throughput_slice loader-64 "$(cap 50 3)" --only loader --image-size 64
throughput_slice all-227 $(($(left) - 5)) --only loader --only model --only e2e --image-size 227
for json in "$LOGS"/throughput-*.json; do
    [ -f "$json" ] && grep -q '"status": "skipped"' "$json" || continue
    SKIPPED+=("$(basename "$json" .json):$(grep -c '"status": "skipped"' "$json")-rows")
done
[ ${#FAILED[@]} -eq 0 ]
