"""Triton kernels of c2f_fast: plain tensors in, tensors out; nothing here knows the model.

Each op is Triton kernels + host forward/backward + a ``torch.autograd.Function`` registered with
``torch.library.triton_op`` (so ``torch.compile`` traces through it) + a plain-PyTorch ``*_ref``.
On CPU the ops run their references, except under ``TRITON_INTERPRET=1`` (set before triton is
imported), where the Triton kernels themselves run in the interpreter (fp32 only).
``available()`` says whether the kernels can run in this process at all. Every kernel is
autotuned (tile sizes, warps, stages); ``python -m benchmarks.kernel_report`` (in a checkout)
compiles every candidate for sm_90/sm_80 and checks it.
"""

from ._utils import available, warn_if_unavailable  # noqa: F401
from .registry import KERNELS, CompileConfig, KernelSpec, all_kernels, register_kernel  # noqa: F401

#: Every op module; ``registry.all_kernels()`` imports each so that all kernels are registered.
OP_MODULES = ("attention_pool", "additive_attention", "lstm_cell")

# The ops are imported eagerly: each op module has the name of its function, and importing the
# module later would shadow the function on the package.
from .attention_pool import attention_pool, attention_pool_ref  # noqa: E402,F401
from .additive_attention import additive_attention, additive_attention_ref  # noqa: E402,F401
from .lstm_cell import lstm_cell, lstm_cell_ref  # noqa: E402,F401

__all__ = [
    "attention_pool", "attention_pool_ref", "additive_attention", "additive_attention_ref",
    "lstm_cell", "lstm_cell_ref", "KERNELS", "CompileConfig", "KernelSpec", "all_kernels",
    "register_kernel", "available", "warn_if_unavailable",
]
