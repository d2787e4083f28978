"""c2f_fast: Coarse-to-Fine global/local attention for multi-label image classification.

The function the package computes is defined in ``docs/model.md`` (model, loss, metrics) and
``docs/data.md`` (data conventions); the reference path is plain PyTorch, the fast path uses the Triton kernels
of the top-level ``kernels`` package.
"""

__version__ = "0.1.0"

_LAZY = {"C2FClassifier": "infer", "Prediction": "infer", "export_model": "export", "tune_allocator": "runtime"}


def __getattr__(name):  # imported on first use: ``import c2f_fast`` stays light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'c2f_fast' has no attribute {name!r}")
