"""One LSTM step with the recurrent matrix product fused into the gate epilogue.

``lstm_cell(gates_x, h, c, w_hh, bias)`` computes, in PyTorch's gate order (i, f, g, o)::

    gates  = gates_x + h @ w_hh.T + bias          # [B, 4H]
    i, f, o = sigmoid(...), g = tanh(...)
    c_new  = f * c + i * g
    h_new  = o * tanh(c_new)

``gates_x`` is the input projection ``x @ weight_ih.T + bias_ih``: it does not depend on the
recurrence, so callers compute it with one big GEMM (for all steps at once if they can) and this op
only does the part that must run step by step. With ``w_hh = weight_hh`` and ``bias = bias_hh`` the
result equals ``torch.nn.LSTMCell``.

Laid out like the attention ops: reference, kernels, launch configuration (one
``KernelLaunch`` per kernel, autotuned), registry, host functions with the custom ops, and the
public entry point with the shared dispatch rule (``_utils.fast_path``).

* ``_lstm_cell_fwd_kernel``: each program owns a BLOCK_B x BLOCK_H tile of *all four* gates, so
  the four gate pre-activations of one (row, unit) pair meet in registers: four fp32 accumulators
  (started from ``gates_x + bias``) are fed by ``tl.dot`` over K = H, then the nonlinearities and the
  cell update run as the epilogue. The pre-activations never touch memory; the activated gates are
  stored (input dtype) only because backward needs them.
* ``_lstm_cell_bwd_kernel``: the elementwise gate backward, producing ``d_gates`` [B, 4H] (which is
  also ``d_gates_x``), ``d_c`` and the bias gradient. The grid is (row blocks) x (unit blocks) of
  small tiles, so that even the benchmark size (B=256, H=512) spreads over every SM. Each program
  writes the fp32 column sums of its rows of ``d_gates`` to one row of a [n_row_blocks, 4H]
  partial-sum buffer, which the host reduces with ``torch.sum(dim=0)``: deterministic, no atomics.
* ``d_h = d_gates @ w_hh`` and ``d_w_hh = d_gates.T @ h`` are plain ``torch.mm`` (cuBLAS): they
  are ordinary GEMMs that cuBLAS already does at full speed.

The forward and the elementwise backward are ``torch.library.triton_op`` custom ops tied together
with ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.library import triton_op

from ._triton import tl, triton
from ._utils import KernelLaunch, compile_configs, config, dtype_name, fast_path, fixed_grid, launch, unique_configs
from .registry import BENCH_B, BENCH_H, CompileConfig, KernelSpec, register_kernel

__all__ = ["lstm_cell", "lstm_cell_ref", "lstm_cell_forward", "lstm_cell_backward_gates"]

# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _check_inputs(gates_x, h, c, w_hh, bias) -> None:
    named = {"gates_x": gates_x, "h": h, "c": c, "w_hh": w_hh, "bias": bias}
    for name, t in named.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lstm_cell: {name} must be a torch.Tensor, got {type(t).__name__}")
        want_dim = 1 if name == "bias" else 2
        if t.dim() != want_dim:
            raise ValueError(f"lstm_cell: {name} must be {want_dim}-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"lstm_cell: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != h.dtype:
            raise ValueError(f"lstm_cell: {name} has dtype {t.dtype}, h has {h.dtype}; all inputs must match")
        if t.device != h.device:
            raise ValueError(f"lstm_cell: {name} is on {t.device}, h on {h.device}; all inputs must match")
    B, H = h.shape
    if H == 0:
        raise ValueError("lstm_cell: h must have a non-empty hidden dimension, got shape (B, 0)")
    expected = {"gates_x": (B, 4 * H), "c": (B, H), "w_hh": (4 * H, H), "bias": (4 * H,)}
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"lstm_cell: {name} must have shape {shape} for h of shape {(B, H)}, got {tuple(t.shape)}"
            )


def lstm_cell_ref(
    gates_x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch LSTM step (same contract as ``lstm_cell``).

    ``upcast=True`` computes in (at least) fp32 and casts the results back, which is what the
    Triton kernels do; ``upcast=False`` computes in the input dtype, i.e. PyTorch's own
    low-precision path (the yardstick for the bf16/fp16 accuracy tests).
    """
    out_dtype = gates_x.dtype
    if upcast:
        dt = torch.promote_types(out_dtype, torch.float32)
        gates_x, h, c, w_hh = gates_x.to(dt), h.to(dt), c.to(dt), w_hh.to(dt)
        bias = bias.to(dt) if bias is not None else None
    gates = gates_x + h @ w_hh.t()
    if bias is not None:
        gates = gates + bias
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new.to(out_dtype), c_new.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lstm_cell_fwd_kernel(
    gx_ptr,  # [B, 4H] input projection, row stride stride_gx, unit stride 1
    h_ptr,  # [B, H] previous hidden state, row stride stride_h
    c_ptr,  # [B, H] previous cell state, row stride stride_c
    w_ptr,  # [4H, H] recurrent weight, contiguous
    b_ptr,  # [4H] recurrent bias (unused when HAS_BIAS is False)
    h_new_ptr,  # [B, H] out, contiguous
    c_new_ptr,  # [B, H] out, contiguous
    gates_ptr,  # [B, 4H] out, activated gates (i, f, g, o), contiguous; saved for backward
    B,
    H,
    stride_gx,
    stride_h,
    stride_c,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # batch rows of this tile
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # hidden units of this tile
    row_mask = rows < B
    col_mask = cols < H
    tile_mask = row_mask[:, None] & col_mask[None, :]

    # Accumulators start from gates_x (+ bias), in fp32: gates = gates_x + bias + h @ w_hh.T.
    gx_tile = gx_ptr + rows[:, None] * stride_gx + cols[None, :]
    acc_i = tl.load(gx_tile, mask=tile_mask, other=0.0).to(tl.float32)
    acc_f = tl.load(gx_tile + H, mask=tile_mask, other=0.0).to(tl.float32)
    acc_g = tl.load(gx_tile + 2 * H, mask=tile_mask, other=0.0).to(tl.float32)
    acc_o = tl.load(gx_tile + 3 * H, mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc_i += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_f += tl.load(b_ptr + H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + 2 * H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_o += tl.load(b_ptr + 3 * H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    # K loop over the previous hidden state. The weight tile of gate q is w_hh[q*H + cols, k]
    # read as a [BLOCK_K, BLOCK_H] block (w_hh.T), K contiguous in memory.
    ks = tl.arange(0, BLOCK_K)
    h_tile = h_ptr + rows[:, None] * stride_h + ks[None, :]
    w_tile = w_ptr + cols[None, :].to(tl.int64) * H + ks[:, None]
    gate_stride = H * H  # elements between the blocks of consecutive gates in w_hh
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + ks) < H
        a = tl.load(h_tile + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_i = tl.load(w_tile + k0, mask=w_mask, other=0.0)
        w_f = tl.load(w_tile + gate_stride + k0, mask=w_mask, other=0.0)
        w_g = tl.load(w_tile + 2 * gate_stride + k0, mask=w_mask, other=0.0)
        w_o = tl.load(w_tile + 3 * gate_stride + k0, mask=w_mask, other=0.0)
        # "ieee": fp32 inputs must not silently run in tf32 (ignored for bf16/fp16 inputs).
        acc_i = tl.dot(a, w_i, acc_i, input_precision="ieee")
        acc_f = tl.dot(a, w_f, acc_f, input_precision="ieee")
        acc_g = tl.dot(a, w_g, acc_g, input_precision="ieee")
        acc_o = tl.dot(a, w_o, acc_o, input_precision="ieee")

    # Epilogue: nonlinearities and cell update in fp32. tanh(x) = 2*sigmoid(2x) - 1 keeps to
    # tl.sigmoid, which every Triton >= 3.2 backend and the CPU interpreter provide.
    gate_i = tl.sigmoid(acc_i)
    gate_f = tl.sigmoid(acc_f)
    gate_g = 2.0 * tl.sigmoid(2.0 * acc_g) - 1.0
    gate_o = tl.sigmoid(acc_o)
    c_prev = tl.load(c_ptr + rows[:, None] * stride_c + cols[None, :], mask=tile_mask, other=0.0)
    c_new = gate_f * c_prev.to(tl.float32) + gate_i * gate_g
    h_new = gate_o * (2.0 * tl.sigmoid(2.0 * c_new) - 1.0)

    out_dtype = h_new_ptr.dtype.element_ty
    out_offs = rows[:, None] * H + cols[None, :]
    tl.store(h_new_ptr + out_offs, h_new.to(out_dtype), mask=tile_mask)
    tl.store(c_new_ptr + out_offs, c_new.to(out_dtype), mask=tile_mask)
    gates_tile = gates_ptr + rows[:, None] * (4 * H) + cols[None, :]
    tl.store(gates_tile, gate_i.to(out_dtype), mask=tile_mask)
    tl.store(gates_tile + H, gate_f.to(out_dtype), mask=tile_mask)
    tl.store(gates_tile + 2 * H, gate_g.to(out_dtype), mask=tile_mask)
    tl.store(gates_tile + 3 * H, gate_o.to(out_dtype), mask=tile_mask)


@triton.jit
def _lstm_cell_bwd_kernel(
    dh_ptr,  # [B, H] grad of h_new, row stride stride_dh (may be 0: expanded grads)
    dc_ptr,  # [B, H] grad of c_new, row stride stride_dc
    c_ptr,  # [B, H] previous cell state, row stride stride_c
    gates_ptr,  # [B, 4H] activated gates saved by forward, contiguous
    dgates_ptr,  # [B, 4H] out: grad of the gate pre-activations (= grad of gates_x)
    dc_prev_ptr,  # [B, H] out: grad of c
    dbias_ptr,  # [n_row_blocks, 4H] out: column sums of dgates over this program's rows (HAS_BIAS only)
    B,
    H,
    stride_dh,
    stride_dc,
    stride_c,
    HAS_DH: tl.constexpr,
    HAS_DC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    # fp32 column sums of the four d_gate blocks over this program's rows (its share of the bias
    # gradient). At the benchmark size a program owns one BLOCK_B-row tile (ROWS_PER_PROGRAM ==
    # BLOCK_B); only for large batches does the launcher give it several.
    bias_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    bias_f = tl.zeros((BLOCK_H,), dtype=tl.float32)
    bias_g = tl.zeros((BLOCK_H,), dtype=tl.float32)
    bias_o = tl.zeros((BLOCK_H,), dtype=tl.float32)
    row0 = pid_b.to(tl.int64) * ROWS_PER_PROGRAM
    for r in range(0, ROWS_PER_PROGRAM, BLOCK_B):
        rows = row0 + r + tl.arange(0, BLOCK_B)
        mask = (rows < B)[:, None] & col_mask[None, :]
        gates_tile = gates_ptr + rows[:, None] * (4 * H) + cols[None, :]
        gate_i = tl.load(gates_tile, mask=mask, other=0.0).to(tl.float32)
        gate_f = tl.load(gates_tile + H, mask=mask, other=0.0).to(tl.float32)
        gate_g = tl.load(gates_tile + 2 * H, mask=mask, other=0.0).to(tl.float32)
        gate_o = tl.load(gates_tile + 3 * H, mask=mask, other=0.0).to(tl.float32)
        c_prev = tl.load(c_ptr + rows[:, None] * stride_c + cols[None, :], mask=mask, other=0.0)
        c_prev = c_prev.to(tl.float32)
        # Recompute c_new in fp32 from the saved gates instead of saving it.
        c_new = gate_f * c_prev + gate_i * gate_g
        tanh_c = 2.0 * tl.sigmoid(2.0 * c_new) - 1.0

        if HAS_DC:
            d_c = tl.load(dc_ptr + rows[:, None] * stride_dc + cols[None, :], mask=mask, other=0.0)
            d_c = d_c.to(tl.float32)
        else:
            d_c = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        if HAS_DH:
            d_h = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
            d_h = d_h.to(tl.float32)
            d_o = d_h * tanh_c
            d_c += d_h * gate_o * (1.0 - tanh_c * tanh_c)
        else:
            d_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)

        # Through the activations: sigmoid' = s(1-s), tanh' = 1 - t^2. Each gate is stored and
        # folded into its bias sum as soon as it is computed (masked-out rows are exact zeros,
        # so they add nothing), which keeps fewer fp32 tiles alive at once.
        out_dtype = dgates_ptr.dtype.element_ty
        dgates_tile = dgates_ptr + rows[:, None] * (4 * H) + cols[None, :]
        tl.store(dc_prev_ptr + rows[:, None] * H + cols[None, :], (d_c * gate_f).to(out_dtype), mask=mask)
        dpre_o = d_o * gate_o * (1.0 - gate_o)
        tl.store(dgates_tile + 3 * H, dpre_o.to(out_dtype), mask=mask)
        dpre_i = d_c * gate_g * gate_i * (1.0 - gate_i)
        tl.store(dgates_tile, dpre_i.to(out_dtype), mask=mask)
        dpre_f = d_c * c_prev * gate_f * (1.0 - gate_f)
        tl.store(dgates_tile + H, dpre_f.to(out_dtype), mask=mask)
        dpre_g = d_c * gate_i * (1.0 - gate_g * gate_g)
        tl.store(dgates_tile + 2 * H, dpre_g.to(out_dtype), mask=mask)
        if HAS_BIAS:
            bias_o += tl.sum(dpre_o, axis=0)
            bias_i += tl.sum(dpre_i, axis=0)
            bias_f += tl.sum(dpre_f, axis=0)
            bias_g += tl.sum(dpre_g, axis=0)

    if HAS_BIAS:
        bias_dtype = dbias_ptr.dtype.element_ty
        dbias_row = dbias_ptr + pid_b.to(tl.int64) * (4 * H) + cols
        tl.store(dbias_row, bias_i.to(bias_dtype), mask=col_mask)
        tl.store(dbias_row + H, bias_f.to(bias_dtype), mask=col_mask)
        tl.store(dbias_row + 2 * H, bias_g.to(bias_dtype), mask=col_mask)
        tl.store(dbias_row + 3 * H, bias_o.to(bias_dtype), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration (one function, used by the launchers and by the kernel registry)
# ---------------------------------------------------------------------------------------------

#: Forward tiles aim for at least this many programs (about one wave on an H100/H200, 132 SMs).
_TARGET_PROGRAMS = 128
#: Backward: a program handles more than one BLOCK_B-row tile only while the grid keeps at least
#: this many programs (about four per SM on an H100/H200): only large batches get longer row
#: walks, which shrink the fp32 bias partial-sum buffer and its host reduction.
_BWD_TARGET_PROGRAMS = 512
#: Backward: the most rows one program walks.
_BWD_MAX_ROWS_PER_PROGRAM = 256
#: Backward rows per tile (the unit of the row walk).
_BWD_BLOCK_B = 16
#: Bytes per thread and gate in the backward: one 16-byte vector (8 bf16/fp16 or 4 fp32 values).
_BWD_VECTOR_BYTES = 16
#: Forward autotune candidates ``(BLOCK_K, warps, stages)``, the first the default.
#: fp32 runs ``tl.dot`` on FMA units with its operands in registers: narrow K, two stages.
#: bf16/fp16 use tensor cores: 128-byte K rows, three or four stages of cp.async.
FWD_CONFIGS = {
    "fp32": ((16, 4, 2), (32, 4, 2), (16, 4, 3)),
    "half": ((64, 4, 3), (32, 4, 4), (64, 4, 4)),
}
#: Backward autotune candidates: BLOCK_H; warps follow (one 16-byte vector per thread and gate).
BWD_BLOCK_H = (16, 32, 64)


@lru_cache(maxsize=256)
def _launch_config(B: int, H: int, dtype: str) -> dict[str, KernelLaunch]:
    """Launch of both kernels for batch ``B``, hidden size ``H`` and Triton dtype name ``dtype``.

    Forward, 16-bit types (tensor cores): BLOCK_B = 64 when the batch allows (a Hopper warpgroup
    MMA is 64 rows; smaller batches pad to 16, the smallest ``tl.dot`` tile). The four fp32
    accumulators of 64 x BLOCK_H cost 2 * BLOCK_H registers per thread with 4 warps. BLOCK_H = 32
    unless that leaves fewer than ``_TARGET_PROGRAMS`` programs, else 16 (at B=256, H=512: 4 x 32
    = 128 programs). BLOCK_K (tuned, default 64: 128-byte rows of h and w_hh), warps and stages
    are autotuned; the grid is fixed by BLOCK_B x BLOCK_H.
    Forward, fp32: ``tl.dot`` runs on FMA units with its operands in registers, so registers grow
    with the tile: BLOCK_B = 32 (at most), BLOCK_H = 16, BLOCK_K = 16 by default compile to about
    96 registers (64-row tiles: ~168, 3 blocks/SM) and give 8 x 32 = 256 programs at B=256, H=512.

    Backward (elementwise, bound by memory latency): [16, BLOCK_H] tiles of the four gates, with
    exactly as many warps as give every thread one 16-byte vector per gate; BLOCK_H is tuned
    (16, 32, 64), the grid follows it. A program walks ``ROWS_PER_PROGRAM`` rows (a power-of-two
    multiple of 16, at most ``_BWD_MAX_ROWS_PER_PROGRAM``; fixed by the host because the bias
    partial-sum buffer has one row per row block), more than one tile only while the grid (at
    BLOCK_H = 16) keeps at least ``_BWD_TARGET_PROGRAMS`` programs.
    """
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be one of fp32/bf16/fp16, got {dtype!r}")
    if dtype == "fp32":
        block_b = 32 if B >= 32 else max(16, triton.next_power_of_2(B))
        block_h = 16
    else:
        block_b = 64 if B >= 64 else max(16, triton.next_power_of_2(B))
        block_h = 32 if triton.cdiv(B, block_b) * triton.cdiv(H, 32) >= _TARGET_PROGRAMS else 16
    k_cap = max(16, triton.next_power_of_2(H))
    fwd_configs = unique_configs(config(warps, stages, BLOCK_K=min(block_k, k_cap))
                                 for block_k, warps, stages in FWD_CONFIGS["fp32" if dtype == "fp32" else "half"])
    fwd = KernelLaunch(
        grid=fixed_grid(triton.cdiv(B, block_b), triton.cdiv(H, block_h)),
        constexprs=dict(BLOCK_B=block_b, BLOCK_H=block_h),
        configs=fwd_configs,
        key=("B", "H"),
    )

    elem_bytes = 4 if dtype == "fp32" else 2
    n_h = triton.cdiv(H, BWD_BLOCK_H[0])
    rows = _BWD_BLOCK_B
    while rows * 2 <= _BWD_MAX_ROWS_PER_PROGRAM and triton.cdiv(B, rows * 2) * n_h >= _BWD_TARGET_PROGRAMS:
        rows *= 2
    n_row_blocks = triton.cdiv(B, rows)
    bwd_configs = []
    for bh in BWD_BLOCK_H:
        if bh > max(BWD_BLOCK_H[0], triton.next_power_of_2(H)):
            continue
        warps = max(1, _BWD_BLOCK_B * bh * elem_bytes // (32 * _BWD_VECTOR_BYTES))
        bwd_configs.append(config(warps, 1, BLOCK_H=bh))
    bwd = KernelLaunch(
        grid=lambda meta: (n_row_blocks, triton.cdiv(H, meta["BLOCK_H"])),
        constexprs=dict(BLOCK_B=_BWD_BLOCK_B, ROWS_PER_PROGRAM=rows),
        configs=tuple(bwd_configs),
        key=("B", "H"),
        ints=dict(N_ROW_BLOCKS=n_row_blocks),
    )
    return {"fwd": fwd, "bwd": bwd}


# ---------------------------------------------------------------------------------------------
# Registry: every autotune candidate the launchers above offer at the benchmark size
# ---------------------------------------------------------------------------------------------

_FWD_PTRS = ("gx_ptr", "h_ptr", "c_ptr", "w_ptr", "b_ptr", "h_new_ptr", "c_new_ptr", "gates_ptr")
_FWD_INTS = ("B", "H", "stride_gx", "stride_h", "stride_c")
_BWD_PTRS = ("dh_ptr", "dc_ptr", "c_ptr", "gates_ptr", "dgates_ptr", "dc_prev_ptr")
_BWD_INTS = ("B", "H", "stride_dh", "stride_dc", "stride_c")


def _bench_configs(which: str, dtype: str) -> list[CompileConfig]:
    launch = _launch_config(BENCH_B, BENCH_H, dtype)[which]
    ptr = f"*{dtype}"
    if which == "fwd":
        signature = {**{n: ptr for n in _FWD_PTRS}, **{n: "i32" for n in _FWD_INTS}}
        flags, what = {"HAS_BIAS": True}, "bias"
    else:
        signature = {
            **{n: ptr for n in _BWD_PTRS},
            # the launcher's bias-partials buffer: input dtype for one row block, fp32 otherwise
            "dbias_ptr": ptr if launch.ints["N_ROW_BLOCKS"] == 1 else "*fp32",
            **{n: "i32" for n in _BWD_INTS},
        }
        flags, what = {"HAS_DH": True, "HAS_DC": True, "HAS_BIAS": True}, "bias, both grads"
    # the integer arguments at the benchmark size (contiguous inputs and output grads)
    B, H = BENCH_B, BENCH_H
    ints = {"B": B, "H": H, "stride_gx": 4 * H, "stride_h": H, "stride_c": H, "stride_dh": H, "stride_dc": H}
    scalars = {k: v for k, v in ints.items() if k in signature}
    return compile_configs(launch, f"{which} B={BENCH_B} H={BENCH_H} {what}", signature, flags, scalars)


register_kernel(
    KernelSpec(
        name="lstm_cell_fwd",
        fn=_lstm_cell_fwd_kernel,
        dtypes=("fp32", "bf16", "fp16"),
        configs=lambda dtype: _bench_configs("fwd", dtype),
        streamed=("gx_ptr", "c_ptr", "h_new_ptr", "c_new_ptr", "gates_ptr"),
        uses_dot=True,
        notes="h @ w_hh.T (4 gate accumulators, fp32) fused with the LSTM gate epilogue",
    )
)
register_kernel(
    KernelSpec(
        name="lstm_cell_bwd",
        fn=_lstm_cell_bwd_kernel,
        dtypes=("fp32", "bf16", "fp16"),
        configs=lambda dtype: _bench_configs("bwd", dtype),
        streamed=("dh_ptr", "dc_ptr", "c_ptr", "gates_ptr", "dgates_ptr", "dc_prev_ptr"),
        uses_dot=False,
        notes="elementwise LSTM gate backward + bias-gradient column sums",
    )
)


# ---------------------------------------------------------------------------------------------
# Host functions and the custom ops
# ---------------------------------------------------------------------------------------------


def _rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride but need unit stride along the last dim (and 16-byte
    alignment along rows for vector loads); anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_op(
    "c2f_fast::lstm_cell_fwd",
    mutates_args=(),
    schema="(Tensor gates_x, Tensor h, Tensor c, Tensor w_hh, Tensor? bias) -> (Tensor, Tensor, Tensor)",
)
def lstm_cell_forward(
    gates_x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host forward: returns ``(h_new, c_new, gates)``, ``gates`` the activated gates [B, 4H]
    (i, f, g, o) that the backward reuses. Inputs are assumed validated (see ``lstm_cell``)."""
    gates_x = _rows_unit_stride(gates_x)
    h = _rows_unit_stride(h)
    c = _rows_unit_stride(c)
    w_hh = w_hh.contiguous()
    B, H = h.shape
    # int(): sizes are specialised (see _utils: the engine keeps B static).
    fwd = _launch_config(int(B), int(H), dtype_name(h))["fwd"]
    h_new = torch.empty((B, H), dtype=h.dtype, device=h.device)
    c_new = torch.empty((B, H), dtype=h.dtype, device=h.device)
    gates = torch.empty((B, 4 * H), dtype=h.dtype, device=h.device)
    has_bias = bias is not None
    launch(
        _lstm_cell_fwd_kernel,
        fwd,
        gates_x,
        h,
        c,
        w_hh,
        bias.contiguous() if has_bias else w_hh,  # dummy pointer, never read without bias
        h_new,
        c_new,
        gates,
        B,
        H,
        gates_x.stride(0),
        h.stride(0),
        c.stride(0),
        HAS_BIAS=has_bias,
    )
    return h_new, c_new, gates


@triton_op(
    "c2f_fast::lstm_cell_bwd_gates",
    mutates_args=(),
    schema="(Tensor? grad_h_new, Tensor? grad_c_new, Tensor c, Tensor gates, bool has_bias) -> (Tensor, Tensor, Tensor)",
)
def lstm_cell_backward_gates(
    grad_h_new: torch.Tensor | None,
    grad_c_new: torch.Tensor | None,
    c: torch.Tensor,
    gates: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host elementwise backward: ``(d_gates [B,4H], d_c [B,H], d_bias [4H])`` from the output
    grads (either may be None: that output was not used). ``d_bias`` is empty without bias."""
    c = _rows_unit_stride(c)
    B, H = c.shape
    bwd = _launch_config(int(B), int(H), dtype_name(c))["bwd"]
    n_row_blocks = bwd.ints["N_ROW_BLOCKS"]
    has_dh = grad_h_new is not None
    has_dc = grad_c_new is not None
    # Expanded grads (e.g. from ``out.sum().backward()``) have stride 0 along the last dim too;
    # row stride 0 is fine for the kernel, unit stride 0 is copied.
    dh = _rows_unit_stride(grad_h_new) if has_dh else c
    dc = _rows_unit_stride(grad_c_new) if has_dc else c
    d_gates = torch.empty((B, 4 * H), dtype=c.dtype, device=c.device)
    d_c = torch.empty((B, H), dtype=c.dtype, device=c.device)
    if has_bias and n_row_blocks == 1:
        # One row block: the kernel's column sums are the bias gradient itself.
        d_bias_parts = torch.empty((4 * H,), dtype=c.dtype, device=c.device)
    elif has_bias:
        # Several row blocks: fp32 partial sums (one row per row block), reduced below with
        # torch.sum -- a fixed order, so the bias gradient is reproducible (no atomics).
        d_bias_parts = torch.empty((n_row_blocks, 4 * H), dtype=torch.float32, device=c.device)
    else:
        d_bias_parts = torch.empty((0,), dtype=c.dtype, device=c.device)
    launch(
        _lstm_cell_bwd_kernel,
        bwd,
        dh,
        dc,
        c,
        gates,
        d_gates,
        d_c,
        # dummy (read-only, so tracing sees no aliasing of written buffers); unused without bias
        d_bias_parts if has_bias else gates,
        B,
        H,
        dh.stride(0),
        dc.stride(0),
        c.stride(0),
        HAS_DH=has_dh,
        HAS_DC=has_dc,
        HAS_BIAS=has_bias,
    )
    d_bias = d_bias_parts.sum(0).to(c.dtype) if d_bias_parts.dim() == 2 else d_bias_parts
    return d_gates, d_c, d_bias


def _setup_context(ctx, inputs, output):
    gates_x, h, c, w_hh, bias = inputs
    _, _, gates = output
    ctx.save_for_backward(h, c, w_hh, gates)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(gates)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_h_new, grad_c_new, _grad_gates):
    h, c, w_hh, gates = ctx.saved_tensors
    if grad_h_new is None and grad_c_new is None:  # neither output reached the loss
        return None, None, None, None, None
    need_gx, need_h, need_c, need_w, need_b = ctx.needs_input_grad
    d_gates, d_c, d_bias = torch.ops.c2f_fast.lstm_cell_bwd_gates(
        grad_h_new, grad_c_new, c, gates, ctx.has_bias and need_b
    )
    return (
        d_gates if need_gx else None,
        d_gates @ w_hh if need_h else None,  # [B,4H] @ [4H,H]
        d_c if need_c else None,
        d_gates.t() @ h if need_w else None,  # [4H,B] @ [B,H]
        d_bias if (ctx.has_bias and need_b) else None,
    )


lstm_cell_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def lstm_cell(
    gates_x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step: ``(h_new, c_new)`` from ``gates_x`` [B,4H], ``h``/``c`` [B,H], ``w_hh``
    [4H,H], ``bias`` [4H] or None (gate order i, f, g, o, as ``torch.nn.LSTMCell``).

    Differentiable in every input. Under autocast the inputs are cast to the autocast dtype first
    (as ``nn.LSTMCell`` does); otherwise all inputs must share one dtype and device. Runs the
    Triton kernels on CUDA (fp32/bf16/fp16) and under ``TRITON_INTERPRET=1`` for fp32 CPU tensors,
    ``lstm_cell_ref`` otherwise.
    """
    if isinstance(h, torch.Tensor) and torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        gates_x, h, c, w_hh = (t.to(dt) if isinstance(t, torch.Tensor) else t for t in (gates_x, h, c, w_hh))
        bias = bias.to(dt) if isinstance(bias, torch.Tensor) else bias
    if not isinstance(h, torch.Tensor):
        raise ValueError(f"lstm_cell: h must be a torch.Tensor, got {type(h).__name__}")
    _check_inputs(gates_x, h, c, w_hh, bias)
    if fast_path(gates_x, h, c, w_hh, bias):
        h_new, c_new, _ = torch.ops.c2f_fast.lstm_cell_fwd(gates_x, h, c, w_hh, bias)
        return h_new, c_new
    return lstm_cell_ref(gates_x, h, c, w_hh, bias, upcast=True)
