#!/usr/bin/env bash
# One check of fastalex on a CUDA machine, offline, in under 8 minutes:
#
#     benchmarks/gpu_check.sh OUTDIR
#
# 1. records the machine (nvidia-smi, versions of torch/DALI/simplejpeg/...) and says what is missing;
# 2. installs this checkout with `pip install --no-deps -e .` (nothing is downloaded; if pip cannot
#    build offline the package is used from the source tree through PYTHONPATH instead);
# 3. runs `pytest -m gpu`;
# 4. runs `benchmarks/throughput.py --device cuda` on a synthetic stand-in, writing
#    OUTDIR/throughput.json (rewritten after every row) and OUTDIR/throughput.jsonl (the rows as
#    throughput.py records them: append it to benchmarks/results/throughput.jsonl to keep them).
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
[ "$limit" -gt "$PYTEST_S" ] && limit=$PYTEST_S
step pytest-gpu "$limit" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider
case $? in
    0) ;;
    5) log "pytest-gpu: no test is marked gpu (nothing ran)" ;;
    *) FAILED=1 ;;
esac

# GPU_CHECK_THROUGHPUT_ARGS: extra options, e.g. "--repeats 3" or "--only model" (later ones win).
# shellcheck disable=SC2086
step throughput $(($(left) - 5)) "$PY" benchmarks/throughput.py --device cuda \
    --json "$OUT/throughput.json" --record-to "$OUT/throughput.jsonl" ${GPU_CHECK_THROUGHPUT_ARGS:-} || FAILED=1
if [ -f "$OUT/throughput.json" ]; then
    "$PY" - "$OUT/throughput.json" <<'EOF' | tee -a "$OUT/gpu_check.log"
import json, sys
result = json.load(open(sys.argv[1]))
print(f"throughput.json: {len(result['rows'])} rows, complete={result['complete']}")
for row in result["rows"]:
    rate = f"{row['images_per_s']:.0f} img/s" if row["images_per_s"] else row["note"]
    print(f"  {row['group']:<7} {row['name']:<14} {row['image_size'] or '':>4} {rate}")
EOF
fi

log "done in $((SECONDS - START))s: $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
