#!/usr/bin/env bash
# The GPU checks of the fast path in one short run (at most C2F_BENCH_TOTAL_S s, default 300),
# for a lent GPU with little time; results in $OUT (default /tmp/c2f_gpu_check).
#
#   bash benchmarks/gpu_check.sh
#
# 1. install: carried wheels (--no-index, see benchmarks/fetch_gpu_wheels.sh), then the package;
# 2. every kernel test on CUDA with autotuning off (C2F_KERNELS_AUTOTUNE=0: the default
#    candidate, no timing sweep per shape; tests/*::*candidate* still run every candidate once);
# 3. the tests that need the autotuner itself: torch.compile of the ops and of the whole model,
#    and the whole-model forward/backward in fp32 and bf16 autocast, eager and compiled.
# Each step prints one summary line (benchmarks/_gpu_steps.sh), all of them again at the end.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/c2f_gpu_check}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL=${C2F_BENCH_TOTAL_S:-300}
source benchmarks/_gpu_steps.sh
rm -f "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
install_all() {
    install_carried_wheels "${C2F_GPU_WHEELS:-.gpu_wheels}" || true
    pip install --no-deps --no-build-isolation -e .
}
export -f install_all
files="tests/test_attention_kernels.py tests/test_lstm_cell.py tests/test_model_fast.py"
step install 90 install.log install_all
step kernels 120 gpu_kernels.log env C2F_KERNELS_AUTOTUNE=0 python -m pytest -q -rs $files \
    -k "not compile and not forward_backward_on_gpu" --junitxml="$OUT/gpu_kernels.xml"
step compile 150 gpu_compile.log python -m pytest -q -rs $files -k "compile or forward_backward_on_gpu" \
    --junitxml="$OUT/gpu_compile.xml"
echo "== summary (total $(( $(date +%s) - START )) s)"
cat "$OUT/summary.txt"
grep -q "FAILED\|TIMEOUT" "$OUT/summary.txt" && exit 1
exit 0
