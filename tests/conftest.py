"""Test-session setup and the helpers the test modules share.

Without CUDA the Triton kernels run in Triton's CPU interpreter, which must be switched on before
triton is imported (the kernels module decorates its functions at import time). With CUDA the
kernel tests build their tensors on the GPU (``DEVICE``), so a test means the same thing on both
machines: it runs the Triton path (interpreted on CPU, compiled on a GPU) and asserts that it did.

Shared here: ``DEVICE``; ``requires_cuda`` (the one GPU-skip mechanism: it also marks the test
``gpu``); ``assert_low_precision`` (the one low-precision rule); ``SMALL_MODEL`` (the small model
configuration of the model tests).
"""

import os
import sys
from pathlib import Path

import torch  # importing torch does not import triton, so the switch below is still in time

# The question is whether *torch* can run on a GPU, not whether a driver tool is on the PATH
# (a container may have nvidia-smi and no usable device, or the reverse).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ["TRITON_INTERPRET"] = "1"

# The checkout's packages (kernels, benchmarks, c2f_fast) first, also under a bare `pytest`.
REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
#: Where the kernel tests put their tensors: the GPU when there is one (compiled kernels), else
#: the CPU (interpreted kernels, fp32).
DEVICE = "cuda" if HAS_CUDA else "cpu"


def requires_cuda(fn):
    """Skip without a CUDA GPU (with the reason), and mark the test ``gpu``."""
    reason = "needs a CUDA GPU (compiled Triton kernels, bf16/fp16, torch.compile of the triton ops)"
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason=reason)(fn))


#: The small model of the model tests (tiny backbone; sizes chosen so that L, D, A, H all differ).
SMALL_MODEL = dict(backbone="tiny", num_classes=5, steps=3, hidden=24, embed=8, attn=20, image_size=48)


def low_precision_errors(fast, torch_lp, ref32) -> tuple[float, float]:
    """(max |fast - ref32|, max |torch_lp - ref32|), in fp32."""
    ref = ref32.float()
    return (fast.float() - ref).abs().max().item(), (torch_lp.float() - ref).abs().max().item()


def assert_low_precision(name, fast, torch_lp, ref32, atol=None, eps=None):
    """The low-precision rule of every test: the error of the fast path against an fp32 reference
    is at most twice the error of PyTorch's own low-precision path against the same reference,
    plus a small atol (default: ``eps`` -- the low-precision dtype's, bf16's if the results were
    already upcast -- at the reference's scale)."""
    err_fast, err_torch = low_precision_errors(fast, torch_lp, ref32)
    if atol is None:
        if eps is None:
            low = fast.dtype if fast.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            eps = torch.finfo(low).eps
        atol = eps * max(1.0, ref32.float().abs().max().item())
    assert err_fast <= 2 * err_torch + atol, (
        f"{name}: fast error {err_fast:.3g} > 2 x torch low-precision error {err_torch:.3g} + atol {atol:.3g}"
    )


@pytest.fixture
def force_candidate(monkeypatch):
    """``force_candidate(k)``: every launch runs autotune candidate ``k`` of its kernel (the last
    one if it has fewer), so a test checks that candidate's results -- under the interpreter too,
    which otherwise runs only the default. Returns the list of configs launched."""
    from kernels import _utils

    real = _utils.autotuned

    def force(k: int) -> list:
        launched = []

        def pick(kernel, configs, key):
            cfg = configs[min(k, len(configs) - 1)]
            launched.append(cfg)
            return real(kernel, [cfg], key)

        monkeypatch.setattr(_utils, "autotuned", pick)
        return launched

    return force


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
