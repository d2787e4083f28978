"""Additive (Bahdanau) attention with a multiplicative prior (the paper's local attention, Eq. 4–5).

    s_i     = v · tanh(feats_proj_i + query_proj)          [B, L]
    weights = softmax_i(s_i)                               [B, L]
    context = Σ_i weights_i · prior_i · feats_i            [B, D]   (prior None = 1)

Forward (two kernels):
1. grid (B, L-splits): each program streams its regions' ``feats_proj`` and ``feats`` rows once,
   scoring and pooling them with an online softmax; it writes the raw scores (fp32, B×L) and its
   partial (max, Σexp, Σexp·prior·feats).
2. grid (B,): merges the partials into the context and turns the scores into the weights.
Every kernel writes only its outputs (never an input in place), so autotuning may rerun it.
Backward (one kernel, grid (B, L-splits)): recomputes tanh from ``feats_proj`` instead of keeping
B×L×A intermediates; d(query_proj) and dv, which sum over regions, go to fp32 per-program partial
buffers that the host sums (deterministic, no atomics).

dfeats per step. In the decoder this op runs once per step t, and each backward writes a dense
``[B, L, D]`` dfeats term ``coef_t ⊗ dctx_t`` (rank one per row) that autograd adds to the others;
one batched product ``coef^T [B,L,T] @ dctx [B,T,D]`` would write it once. It is not done: the sum
needs every step's context gradient, which autograd hands to each step's own node, so deferring it
takes either one autograd node over all T steps (attention, LSTM and prediction fused) or a side
channel mutated behind autograd (not traceable by torch.compile). Measured and modelled in
``benchmarks/dfeats_accumulation.py``: at B=256, L=784, D=512, T=5, bf16 the per-step terms move
~3.5 GB per iteration against ~0.2 GB (~0.8 ms at 4 TB/s, under 1 % of a VGG-16 448-px step); on a
2-core CPU (fp32, B=32, L=196) 108 ms against 12 ms.
"""

from functools import lru_cache
from typing import Any, Optional

import torch
from torch.library import triton_op

from . import _attention_common as common
# The @triton.jit helpers are imported by name and called unqualified: when torch.compile meets
# this kernel, Inductor re-emits its source with the jit functions it reaches by global *name*;
# a call through a module attribute (common.helper) would be a NameError in the re-emitted code.
from ._attention_common import softmax_bwd_delta, tanh_f32
from ._triton import tl, triton
from ._utils import config, dtype_name, fast_path, fixed_grid, launch
from .registry import BENCH_A, BENCH_B, BENCH_D, KernelSpec, register_kernel

__all__ = ["additive_attention", "additive_attention_ref"]

#: Autotune candidates of the forward: ``(elements per [BLOCK_L, max(BLOCK_D, BLOCK_A)] tile,
#: warps, stages)``, the first the default (8 warps → 32 per thread for each of the feats tile,
#: the feats_proj tile and the context accumulator).
TILES_FWD = ((8192, 8, 1), (8192, 8, 2), (4096, 4, 1))
#: The backward holds twice as many live tiles (inputs, outputs, two accumulators): half the rows.
TILES_BWD = ((4096, 8, 1), (4096, 8, 2), (2048, 4, 1))
#: Combine (one program per row): warps and stages only.
COMBINE_CONFIGS = ((4, 1), (2, 1))
#: Resident programs per SM (benchmarks/KERNELS.md: 2, registers, for the forward and backward):
#: sets the split target, so that a launch is ``common.WAVES`` full waves.
RESIDENT_PER_SM = 2
#: Scores are read in chunks of at most this many (combine, δ).
MAX_BLOCK_LS = 1024


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def _check_args(feats: Any, feats_proj: Any, query_proj: Any, v: Any, prior: Any) -> None:
    common.check_tensor("feats", feats, 3)
    common.check_nonempty(feats)
    B, L, _ = feats.shape
    common.check_tensor("feats_proj", feats_proj, 3)
    if tuple(feats_proj.shape[:2]) != (B, L):
        raise ValueError(
            f"feats_proj must have shape (B, L, A) with (B, L) = {(B, L)} from feats, "
            f"got {tuple(feats_proj.shape)}"
        )
    A = feats_proj.shape[2]
    if A == 0:
        raise ValueError("feats_proj must have at least one attention channel (A >= 1), got A = 0")
    common.check_tensor("query_proj", query_proj, 2)
    common.check_shape("query_proj", query_proj, (B, A), "(B, A)")
    common.check_tensor("v", v, 1)
    common.check_shape("v", v, (A,), "(A,)")
    if prior is not None:
        common.check_tensor("prior", prior, 2)
        common.check_shape("prior", prior, (B, L), "(B, L)")
    common.check_same_device(
        {"feats": feats, "feats_proj": feats_proj, "query_proj": query_proj, "v": v, "prior": prior}
    )


def additive_attention_ref(
    feats: torch.Tensor,
    feats_proj: torch.Tensor,
    query_proj: torch.Tensor,
    v: torch.Tensor,
    prior: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch additive attention: ``(context [B, D], weights [B, L])``.

    ``upcast=True`` computes in fp32 (fp16/bf16 inputs) and returns in ``feats.dtype``;
    ``upcast=False`` is PyTorch's own low-precision path.
    """
    _check_args(feats, feats_proj, query_proj, v, prior)
    out_dtype = feats.dtype
    f, fp, q, vv, p = (common.upcast(t, upcast) for t in (feats, feats_proj, query_proj, v, prior))
    scores = torch.tanh(fp + q.unsqueeze(1)) @ vv  # [B, L]
    weights = torch.softmax(scores, dim=-1)
    coef = weights if p is None else weights * p
    context = torch.bmm(coef.unsqueeze(1).to(f.dtype), f).squeeze(1)
    return context.to(out_dtype), weights.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _additive_attention_fwd_kernel(
    feats, feats_proj, query_proj, v, prior,
    scores32, part_max, part_sum, part_ctx,
    L, ROWS_PER_SPLIT,
    D: tl.constexpr, A: tl.constexpr, HAS_PRIOR: tl.constexpr, FAST_TANH: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """Program (b, k): scores and the online-softmax partial context of split k of row b."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    row = b.to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < A
    q_vec = tl.load(query_proj + row * A + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    v_vec = tl.load(v + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    feats_row = feats + row * L * D
    proj_row = feats_proj + row * L * A

    m = tl.full([], float("-inf"), tl.float32)  # running max of the scores
    denom = tl.zeros([], tl.float32)  # running Σ exp(s - m)
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)  # Σ exp(s - m) prior feats, rows reduced last
    l_begin = split * ROWS_PER_SPLIT
    l_end = tl.minimum(l_begin + ROWS_PER_SPLIT, L)
    for l0 in range(l_begin, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        fp = tl.load(
            proj_row + offs_l[:, None] * A + offs_a[None, :],
            mask=mask_l[:, None] & mask_a[None, :], other=0.0,
        ).to(tl.float32)
        t = tanh_f32(fp + q_vec[None, :], FAST_TANH)
        s = tl.sum(t * v_vec[None, :], 1)
        s = tl.where(mask_l, s, float("-inf"))
        tl.store(scores32 + row * L + offs_l, s, mask=mask_l)

        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        denom = denom * alpha + tl.sum(e, 0)
        if HAS_PRIOR:
            e = e * tl.load(prior + row * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        f = tl.load(
            feats_row + offs_l[:, None] * D + offs_d[None, :],
            mask=mask_l[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        acc = acc * alpha + e[:, None] * f
        m = m_new

    part = row * n_split + split
    tl.store(part_max + part, m)
    tl.store(part_sum + part, denom)
    tl.store(part_ctx + part * D + offs_d, tl.sum(acc, 0), mask=mask_d)


@triton.jit
def _additive_attention_combine_kernel(
    part_max, part_sum, part_ctx, scores32,
    context, context32, weights, weights32,
    L, N_SPLIT,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_LS: tl.constexpr,
):
    """Program b: merge row b's split partials into the context and turn the raw scores into the
    weights (written, like every kernel output, to its own buffer: autotuning runs it twice)."""
    b = tl.program_id(0)
    row = b.to(tl.int64)
    m = tl.full([], float("-inf"), tl.float32)
    for k in range(0, N_SPLIT):
        m = tl.maximum(m, tl.load(part_max + row * N_SPLIT + k))
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    denom = tl.zeros([], tl.float32)
    ctx = tl.zeros([BLOCK_D], tl.float32)
    for k in range(0, N_SPLIT):
        part = row * N_SPLIT + k
        scale = tl.exp(tl.load(part_max + part) - m)
        denom += scale * tl.load(part_sum + part)
        ctx += scale * tl.load(part_ctx + part * D + offs_d, mask=mask_d, other=0.0)
    inv_denom = 1.0 / denom
    ctx = ctx * inv_denom
    tl.store(context + row * D + offs_d, ctx.to(context.dtype.element_ty), mask=mask_d)
    tl.store(context32 + row * D + offs_d, ctx, mask=mask_d)
    for l0 in range(0, L, BLOCK_LS):
        offs = l0 + tl.arange(0, BLOCK_LS)
        mask = offs < L
        s = tl.load(scores32 + row * L + offs, mask=mask, other=float("-inf"))
        w = tl.exp(s - m) * inv_denom
        tl.store(weights32 + row * L + offs, w, mask=mask)
        tl.store(weights + row * L + offs, w.to(weights.dtype.element_ty), mask=mask)


@triton.jit
def _additive_attention_bwd_kernel(
    feats, feats_proj, query_proj, v, prior,
    weights32, context32, dcontext, dweights,
    dfeats, dfeats_proj, dprior, part_dq, part_dv,
    L, ROWS_PER_SPLIT,
    D: tl.constexpr, A: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_GW: tl.constexpr,
    NEED_DFEATS: tl.constexpr, NEED_DPRIOR: tl.constexpr, FAST_TANH: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_LS: tl.constexpr,
):
    """Program (b, k): every gradient for the regions of split k of row b.

    With g_i = feats_i·dcontext, δ = Σ_j w_j (prior_j g_j + dweights_j), ds_i = w_i (prior_i g_i +
    dweights_i − δ) and t_i = tanh(feats_proj_i + query_proj):
    dfeats_i = w_i prior_i dcontext, dprior_i = w_i g_i, dfeats_proj_i = ds_i v ⊙ (1 − t_i²),
    d(query_proj) = Σ_i dfeats_proj_i, dv = Σ_i ds_i t_i (these two as per-program partials).
    """
    b = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    row = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < A
    dctx = tl.load(dcontext + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    delta = softmax_bwd_delta(
        context32 + row * D, dctx, offs_d, mask_d,
        weights32 + row * L, dweights + row * L, L, HAS_GW, BLOCK_LS,
    )
    q_vec = tl.load(query_proj + row * A + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    v_vec = tl.load(v + offs_a, mask=mask_a, other=0.0).to(tl.float32)
    feats_row = feats + row * L * D
    dfeats_row = dfeats + row * L * D
    proj_row = feats_proj + row * L * A
    dproj_row = dfeats_proj + row * L * A

    dq_acc = tl.zeros([BLOCK_L, BLOCK_A], tl.float32)
    dv_acc = tl.zeros([BLOCK_L, BLOCK_A], tl.float32)
    l_begin = split * ROWS_PER_SPLIT
    l_end = tl.minimum(l_begin + ROWS_PER_SPLIT, L)
    for l0 in range(l_begin, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        w = tl.load(weights32 + row * L + offs_l, mask=mask_l, other=0.0)
        if HAS_PRIOR:
            p = tl.load(prior + row * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        else:
            p = tl.full([BLOCK_L], 1.0, tl.float32)
        mask_ld = mask_l[:, None] & mask_d[None, :]
        offs_ld = offs_l[:, None] * D + offs_d[None, :]
        f = tl.load(feats_row + offs_ld, mask=mask_ld, other=0.0).to(tl.float32)
        g = tl.sum(f * dctx[None, :], 1)
        if NEED_DFEATS:
            df = (w * p)[:, None] * dctx[None, :]
            tl.store(dfeats_row + offs_ld, df.to(dfeats.dtype.element_ty), mask=mask_ld)
        if NEED_DPRIOR:
            tl.store(dprior + row * L + offs_l, (w * g).to(dprior.dtype.element_ty), mask=mask_l)
        dw = p * g
        if HAS_GW:
            dw += tl.load(dweights + row * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        ds = w * (dw - delta)  # 0 on the masked tail (w = 0 there)

        mask_la = mask_l[:, None] & mask_a[None, :]
        offs_la = offs_l[:, None] * A + offs_a[None, :]
        fp = tl.load(proj_row + offs_la, mask=mask_la, other=0.0).to(tl.float32)
        t = tanh_f32(fp + q_vec[None, :], FAST_TANH)
        du = ds[:, None] * v_vec[None, :] * (1.0 - t * t)  # 0 where a >= A (v = 0) or l >= L
        tl.store(dproj_row + offs_la, du.to(dfeats_proj.dtype.element_ty), mask=mask_la)
        dq_acc += du
        dv_acc += ds[:, None] * t

    part = row * n_split + split
    tl.store(part_dq + part * A + offs_a, tl.sum(dq_acc, 0), mask=mask_a)
    tl.store(part_dv + part * A + offs_a, tl.sum(dv_acc, 0), mask=mask_a)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and the registry)
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)  # computed once per problem: launchers run at every decoder step
def _launch_config(B: int, L: int, D: int, A: int, dtype: str) -> dict[str, common.KernelLaunch]:
    """Grid, block sizes and autotune candidates of the three kernels for a ``[B, L, D]`` /
    ``[B, L, A]`` problem.

    Streaming programs hold the full (power-of-two padded) D and A in their tiles and loop over
    their ``ROWS_PER_SPLIT`` regions in BLOCK_L rows; each batch row is split over enough programs
    that B·splits reaches ``target_programs`` (B = 256 alone is under one program per SM). The
    split (hence the partial buffers) is fixed by the host; BLOCK_L, warps and stages are tuned.
    """
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be one of fp32/bf16/fp16, got {dtype!r}")
    target = common.target_programs(RESIDENT_PER_SM)
    block_d = common.pow2(D)
    block_a = common.pow2(A)
    width = max(block_d, block_a)
    block_ls = min(common.pow2(L), MAX_BLOCK_LS)

    configs_fwd = common.block_l_configs(width, L, TILES_FWD)
    n_split, rows_per_split = common.split_rows(B, L, common.max_block_l(configs_fwd), target)
    fwd = common.KernelLaunch(
        grid=fixed_grid(B, n_split),
        constexprs=dict(BLOCK_D=block_d, BLOCK_A=block_a),
        configs=configs_fwd,
        key=("L", "D", "A", "ROWS_PER_SPLIT"),
        ints=dict(ROWS_PER_SPLIT=rows_per_split, N_SPLIT=n_split),
    )
    combine = common.KernelLaunch(
        grid=fixed_grid(B),
        constexprs=dict(BLOCK_D=block_d, BLOCK_LS=block_ls),
        configs=tuple(config(w, st) for w, st in COMBINE_CONFIGS),
        key=("L", "D", "N_SPLIT"),
        ints=dict(N_SPLIT=n_split),
    )
    configs_bwd = common.block_l_configs(width, L, TILES_BWD)
    n_split_bwd, rows_per_split_bwd = common.split_rows(B, L, common.max_block_l(configs_bwd), target)
    bwd = common.KernelLaunch(
        grid=fixed_grid(B, n_split_bwd),
        constexprs=dict(BLOCK_D=block_d, BLOCK_A=block_a, BLOCK_LS=block_ls),
        configs=configs_bwd,
        key=("L", "D", "A", "ROWS_PER_SPLIT"),
        ints=dict(ROWS_PER_SPLIT=rows_per_split_bwd, N_SPLIT=n_split_bwd),
    )
    return {"fwd": fwd, "combine": combine, "bwd": bwd}


_FWD_KINDS = dict(
    feats="io", feats_proj="io", query_proj="io", v="io", prior="io",
    scores32="f32", part_max="f32", part_sum="f32", part_ctx="f32",
    L="i32", ROWS_PER_SPLIT="i32",
)
_COMBINE_KINDS = dict(
    part_max="f32", part_sum="f32", part_ctx="f32", scores32="f32",
    context="io", context32="f32", weights="io", weights32="f32", L="i32", N_SPLIT="i32",
)
_BWD_KINDS = dict(
    feats="io", feats_proj="io", query_proj="io", v="io", prior="io",
    weights32="f32", context32="f32", dcontext="io", dweights="io",
    dfeats="io", dfeats_proj="io", dprior="io", part_dq="f32", part_dv="f32",
    L="i32", ROWS_PER_SPLIT="i32",
)


def _registry(kernel: Any, which: str, kinds: dict[str, str], flags: dict[str, Any]) -> dict[str, Any]:
    B, D, A = BENCH_B, BENCH_D, BENCH_A

    def constexprs_for(dtype: str) -> dict[str, Any]:
        if which == "combine":
            return dict(D=D, **flags)
        return dict(D=D, A=A, FAST_TANH=common.use_fast_tanh(dtype), **flags)

    configs = common.bench_registry(
        kernel, which, kinds,
        launch_for=lambda L, dtype: _launch_config(B, L, D, A, dtype),
        constexprs_for=constexprs_for,
        sizes=f"D={D} A={A}",
    )
    return dict(configs=configs)


# The model's local attention has the global weights as prior and its own weights unused by the
# loss (no weights gradient): the registered configs are that case.
register_kernel(
    KernelSpec(
        name="additive_attention_fwd",
        fn=_additive_attention_fwd_kernel,
        dtypes=("fp32", "bf16", "fp16"),
        streamed=("feats", "feats_proj"),
        uses_dot=False,
        notes="grid (B, L-splits); online softmax, one pass over feats_proj and feats",
        **_registry(_additive_attention_fwd_kernel, "fwd", _FWD_KINDS, dict(HAS_PRIOR=True)),
    )
)
register_kernel(
    KernelSpec(
        name="additive_attention_combine",
        fn=_additive_attention_combine_kernel,
        dtypes=("fp32", "bf16", "fp16"),
        streamed=(),
        uses_dot=False,
        notes="grid (B,); merges the L-split partials, writes context and weights",
        **_registry(_additive_attention_combine_kernel, "combine", _COMBINE_KINDS, {}),
    )
)
register_kernel(
    KernelSpec(
        name="additive_attention_bwd",
        fn=_additive_attention_bwd_kernel,
        dtypes=("fp32", "bf16", "fp16"),
        streamed=("feats", "feats_proj"),
        uses_dot=False,
        notes="grid (B, L-splits); recomputes tanh; dq/dv as fp32 per-program partials",
        **_registry(
            _additive_attention_bwd_kernel, "bwd", _BWD_KINDS,
            dict(HAS_PRIOR=True, HAS_GW=False, NEED_DFEATS=True, NEED_DPRIOR=True),
        ),
    )
)


# ----------------------------------------------------------------------------------------------
# Host functions and the custom op
# ----------------------------------------------------------------------------------------------


def _fast_tanh(t: torch.Tensor) -> bool:
    # The interpreter (CPU) cannot run inline PTX; it only sees fp32 anyway.
    return t.is_cuda and common.use_fast_tanh(dtype_name(t))


@triton_op("c2f_fast::additive_attention", mutates_args=())
def _additive_attention_op(
    feats: torch.Tensor,
    feats_proj: torch.Tensor,
    query_proj: torch.Tensor,
    v: torch.Tensor,
    prior: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(context, weights, context fp32, weights fp32)``; the fp32 pair is kept for
    the backward."""
    feats, feats_proj, query_proj, v = (
        common.contiguous(t) for t in (feats, feats_proj, query_proj, v)
    )
    prior = None if prior is None else common.contiguous(prior)
    B, L, D = feats.shape
    A = feats_proj.shape[2]
    launches = _launch_config(int(B), int(L), int(D), int(A), dtype_name(feats_proj))
    fwd, combine = launches["fwd"], launches["combine"]
    n_split = fwd.ints["N_SPLIT"]
    context = feats.new_empty((B, D))
    weights = feats.new_empty((B, L))
    context32 = feats.new_empty((B, D), dtype=torch.float32)
    weights32 = feats.new_empty((B, L), dtype=torch.float32)
    scores32 = feats.new_empty((B, L), dtype=torch.float32)
    part_max = feats.new_empty((B, n_split), dtype=torch.float32)
    part_sum = feats.new_empty((B, n_split), dtype=torch.float32)
    part_ctx = feats.new_empty((B, n_split, D), dtype=torch.float32)
    if B > 0:
        launch(
            _additive_attention_fwd_kernel, fwd,
            feats, feats_proj, query_proj, v, prior if prior is not None else common.placeholder(feats),
            scores32, part_max, part_sum, part_ctx,
            L, fwd.ints["ROWS_PER_SPLIT"],
            D=D, A=A, HAS_PRIOR=prior is not None, FAST_TANH=_fast_tanh(feats_proj),
        )
        launch(
            _additive_attention_combine_kernel, combine,
            part_max, part_sum, part_ctx, scores32,
            context, context32, weights, weights32,
            L, n_split,
            D=D,
        )
    return context, weights, context32, weights32


@triton_op("c2f_fast::additive_attention_backward", mutates_args=())
def _additive_attention_backward_op(
    feats: torch.Tensor,
    feats_proj: torch.Tensor,
    query_proj: torch.Tensor,
    v: torch.Tensor,
    prior: Optional[torch.Tensor],
    weights32: torch.Tensor,
    context32: torch.Tensor,
    dcontext: torch.Tensor,
    dweights: Optional[torch.Tensor],
    need_dfeats: bool,
    need_dprior: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dfeats, dfeats_proj, dquery_proj, dv, dprior)``; a gradient that is not
    needed (dfeats, dprior) comes back as an empty tensor."""
    feats, feats_proj, query_proj, v, dcontext = (
        common.contiguous(t) for t in (feats, feats_proj, query_proj, v, dcontext)
    )
    prior = None if prior is None else common.contiguous(prior)
    dweights = None if dweights is None else common.contiguous(dweights)
    B, L, D = feats.shape
    A = feats_proj.shape[2]
    need_dprior = need_dprior and prior is not None
    bwd = _launch_config(int(B), int(L), int(D), int(A), dtype_name(feats_proj))["bwd"]
    n_split = bwd.ints["N_SPLIT"]
    dfeats = torch.empty_like(feats) if need_dfeats else common.placeholder(feats)
    dfeats_proj = torch.empty_like(feats_proj)
    dprior = torch.empty_like(prior) if need_dprior else common.placeholder(feats)
    part_dq = feats.new_empty((B, n_split, A), dtype=torch.float32)
    part_dv = feats.new_empty((B, n_split, A), dtype=torch.float32)
    if B > 0:
        launch(
            _additive_attention_bwd_kernel, bwd,
            feats, feats_proj, query_proj, v, prior if prior is not None else common.placeholder(feats),
            weights32, context32, dcontext,
            dweights if dweights is not None else common.placeholder(feats),
            dfeats, dfeats_proj, dprior,
            part_dq, part_dv,
            L, bwd.ints["ROWS_PER_SPLIT"],
            D=D, A=A, HAS_PRIOR=prior is not None, HAS_GW=dweights is not None,
            NEED_DFEATS=need_dfeats, NEED_DPRIOR=need_dprior, FAST_TANH=_fast_tanh(feats_proj),
        )
    # Fixed-order fp32 sums of the per-program partials: deterministic.
    dquery_proj = part_dq.sum(dim=1).to(query_proj.dtype)
    dv = part_dv.sum(dim=(0, 1)).to(v.dtype)
    return dfeats, dfeats_proj, dquery_proj, dv, dprior


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    feats, feats_proj, query_proj, v, prior = inputs
    _, _, context32, weights32 = output
    ctx.mark_non_differentiable(context32, weights32)
    # An unused `weights` output then gives None rather than a materialised zero tensor.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(feats, feats_proj, query_proj, v, prior, weights32, context32)


def _backward(ctx: Any, dcontext, dweights, _d32, _w32):
    feats, feats_proj, query_proj, v, prior, weights32, context32 = ctx.saved_tensors
    if dcontext is None:
        dcontext = context32.new_zeros(context32.shape)
    need = ctx.needs_input_grad[:5]
    dfeats, dfeats_proj, dquery_proj, dv, dprior = _additive_attention_backward_op(
        feats, feats_proj, query_proj, v, prior, weights32, context32, dcontext, dweights,
        bool(need[0]), bool(need[4]),
    )
    return (
        dfeats if need[0] else None,
        dfeats_proj if need[1] else None,
        dquery_proj if need[2] else None,
        dv if need[3] else None,
        dprior if need[4] and prior is not None else None,
    )


_additive_attention_op.register_autograd(_backward, setup_context=_setup_context)


def additive_attention(
    feats: torch.Tensor,
    feats_proj: torch.Tensor,
    query_proj: torch.Tensor,
    v: torch.Tensor,
    prior: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention: ``(context [B, D], weights [B, L])`` in ``feats.dtype``.

    ``s_i = v · tanh(feats_proj_i + query_proj)``, ``weights = softmax_i(s)`` (before the prior),
    ``context = Σ_i weights_i prior_i feats_i``. Triton kernels on CUDA (fp32/bf16/fp16, fp32
    accumulation) and under ``TRITON_INTERPRET=1`` for fp32 CPU tensors; otherwise
    ``additive_attention_ref``.
    """
    _check_args(feats, feats_proj, query_proj, v, prior)
    if not fast_path(feats, feats_proj, query_proj, v, prior):
        return additive_attention_ref(feats, feats_proj, query_proj, v, prior, upcast=True)
    context, weights, _, _ = _additive_attention_op(feats, feats_proj, query_proj, v, prior)
    return context, weights
