"""Softmax attention pooling with given scores (the paper's global attention, Eq. 1–3).

    weights = softmax_i(scores_i)                      [B, L]
    context = Σ_i weights_i · prior_i · feats_i        [B, D]   (prior None = 1, no renormalisation)

Forward: one kernel, grid (B, D-blocks). Each program reads its row's L scores (tiny, cached) to
get the exact softmax statistics, then streams its ``[L, BLOCK_D]`` slice of feats exactly once.
Backward: one kernel, grid (B, L-splits); every input gradient is local to a region i once
δ = Σ_j w_j ∂loss/∂w_j is known, and δ comes from the fp32 context the forward keeps
(see ``_attention_common.softmax_bwd_delta``), so feats is read once more and nothing B×L×D is
stored between the passes.
"""

from functools import lru_cache
from typing import Any, Optional

import torch
from torch.library import triton_op

from . import _attention_common as common
# The @triton.jit helpers are imported by name and called unqualified: when torch.compile meets
# this kernel, Inductor re-emits its source with the jit functions it reaches by global *name*;
# a call through a module attribute (common.helper) would be a NameError in the re-emitted code.
from ._attention_common import row_softmax_stats, softmax_bwd_delta
from ._triton import tl, triton
from ._utils import dtype_name, fast_path, fixed_grid, launch
from .registry import BENCH_B, BENCH_D, KernelSpec, register_kernel

__all__ = ["attention_pool", "attention_pool_ref"]

#: Autotune candidates of the forward: ``(elements per [BLOCK_L, BLOCK_D] tile, warps, stages)``,
#: the first the default (4 warps → 32 elements per thread).
TILES_FWD = ((4096, 4, 1), (4096, 4, 2), (8192, 8, 2))
#: Backward tiles hold feats and the dfeats being written (8 warps → 32 + 32 per thread).
TILES_BWD = ((8192, 8, 1), (8192, 8, 2), (4096, 4, 2))
#: Resident programs per SM (benchmarks/KERNELS.md: 4-9 for both kernels): sets the split target.
RESIDENT_PER_SM = 4
#: Widest D slice one forward program owns.
MAX_BLOCK_D_FWD = 128
#: Scores are read in chunks of at most this many (softmax statistics, δ).
MAX_BLOCK_LS = 1024


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def _check_args(feats: Any, scores: Any, prior: Any) -> None:
    common.check_tensor("feats", feats, 3)
    common.check_nonempty(feats)
    B, L, _ = feats.shape
    common.check_tensor("scores", scores, 2)
    common.check_shape("scores", scores, (B, L), "(B, L)")
    if prior is not None:
        common.check_tensor("prior", prior, 2)
        common.check_shape("prior", prior, (B, L), "(B, L)")
    common.check_same_device({"feats": feats, "scores": scores, "prior": prior})


def attention_pool_ref(
    feats: torch.Tensor,
    scores: torch.Tensor,
    prior: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention pooling: ``(context [B, D], weights [B, L])``.

    ``upcast=True`` computes in fp32 (fp16/bf16 inputs) and returns in ``feats.dtype``;
    ``upcast=False`` is PyTorch's own low-precision path.
    """
    _check_args(feats, scores, prior)
    out_dtype = feats.dtype
    f = common.upcast(feats, upcast)
    s = common.upcast(scores, upcast)
    p = common.upcast(prior, upcast)
    weights = torch.softmax(s, dim=-1)
    coef = weights if p is None else weights * p
    context = torch.bmm(coef.unsqueeze(1).to(f.dtype), f).squeeze(1)
    return context.to(out_dtype), weights.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attention_pool_fwd_kernel(
    feats, scores, prior,
    context, weights, context32, weights32,
    L,
    D: tl.constexpr, HAS_PRIOR: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_LS: tl.constexpr,
):
    """Program (b, j): context[b, j·BLOCK_D : (j+1)·BLOCK_D]; programs with j = 0 also write
    the row's weights."""
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    row = b.to(tl.int64)
    scores_row = scores + row * L
    m, denom = row_softmax_stats(scores_row, L, BLOCK_LS)
    inv_denom = 1.0 / denom

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    feats_row = feats + row * L * D
    write_weights = pid_d == 0
    # 2-D accumulator: the reduction over rows happens once, after the loop.
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        s = tl.load(scores_row + offs_l, mask=mask_l, other=float("-inf")).to(tl.float32)
        w = tl.exp(s - m) * inv_denom  # 0 on the masked tail
        wmask = mask_l & write_weights
        tl.store(weights + row * L + offs_l, w.to(weights.dtype.element_ty), mask=wmask)
        tl.store(weights32 + row * L + offs_l, w, mask=wmask)
        if HAS_PRIOR:
            w = w * tl.load(prior + row * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        f = tl.load(
            feats_row + offs_l[:, None] * D + offs_d[None, :],
            mask=mask_l[:, None] & mask_d[None, :], other=0.0,
        )
        acc += w[:, None] * f.to(tl.float32)
    ctx = tl.sum(acc, 0)
    tl.store(context + row * D + offs_d, ctx.to(context.dtype.element_ty), mask=mask_d)
    tl.store(context32 + row * D + offs_d, ctx, mask=mask_d)


@triton.jit
def _attention_pool_bwd_kernel(
    feats, prior, weights32, context32, dcontext, dweights,
    dfeats, dscores, dprior,
    L, ROWS_PER_SPLIT,
    D: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_GW: tl.constexpr,
    NEED_DFEATS: tl.constexpr, NEED_DPRIOR: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_LS: tl.constexpr,
):
    """Program (b, k): every gradient for the regions of split k of row b.

    With g_i = feats_i·dcontext and δ = Σ_j w_j (prior_j g_j + dweights_j):
    dfeats_i = w_i prior_i dcontext, dprior_i = w_i g_i,
    dscores_i = w_i (prior_i g_i + dweights_i − δ).
    """
    b = tl.program_id(0)
    split = tl.program_id(1)
    row = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    dctx = tl.load(dcontext + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    delta = softmax_bwd_delta(
        context32 + row * D, dctx, offs_d, mask_d,
        weights32 + row * L, dweights + row * L, L, HAS_GW, BLOCK_LS,
    )
    feats_row = feats + row * L * D
    dfeats_row = dfeats + row * L * D
    l_begin = split * ROWS_PER_SPLIT
    l_end = tl.minimum(l_begin + ROWS_PER_SPLIT, L)
    for l0 in range(l_begin, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        mask_2d = mask_l[:, None] & mask_d[None, :]
        offs_2d = offs_l[:, None] * D + offs_d[None, :]
        w = tl.load(weights32 + row * L + offs_l, mask=mask_l, other=0.0)
        if HAS_PRIOR:
            p = tl.load(prior + row * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        else:
            p = tl.full([BLOCK_L], 1.0, tl.float32)
        f = tl.load(feats_row + offs_2d, mask=mask_2d, other=0.0).to(tl.float32)
        g = tl.sum(f * dctx[None, :], 1)
        if NEED_DFEATS:
            df = (w * p)[:, None] * dctx[None, :]
            tl.store(dfeats_row + offs_2d, df.to(dfeats.dtype.element_ty), mask=mask_2d)
        if NEED_DPRIOR:
            tl.store(dprior + row * L + offs_l, (w * g).to(dprior.dtype.element_ty), mask=mask_l)
        dw = p * g
        if HAS_GW:
            dw += tl.load(dweights + row * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        ds = w * (dw - delta)
        tl.store(dscores + row * L + offs_l, ds.to(dscores.dtype.element_ty), mask=mask_l)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and the registry)
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)  # computed once per problem: launchers run at every decoder step
def _launch_config(B: int, L: int, D: int, dtype: str) -> dict[str, common.KernelLaunch]:
    """Grid, block sizes and autotune candidates of both kernels for a ``[B, L, D]`` problem.

    Forward: programs own a D slice of one row (no cross-program reduction); the slice narrows
    until B·D-blocks reaches ``target_programs`` (but stays ≥ 32 wide, i.e. 64-byte rows); the
    rows per tile (BLOCK_L), warps and stages are tuned.
    Backward: programs own a run of ``ROWS_PER_SPLIT`` regions of one row with the full D in the
    tile; the split is fixed by the host, BLOCK_L, warps and stages are tuned.
    ``dtype`` does not change the shapes (fp32 tiles just take two 16-byte loads per 8 values).
    """
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be one of fp32/bf16/fp16, got {dtype!r}")
    target = common.target_programs(RESIDENT_PER_SM)
    block_ls = min(common.pow2(L), MAX_BLOCK_LS)

    block_d = min(common.pow2(D), MAX_BLOCK_D_FWD)
    while block_d > 32 and B * triton.cdiv(D, block_d) < target:
        block_d //= 2
    fwd = common.KernelLaunch(
        grid=fixed_grid(B, triton.cdiv(D, block_d)),
        constexprs=dict(BLOCK_D=block_d, BLOCK_LS=block_ls),
        configs=common.block_l_configs(block_d, L, TILES_FWD),
        key=("L", "D"),
    )

    block_d_bwd = common.pow2(D)
    configs_bwd = common.block_l_configs(block_d_bwd, L, TILES_BWD)
    n_split, rows_per_split = common.split_rows(B, L, common.max_block_l(configs_bwd), target)
    bwd = common.KernelLaunch(
        grid=fixed_grid(B, n_split),
        constexprs=dict(BLOCK_D=block_d_bwd, BLOCK_LS=block_ls),
        configs=configs_bwd,
        key=("L", "D", "ROWS_PER_SPLIT"),
        ints=dict(ROWS_PER_SPLIT=rows_per_split),
    )
    return {"fwd": fwd, "bwd": bwd}


_FWD_KINDS = dict(
    feats="io", scores="io", prior="io",
    context="io", weights="io", context32="f32", weights32="f32", L="i32",
)
_BWD_KINDS = dict(
    feats="io", prior="io", weights32="f32", context32="f32",
    dcontext="io", dweights="io", dfeats="io", dscores="io", dprior="io",
    L="i32", ROWS_PER_SPLIT="i32",
)


def _registry(kernel: Any, which: str, kinds: dict[str, str], flags: dict[str, Any]) -> dict[str, Any]:
    configs = common.bench_registry(
        kernel, which, kinds,
        launch_for=lambda L, dtype: _launch_config(BENCH_B, L, BENCH_D, dtype),
        constexprs_for=lambda dtype: dict(D=BENCH_D, **flags),
        sizes=f"D={BENCH_D}",
    )
    return dict(configs=configs)


# The model's global attention has no prior and its weights feed the local attention's prior
# (so the backward sees a weights gradient): the registered configs are that case.
register_kernel(
    KernelSpec(
        name="attention_pool_fwd",
        fn=_attention_pool_fwd_kernel,
        dtypes=("fp32", "bf16", "fp16"),
        streamed=("feats",),
        uses_dot=False,
        notes="grid (B, D/BLOCK_D); one pass over feats",
        **_registry(_attention_pool_fwd_kernel, "fwd", _FWD_KINDS, dict(HAS_PRIOR=False)),
    )
)
register_kernel(
    KernelSpec(
        name="attention_pool_bwd",
        fn=_attention_pool_bwd_kernel,
        dtypes=("fp32", "bf16", "fp16"),
        streamed=("feats",),
        uses_dot=False,
        notes="grid (B, L-splits); reads feats once, writes dfeats",
        **_registry(
            _attention_pool_bwd_kernel, "bwd", _BWD_KINDS,
            dict(HAS_PRIOR=False, HAS_GW=True, NEED_DFEATS=True, NEED_DPRIOR=False),
        ),
    )
)


# ----------------------------------------------------------------------------------------------
# Host functions and the custom op
# ----------------------------------------------------------------------------------------------


@triton_op("c2f_fast::attention_pool", mutates_args=())
def _attention_pool_op(
    feats: torch.Tensor, scores: torch.Tensor, prior: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(context, weights, context fp32, weights fp32)``; the fp32 pair is kept for
    the backward (δ and the softmax probabilities at full precision)."""
    feats = common.contiguous(feats)
    scores = common.contiguous(scores)
    prior = None if prior is None else common.contiguous(prior)
    B, L, D = feats.shape
    context = feats.new_empty((B, D))
    weights = feats.new_empty((B, L))
    context32 = feats.new_empty((B, D), dtype=torch.float32)
    weights32 = feats.new_empty((B, L), dtype=torch.float32)
    if B > 0:
        launch(
            _attention_pool_fwd_kernel, _launch_config(int(B), int(L), int(D), dtype_name(feats))["fwd"],
            feats, scores, prior if prior is not None else common.placeholder(feats),
            context, weights, context32, weights32,
            L,
            D=D, HAS_PRIOR=prior is not None,
        )
    return context, weights, context32, weights32


@triton_op("c2f_fast::attention_pool_backward", mutates_args=())
def _attention_pool_backward_op(
    feats: torch.Tensor,
    prior: Optional[torch.Tensor],
    weights32: torch.Tensor,
    context32: torch.Tensor,
    dcontext: torch.Tensor,
    dweights: Optional[torch.Tensor],
    dscores_dtype: torch.dtype,
    need_dfeats: bool,
    need_dprior: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dfeats, dscores, dprior)``; a gradient that is not needed comes back as an
    empty tensor."""
    feats = common.contiguous(feats)
    prior = None if prior is None else common.contiguous(prior)
    dcontext = common.contiguous(dcontext)
    dweights = None if dweights is None else common.contiguous(dweights)
    B, L, D = feats.shape
    need_dprior = need_dprior and prior is not None
    dfeats = torch.empty_like(feats) if need_dfeats else common.placeholder(feats)
    dscores = torch.empty((B, L), dtype=dscores_dtype, device=feats.device)
    dprior = torch.empty_like(prior) if need_dprior else common.placeholder(feats)
    if B > 0:
        bwd = _launch_config(int(B), int(L), int(D), dtype_name(feats))["bwd"]
        launch(
            _attention_pool_bwd_kernel, bwd,
            feats, prior if prior is not None else common.placeholder(feats), weights32, context32,
            dcontext, dweights if dweights is not None else common.placeholder(feats),
            dfeats, dscores, dprior,
            L, bwd.ints["ROWS_PER_SPLIT"],
            D=D, HAS_PRIOR=prior is not None, HAS_GW=dweights is not None,
            NEED_DFEATS=need_dfeats, NEED_DPRIOR=need_dprior,
        )
    return dfeats, dscores, dprior


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    feats, scores, prior = inputs
    _, _, context32, weights32 = output
    ctx.mark_non_differentiable(context32, weights32)
    # An unused `weights` output then gives None rather than a materialised zero tensor.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(feats, prior, weights32, context32)
    ctx.scores_dtype = scores.dtype


def _backward(ctx: Any, dcontext, dweights, _d32, _w32):
    feats, prior, weights32, context32 = ctx.saved_tensors
    if dcontext is None:
        dcontext = context32.new_zeros(context32.shape)
    need_feats, need_scores, need_prior = ctx.needs_input_grad[:3]
    dfeats, dscores, dprior = _attention_pool_backward_op(
        feats, prior, weights32, context32, dcontext, dweights, ctx.scores_dtype,
        bool(need_feats), bool(need_prior),
    )
    return (
        dfeats if need_feats else None,
        dscores if need_scores else None,
        dprior if need_prior and prior is not None else None,
    )


_attention_pool_op.register_autograd(_backward, setup_context=_setup_context)


def attention_pool(
    feats: torch.Tensor, scores: torch.Tensor, prior: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention pooling: ``(context [B, D], weights [B, L])`` in ``feats.dtype``.

    ``weights = softmax_i(scores)`` (before the prior); ``context = Σ_i weights_i prior_i feats_i``.
    Triton kernels on CUDA (fp32/bf16/fp16, fp32 accumulation) and under ``TRITON_INTERPRET=1``
    for fp32 CPU tensors; otherwise ``attention_pool_ref``.
    """
    _check_args(feats, scores, prior)
    if not fast_path(feats, scores, prior):
        return attention_pool_ref(feats, scores, prior, upcast=True)
    context, weights, _, _ = _attention_pool_op(feats, scores, prior)
    return context, weights
