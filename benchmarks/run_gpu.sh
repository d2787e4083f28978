#!/usr/bin/env bash
# Every GPU figure on a machine with one CUDA GPU and no internet, most important first, each step
# under its own time limit, the whole run within C2F_BENCH_TOTAL_S seconds (default 480 = 8 min).
#
#   bash benchmarks/fetch_gpu_wheels.sh                 # here, once: wheels the GPU image lacks
#   bash benchmarks/run_gpu.sh OUTDIR                   # there (carry .gpu_wheels)
#   C2F_GPU_SMOKE=1 bash benchmarks/run_gpu.sh OUTDIR   # the 3-minute smoke run
#
# Steps (each prints one "STEP name: ok|FAILED|TIMEOUT | seconds | last log line" line; all of
# them again at the end, from OUTDIR/summary.txt):
#  1. env          versions, GPU, which optional packages import (env.txt)
#  2. install      carried wheels (--no-index, only what does not import), then
#                  pip install --no-deps --no-build-isolation -e .
#  3. kernels      the Triton kernel tests, autotuning off (C2F_KERNELS_AUTOTUNE=0)
#  4. smoke        one compiled bf16 training step of the fast model, one compiled inference call
#                  (python -m benchmarks.gpu_smoke), with their times
#  5. goals        the benchmark cases the goals need (C2F_BENCH_GOALS_ONLY=1)
#  -- the smoke run stops here --
#  6. gpu-tests    the other GPU tests (torch.compile of the ops and the model; autotuning on)
#  7. benchmarks   the rest of the suite at the GPU sizes (benchmarks.json, cases.jsonl)
#  8. rest         the CPU tests, with the time left
#  9. the compact table, printed last (rebuilt from cases.jsonl: a suite cut short still reports
#     every case it measured)
#
# Data cases name their decoder (extra_info["decoder"]): without DALI (not on the GPU image, too
# large to carry) data/dali skips and data/tv_decode_jpeg (torchvision's nvJPEG) stands in.
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/run_gpu.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
SMOKE=${C2F_GPU_SMOKE:-0}
[ "$SMOKE" = "0" ] && SMOKE=""
START=$(date +%s)
if [ -n "$SMOKE" ]; then TOTAL=${C2F_BENCH_TOTAL_S:-180}; else TOTAL=${C2F_BENCH_TOTAL_S:-480}; fi
source benchmarks/_gpu_steps.sh
rm -f "$OUT/summary.txt" "$OUT/cases.jsonl" "$OUT/table.txt" "$OUT/summary.json" "$OUT/autotune.json" \
      "$OUT/benchmarks.json"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
export PYTHONUNBUFFERED=1
echo "run_gpu.sh: ${SMOKE:+smoke run, }budget ${TOTAL} s, results in $OUT"

env_report() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  uptime: $(uptime)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not found"
    python - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "torchvision", "nvidia.dali", "defusedxml", "pycocotools", "pytest_benchmark"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as exc:  # noqa: BLE001
        print(name, "absent:", type(exc).__name__)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed file(s)"
}
install_all() {
    install_carried_wheels "${C2F_GPU_WHEELS:-.gpu_wheels}" || echo "(continuing: tests that need a missing package skip or fail by name)"
    pip install --no-deps --no-build-isolation -e . || echo "pip install failed: the tests still import the checkout"
    python -c "import c2f_fast, kernels; print('c2f_fast', c2f_fast.__file__)"
}

export -f env_report install_all
step env 30 env.txt env_report
cat "$OUT/env.txt"
# smoke: 180 s = env ~10 + install ~20 + kernels 60 + smoke 60 + goals with the rest
if [ -n "$SMOKE" ]; then KERNELS_S=60; SMOKE_S=60; else KERNELS_S=100; SMOKE_S=90; fi
step install 90 install.log install_all
KERNEL_TESTS="tests/test_attention_kernels.py tests/test_lstm_cell.py"
step kernels $KERNELS_S tests_kernels.log env C2F_KERNELS_AUTOTUNE=0 \
    python -m pytest $KERNEL_TESTS -q -x -rs -p no:cacheprovider -k "not compile"
step smoke $SMOKE_S smoke.log python -m benchmarks.gpu_smoke
grep "^smoke " "$OUT/smoke.log"
step goals 120 goals.log env C2F_BENCH_OUT="$OUT" C2F_BENCH_GOALS_ONLY=1 \
    python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/goals.json" --benchmark-columns=min,median,iqr,rounds

if [ -z "$SMOKE" ]; then
    step gpu-tests 120 tests_gpu.log python -m pytest tests -m gpu -q -rs -p no:cacheprovider \
        -k "compile or not (test_attention_kernels or test_lstm_cell)"
    step benchmarks $(( $(left) - 75 )) benchmarks.log env C2F_BENCH_OUT="$OUT" \
        python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$OUT/benchmarks.json" --benchmark-columns=min,median,iqr,rounds
    grep -E "^(SKIPPED|FAILED|ERROR)" "$OUT/benchmarks.log" | head -20
    step rest $(( $(left) - 15 )) tests_rest.log python -m pytest tests -x -q -m "not gpu" -p no:cacheprovider
fi

echo "== table ($(uptime))"
[ -f "$OUT/cases.jsonl" ] && python -m benchmarks.table "$OUT" | tee "$OUT/table_final.txt"
echo "== summary (total $(( $(date +%s) - START )) s of ${TOTAL} s)"
cat "$OUT/summary.txt"
grep -q "FAILED\|TIMEOUT" "$OUT/summary.txt" && exit 1
exit 0
