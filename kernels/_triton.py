"""``triton`` and ``triton.language`` for the op modules, or stand-ins where triton is missing.

Without triton (e.g. a CPU-only install on a platform without Triton wheels) the package still
imports: the ``@triton.jit`` functions become inert stand-ins that refuse to launch, ``tl`` keeps
only what module-level code evaluates (``tl.constexpr`` annotations), and every op dispatches to
its plain-PyTorch reference (``_utils.use_triton`` is False). ``C2FNet`` warns about it once.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    HAVE_TRITON = False

    class _Inert:
        """What ``@triton.jit`` returns without triton: keeps the Python function, never launches."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = fn.__name__
            self.__doc__ = fn.__doc__

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.__name__}: triton is not installed; the Triton kernels cannot run")

        __call__ = __getitem__

    class _TritonStandIn:
        @staticmethod
        def jit(fn=None, **kwargs):
            return _Inert(fn) if fn is not None else _Inert

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    class _LanguageStandIn:
        class constexpr:  # noqa: N801 - the annotation's name in triton.language
            pass

    triton = _TritonStandIn()  # type: ignore[assignment]
    tl = _LanguageStandIn()  # type: ignore[assignment]

__all__ = ["HAVE_TRITON", "triton", "tl"]
