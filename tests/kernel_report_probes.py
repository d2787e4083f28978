"""Probe kernels for tests/test_kernel_report.py: small Triton kernels with known SASS properties.

Imported only by ``python -m benchmarks.kernel_report --module tests/kernel_report_probes.py`` (in a process
without ``TRITON_INTERPRET``), never by the test process itself, so the probes never enter the
registry the real tests see. Each probe states what the report must find in it:

* ``probe_pool``: a bf16 mean-pool over L of a [B, L, D] stream, read as [BLOCK_L, D] tiles --
  the access pattern of the attention pool. Must read ``x`` with 16-byte loads only.
* ``probe_pool_scalar_loop``: the same computation with the D loop written one element at a time
  (the deliberately broken copy). Must be rejected for 2-byte loads of ``x``.
* ``probe_pool_strided``: the same tile load, but the feature stride is a runtime argument the JIT
  may not specialise (``do_not_specialize``), so the compiler cannot prove contiguity. Rejected.
* ``probe_matmul``: a bf16 ``tl.dot`` tile product. Must contain tensor-core instructions.
* ``probe_no_dot``: claims ``uses_dot`` but has no matrix product (a row-sum x column-sum outer
  product; a broadcast-multiply-sum would not do: some Triton versions turn it into a dot). Rejected.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.registry import CompileConfig, KernelSpec, register_kernel

B, L, D = 256, 196, 512
BLOCK_L = 16

# ----------------------------------------------------------------------------- streaming pool


@triton.jit
def probe_pool_kernel(x_ptr, out_ptr, L, stride_b, stride_l, BLOCK_L: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        tile = tl.load(x_ptr + b * stride_b + rows[:, None] * stride_l + d[None, :], mask=rows[:, None] < L, other=0.0)
        acc += tl.sum(tile.to(tl.float32), 0)
    tl.store(out_ptr + b * D + d, (acc / L).to(out_ptr.dtype.element_ty))


@triton.jit
def probe_pool_scalar_loop_kernel(x_ptr, out_ptr, L, stride_b, stride_l, BLOCK_L: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    for d in range(0, D):
        acc = 0.0
        for l in range(0, L):
            acc += tl.load(x_ptr + b * stride_b + l * stride_l + d).to(tl.float32)
        tl.store(out_ptr + b * D + d, (acc / L).to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_d"])
def probe_pool_strided_kernel(x_ptr, out_ptr, L, stride_b, stride_l, stride_d, BLOCK_L: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        offs = b * stride_b + rows[:, None] * stride_l + d[None, :] * stride_d
        tile = tl.load(x_ptr + offs, mask=rows[:, None] < L, other=0.0)
        acc += tl.sum(tile.to(tl.float32), 0)
    tl.store(out_ptr + b * D + d, (acc / L).to(out_ptr.dtype.element_ty))


def _pool_configs(dtype: str, strided: bool = False) -> list[CompileConfig]:
    signature = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "L": "i32", "stride_b": "i32", "stride_l": "i32"}
    if strided:
        signature["stride_d"] = "i32"
    return [CompileConfig(label=f"B={B} L={L} D={D}", signature=signature, constexprs={"BLOCK_L": BLOCK_L, "D": D})]


_POOL_SCALARS = {"L": L, "stride_b": L * D, "stride_l": D, "stride_d": 1}

register_kernel(
    KernelSpec(
        name="probe_pool", fn=probe_pool_kernel, dtypes=("bf16", "fp32"), configs=_pool_configs,
        streamed=("x_ptr",), extra={"scalars": lambda config: _POOL_SCALARS},
    )
)  # fmt: skip
register_kernel(
    KernelSpec(
        name="probe_pool_scalar_loop", fn=probe_pool_scalar_loop_kernel, dtypes=("bf16",), configs=_pool_configs,
        streamed=("x_ptr",), extra={"scalars": lambda config: _POOL_SCALARS},
    )
)  # fmt: skip
register_kernel(
    KernelSpec(
        name="probe_pool_strided", fn=probe_pool_strided_kernel, dtypes=("bf16",),
        configs=lambda dtype: _pool_configs(dtype, strided=True), streamed=("x_ptr",),
        extra={"scalars": lambda config: _POOL_SCALARS},
    )
)  # fmt: skip

# ----------------------------------------------------------------------------- tensor cores


@triton.jit
def probe_matmul_kernel(a_ptr, b_ptr, c_ptr, K, N, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def probe_no_dot_kernel(a_ptr, b_ptr, c_ptr, K, N, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Row sums times column sums: same loads as probe_matmul, no matrix product anywhere.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :]).to(tl.float32)
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :]).to(tl.float32)
        acc += tl.sum(a, 1)[:, None] * tl.sum(b, 0)[None, :]
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def _mm_configs(dtype: str, block: tuple[int, int, int] = (64, 64, 32)) -> list[CompileConfig]:
    ptr = f"*{dtype}"
    bm, bn, bk = block
    return [
        CompileConfig(
            label=f"M=N=K=512 {bm}x{bn}x{bk}",
            signature={"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "K": "i32", "N": "i32"},
            constexprs={"BM": bm, "BN": bn, "BK": bk}, num_warps=4, num_stages=2,
        )
    ]  # fmt: skip


_MM_SCALARS = {"K": 512, "N": 512}
register_kernel(
    KernelSpec(
        name="probe_matmul", fn=probe_matmul_kernel, dtypes=("bf16",), configs=_mm_configs, uses_dot=True,
        extra={"scalars": lambda config: _MM_SCALARS},
    )
)  # fmt: skip
register_kernel(
    KernelSpec(
        name="probe_no_dot", fn=probe_no_dot_kernel, dtypes=("bf16",), configs=_mm_configs, uses_dot=True,
        extra={"scalars": lambda config: _MM_SCALARS},
    )
)  # fmt: skip

# ----------------------------------------------------------------------------- torch.compile gate

# The real kernels' pattern: a jit helper from kernels._attention_common. ``probe_helper_by_name``
# imports it by name (Inductor's re-emission carries it); ``probe_helper_by_module`` reaches it
# through the module (``attention_common.tanh_f32``), which compiles as it stands but is a
# NameError in the source Inductor re-emits: the gate must reject it.
from kernels import _attention_common as attention_common  # noqa: E402
from kernels._attention_common import tanh_f32  # noqa: E402


@triton.jit
def probe_helper_by_name_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tanh_f32(tl.load(x_ptr + offs), False))


@triton.jit
def probe_helper_by_module_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, attention_common.tanh_f32(tl.load(x_ptr + offs), False))


def _helper_configs(dtype: str) -> list[CompileConfig]:
    return [CompileConfig(label="N=128", signature={"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"},
                          constexprs={"N": 128})]  # fmt: skip


register_kernel(KernelSpec(name="probe_helper_by_name", fn=probe_helper_by_name_kernel, dtypes=("fp32",),
                           configs=_helper_configs))  # fmt: skip
register_kernel(KernelSpec(name="probe_helper_by_module", fn=probe_helper_by_module_kernel, dtypes=("fp32",),
                           configs=_helper_configs))  # fmt: skip
