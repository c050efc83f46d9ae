#!/usr/bin/env bash
# effkern's one-call GPU check: build, tests, compute-sanitizer, benchmarks, in at most 6 minutes.
#
#   EFFKERN_COMMIT=<sha> bash scripts/gpu_check.sh OUTDIR
#
# For the lent GPU machine (one H100/H200; torch 2.11+cu130 and its triton, Python 3.12, nvcc 13.0,
# no internet), from a copy of the working tree, in ONE call of the device tool with timeout_s=330:
# the whole script keeps to GPU_CHECK_BUDGET_S (default 300 s), so that a rerun fits in the 15
# minutes of device time with the machine's start (a minute or two each) and its idle wait. Pass
# the commit (the copied tree has no .git): the benchmark rows record $EFFKERN_COMMIT.
#
# Stages, in order, each under `timeout` with its own cap and a reserve kept for the later stages
# (a stage with too little time left is reported SKIPPED); every stage writes its log into OUTDIR
# as it runs, and the benchmarks append each case's rows to OUTDIR/bench.csv as soon as the case
# is measured, so a timeout loses nothing already measured:
#   build      pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=8.0;9.0a)  build.log
#   info       python -m effkern info                                                        info.txt
#   tests      pytest, most informative first: the CUDA library's build test, the CUDA tests, the
#              Triton kernel tests, the registry and dispatch tests, the ops tests, the rest     tests.log
#   memcheck   compute-sanitizer --tool memcheck over tests/test_cuda_sanitize.py (every CUDA
#              kernel of the op registry); fails when a listed kernel was not driven          sanitizer.log
#   racecheck  the same with EFFKERN_SANITIZE_SMALL=1, only when time is left over            sanitizer.log
#   bench      python -m bench.runner <families> --timing quick: every family's --quick cases (the
#              target shapes) first, then the rest until the time is spent                   bench.log, bench.csv
#   pytest-bench  only with GPU_CHECK_PYTEST_BENCH=1: pytest bench/ --benchmark-json      pytest_bench_F.log/.json
#   models     only with GPU_CHECK_MODELS=1 (and timm): python -m effkern bench models --quick, the ViT
#              variants end to end (the benchmark step leaves it no time unless GPU_CHECK_BENCH
#              is narrowed)                                                         models.log, models.csv
# and a short summary last (the device tool returns the last 12,000 characters of the output and
# at most 8 files: the files above are 7). Back here, add the rows to bench/results/<family>.csv and
# regenerate the reports with:  python bench/report.py --append-from OUTDIR/bench.csv
#
# The exit status is non-zero when a stage failed or timed out (missed benchmark targets are
# reported, not failures; wrong benchmark results are failures).
#
# Environment: PYTHON (default python3), EFFKERN_COMMIT, GPU_CHECK_BUDGET_S, GPU_CHECK_MAX_FILES
# (default 8; 0 = never pack), TORCH_CUDA_ARCH_LIST, GPU_CHECK_BENCH (benchmark families, in order,
# comma- or space-separated; default every family of `python -m effkern ops --families`),
# GPU_CHECK_BENCH_ARGS (extra arguments for the benchmark, e.g. --no-compile or --ops ...),
# GPU_CHECK_PYTEST_BENCH=1, GPU_CHECK_MODELS=1.
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
BUDGET=${GPU_CHECK_BUDGET_S:-300}
MAX_FILES=${GPU_CHECK_MAX_FILES:-8}
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$MAX_JOBS}
unset TRITON_INTERPRET EFFKERN_BACKEND
if [[ -z "${EFFKERN_COMMIT:-}" ]]; then  # else the runner names the tree by a digest of its sources
    EFFKERN_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)
fi
export EFFKERN_COMMIT

# Seconds kept back for the stages after each one: the benchmarks get at least BENCH_MIN.
SUMMARY_S=15
BENCH_MIN=110
SAN_MIN=40
TESTS_MIN=30

STEPS=()    # "name|status|seconds|log" per stage
FAILED=0

left() { echo $((START + BUDGET - $(date +%s))); }

# timeout_for CAP RESERVE: seconds a stage may take (<= CAP, leaving RESERVE for later stages)
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

# run_step NAME CAP RESERVE MIN LOG -- CMD...: run CMD under `timeout`, its output to LOG as it
# runs. Sets STEP_RC (124 = timed out, -1 = not run).
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
    if timeout -k 10 "$t" "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
    STEP_RC=$rc
    if ((rc == 0)); then
        status=PASS
    elif ((rc == 124 || rc == 137)); then
        status="TIMEOUT (${t}s)"
    elif ((rc == 5)) && grep -q -E "skipped|no tests ran" "$log"; then
        status="SKIP (pytest: nothing ran)"
    else
        status="FAIL (rc=$rc)"
    fi
    ((${TAIL_LINES:-6} > 0)) && tail -n "${TAIL_LINES:-6}" "$log" | cut -c1-200 | sed 's/^/   | /'
    record "$name" "$status" $(($(date +%s) - t0)) "$(basename "$log")"
}

# The test files, most informative on a GPU first (the sanitizer stage runs test_cuda_sanitize.py).
ordered_tests() {
    local f seen=" " out=()
    for f in tests/test_cuda_build.py tests/test_*_cuda.py tests/test_*triton*kernels.py tests/test_registry.py \
        tests/test_dispatch.py tests/test_*_ops.py tests/test_*.py; do
        [[ -f "$f" && "$f" != tests/test_cuda_sanitize.py && "$seen" != *" $f "* ]] || continue
        seen+="$f "
        out+=("$f")
    done
    echo "${out[@]}"
}

main() {
    echo "== effkern gpu_check $(date -u +%FT%TZ) host $(hostname) commit ${EFFKERN_COMMIT:-'(none: tree digest)'} budget ${BUDGET}s"
    echo "== tree $ROOT -> $OUTDIR"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv || echo "nvidia-smi failed"
    { timeout 10 nvcc --version 2>/dev/null | tail -n 2; } || echo "nvcc not found"
    timeout 60 "$PY" - <<'EOF' || echo "python version probe failed"
import importlib, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  torch CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  cc {p.major}.{p.minor}  {p.multi_processor_count} SMs  "
          f"{p.total_memory / 2**30:.0f} GiB  L2 {getattr(p, 'L2_cache_size', 0) / 1e6:.0f} MB")
else:
    print("torch sees NO CUDA device")
for name in ("triton", "pytest", "pytest_timeout", "pytest_benchmark", "pynvml", "matplotlib"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as e:
        print(f"{name}: {type(e).__name__}")
EOF
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

    # ---- build ------------------------------------------------------------------------------
    # the build comes first (the CUDA tests and kernels need it): it may eat the sanitizer's share
    run_step build 150 $((TESTS_MIN + BENCH_MIN + SUMMARY_S)) 30 "$OUTDIR/build.log" -- \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    if [[ $STEP_RC != 0 ]]; then
        echo "   build failed: importing effkern from the source tree (no CUDA library)"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        grep -n -i -E "error|failed" "$OUTDIR/build.log" | head -n 20 | cut -c1-200 | sed 's/^/   | /' || true
    fi

    # ---- info -------------------------------------------------------------------------------
    TAIL_LINES=0 run_step info 30 $((TESTS_MIN + BENCH_MIN + SUMMARY_S)) 5 "$OUTDIR/info.txt" -- \
        "$PY" -m effkern info
    head -n 30 "$OUTDIR/info.txt" 2>/dev/null | cut -c1-200 | sed 's/^/   /' || true

    # ---- tests, most informative first --------------------------------------------------------
    local tests timeout_opt=()
    read -r -a tests <<<"$(ordered_tests)"
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout=120)  # a hang ends; slow tests pass
    run_step tests 90 $((SAN_MIN + BENCH_MIN + SUMMARY_S)) "$TESTS_MIN" "$OUTDIR/tests.log" -- \
        "$PY" -m pytest "${tests[@]}" --maxfail=25 -v --tb=short -rfEs -p no:cacheprovider "${timeout_opt[@]}"

    # ---- compute-sanitizer: every CUDA kernel the op registry lists --------------------------
    local san kernels
    san=$(command -v compute-sanitizer || true)
    [[ -z "$san" && -x /usr/local/cuda/bin/compute-sanitizer ]] && san=/usr/local/cuda/bin/compute-sanitizer
    kernels=$(timeout 60 "$PY" -m effkern ops --backend cuda 2>/dev/null | tr "\n" " " || true)
    if [[ -z "$san" ]]; then
        record memcheck "SKIP (compute-sanitizer not on PATH)" 0 ""
    elif [[ -z "$kernels" ]]; then
        record memcheck "FAIL (could not list the CUDA kernels: python -m effkern ops --backend cuda)" 0 ""
    else
        echo "   CUDA kernels (python -m effkern ops --backend cuda): $kernels"
        sanitize memcheck 60 $((BENCH_MIN + SUMMARY_S)) "$SAN_MIN" "$san" 0 "$kernels"
        if (($(left) > BENCH_MIN + SUMMARY_S + 150)); then
            sanitize racecheck 60 $((BENCH_MIN + SUMMARY_S + 60)) 30 "$san" 1 "$kernels"
        else
            record racecheck "SKIP (time budget)" 0 ""
        fi
    fi

    # ---- benchmarks: one process, every family's target shapes first -------------------------
    local fams t
    fams=${GPU_CHECK_BENCH:-$(timeout 60 "$PY" -m effkern ops --families 2>/dev/null | tr '\n' ',' || true)}
    fams=$(echo "$fams" | tr ' ' ',' | sed -e 's/,,*/,/g' -e 's/^,//' -e 's/,$//')
    [[ -z "$fams" ]] && fams=all
    t=$(timeout_for 100000 "$SUMMARY_S")
    local extra=()
    read -r -a extra <<<"${GPU_CHECK_BENCH_ARGS:-}"
    TAIL_LINES=3 run_step bench 100000 "$SUMMARY_S" 30 "$OUTDIR/bench.log" -- \
        "$PY" -m bench.runner "$fams" --timing quick --csv "$OUTDIR/bench.csv" --no-report \
        --time-budget $((t > 90 ? t - 45 : t / 2)) "${extra[@]}"

    # ---- pytest-benchmark (opt-in: it times the same cases again) ----------------------------
    if [[ "${GPU_CHECK_PYTEST_BENCH:-0}" == 1 ]]; then
        local fam
        for fam in ${fams//,/ }; do
            t=$(timeout_for 120 "$SUMMARY_S")
            export EFFKERN_BENCH_QUICK=1 EFFKERN_BENCH_DEADLINE=$(($(date +%s) + t - 20))
            run_step "pytest-bench-$fam" 120 "$SUMMARY_S" 40 "$OUTDIR/pytest_bench_$fam.log" -- \
                "$PY" -m pytest "bench/test_bench_$fam.py" -q -rs -p no:cacheprovider \
                --benchmark-json="$OUTDIR/pytest_bench_$fam.json" --benchmark-group-by=group \
                --benchmark-columns=min,median,max,rounds --benchmark-sort=name
        done
        unset EFFKERN_BENCH_QUICK EFFKERN_BENCH_DEADLINE
    fi

    # ---- the ViT variants end to end (opt-in: minutes of compiles; needs timm) ---------------
    if [[ "${GPU_CHECK_MODELS:-0}" == 1 ]]; then
        run_step models 100000 "$SUMMARY_S" 120 "$OUTDIR/models.log" -- \
            "$PY" -m effkern bench models --quick --csv "$OUTDIR/models.csv"
    fi

    summary
    pack_outdir
    return $FAILED
}

# sanitize NAME CAP RESERVE MIN SANITIZER SMALL KERNELS: compute-sanitizer --tool NAME over the
# CUDA tests named sanitizer_smoke (EFFKERN_SANITIZE_SMALL=SMALL); every kernel in KERNELS must
# have passed its test_cuda_sanitize.py::test_cuda_sanitizer_smoke[<kernel>].
sanitize() {
    local name=$1 cap=$2 reserve=$3 min=$4 san=$5 small=$6 kernels=$7 log="$OUTDIR/sanitizer.log"
    local t t0 rc status run k missing=() skipped=()
    t=$(timeout_for "$cap" "$reserve")
    if ((t < min)); then
        record "$name" "SKIPPED (time budget: ${t}s left for it)" 0 ""
        return 0
    fi
    echo
    echo "== $name (timeout ${t}s, $(left)s of the budget left) $(date -u +%T)"
    run=$(mktemp /tmp/effkern_sanitize_XXXX.log)
    echo "===== $name (EFFKERN_SANITIZE_SMALL=$small) =====" >>"$log"
    t0=$(date +%s)
    set +e  # the log grows as the tests run (a timeout of the whole call keeps it); rc from the sanitizer
    EFFKERN_SANITIZE_SMALL=$small PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$t" \
        "$san" --tool "$name" --error-exitcode 99 --print-limit 30 \
        "$PY" -m pytest tests/test_cuda_sanitize.py -m cuda -k sanitizer_smoke -v -rs -p no:cacheprovider \
        2>&1 | tee "$run" >>"$log"
    rc=${PIPESTATUS[0]}
    set -e
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
    echo "-- benchmarks (bench.log, bench.csv):"
    if [[ -s "$OUTDIR/bench.csv" ]]; then
        timeout 60 "$PY" - "$OUTDIR/bench.csv" <<'EOF' 2>&1 || echo "(no benchmark table)"
import sys
sys.path.insert(0, ".")
from bench import report
from bench.common import fmt_num, text_table
rows = report.read_rows(sys.argv[1])
date = max(r.get("date", "") for r in rows)
rows = [r for r in rows if r.get("date") == date]
r0 = rows[0]
print(f"== {r0.get('gpu')}  {date}  commit {r0.get('commit')}  mode {r0.get('mode')}  driver {r0.get('driver')}  "
      f"copy {fmt_num(report._f(r0.get('copy_gbps')))} GB/s  {len(rows)} rows")
shown = rows if len(rows) <= 40 else [r for r in rows if r.get("status") not in ("PASS", "-", "")][:30]
if len(rows) > 40:
    print(f"{len(shown)} of the rows off target or failed (at most 30):")
if shown:
    print(report.table(shown, compact=True))
print(text_table(report.speedup_summary(rows), report.SUMMARY_HEADER))
EOF
    else
        echo "(no benchmark results)"
    fi
    grep -E "^targets:|rows wrong|time budget of" "$OUTDIR/bench.log" 2>/dev/null | tail -n 3 || true
    echo
    echo "-- tests (tests.log):"
    grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" 2>/dev/null | cut -c1-160 | head -n 12 || true
    tail -n 1 "$OUTDIR/tests.log" 2>/dev/null | cut -c1-200 || true
    echo "-- sanitizer:"
    grep -E "^=====|ERROR SUMMARY|RACECHECK SUMMARY|^FAILED| in [0-9.]+s" "$OUTDIR/sanitizer.log" 2>/dev/null | head -n 10 || true
    echo
    printf "%-21s %-48s %6s  %s\n" stage status sec log
    local s name status secs log
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name status secs log <<<"$s"
        printf "%-21s %-48s %6s  %s\n" "$name" "$status" "$secs" "$log"
    done
    echo "total $(($(date +%s) - START))s of ${BUDGET}s budget; commit ${EFFKERN_COMMIT:-'(tree digest)'}; outputs in $OUTDIR"
    echo "back here: python bench/report.py --append-from <fetched>/bench.csv"
    if ((FAILED)); then echo "GPU CHECK: FAILED"; else echo "GPU CHECK: OK"; fi
}

pack_outdir() {
    # Keep at most MAX_FILES plain files in OUTDIR (the device tool returns 8): the most useful
    # stay loose, the rest go into logs.tar.gz.
    ((MAX_FILES > 0)) || return 0
    local keep=(gpu_check.log bench.csv bench.log tests.log sanitizer.log build.log info.txt)
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
