#!/usr/bin/env bash
# effkern's one-call GPU check: build, info, tests, compute-sanitizer, benchmarks.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# For the lent GPU machine (H100/H200, torch 2.11+cu130, triton 3.6, nvcc 13.0, no internet),
# run from a copy of the working tree in one call, e.g. with the device tool:
#   EFFKERN_COMMIT=<sha> bash scripts/gpu_check.sh $OUT
#
# Steps (each logged to OUTDIR; a failing step does not stop the later ones):
#   build      pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=8.0;9.0a)  build.log
#   info       python -m effkern info                                                        info.txt
#   tests      python -m pytest tests/ --maxfail=25 -q -rs (CUDA tests included)                 tests.log
#   memcheck   compute-sanitizer --tool memcheck over the CUDA tests named sanitizer_smoke    sanitizer.log
#              (tests/test_cuda_sanitize.py: every CUDA kernel of the op registry, long rows included);
#              fails when a CUDA kernel the registry lists was not driven
#   racecheck  the same with EFFKERN_SANITIZE_SMALL=1 (smaller shapes; only if time allows)  sanitizer.log
#   bench-F    python bench/F.py --out OUTDIR for each benchmark family F       bench_F.log, F.csv/.md/.png
#              (integer, tokens, binary_hash; appends to bench/results/ in this tree and copies F.csv/.md/.png to OUTDIR)
#   pytest-bench-F  pytest bench/test_bench_F.py --benchmark-json=OUTDIR/bench_F.json   pytest_bench_F.log
# and prints a short summary last (the device tool returns only the last 12,000 characters).
#
# The whole script keeps to a time budget (GPU_CHECK_BUDGET_S, default 540 s): each step gets
# at most its cap and what the budget leaves after reserving time for the later steps; the
# benchmark families share the time left for them equally (each at most 240 s, the pytest-benchmark
# runs 180 s together) and fall back to --quick when little time is left; a step with no time left is
# reported as skipped. The exit status is non-zero when any step failed or timed out (steps
# skipped for lack of time or tools are listed in the summary; missed benchmark targets are
# reported, not failures; wrong benchmark results are failures).
#
# The device tool returns at most 8 files from $OUT: when OUTDIR holds more than
# GPU_CHECK_MAX_FILES (default 8; 0 = never), the least important logs are moved into
# OUTDIR/logs.tar.gz at the end.
#
# Environment: PYTHON (default python3), EFFKERN_COMMIT (recorded with the benchmark rows when
# git is unavailable), GPU_CHECK_BUDGET_S, GPU_CHECK_MAX_FILES, TORCH_CUDA_ARCH_LIST,
# GPU_CHECK_BENCH (the benchmark families to run, in order; default: every family of python -m effkern ops --families).
set -euo pipefail

if [[ $# -lt 1 || -z "${1:-}" ]]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
MAX_FILES=${GPU_CHECK_MAX_FILES:-8}
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$MAX_JOBS}
unset TRITON_INTERPRET EFFKERN_BACKEND
if [[ -z "${EFFKERN_COMMIT:-}" ]]; then
    EFFKERN_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
fi
export EFFKERN_COMMIT

STEPS=()    # "name|status|seconds|log" per step
# Benchmark families: the op registry's families (python -m effkern ops --families), bench/<family>.py each.
read -r -a FAMILIES <<<"${GPU_CHECK_BENCH:-$("$PY" -m effkern ops --families 2>/dev/null | tr '\n' ' ')}"
FAILED=0

left() { echo $((START + BUDGET - $(date +%s))); }

# timeout_for CAP RESERVE: seconds a step may take (<= CAP, leaving RESERVE for later steps)
timeout_for() {
    local cap=$1 reserve=$2 l
    l=$(($(left) - reserve))
    echo $((cap < l ? cap : l))
}

record() {  # record NAME STATUS SECONDS LOG
    STEPS+=("$1|$2|$3|$4")
    case $2 in
        PASS | SKIP*) ;;
        *) FAILED=1 ;;
    esac
    echo ">> $1: $2 (${3}s) -> ${4:-}"
}

# run_step NAME CAP RESERVE MIN LOG -- CMD...: run CMD with a timeout, output to LOG.
# Sets STEP_RC (124 = timed out, -1 = not run).
run_step() {
    local name=$1 cap=$2 reserve=$3 min=$4 log=$5
    shift 6
    local t t0 rc status
    t=$(timeout_for "$cap" "$reserve")
    STEP_RC=-1
    if ((t < min)); then
        record "$name" "SKIPPED (time budget: ${t}s left for it)" 0 ""
        return 0
    fi
    echo
    echo "== $name (timeout ${t}s, $(left)s of the budget left) $(date -u +%T)"
    t0=$(date +%s)
    if timeout -k 15 "$t" "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
    STEP_RC=$rc
    if ((rc == 0)); then
        status=PASS
    elif ((rc == 124 || rc == 137)); then
        status="TIMEOUT (${t}s)"
    elif ((rc == 5)) && grep -q -E "skipped|no tests ran" "$log"; then
        status="SKIP (pytest: nothing ran)"  # e.g. the benchmark module skipped itself without CUDA
    else
        status="FAIL (rc=$rc)"
    fi
    ((${TAIL_LINES:-6} > 0)) && tail -n "${TAIL_LINES:-6}" "$log" | sed 's/^/   | /'
    record "$name" "$status" $(($(date +%s) - t0)) "$(basename "$log")"
}

main() {
    echo "== effkern gpu_check $(date -u +%FT%TZ) host $(hostname) commit $EFFKERN_COMMIT budget ${BUDGET}s"
    echo "== tree $ROOT -> $OUTDIR"
    nvidia-smi || echo "nvidia-smi failed"
    { nvcc --version 2>/dev/null | tail -n 2; } || echo "nvcc not found"
    { cmake --version 2>/dev/null | head -n 1; } || echo "cmake not found"
    echo "ninja $(ninja --version 2>/dev/null || echo 'not found')"
    "$PY" - <<'EOF' || echo "python version probe failed"
import importlib, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  torch CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  cc {p.major}.{p.minor}  {p.multi_processor_count} SMs  "
          f"{p.total_memory / 2**30:.0f} GiB  L2 {getattr(p, 'L2_cache_size', 0) / 1e6:.0f} MB")
else:
    print("torch sees NO CUDA device")
for name in ("triton", "pytest", "pytest_benchmark", "matplotlib", "tabulate", "numpy"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"{name}: {type(e).__name__}")
EOF
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

    # ---- build ------------------------------------------------------------------------------
    run_step build 300 200 60 "$OUTDIR/build.log" -- \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    if [[ $STEP_RC != 0 ]]; then
        echo "   build failed: importing effkern from the source tree (no CUDA library)"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        grep -n -i -E "error|failed" "$OUTDIR/build.log" | head -n 20 | sed 's/^/   | /' || true
    fi

    # ---- info -------------------------------------------------------------------------------
    TAIL_LINES=0 run_step info 60 190 10 "$OUTDIR/info.txt" -- "$PY" -m effkern info
    sed 's/^/   /' "$OUTDIR/info.txt" 2>/dev/null | head -n 40 || true

    # ---- tests ------------------------------------------------------------------------------
    run_step tests 200 150 40 "$OUTDIR/tests.log" -- \
        "$PY" -m pytest tests/ --maxfail=25 -q -rs -p no:cacheprovider

    # ---- compute-sanitizer: every CUDA kernel the op registry lists --------------------------
    local san kernels
    san=$(command -v compute-sanitizer || true)
    [[ -z "$san" && -x /usr/local/cuda/bin/compute-sanitizer ]] && san=/usr/local/cuda/bin/compute-sanitizer
    kernels=$("${CUDA_KERNELS_CMD[@]}" 2>/dev/null | tr "\n" " " || true)
    if [[ -z "$san" ]]; then
        record memcheck "SKIP (compute-sanitizer not on PATH)" 0 ""
    elif [[ -z "$kernels" ]]; then
        record memcheck "FAIL (could not list the CUDA kernels: python -m effkern ops --backend cuda)" 0 ""
    else
        echo "   CUDA kernels (python -m effkern ops --backend cuda): $kernels"
        sanitize memcheck 120 150 45 "$san" 0 "$kernels"
        if (($(left) > 330)); then
            sanitize racecheck 75 150 45 "$san" 1 "$kernels"
        else
            record racecheck "SKIP (time budget)" 0 ""
        fi
    fi

    # ---- benchmarks: each family an equal share of the time left before pytest-benchmark -----
    local t cap quick fam i n=${#FAMILIES[@]}
    for ((i = 0; i < n; i++)); do
        fam=${FAMILIES[i]}
        cap=$((($(left) - 75) / (n - i)))
        ((cap > 240)) && cap=240
        t=$(timeout_for "$cap" 75)
        quick=()
        ((t < 150)) && quick=(--quick)
        run_step "bench-$fam" "$cap" 75 45 "$OUTDIR/bench_$fam.log" -- \
            "$PY" "bench/$fam.py" --out "$OUTDIR" --time-budget $((t > 60 ? t - 40 : 20)) "${quick[@]}"
    done

    # ---- pytest-benchmark: one run per family, sharing 180 s --------------------------------
    t=$(timeout_for 180 15)
    local bq=0 pstart
    ((t < 120)) && bq=1
    pstart=$(date +%s)
    for ((i = 0; i < n; i++)); do
        fam=${FAMILIES[i]}
        cap=$(((180 - ($(date +%s) - pstart)) / (n - i)))
        t=$(timeout_for "$cap" 15)
        export EFFKERN_BENCH_QUICK=$bq EFFKERN_BENCH_DEADLINE=$(($(date +%s) + t - 25))
        run_step "pytest-bench-$fam" "$cap" 15 40 "$OUTDIR/pytest_bench_$fam.log" -- \
            "$PY" -m pytest "bench/test_bench_$fam.py" -q -rs -p no:cacheprovider \
            --benchmark-json="$OUTDIR/bench_$fam.json" --benchmark-group-by=group \
            --benchmark-columns=min,median,max,rounds --benchmark-sort=name
    done
    unset EFFKERN_BENCH_QUICK EFFKERN_BENCH_DEADLINE

    summary
    pack_outdir
    return $FAILED
}

# The ops with a cuda kernel, from the op registry (one per line).
CUDA_KERNELS_CMD=("$PY" -m effkern ops --backend cuda)

# sanitize NAME CAP RESERVE MIN SANITIZER SMALL KERNELS: compute-sanitizer --tool NAME over the
# CUDA tests named sanitizer_smoke (EFFKERN_SANITIZE_SMALL=SMALL); every kernel in KERNELS must
# have passed its test_cuda_sanitize.py::test_cuda_sanitizer_smoke[<kernel>].
sanitize() {
    local name=$1 cap=$2 reserve=$3 min=$4 san=$5 small=$6 kernels=$7 log="$OUTDIR/sanitizer.log"
    local t t0 rc status run k missing=() skipped=()
    t=$(timeout_for "$cap" "$reserve")
    if ((t < min)); then
        record "$name" "SKIPPED (time budget)" 0 ""
        return 0
    fi
    echo
    echo "== $name (timeout ${t}s, $(left)s of the budget left) $(date -u +%T)"
    run=$(mktemp /tmp/effkern_sanitize_XXXX.log)
    t0=$(date +%s)
    if EFFKERN_SANITIZE_SMALL=$small PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 15 "$t" \
        "$san" --tool "$name" --error-exitcode 99 --print-limit 30 \
        "$PY" -m pytest tests/test_cuda_sanitize.py -m cuda -k sanitizer_smoke -v -rs -p no:cacheprovider \
        >"$run" 2>&1; then rc=0; else rc=$?; fi
    { echo "===== $name (EFFKERN_SANITIZE_SMALL=$small) ====="; cat "$run"; } >>"$log"
    for k in $kernels; do
        if grep -q -E "test_cuda_sanitizer_smoke\[$k\] PASSED" "$run"; then
            :
        elif grep -q -E "test_cuda_sanitizer_smoke\[$k\] SKIPPED" "$run"; then
            skipped+=("$k")
        else
            missing+=("$k")
        fi
    done
    if grep -q -E "Device not supported|Unable to find injection library|not supported on this" "$run"; then
        status="SKIP (compute-sanitizer cannot use this device)"
    elif ((rc == 124 || rc == 137)); then
        status="TIMEOUT (${t}s)"
    elif ((rc == 99)); then
        status="FAIL (sanitizer errors)"
    elif ((rc != 0)); then
        status="FAIL (rc=$rc)"
    elif ((${#skipped[@]} > 0 && ${#missing[@]} == 0)) && ! grep -q " PASSED" "$run"; then
        status="SKIP (the CUDA tests skipped: no GPU or no CUDA library)"
    elif ((${#missing[@]} + ${#skipped[@]} > 0)); then
        status="FAIL (not driven: ${missing[*]} ${skipped[*]})"
    else
        status=PASS
    fi
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^FAILED| in [0-9.]+s" "$run" | tail -n 4 | sed 's/^/   | /' || true
    rm -f "$run"
    record "$name" "$status" $(($(date +%s) - t0)) "sanitizer.log"
}

summary() {
    echo
    echo "=================================== SUMMARY ==================================="
    local fam
    for fam in "${FAMILIES[@]}"; do
        echo "-- benchmark $fam (bench_$fam.log, $fam.md):"
        if [[ -s "$OUTDIR/$fam.csv" ]]; then
            bench_summary "$OUTDIR/$fam.csv" 2>&1 || echo "(no benchmark table)"
            grep -E "^targets:|rows wrong" "$OUTDIR/bench_$fam.log" 2>/dev/null | tail -n 2 || true
        else
            echo "(no benchmark results)"
            tail -n 15 "$OUTDIR/bench_$fam.log" 2>/dev/null || true
        fi
    done
    echo
    echo "-- tests (tests.log):"
    grep -E "^(SKIPPED|FAILED|ERROR)" "$OUTDIR/tests.log" 2>/dev/null | cut -c1-160 | head -n 10 || true
    tail -n 1 "$OUTDIR/tests.log" 2>/dev/null || true
    echo "-- sanitizer:"
    grep -E "^=====|ERROR SUMMARY|RACECHECK SUMMARY|^FAILED| in [0-9.]+s" "$OUTDIR/sanitizer.log" 2>/dev/null | head -n 10 || true
    echo "-- pytest bench:"
    for fam in "${FAMILIES[@]}"; do
        tail -n 1 "$OUTDIR/pytest_bench_$fam.log" 2>/dev/null || true
    done
    echo
    printf "%-21s %-48s %6s  %s\n" step status sec log
    local s name status secs log
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name status secs log <<<"$s"
        printf "%-21s %-48s %6s  %s\n" "$name" "$status" "$secs" "$log"
    done
    echo "total $(($(date +%s) - START))s of ${BUDGET}s budget; commit $EFFKERN_COMMIT; outputs in $OUTDIR"
    if ((FAILED)); then echo "GPU CHECK: FAILED"; else echo "GPU CHECK: OK"; fi
}

bench_summary() {
    # The latest run in CSV $1: its compact table when short, else the rows off target (MISS,
    # WRONG, ERROR, N/A; at most 25) and the speedup summary (the tool returns the last 12,000 chars).
    "$PY" - "$1" <<'EOF'
import sys
sys.path.insert(0, ".")
from bench import report
from bench.common import fmt_num, text_table
runs = report.latest_runs(report.read_rows(sys.argv[1]))
gpu = max(runs, key=lambda g: runs[g][0].get("date", ""))
rows = runs[gpu]
r0 = rows[0]
print(f"== {gpu}  {r0.get('date')}  commit {r0.get('commit')}  mode {r0.get('mode')}  "
      f"copy {fmt_num(report._f(r0.get('copy_gbps')))} GB/s  {len(rows)} rows")
if len(rows) <= 40:
    print(report.table(rows, compact=True))
else:
    off = [r for r in rows if r.get("status") not in ("PASS", "-", "")]
    print(f"{len(off)} rows off target or failed{' (first 25)' if len(off) > 25 else ''}:")
    if off:
        print(report.table(off[:25], compact=True))
print(text_table(report.speedup_summary(rows), report.SUMMARY_HEADER))
EOF
}

pack_outdir() {
    # Keep at most MAX_FILES plain files in OUTDIR (the device tool returns 8): the most useful
    # stay loose, the rest go into logs.tar.gz.
    ((MAX_FILES > 0)) || return 0
    local keep=(gpu_check.log tests.log integer.csv tokens.csv binary_hash.csv integer.md tokens.md binary_hash.md build.log info.txt)
    local files n
    mapfile -t files < <(cd "$OUTDIR" && find . -maxdepth 1 -type f ! -name logs.tar.gz -printf '%f\n' | sort)
    n=${#files[@]}
    ((n <= MAX_FILES)) && return 0
    local loose=() f k
    for k in "${keep[@]}"; do
        [[ -f "$OUTDIR/$k" ]] && ((${#loose[@]} < MAX_FILES - 1)) && loose+=("$k")
    done
    local pack=()
    for f in "${files[@]}"; do
        [[ " ${loose[*]} " == *" $f "* ]] || pack+=("$f")
    done
    ((${#pack[@]})) || return 0
    tar -czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" "${pack[@]}" && (cd "$OUTDIR" && rm -f "${pack[@]}")
    echo "(OUTDIR had $n files; packed ${pack[*]} into logs.tar.gz)"
}

set -o pipefail
main 2>&1 | tee -a "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
