"""One registry of every Triton kernel in the package.

Each kernel module registers its ``@triton.jit`` functions here with the launch configurations its
host code picks, so that ``python -m benchmarks.kernel_report`` (and its CI tests) compile every kernel for a
GPU target without a GPU, and a new kernel cannot be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


#: The benchmark sizes at which every kernel's ``configs(dtype)`` reports the launch
#: configurations (every autotune candidate) its host code offers (VGG-16 at 224 and 448 px: L = 196, 784).
BENCH_B = 256
BENCH_LS = (196, 784)
BENCH_D = 512
BENCH_A = 512
BENCH_H = 512


@dataclass(frozen=True)
class CompileConfig:
    """Everything ``triton.compile`` needs for one specialisation of a kernel.

    ``signature`` maps every non-constexpr argument name to a Triton type string ("*bf16",
    "*fp32", "i32", "fp32", ...); ``constexprs`` maps every ``tl.constexpr`` argument to its
    value. ``label`` says which host situation picked it (e.g. "B=256 L=196 D=512").
    ``scalars``: the runtime integer arguments the launcher passes in that situation (sizes,
    strides), so that the kernel report specialises them on their values as Triton's JIT does.
    """

    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    scalars: Optional[dict[str, int]] = None


@dataclass(frozen=True)
class KernelSpec:
    """A registered kernel.

    ``configs(dtype)`` returns every configuration the host launcher may run at the benchmark
    sizes (B=256, L=196 and 784, D=A=H=512) for ``dtype`` in {"fp32", "bf16", "fp16"}: one per
    autotune candidate, so the report checks whichever one autotuning picks. It must be computed
    by the same function the launcher uses, not written out by hand.
    ``streamed`` names the pointer arguments that are bandwidth-critical streams (they must be
    read with 16-byte loads in bf16/fp16). ``uses_dot`` says the kernel calls ``tl.dot``.
    """

    name: str
    fn: Any  # triton.runtime.jit.JITFunction
    dtypes: tuple[str, ...]
    configs: Callable[[str], list[CompileConfig]]
    streamed: tuple[str, ...] = ()
    uses_dot: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    if spec.name in KERNELS and KERNELS[spec.name].fn is not spec.fn:
        raise ValueError(f"kernel {spec.name!r} registered twice")
    KERNELS[spec.name] = spec
    return spec


def all_kernels() -> dict[str, KernelSpec]:
    """Every registered kernel (importing the op modules registers them)."""
    import importlib

    from kernels import OP_MODULES

    for module in OP_MODULES:
        importlib.import_module(f"kernels.{module}")
    return dict(KERNELS)
