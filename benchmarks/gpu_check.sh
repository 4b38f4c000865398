#!/usr/bin/env bash
# The device check in one call: the CUDA tests, the integration benchmark against pyFAI (with the
# host-to-device copy against the raw PCIe bandwidth), the fit benchmark against curve_fit, and
# `scatterflow bench` at Eiger 1M and 4M, then ONE table (step, figure, unit, goal, met?).
#
#   bash benchmarks/gpu_check.sh                               # on the GPU machine, .whl carried
#   GPU_CHECK_QUICK=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh   # quick CPU mode (or --quick)
#
# Each step runs under its own `timeout`, cut further so that the whole script ends within
# GPU_CHECK_BUDGET seconds (default 450, under the 8 minutes the issue allows) even when a step
# hangs; a failed step is a FAILED row with its reason, and the script goes on. Raw logs and
# JSON go to $WORK (default /tmp/gpu_check); where $OUT is set (the device tool) the table, the
# concatenated logs and the JSON figures are copied there as 3 files (the tool returns at most 8).
# The wheels: benchmarks/gpu_wheels.sh (cp312, the device's Python), installed to /tmp/site.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
[ "${1:-}" = "--quick" ] && QUICK=1
BUDGET=${GPU_CHECK_BUDGET:-450}
WORK=${WORK:-/tmp/gpu_check}
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
START=$SECONDS

# sizes: the full check on the GPU, a quick one (same steps, small sizes) on the CPU
if [ "$QUICK" = 1 ]; then
    DEVICE=${GPU_CHECK_DEVICE:-cpu}
    INT_BATCH=4; INT_REPS=3
    FIT_QUICK=--quick
    E2E_1M=(--frames 30 --rate 20 --warmup 4); E2E_4M=(--frames 10 --rate 5 --warmup 2)
    T_TESTS=90; T_INT=90; T_FIT=120; T_E2E=150
else
    DEVICE=${GPU_CHECK_DEVICE:-cuda}
    INT_BATCH=128; INT_REPS=10
    FIT_QUICK=
    # requested rate = the 2.5 Gpixel/s goal (Eiger1M 1.097 Mpx, Eiger4M 4.486 Mpx); frames for
    # 0.7 s of it, so that a service 20x slower than the goal still drains them within the limit
    E2E_1M=(--frames 1500 --rate 2280 --warmup 16); E2E_4M=(--frames 400 --rate 560 --warmup 8)
    T_TESTS=100; T_INT=90; T_FIT=120; T_E2E=100
fi
E2E_MODE=${GPU_CHECK_E2E_MODE:-inline}

# run_step NAME LIMIT CMD...: CMD under `timeout` (LIMIT s, less if the budget is nearly spent),
# output in $WORK/NAME.log, exit status in $WORK/NAME.rc ("skipped" when no time is left)
run_step() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - (SECONDS - START) - 15))      # 15 s kept for the table
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "skipped: no time left in the ${BUDGET} s budget" >"$WORK/$name.log"
        echo skipped >"$WORK/$name.rc"
        echo "== $name: skipped (budget spent)"
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$WORK/$name.rc"
    echo "$limit" >"$WORK/$name.limit"
    echo "   rc $rc after $((SECONDS - t0)) s"
}

# 1. the carried wheels (cp312: only for the device's Python 3.12) into /tmp/site
if ls .whl/*.whl >/dev/null 2>&1 && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "== wheels: $(ls .whl/*.whl | wc -l) from .whl into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$WORK/wheels.log" 2>&1
    echo $? >"$WORK/wheels.rc"
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    echo "not installed: no .whl/*.whl, or $PY is not Python 3.12" >"$WORK/wheels.log"
    echo skipped >"$WORK/wheels.rc"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. the machine: nvidia-smi, torch and CUDA, which optional packages import
run_step env 60 bash -c 'command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
    "$0" benchmarks/gpu_check_table.py --env "$1"' "$PY" "$WORK/env.json"

# 3. the CUDA tests: every test file with a @pytest.mark.gpu test, only those tests (-m gpu)
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py)
run_step tests "$T_TESTS" env SCATTERFLOW_TEST_HARD_EXIT=0 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    -o addopts="" --timeout 60 --continue-on-collection-errors -rfEs --junitxml="$WORK/tests.xml" $GPU_TESTS

# 4. integration, Eiger1M: ours on the device (frames there, and from pinned memory with the copy)
#    against pyFAI's CSR on the CPU cores, and the raw pinned host-to-device bandwidth
run_step integrate "$T_INT" "$PY" benchmarks/bench_integrate.py --detectors Eiger1M --batch "$INT_BATCH" \
    --reps "$INT_REPS" --device "$DEVICE" --json "$WORK/integrate.json"

# 5. fits: benchmarks/bench_fit.py as it is (3 pseudo-Voigt + line, 1000 points) against curve_fit
run_step fit "$T_FIT" "$PY" benchmarks/bench_fit.py --device "$DEVICE" $FIT_QUICK

# 6. end to end: `scatterflow bench` (0MQ proxy, service, worker) without Tiled (not on the device);
#    its frame pool (70 MB, 280 MB) in $WORK, removed by the next run
run_step e2e_Eiger1M "$T_E2E" "$PY" -m service.cli bench --detector Eiger1M --mode "$E2E_MODE" --no-tiled \
    "${E2E_1M[@]}" --json "$WORK/e2e_Eiger1M.json" --workdir "$WORK/e2e_Eiger1M"
run_step e2e_Eiger4M "$T_E2E" "$PY" -m service.cli bench --detector Eiger4M --mode "$E2E_MODE" --no-tiled \
    "${E2E_4M[@]}" --json "$WORK/e2e_Eiger4M.json" --workdir "$WORK/e2e_Eiger4M"

# 7. the one table (stdout and $WORK/gpu_check.md), then the files for the device tool's $OUT
echo "== total $((SECONDS - START)) s"
QUICK=$QUICK "$PY" benchmarks/gpu_check_table.py "$WORK" "$((SECONDS - START))"
if [ -n "${OUT:-}" ]; then
    cp "$WORK/gpu_check.md" "$OUT/" 2>/dev/null
    for s in wheels env tests integrate fit e2e_Eiger1M e2e_Eiger4M; do
        echo "===== $s (rc $(cat "$WORK/$s.rc" 2>/dev/null))"; cat "$WORK/$s.log" 2>/dev/null
    done >"$OUT/gpu_check.log"
    "$PY" -c 'import glob, json, os, sys
d = {}
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        d[os.path.basename(p)[:-5]] = json.load(open(p))
    except ValueError as exc:
        d[os.path.basename(p)[:-5]] = str(exc)
json.dump(d, open(sys.argv[2], "w"), indent=1)' "$WORK" "$OUT/gpu_check.json"
fi
exit 0
