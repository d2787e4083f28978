#!/usr/bin/env bash
# Fill in every GPU figure on a machine with one CUDA GPU (no internet needed), in at most
# C2F_BENCH_TOTAL_S seconds (default 480 = 8 minutes) overall.
#
#   bash benchmarks/run_gpu.sh OUTDIR
#
# 1. pip install --no-deps --no-build-isolation -e .          (install.log)
# 2. the GPU tests: python -m pytest tests -m gpu -x -q        (tests_gpu.log)
# 3. the whole benchmark suite at the GPU sizes, goal cases first (benchmarks.log,
#    benchmarks.json = pytest-benchmark's raw JSON, cases.jsonl = one line per measured case,
#    summary.json, table.txt, autotune.json = the Triton autotune winners)
# 4. with the time left, the rest of the tests: python -m pytest tests -x -q -m "not gpu" (tests_rest.log)
# 5. the compact table, printed last (rebuilt from cases.jsonl, so a suite cut short by its
#    time limit still reports every case it measured).
#
# C2F_BENCH_GOALS_ONLY=1 runs only the cases the goals need (for a very short loan).
# Without DALI the DALI data case skips and data/tv_decode_jpeg (torchvision nvJPEG) stands in;
# every data result names its decoder (extra_info["decoder"]).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/run_gpu.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL=${C2F_BENCH_TOTAL_S:-480}
left() { echo $(( START + TOTAL - $(date +%s) )); }
rm -f "$OUT/cases.jsonl" "$OUT/table.txt" "$OUT/summary.json" "$OUT/autotune.json" "$OUT/benchmarks.json"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)  uptime: $(uptime)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    python - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "torchvision", "nvidia.dali", "pytest_benchmark"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "absent:", type(exc).__name__, exc)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed file(s)"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

echo "== install ($(left) s left)"
if [ -n "${C2F_BENCH_SKIP_INSTALL:-}" ]; then
    echo "skipped (C2F_BENCH_SKIP_INSTALL)" > "$OUT/install.log"
else
    timeout 120 pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
        || echo "pip install failed (see install.log); python -m pytest still imports the checkout from the repo root"
fi

export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}

echo "== GPU tests ($(left) s left)"
timeout -s INT -k 10 75 python -m pytest tests -m gpu -x -q -p no:cacheprovider > "$OUT/tests_gpu.log" 2>&1
echo "tests -m gpu: exit $? ($(tail -n 1 "$OUT/tests_gpu.log"))"

# The suite gets what is left, less a minute for the rest of the tests and the table.
BUDGET=$(( $(left) - 60 ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
echo "== benchmarks (limit ${BUDGET} s)"
C2F_BENCH_OUT="$OUT" timeout -s INT -k 30 "$BUDGET" \
    python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/benchmarks.json" --benchmark-columns=min,median,iqr,rounds \
    > "$OUT/benchmarks.log" 2>&1
STATUS=$?
echo "benchmarks: exit $STATUS$([ $STATUS -eq 124 ] || [ $STATUS -eq 130 ] || [ $STATUS -eq 2 ] && echo ' (time limit: cut short, goal cases ran first)')"
grep -E "^(SKIPPED|FAILED|ERROR)" "$OUT/benchmarks.log" | head -40
sed -n '/Triton autotune winners/,/c2f benchmarks/p' "$OUT/benchmarks.log" | head -60

REST=$(( $(left) - 15 ))
if [ "$REST" -ge 30 ]; then
    echo "== remaining tests (limit ${REST} s)"
    timeout -s INT -k 10 "$REST" python -m pytest tests -x -q -m "not gpu" -p no:cacheprovider > "$OUT/tests_rest.log" 2>&1
    echo "tests -m 'not gpu': exit $? ($(tail -n 1 "$OUT/tests_rest.log"))"
else
    echo "== remaining tests: skipped (no time left)" | tee "$OUT/tests_rest.log"
fi

echo "== table ($(uptime))"
python -m benchmarks.table "$OUT" | tee "$OUT/table_final.txt"
echo "raw JSON: $OUT/benchmarks.json; logs: $OUT/*.log; total $(( $(date +%s) - START )) s"
