"""Small host-side helpers shared by the op modules."""

from __future__ import annotations

import os

import torch
from torch.library import wrap_triton

TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dtype_name(t: torch.Tensor) -> str:
    """Triton's name of a tensor's dtype ("fp32", "bf16", "fp16")."""
    return TRITON_DTYPES[t.dtype]


def launchable(fn):
    """``wrap_triton(fn)`` so that ``torch.compile`` traces the launch; under the interpreter the
    plain (interpreted) kernel.

    Older torch releases reject the interpreter's ``InterpretedFunction`` in ``wrap_triton``; the
    interpreter only runs eagerly on CPU anyway, where nothing needs tracing.
    """
    return fn if interpret_mode() else wrap_triton(fn)


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels (rather than the ``*_ref`` fallbacks) run for these tensors.

    On CUDA always; on CPU only under the interpreter, which handles fp32 alone.
    """
    present = [t for t in tensors if t is not None]
    if all(t.is_cuda for t in present):
        return True
    if interpret_mode() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present):
        return True
    return False
