#!/usr/bin/env bash
# The GPU checks of the fast path (issue 12) in one short run, for a lent GPU with little time.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results also in $OUT if set
#
# 1. every kernel test on CUDA with autotuning off (C2F_KERNELS_AUTOTUNE=0: the default candidate,
#    no timing sweep per shape; tests/*::*candidate* still run every candidate once);
# 2. the tests that need the autotuner itself: torch.compile of the ops and of the whole model
#    (autotune + wrap_triton), and the whole-model forward/backward in fp32 and bf16 autocast,
#    eager and compiled, at two batch sizes.
set -u
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
files="tests/test_attention_kernels.py tests/test_lstm_cell.py tests/test_model_fast.py"
C2F_KERNELS_AUTOTUNE=0 python -m pytest -q -rs $files -k "not compile and not forward_backward_on_gpu" \
    --junitxml="$out/gpu_kernels.xml" 2>&1 | tail -40
rc1=${PIPESTATUS[0]}
python -m pytest -q -rs $files -k "compile or forward_backward_on_gpu" --junitxml="$out/gpu_compile.xml" 2>&1 | tail -40
rc2=${PIPESTATUS[0]}
echo "kernel tests rc=$rc1, compile/autotune tests rc=$rc2"
exit $(( rc1 || rc2 ))
