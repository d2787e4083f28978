"""Pieces shared by the two attention ops (``attention_pool`` and ``additive_attention``).

Both ops compute ``weights = softmax_i(s_i)`` over the L regions of a feature map and the context
``Σ_i weights_i · prior_i · feats_i``; they differ only in where the scores ``s`` come from. This
module holds what does not depend on that: argument checks, launch-shape arithmetic, the
signature bookkeeping for the kernel registry, and small ``@triton.jit`` helpers.

Kernel layout conventions (shared by every attention kernel, and relied on by the
``benchmarks/kernel_report.py`` checks):
- every streamed tensor is contiguous with its innermost dimension (D or A) a ``tl.constexpr``,
  walked by a power-of-two ``tl.arange`` block, so a row offset is a known multiple of D (or A)
  and bf16/fp16 loads vectorise to 16 bytes;
- tiles are ``[BLOCK_L, BLOCK_D]`` with ``BLOCK_L·BLOCK_D`` bounded, and programs loop over L,
  so register use does not grow with L;
- all arithmetic is fp32; results are cast to each output's dtype on store.
"""

import inspect
from typing import Any, Callable, Optional, Sequence

import torch

from ._triton import tl, triton
from ._utils import KernelLaunch, compile_configs, config, unique_configs
from .registry import BENCH_B, BENCH_LS

#: SMs of an H100/H200. Fixed rather than read off the device so that ``configs()`` gives the
#: same answer on a machine without a GPU as the launcher does on one.
NUM_SMS = 132
#: Waves of resident programs a split launch aims for (two: the tail of a ragged last wave costs
#: at most a third of the run, and each program still streams a long run of rows).
WAVES = 2


def target_programs(resident_per_sm: int) -> int:
    """Programs a launch aims for: ``WAVES`` full waves of ``resident_per_sm`` programs per SM,
    the kernel's occupancy as ``benchmarks/KERNELS.md`` reports it (registers decide it)."""
    return NUM_SMS * resident_per_sm * WAVES


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def check_tensor(name: str, t: Any, ndim: int) -> None:
    """Raise ``ValueError`` unless ``t`` is a floating tensor of rank ``ndim``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """Raise ``ValueError`` unless ``t.shape == expected`` (``meaning`` spells out the letters)."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def check_same_device(named: dict[str, Optional[torch.Tensor]]) -> None:
    """Raise ``ValueError`` naming the first tensor that is not on the first tensor's device."""
    present = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_nonempty(feats: torch.Tensor) -> None:
    if feats.shape[1] == 0:
        raise ValueError("feats must have at least one region (L >= 1), got L = 0")
    if feats.shape[2] == 0:
        raise ValueError("feats must have at least one channel (D >= 1), got D = 0")


def upcast(t: Optional[torch.Tensor], enabled: bool) -> Optional[torch.Tensor]:
    """fp16/bf16 -> fp32 when ``enabled``; fp32/fp64 are left alone (gradcheck runs in fp64)."""
    if t is None or not enabled or t.dtype not in (torch.float16, torch.bfloat16):
        return t
    return t.float()


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor to pass for a pointer argument that the kernel's flags switch off (prior
    None, no weights gradient, an input gradient nobody needs). A fresh tensor rather than an
    alias of a real argument, so that torch.compile's alias/mutation analysis of the kernel
    call sees nothing shared; it is also what the op returns for a gradient it did not compute."""
    return like.new_empty((0,))


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index every tensor as dense row-major: expanded (stride-0) or transposed
    inputs and incoming gradients are materialised here. For a tensor that is already dense this
    is free (``Tensor.contiguous`` returns it without a copy): the model's encoders emit a dense
    ``[B, L, D]`` feature map once (docs/model.md, "Encoder"), so the ``[B, L, D]`` operands reach
    the kernels without copies; only small ``[B, D]`` / ``[B, L]`` gradients may be copied."""
    return t.contiguous()


# ----------------------------------------------------------------------------------------------
# Launch shapes
# ----------------------------------------------------------------------------------------------


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def rows_per_tile(tile_elems: int, width: int, L: int) -> int:
    """BLOCK_L for a ``[BLOCK_L, width]`` tile of about ``tile_elems`` elements (power of two,
    at least 1, no more than L needs)."""
    return max(1, min(tile_elems // width, pow2(L)))


def split_rows(B: int, L: int, align: int, target: int) -> tuple[int, int]:
    """Split each batch row's L regions over programs so that ``B · n_split`` reaches about
    ``target``. Returns ``(n_split, rows_per_split)``: ``rows_per_split`` is a multiple of
    ``align`` (the largest tuned BLOCK_L, so no candidate has a ragged tile at a split boundary)
    and no split is empty. The split does not depend on the tuned BLOCK_L: the per-split
    partial buffers are allocated before autotuning picks one."""
    n_blocks = triton.cdiv(L, align)
    n_split = max(1, min(n_blocks, triton.cdiv(target, max(B, 1))))
    rows_per_split = triton.cdiv(n_blocks, n_split) * align
    return triton.cdiv(L, rows_per_split), rows_per_split


def block_l_configs(width: int, L: int, tiles: Sequence[tuple[int, int, int]]) -> tuple[Any, ...]:
    """Autotune candidates ``[BLOCK_L, width]`` for ``tiles`` = ``(tile elements, warps, stages)``
    (the first is the default); BLOCK_L = rows_per_tile(elements, width, L), duplicates dropped."""
    return unique_configs(config(warps, stages, BLOCK_L=rows_per_tile(elems, width, L))
                          for elems, warps, stages in tiles)


def max_block_l(configs: Sequence[Any]) -> int:
    return max(c.kwargs["BLOCK_L"] for c in configs)


# ----------------------------------------------------------------------------------------------
# Registry bookkeeping
# ----------------------------------------------------------------------------------------------


def runtime_arg_names(kernel: Any) -> list[str]:
    """The non-``tl.constexpr`` parameters of a ``@triton.jit`` function, in order (works for
    both ``JITFunction`` and the interpreter's ``InterpretedFunction``)."""
    names = []
    for p in inspect.signature(kernel.fn).parameters.values():
        ann = p.annotation
        is_constexpr = ann is tl.constexpr or (isinstance(ann, str) and "constexpr" in ann)
        if not is_constexpr:
            names.append(p.name)
    return names


def signature(kernel: Any, kinds: dict[str, str], dtype: str) -> dict[str, str]:
    """Triton signature of ``kernel`` for inputs of ``dtype`` ("fp32"/"bf16"/"fp16").

    ``kinds`` says what each runtime argument is: ``"io"`` a tensor in the op's dtype, ``"f32"``
    an fp32 scratch/statistics tensor, ``"i32"`` an int. It must name exactly the kernel's
    runtime arguments, so a kernel edit that forgets the registry fails loudly here.
    """
    names = runtime_arg_names(kernel)
    if set(names) != set(kinds):
        raise ValueError(
            f"signature kinds for {kernel.fn.__name__} name {sorted(kinds)}, kernel takes {names}"
        )
    type_of = {"io": f"*{dtype}", "f32": "*fp32", "i32": "i32"}
    return {name: type_of[kinds[name]] for name in names}


def bench_registry(
    kernel: Any,
    which: str,
    kinds: dict[str, str],
    launch_for: Callable[[int, str], dict[str, KernelLaunch]],
    constexprs_for: Callable[[str], dict[str, Any]],
    sizes: str,
) -> Callable[[str], list[Any]]:
    """``configs(dtype)`` for a ``KernelSpec`` of ``kernel`` (launched as ``which``): one
    ``CompileConfig`` per benchmark L and per autotune candidate of ``launch_for(L, dtype)`` -- the
    op's own ``_launch_config`` at B = ``BENCH_B`` -- plus the flags/sizes ``constexprs_for(dtype)``:
    the report compiles every config autotuning may pick. Each carries the launch's runtime integer
    arguments (``L`` and the launch's ``ints``) as ``scalars``.
    """
    runtime = runtime_arg_names(kernel)

    def configs(dtype: str) -> list[Any]:
        out = []
        sig = signature(kernel, kinds, dtype)
        for L in BENCH_LS:
            launch = launch_for(L, dtype)[which]
            scalars = {k: v for k, v in {"L": L, **launch.ints}.items() if k in runtime}
            out += compile_configs(launch, f"{which} B={BENCH_B} L={L} {sizes}", sig, constexprs_for(dtype), scalars)
        return out

    return configs


def use_fast_tanh(dtype_name: str) -> bool:
    """``tanh.approx.f32`` (one MUFU op, rel. error ~2^-11) for bf16/fp16 inputs on NVIDIA GPUs:
    below their own rounding and it halves the special-function work. fp32 keeps the exact
    form so that it matches the fp32 reference to ~1e-6."""
    return dtype_name in ("bf16", "fp16") and torch.version.hip is None


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def tanh_f32(x, FAST: tl.constexpr):
    """tanh in fp32; ``FAST`` uses the hardware approximation (NVIDIA sm_75+)."""
    if FAST:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        # 1 - 2/(e^{2x}+1): absolute error ~1e-7, saturates to ±1 without inf/inf.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def row_softmax_stats(row_ptr, L, BLOCK: tl.constexpr):
    """(max, Σ exp(s - max)) of the L fp32-castable scores at ``row_ptr``."""
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for l0 in range(0, L, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        s = tl.load(row_ptr + offs, mask=offs < L, other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, s)
    m = tl.max(mx, 0)
    acc = tl.zeros([BLOCK], tl.float32)
    for l0 in range(0, L, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        s = tl.load(row_ptr + offs, mask=offs < L, other=float("-inf")).to(tl.float32)
        acc += tl.exp(s - m)
    return m, tl.sum(acc, 0)


@triton.jit
def softmax_bwd_delta(
    context32_row, dcontext, offs_d, mask_d, weights32_row, dweights_row, L,
    HAS_GW: tl.constexpr, BLOCK: tl.constexpr,
):
    """δ = Σ_j w_j · ∂loss/∂w_j for one batch row, where the total weight gradient is
    ``prior_j (feats_j·dcontext) + dweights_j``.

    The context term Σ_j w_j prior_j (feats_j·dcontext) equals ``context·dcontext``, so δ needs no
    extra pass over feats: the forward keeps the fp32 context for this. ``dcontext`` is the row's
    fp32 context gradient, already loaded at ``offs_d``.
    """
    ctx = tl.load(context32_row + offs_d, mask=mask_d, other=0.0)
    delta = tl.sum(ctx * dcontext, 0)
    if HAS_GW:
        acc = tl.zeros([BLOCK], tl.float32)
        for l0 in range(0, L, BLOCK):
            offs = l0 + tl.arange(0, BLOCK)
            m = offs < L
            w = tl.load(weights32_row + offs, mask=m, other=0.0)
            gw = tl.load(dweights_row + offs, mask=m, other=0.0).to(tl.float32)
            acc += w * gw
        delta += tl.sum(acc, 0)
    return delta
