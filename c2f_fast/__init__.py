"""c2f_fast: Coarse-to-Fine global/local attention for multi-label image classification.

The function the package computes is fixed by SPEC.md (shipped beside the project as
``shared/SPEC.md``); the reference path is plain PyTorch, the fast path uses the Triton kernels
of the top-level ``kernels`` package.
"""

__version__ = "0.1.0"
