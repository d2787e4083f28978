"""Triton kernels of c2f_fast: plain tensors in, tensors out; nothing here knows the model.

Each op is Triton kernels + host forward/backward + a ``torch.autograd.Function`` registered with
``torch.library.triton_op`` (so ``torch.compile`` traces through it) + a plain-PyTorch ``*_ref``.
On CPU the ops run their references, except under ``TRITON_INTERPRET=1`` (set before triton is
imported), where the Triton kernels themselves run in the interpreter (fp32 only).

The op modules are imported on first use, so ``import kernels`` stays cheap.
"""

import importlib

from .registry import KERNELS, CompileConfig, KernelSpec, all_kernels, register_kernel  # noqa: F401

#: Every op module; ``registry.all_kernels()`` imports each so that all kernels are registered.
OP_MODULES = ("attention_pool", "additive_attention", "lstm_cell")

_EXPORTS = {
    "attention_pool": "attention_pool",
    "attention_pool_ref": "attention_pool",
    "additive_attention": "additive_attention",
    "additive_attention_ref": "additive_attention",
    "lstm_cell": "lstm_cell",
    "lstm_cell_ref": "lstm_cell",
}

__all__ = sorted(_EXPORTS) + ["KERNELS", "CompileConfig", "KernelSpec", "all_kernels", "register_kernel"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
