#!/usr/bin/env bash
# The one-call GPU runbook: build the extension, list backends, run the GPU tests, tune, benchmark, report.
#
#   benchmarks/gpu_check.sh OUTDIR [--no-build|--no-ext] [--size full|cpu|quick] [--total SECONDS]
#
# Run from anywhere; it works in the repository that holds it.  Every step has a time limit cut
# from a total budget (default 370 s: about 6 minutes, well inside 8), and a failed or timed-out
# step never stops the next one.  OUTDIR ends with at most 8 files:
#   summary.txt  each step's status and time, availability, test and benchmark tails
#   env.txt      nvidia-smi, nvcc, versions, CPU, installed packages, backend availability
#   build.log    pip install of the extension (sm_90 only)
#   tests.log    pytest of the GPU-marked tests
#   bench.json   benchmark results (written after every row, so a timeout keeps what ran)
#   bench.md     the markdown report
#   tuned_plans.csv  the Triton plans' tuned table (benchmarks/tune_plans.py; copy rows into
#                kernels/tuned_plans.csv to ship them)
#   more.tar.gz  junit.xml, bench.log (pytest output of the benchmarks), bench.png (speedup chart),
#                tune.csv/tune.log (every tuning candidate), errors.md/.csv (each backend's error
#                per dtype against float64, benchmarks/errors.py; also in summary.txt)
# To record the run in the repository's tables (one per device kind, keyed, newest wins):
#   python benchmarks/report.py --merge OUTDIR/bench.json --into benchmarks/results/h200.csv
#   python benchmarks/report.py --merge errors.csv --into benchmarks/results/errors-h200.csv  (from more.tar.gz)
# Environment: PYTHON (default python3), GPU_CHECK_TESTS (pytest selection, default "tests/ops tests/models tests/kernels tests/csrc -m gpu"),
# GPU_CHECK_WORKERS (pytest-xdist workers for the tests, default 6 where xdist is installed; 0: none),
# GPU_CHECK_TOTAL_S (the total budget), GPU_CHECK_STEPS (default "tests tune errors bench": which of
# the steps after the install run, in that order), GPU_CHECK_TUNE_CASES (a regular expression:
# which cases tune_plans.py tunes; default all), GPU_CHECK_BENCH_K (a pytest -k filter for bench).
# --no-build uses the dlkunet already installed (for trying the script on a machine without nvcc or
# CUDA); --no-ext installs it without the compiled extension (seconds instead of minutes: the torch
# and triton backends only).
set -u

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
BUILD=1
SIZE=""
TOTAL=${GPU_CHECK_TOTAL_S:-370}
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --no-ext) BUILD=noext ;;
    --size) SIZE=$2; shift ;;
    --total) TOTAL=$2; shift ;;
    *) usage ;;
  esac
  shift
done

PY=${PYTHON:-python3}
# Only the suites with GPU cases: tests/data needs nibabel, which GPU images may lack.
TESTS=${GPU_CHECK_TESTS:-tests/ops tests/models tests/kernels tests/csrc -m gpu}
STEPS=" ${GPU_CHECK_STEPS:-tests tune errors bench} "
want() { case "$STEPS" in *" $1 "*) return 0 ;; esac; printf '%-10s %-16s\n' "$1" "not asked for" >> "$SUMMARY"; return 1; }
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
# -P: never put the current directory on sys.path, so the *installed* dlkunet (with its compiled
# extension) is imported rather than the source tree next to us.
PYP="$PY -P"
START=$SECONDS
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
echo "gpu_check.sh in $(pwd) -> $OUT, total budget ${TOTAL}s, started $(date -u +%FT%TZ)" >> "$SUMMARY"

# A step's time limit: its cap, or what the total leaves after keeping `reserve` for later steps.
limit() {
  local cap=$1 reserve=$2
  local left=$(( TOTAL - (SECONDS - START) - reserve ))
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -lt 15 ] && cap=15
  echo "$cap"
}

# run NAME CAP RESERVE LOG CMD...: run with a limit, append output to LOG, record the status.
run() {
  local name=$1 cap=$2 reserve=$3 log=$4; shift 4
  local t0=$SECONDS lim; lim=$(limit "$cap" "$reserve")
  echo "### $name (limit ${lim}s): $*" >> "$log"
  timeout -s INT -k 10 "$lim" "$@" >> "$log" 2>&1
  local rc=$?
  local status="ok"
  case $rc in
    0) ;;
    124|137) status="TIMEOUT(${lim}s)" ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  printf '%-10s %-16s %4ss\n' "$name" "$status" "$(( SECONDS - t0 ))" >> "$SUMMARY"
  return $rc
}

env_report() {
  date -u
  nvidia-smi || echo "nvidia-smi: not available"
  nvcc --version || echo "nvcc: not available"
  $PY -V
  $PYP -c 'import sys, torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e: print("triton: missing", e)'
  grep -m1 'model name' /proc/cpuinfo; echo "cores $(nproc)"; free -g | head -2
  $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|pytest|pytest-benchmark|numpy|scipy|h5py|tqdm|matplotlib|setuptools|ninja|dlkunet) '
}

backends_report() {
  $PYP -c 'import dlkunet, dlkunet.ops as o
print("dlkunet from", dlkunet.__file__)
for b in o.BACKENDS:
    print("backend %-7s cuda=%s cpu=%s" % (b, o.availability(b, "cuda"), o.availability(b, "cpu")))' || return
  if command -v dlkunet >/dev/null; then dlkunet info; fi
}

# `timeout` runs programs, not shell functions: the two report functions go through bash -c.
export PY PYP
export -f env_report backends_report
run env 30 0 "$OUT/env.txt" bash -c env_report
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$SUMMARY" 2>/dev/null

if [ "$BUILD" = 1 ]; then
  : > "$OUT/build.log"
  if ! run build 200 180 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 DLKUNET_BUILD_EXT=1 \
       $PY -m pip install --no-build-isolation --no-deps -v . ; then
    # Keep the rest of the check useful: install without the extension (torch and triton backends).
    run build-noext 60 170 "$OUT/build.log" env DLKUNET_BUILD_EXT=0 \
      $PY -m pip install --no-build-isolation --no-deps .
  fi
elif [ "$BUILD" = noext ]; then
  : > "$OUT/build.log"
  run install 90 0 "$OUT/build.log" env DLKUNET_BUILD_EXT=0 $PY -m pip install --no-build-isolation --no-deps .
else
  echo "build skipped (--no-build): using the installed dlkunet" > "$OUT/build.log"
  printf '%-10s %-16s\n' build "skipped" >> "$SUMMARY"
fi

run backends 40 150 "$OUT/env.txt" bash -c backends_report
grep -E '^(dlkunet from|backend )' "$OUT/env.txt" >> "$SUMMARY"

# Triton's JIT compilation dominates the GPU tests and is CPU-bound: spread it over workers.
WORKERS=${GPU_CHECK_WORKERS:-6}
XDIST=()
if [ "$WORKERS" != 0 ] && $PY -c 'import xdist' 2>/dev/null; then XDIST=(-n "$WORKERS"); fi
# A hung kernel should cost one test, not the whole step.
if $PY -c 'import pytest_timeout' 2>/dev/null; then XDIST+=(--timeout=120); fi
if want tests; then
# shellcheck disable=SC2086  # TESTS is a word list on purpose
run tests 150 110 "$OUT/tests.log" $PYP -m pytest $TESTS "${XDIST[@]}" -q -rfEs -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" --maxfail=25
if [ $? = 5 ]; then
  echo "(no test selected by '$TESTS'; running tests/ops tests/kernels instead)" >> "$SUMMARY"
  run tests-all 120 100 "$OUT/tests.log" $PYP -m pytest tests/ops tests/kernels -x -q -rfEs \
    -p no:cacheprovider --junitxml="$OUT/junit.xml"
fi
fi

# Tune the Triton plans at the real shapes (compiles in parallel first, then times alone).
if want tune; then
  run tune 200 90 "$OUT/tune.log" $PYP benchmarks/tune_plans.py "$OUT/tune" --jobs 14 \
    --cases "${GPU_CHECK_TUNE_CASES:-}"
  if [ -f "$OUT/tune/tuned_plans.csv" ]; then
    cp "$OUT/tune/tuned_plans.csv" "$OUT/tuned_plans.csv"
    # The benchmarks below run the plans just measured: merge them into the installed table.
    installed=$($PYP -c 'import dlkunet.kernels.plans as p; print(p.TUNED_TABLE)' 2>/dev/null)
    [ -n "$installed" ] && $PY benchmarks/tune_plans.py "$OUT/tuned_plans.csv" --merge "$installed" >> "$OUT/tune.log" 2>&1
  fi
  [ -f "$OUT/tune/tune.csv" ] && mv "$OUT/tune/tune.csv" "$OUT/tune.csv"
  rm -rf "$OUT/tune"
fi

# Error of every backend per dtype against float64 (Triton's cache is warm from the tests).
want errors && run errors 60 90 "$OUT/errors.md" $PYP benchmarks/errors.py --table "$OUT/errors.csv"

BENCH_LIMIT=$(limit 300 25)
SIZE_ARGS=()
[ -n "$SIZE" ] && SIZE_ARGS=(--bench-size "$SIZE")
BENCH_K=()
[ -n "${GPU_CHECK_BENCH_K:-}" ] && BENCH_K=(-k "$GPU_CHECK_BENCH_K")
want bench && run bench 300 25 "$OUT/bench.log" $PYP -m pytest benchmarks --benchmark-only "${SIZE_ARGS[@]}" "${BENCH_K[@]}" -q -rfE \
  -p no:cacheprovider --bench-json "$OUT/bench.json" --bench-budget $(( BENCH_LIMIT - 40 > 20 ? BENCH_LIMIT - 40 : 20 ))

if [ -f "$OUT/bench.json" ]; then
  run report 40 0 "$OUT/bench.log" $PY benchmarks/report.py "$OUT/bench.json" --md "$OUT/bench.md" --png "$OUT/bench.png"
else
  printf '%-10s %-16s\n' report "skipped (no bench.json)" >> "$SUMMARY"
fi

{
  [ -f "$OUT/bench.json" ] && $PY -c 'import json, sys
d = json.load(open(sys.argv[1]))
print("bench.json: %d rows, %d skipped, %d failed" % (len(d["rows"]), len(d["skipped"]), len(d["failed"])))' "$OUT/bench.json"
  echo
  echo "== tests.log (tail)"; tail -n 25 "$OUT/tests.log" 2>/dev/null
  echo
  echo "== tune.log (the chosen plan per case)"; grep -vE '^(### |compiled every)' "$OUT/tune.log" 2>/dev/null
  echo
  echo "== errors.md"; grep '^|' "$OUT/errors.md" 2>/dev/null
  echo
  echo "== bench.log (tail)"; grep -vE '^test_' "$OUT/bench.log" 2>/dev/null | tail -n 40
  echo
  echo "total $(( SECONDS - START ))s, finished $(date -u +%FT%TZ)"
} >> "$SUMMARY"

rm -f "$OUT"/*.tmp
extras=()
for f in junit.xml bench.log bench.png tune.csv tune.log errors.md errors.csv; do [ -f "$OUT/$f" ] && extras+=("$f"); done
if [ ${#extras[@]} -gt 0 ]; then
  tar -C "$OUT" -czf "$OUT/more.tar.gz" "${extras[@]}" && (cd "$OUT" && rm -f "${extras[@]}")
fi
cat "$SUMMARY"
