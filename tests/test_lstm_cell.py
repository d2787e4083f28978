"""Tests of kernels.lstm_cell: the fused LSTM step (Triton) against its plain-PyTorch reference and
``torch.nn.LSTMCell``.

The fp32 comparisons run on ``DEVICE`` (conftest): compiled kernels on a GPU, the interpreter on
CPU (conftest switches on TRITON_INTERPRET=1 there; shapes stay small). Every comparison checks
that the Triton op really ran (its autograd node), so a silent fallback to the reference cannot
pass on either machine.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import kernels
from conftest import DEVICE, assert_low_precision, requires_cuda
from kernels._utils import interpret_mode
from kernels.lstm_cell import _launch_config, lstm_cell, lstm_cell_ref
from kernels.registry import KERNELS

# the module itself (``kernels.lstm_cell`` on the package is the op function)
lstm_mod = importlib.import_module("kernels.lstm_cell")

RTOL, ATOL = 1e-5, 1e-5  # fp32, Triton (fp32 accumulation) vs reference


def _make(B, H, bias=True, dtype=torch.float32, device=DEVICE, grad=True):
    """Random inputs of realistic scale (w_hh ~ U(-1/sqrt(H), 1/sqrt(H)) like nn.LSTMCell)."""
    k = H**-0.5
    gx = torch.randn(B, 4 * H, device=device, dtype=dtype)
    h = torch.randn(B, H, device=device, dtype=dtype)
    c = torch.randn(B, H, device=device, dtype=dtype)
    w = torch.empty(4 * H, H, device=device, dtype=dtype).uniform_(-k, k)
    b = torch.empty(4 * H, device=device, dtype=dtype).uniform_(-k, k) if bias else None
    ins = [gx, h, c, w] + ([b] if bias else [])
    for t in ins:
        t.requires_grad_(grad)
    return ins


def _args(ins):
    return (*ins[:4], ins[4] if len(ins) == 5 else None)


def _assert_triton_ran(out: torch.Tensor) -> None:
    """The Triton op produced ``out`` (on a GPU and under the interpreter alike)."""
    assert out.grad_fn is not None and "lstm_cell_fwd" in out.grad_fn.name(), (
        f"reference ran instead: {out.grad_fn and out.grad_fn.name()}"
    )


def _outputs_and_grads(fn, ins, weights=(1.0, 1.0), seed=1, round_to=None):
    """(h_new, c_new) and the gradients of every input for loss = w_h*<h_new,R1> + w_c*<c_new,R2>
    (R1, R2 fixed by ``seed``, rounded to ``round_to`` so that low- and full-precision runs
    receive the same upstream gradients)."""
    h_new, c_new = fn(*_args(ins))
    g = torch.Generator(device="cpu").manual_seed(seed)
    r1 = torch.randn(h_new.shape, generator=g).to(round_to or h_new.dtype).to(h_new.device, h_new.dtype)
    r2 = torch.randn(c_new.shape, generator=g).to(round_to or c_new.dtype).to(c_new.device, c_new.dtype)
    loss = 0
    if weights[0]:
        loss = loss + (h_new.float() * r1.float()).sum() * weights[0]
    if weights[1]:
        loss = loss + (c_new.float() * r2.float()).sum() * weights[1]
    grads = torch.autograd.grad(loss, ins)
    return (h_new, c_new), grads, h_new


def _close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- CPU (interpreter) correctness -----------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("H", [40, 72, 64])
def test_matches_reference_fwd_bwd(H, B, bias):
    ins = _make(B, H, bias)
    outs, grads, h_new = _outputs_and_grads(lstm_cell, ins)
    _assert_triton_ran(h_new)
    ref_outs, ref_grads, _ = _outputs_and_grads(lstm_cell_ref, ins)
    names = ["gates_x", "h", "c", "w_hh", "bias"]
    for name, o, r in zip(["h_new", "c_new"], outs, ref_outs):
        _close(o, r, what=name)
    for name, g, r in zip(names, grads, ref_grads):
        _close(g, r, what=f"d_{name}")


@pytest.mark.parametrize("candidate", [0, 1, 2])
def test_every_autotune_candidate_matches_reference(candidate, force_candidate):
    """Each autotune candidate (forward BLOCK_K/warps/stages, backward BLOCK_H/warps) computes the
    same results: every launch forced to candidate ``candidate``."""
    launched = force_candidate(candidate)
    ins = _make(70, 72)
    outs, grads, h_new = _outputs_and_grads(lstm_cell, ins)
    _assert_triton_ran(h_new)
    ref_outs, ref_grads, _ = _outputs_and_grads(lstm_cell_ref, ins)
    for name, o, r in zip(["h_new", "c_new", "d_gates_x", "d_h", "d_c", "d_w_hh", "d_bias"],
                          [*outs, *grads], [*ref_outs, *ref_grads]):
        _close(o, r, atol=5e-5, what=f"candidate {candidate}: {name}")
    launches = _launch_config(70, 72, "fp32")
    assert len(launched) == 2 and all(len(launches[w].configs) > candidate for w in ("fwd", "bwd"))


def test_matches_nn_lstmcell():
    """gates_x = x @ weight_ih.T + bias_ih, w_hh = weight_hh, bias = bias_hh gives nn.LSTMCell,
    outputs and gradients of x, h, c and all four parameters."""
    B, I, H = 5, 24, 40
    cell = torch.nn.LSTMCell(I, H, device=DEVICE)
    x = torch.randn(B, I, device=DEVICE, requires_grad=True)
    h = torch.randn(B, H, device=DEVICE, requires_grad=True)
    c = torch.randn(B, H, device=DEVICE, requires_grad=True)
    leaves = [x, h, c, *cell.parameters()]
    r1, r2 = torch.randn(B, H, device=DEVICE), torch.randn(B, H, device=DEVICE)

    gx = torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih)
    h_new, c_new = lstm_cell(gx, h, c, cell.weight_hh, cell.bias_hh)
    _assert_triton_ran(h_new)
    grads = torch.autograd.grad((h_new * r1).sum() + (c_new * r2).sum(), leaves)

    h_ref, c_ref = cell(x, (h, c))
    ref_grads = torch.autograd.grad((h_ref * r1).sum() + (c_ref * r2).sum(), leaves)
    _close(h_new, h_ref, what="h_new")
    _close(c_new, c_ref, what="c_new")
    names = ["x", "h", "c", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    for name, g, r in zip(names, grads, ref_grads):
        _close(g, r, what=f"d_{name}")


@pytest.mark.parametrize("used", ["h_new", "c_new"])
def test_only_one_output_used(used):
    """The unused output's gradient arrives as None; the kernel must treat it as zero."""
    weights = (1.0, 0.0) if used == "h_new" else (0.0, 1.0)
    ins = _make(5, 40)
    _, grads, h_new = _outputs_and_grads(lstm_cell, ins, weights)
    _assert_triton_ran(h_new)
    _, ref_grads, _ = _outputs_and_grads(lstm_cell_ref, ins, weights)
    for g, r in zip(grads, ref_grads):
        _close(g, r, what=f"only {used}")


def test_expanded_stride0_grads():
    """``.sum().backward()`` hands stride-(0, 0) grads; a broadcast weight hands row stride 0."""
    ins = _make(3, 40)
    scale = torch.randn(40, device=DEVICE)
    for loss_fn in (
        lambda hn, cn: hn.sum() + cn.sum(),  # both grads expanded scalars
        lambda hn, cn: (hn * scale).sum(),  # grad of h_new: [H] broadcast over rows, c_new unused
    ):
        hn, cn = lstm_cell(*_args(ins))
        _assert_triton_ran(hn)
        grads = torch.autograd.grad(loss_fn(hn, cn), ins)
        ref = lstm_cell_ref(*_args(ins))
        ref_grads = torch.autograd.grad(loss_fn(*ref), ins)
        for g, r in zip(grads, ref_grads):
            _close(g, r, what="expanded grads")


def test_strided_inputs():
    """gates_x as a step slice of a [B, T, 4H] projection (row stride T*4H), h a column slice."""
    B, T, H = 4, 3, 40
    gx_all = torch.randn(B, T, 4 * H, device=DEVICE, requires_grad=True)
    h_wide = torch.randn(B, 2 * H, device=DEVICE, requires_grad=True)
    _, _, c, w, b = _make(B, H)
    gx, h = gx_all[:, 1], h_wide[:, H:]
    assert not gx.is_contiguous() and not h.is_contiguous()
    outs = lstm_cell(gx, h, c, w, b)
    _assert_triton_ran(outs[0])
    ref = lstm_cell_ref(gx, h, c, w, b)
    for o, r in zip(outs, ref):
        _close(o, r, what="strided")
    leaves = [gx_all, h_wide, c, w, b]
    grads = torch.autograd.grad(outs[0].sum() + 2 * outs[1].sum(), leaves)
    ref_grads = torch.autograd.grad(ref[0].sum() + 2 * ref[1].sum(), leaves)
    for g, r in zip(grads, ref_grads):
        _close(g, r, what="strided grads")


def _check_grads_vs_reference(B, H, what):
    ins = _make(B, H)
    _, grads, h_new = _outputs_and_grads(lstm_cell, ins)
    _assert_triton_ran(h_new)
    _, ref_grads, _ = _outputs_and_grads(lstm_cell_ref, ins)
    for name, g, r in zip(["gates_x", "h", "c", "w_hh", "bias"], grads, ref_grads):
        _close(g, r, rtol=1e-5, atol=5e-5, what=f"{what}: d_{name}")


def test_bias_grad_over_several_row_blocks():
    """Several backward row blocks (the last one partial): the bias gradient is the host sum of
    the per-row-block fp32 partials."""
    B, H = 300, 24  # 19 row blocks x 2 unit blocks, both last blocks partial
    bwd = lstm_mod._launch_config(B, H, "fp32")["bwd"]
    rows, block_h = bwd.constexprs["ROWS_PER_PROGRAM"], bwd.configs[0].kwargs["BLOCK_H"]
    assert bwd.ints["N_ROW_BLOCKS"] > 1 and B % rows and H % block_h
    _check_grads_vs_reference(B, H, "B=300")


def test_bias_grad_with_several_tiles_per_program(monkeypatch):
    """Large batches make each backward program walk several BLOCK_B-row tiles (its bias partial
    covers all of them). Forced here at a small size: 64 rows per program, so the last program
    has one full tile, one partial tile and two fully masked ones."""
    real = lstm_mod._launch_config

    def walking(B, H, dtype):
        launches = dict(real(B, H, dtype))
        bwd = launches["bwd"]
        n_row_blocks = -(-B // 64)
        launches["bwd"] = dataclasses.replace(
            bwd,
            grid=lambda meta: (n_row_blocks, -(-H // meta["BLOCK_H"])),
            constexprs={**bwd.constexprs, "ROWS_PER_PROGRAM": 64},
            ints={"N_ROW_BLOCKS": n_row_blocks},
        )
        return launches

    monkeypatch.setattr(lstm_mod, "_launch_config", walking)
    B, H = 150, 16
    bwd = walking(B, H, "fp32")["bwd"]
    assert bwd.constexprs["ROWS_PER_PROGRAM"] == 4 * bwd.constexprs["BLOCK_B"] and bwd.ints["N_ROW_BLOCKS"] == 3
    _check_grads_vs_reference(B, H, "64 rows per program")


def test_partial_requires_grad_and_no_grad():
    """Only gates_x and w_hh need grads (h, c are constants, as at step 0); and inference mode."""
    gx, h, c, w, b = _make(5, 40, grad=False)
    gx.requires_grad_(True)
    w.requires_grad_(True)
    hn, cn = lstm_cell(gx, h, c, w, b)
    _assert_triton_ran(hn)
    d_gx, d_w = torch.autograd.grad(hn.sum() + cn.sum(), [gx, w])
    hr, cr = lstm_cell_ref(gx, h, c, w, b)
    r_gx, r_w = torch.autograd.grad(hr.sum() + cr.sum(), [gx, w])
    _close(d_gx, r_gx, what="d_gates_x")
    _close(d_w, r_w, what="d_w_hh")
    with torch.no_grad():
        hn2, cn2 = lstm_cell(gx, h, c, w, b)
    assert hn2.grad_fn is None
    _close(hn2, hr, what="no_grad h_new")
    _close(cn2, cr, what="no_grad c_new")


def test_ref_gradcheck_fp64():
    ins = [t.double().detach().requires_grad_() for t in _make(2, 3)]
    assert torch.autograd.gradcheck(lambda *a: lstm_cell_ref(*a), tuple(ins))
    # without upcast too: fp64 stays fp64 either way
    assert torch.autograd.gradcheck(lambda *a: lstm_cell_ref(*a, upcast=False), tuple(ins))


def test_ref_upcast_keeps_fp64_and_matches_formula():
    gx, h, c, w, b = (t.detach() for t in _make(2, 8))
    h_new, c_new = lstm_cell_ref(gx.double(), h.double(), c.double(), w.double(), b.double())
    assert h_new.dtype == torch.float64
    gates = gx.double() + h.double() @ w.double().T + b.double()
    i, f, g, o = gates.sigmoid()[:, :8], gates.sigmoid()[:, 8:16], gates[:, 16:24].tanh(), gates.sigmoid()[:, 24:]
    c_exp = f * c.double() + i * g
    torch.testing.assert_close(c_new, c_exp)
    torch.testing.assert_close(h_new, o * c_exp.tanh())


def test_cpu_bf16_falls_back_to_reference():
    """The interpreter handles fp32 only: bf16 on CPU runs the (upcasting) reference."""
    gx, h, c, w, b = (t.detach().bfloat16() for t in _make(4, 40, device="cpu"))
    h_new, c_new = lstm_cell(gx, h, c, w, b)
    assert h_new.dtype == c_new.dtype == torch.bfloat16
    h_ref, c_ref = lstm_cell_ref(gx, h, c, w, b, upcast=True)
    torch.testing.assert_close(h_new, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(c_new, c_ref, rtol=0, atol=0)


def test_autocast_casts_inputs():
    """Under autocast, fp32 parameters and states are cast to the autocast dtype (as
    nn.LSTMCell does) instead of failing the dtype check."""
    gx, h, c, w, b = (t.detach() for t in _make(4, 40, device="cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_new, c_new = lstm_cell(gx.bfloat16(), h, c, w, b)
    assert h_new.dtype == torch.bfloat16
    h_ref, _ = lstm_cell_ref(gx, h, c, w, b)
    torch.testing.assert_close(h_new.float(), h_ref, rtol=0, atol=0.05)


@pytest.mark.parametrize(
    "mutate, arg",
    [
        (lambda a: {**a, "gates_x": a["gates_x"][:, :-1]}, "gates_x"),
        (lambda a: {**a, "gates_x": a["gates_x"][None]}, "gates_x"),
        (lambda a: {**a, "h": a["h"][0]}, "h"),
        (lambda a: {**a, "c": a["c"][:-1]}, "c"),
        (lambda a: {**a, "w_hh": a["w_hh"].T}, "w_hh"),
        (lambda a: {**a, "w_hh": a["w_hh"][None]}, "w_hh"),
        (lambda a: {**a, "bias": a["bias"][:-1]}, "bias"),
        (lambda a: {**a, "bias": a["bias"][None]}, "bias"),
        (lambda a: {**a, "c": a["c"].double()}, "c"),
        (lambda a: {**a, "h": a["h"].long()}, "h"),
        (lambda a: {**a, "bias": [0.0] * 32}, "bias"),
    ],
)
def test_bad_inputs(mutate, arg):
    gx, h, c, w, b = (t.detach() for t in _make(2, 8))
    args = mutate({"gates_x": gx, "h": h, "c": c, "w_hh": w, "bias": b})
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        lstm_cell(**args)


def test_public_exports():
    assert kernels.lstm_cell_ref is lstm_cell_ref
    # ``kernels.lstm_cell`` is the op, not the submodule of the same name
    assert kernels.lstm_cell is lstm_cell, "kernels.lstm_cell resolves to the submodule, not the op"


# --- launch configuration and registry -------------------------------------------------------


def _pow2_at_least_16(v: int) -> bool:
    return v >= 16 and v & (v - 1) == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B, H", [(1, 40), (5, 72), (256, 512), (1000, 512), (300, 16), (100_000, 512)])
def test_launch_config_is_legal(dtype, B, H):
    launches = _launch_config(B, H, dtype)
    fwd, bwd = launches["fwd"], launches["bwd"]
    assert fwd.configs and bwd.configs
    for cfg in fwd.configs:
        meta = fwd.meta(cfg)
        for name in ("BLOCK_B", "BLOCK_H", "BLOCK_K"):
            assert _pow2_at_least_16(meta[name]), f"{name}={meta[name]}: tl.dot/tl.arange need powers of two >= 16"
        gb, gh = fwd.grid(meta)
        assert gb * meta["BLOCK_B"] >= B and gh * meta["BLOCK_H"] >= H
    rows = bwd.constexprs["ROWS_PER_PROGRAM"]
    assert rows % bwd.constexprs["BLOCK_B"] == 0 and rows <= lstm_mod._BWD_MAX_ROWS_PER_PROGRAM
    elem_bytes = 4 if dtype == "fp32" else 2
    for cfg in bwd.configs:
        meta = bwd.meta(cfg)
        assert _pow2_at_least_16(meta["BLOCK_H"]) and _pow2_at_least_16(meta["BLOCK_B"])
        rb, rh = bwd.grid(meta)
        assert rb == bwd.ints["N_ROW_BLOCKS"] and rb * rows >= B and rh * meta["BLOCK_H"] >= H
        # one 16-byte vector per thread and gate
        assert meta["BLOCK_B"] * meta["BLOCK_H"] * elem_bytes == 32 * cfg.num_warps * 16
    if rows > bwd.constexprs["BLOCK_B"]:  # longer row walks only when the grid stays wide
        rb, rh = bwd.grid(bwd.meta(bwd.configs[0]))
        assert rb * rh >= lstm_mod._BWD_TARGET_PROGRAMS


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_backward_spreads_over_the_gpu_at_benchmark_size(dtype):
    """B=256, H=512: with the default (first) candidate, at least two backward programs per SM of
    an H100/H200 (132 SMs), and the bias gradient split over several row blocks (so the fp32
    partial-sum reduction is what runs there)."""
    B, H = 256, 512
    bwd = _launch_config(B, H, dtype)["bwd"]
    rb, rh = bwd.grid(bwd.meta(bwd.configs[0]))
    assert rb * rh >= 2 * 132, f"backward grid {rb}x{rh}"
    assert rb > 1
    assert bwd.constexprs["ROWS_PER_PROGRAM"] == bwd.constexprs["BLOCK_B"]  # one tile per program


def test_backward_row_walk_grows_only_for_large_batches():
    small, large = _launch_config(256, 512, "bf16")["bwd"], _launch_config(100_000, 512, "bf16")["bwd"]
    assert small.constexprs["ROWS_PER_PROGRAM"] == small.constexprs["BLOCK_B"]
    assert large.constexprs["ROWS_PER_PROGRAM"] > large.constexprs["BLOCK_B"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_registry_configs(dtype):
    """Every kernel is registered with a full signature (every non-constexpr argument) and one
    config per autotune candidate the launcher offers at B=256, H=512."""
    fwd, bwd = KERNELS["lstm_cell_fwd"], KERNELS["lstm_cell_bwd"]
    assert fwd.uses_dot and not bwd.uses_dot
    launches = _launch_config(256, 512, dtype)
    for spec, which in ((fwd, "fwd"), (bwd, "bwd")):
        assert dtype in spec.dtypes
        configs = spec.configs(dtype)
        launch = launches[which]
        assert len(configs) == len(launch.configs) > 1
        for cfg, cand in zip(configs, launch.configs):
            assert set(cfg.signature) | set(cfg.constexprs) == set(spec.fn.arg_names)
            assert not set(cfg.signature) & set(cfg.constexprs)
            assert set(spec.streamed) <= set(cfg.signature)
            for name, ty in cfg.signature.items():
                assert ty in (f"*{dtype}", "*fp32", "i32"), (name, ty)
            for name, value in launch.meta(cand).items():
                assert cfg.constexprs[name] == value, (name, cfg.label)
            assert (cfg.num_warps, cfg.num_stages) == (cand.num_warps, cand.num_stages)
            assert set(cfg.scalars) == {n for n, t in cfg.signature.items() if t == "i32"}
    # several row blocks at the benchmark size: the launcher passes an fp32 partial-sum buffer
    assert all(cfg.signature["dbias_ptr"] == "*fp32" for cfg in bwd.configs(dtype))


# --- GPU --------------------------------------------------------------------------------------


def _lowp_check(dtype, B, H, bias=True, device="cuda", fast=lstm_cell):
    """The low-precision rule (conftest.assert_low_precision) for the outputs and every input
    gradient: fast path vs an fp32 reference on the same (rounded) inputs, against PyTorch's own
    low-precision computation (reference without upcast); atol 1e-3 at the reference's scale."""
    ins = _make(B, H, bias, dtype=dtype, device=device)
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    outs, grads, h_new = _outputs_and_grads(fast, ins, round_to=dtype)
    _assert_triton_ran(h_new)
    ref_outs, ref_grads, _ = _outputs_and_grads(lstm_cell_ref, ins32, round_to=dtype)
    lp_outs, lp_grads, _ = _outputs_and_grads(lambda *a: lstm_cell_ref(*a, upcast=False), ins, round_to=dtype)
    names = ["h_new", "c_new", "d_gates_x", "d_h", "d_c", "d_w_hh", "d_bias"]
    for name, got, ref, lp in zip(names, [*outs, *grads], [*ref_outs, *ref_grads], [*lp_outs, *lp_grads]):
        assert got.dtype == dtype and got.shape == ref.shape
        assert_low_precision(name, got, lp, ref, atol=1e-3 * max(1.0, ref.abs().max().item()))


@pytest.mark.skipif(not interpret_mode(), reason="runs the kernels in Triton's CPU interpreter")
def test_interpreter_fp16_error_rule():
    """The low-precision rule on CPU: the interpreter runs fp16 (numpy has float16, not bfloat16)
    when the op is called directly, bypassing the fp32-only dispatch of ``lstm_cell``."""

    def fast(gx, h, c, w, b):
        h_new, c_new, _ = torch.ops.c2f_fast.lstm_cell_fwd(gx, h, c, w, b)
        return h_new, c_new

    _lowp_check(torch.float16, 70, 72, True, device="cpu", fast=fast)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, bias", [(1, 40, True), (5, 72, False), (70, 64, True), (256, 512, True)])
def test_gpu_low_precision(dtype, B, H, bias):
    _lowp_check(dtype, B, H, bias)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_bias_grad_deterministic(dtype):
    """The bias gradient (fp32 partials per row block, summed on the host; no atomics) is
    bitwise reproducible and equals the column sums of the fp32 gate gradients."""
    B, H = 256, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    dh, dc, c = (torch.randn(B, H, device="cuda", generator=g).to(dtype) for _ in range(3))
    gates = torch.rand(B, 4 * H, device="cuda", generator=g).to(dtype)
    gates[:, 2 * H : 3 * H] = gates[:, 2 * H : 3 * H] * 2 - 1  # the g gate is a tanh
    outs = [torch.ops.c2f_fast.lstm_cell_bwd_gates(dh, dc, c, gates, True) for _ in range(2)]
    assert torch.equal(outs[0][2], outs[1][2]) and torch.equal(outs[0][0], outs[1][0])
    expected = outs[0][0].float().sum(0)  # from the rounded d_gates: agrees up to that rounding
    atol = 1e-5 if dtype == torch.float32 else 1e-2 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(outs[0][2].float(), expected, rtol=1e-2, atol=atol)


@requires_cuda
@pytest.mark.parametrize("B, H", [(5, 72), (256, 512)])
def test_gpu_fp32_exact(B, H):
    """fp32 on GPU must not run in tf32 (input_precision="ieee"): matches the reference to ~1e-5
    (cuBLAS fp32 reference: TF32 off by default in PyTorch)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    ins = _make(B, H, device="cuda")
    outs, grads, h_new = _outputs_and_grads(lstm_cell, ins)
    _assert_triton_ran(h_new)
    ref_outs, ref_grads, _ = _outputs_and_grads(lstm_cell_ref, ins)
    for o, r in zip([*outs, *grads], [*ref_outs, *ref_grads]):
        _close(o, r, rtol=2e-5, atol=5e-5, what=f"B={B} H={H}")


@requires_cuda
def test_gpu_matches_nn_lstmcell_bf16():
    B, I, H = 256, 64, 512
    cell = torch.nn.LSTMCell(I, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, I, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
    gx = torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih)
    h_new, c_new = lstm_cell(gx, h, c, cell.weight_hh, cell.bias_hh)
    with torch.no_grad():
        cell32 = torch.nn.LSTMCell(I, H, device="cuda")
        cell32.load_state_dict({k: v.float() for k, v in cell.state_dict().items()})
        h_ref, c_ref = cell32(x.float(), (h.float(), c.float()))
        h_lp, c_lp = cell(x, (h, c))
    _assert_triton_ran(h_new)  # the parameters require grad: the op has an autograd node
    for name, fast, ref, lp in [("h_new", h_new, h_ref, h_lp), ("c_new", c_new, c_ref, c_lp)]:
        assert_low_precision(name, fast, lp, ref, atol=1e-2)


class _Step(torch.nn.Module):
    def __init__(self, I, H):
        super().__init__()
        self.cell = torch.nn.LSTMCell(I, H)

    def forward(self, x, h, c):
        gx = torch.nn.functional.linear(x, self.cell.weight_ih, self.cell.bias_ih)
        h1, c1 = lstm_cell(gx, h, c, self.cell.weight_hh, self.cell.bias_hh)
        return lstm_cell(torch.nn.functional.linear(h1, self.cell.weight_ih[:, : h1.shape[1]]), h1, c1,
                         self.cell.weight_hh, None)


@requires_cuda
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    B, H = 8, 64
    mod = _Step(H, H).cuda()
    x, h, c = (torch.randn(B, H, device="cuda", requires_grad=True) for _ in range(3))
    compiled = torch.compile(mod, fullgraph=True)
    out = compiled(x, h, c)
    ref = mod(x, h, c)
    for o, r in zip(out, ref):
        _close(o, r, rtol=1e-5, atol=1e-5, what="compiled")
    leaves = [x, h, c, *mod.parameters()]
    g = torch.autograd.grad(out[0].sum() + out[1].square().sum(), leaves)
    gr = torch.autograd.grad(ref[0].sum() + ref[1].square().sum(), leaves)
    for a, b in zip(g, gr):
        _close(a, b, rtol=1e-4, atol=1e-5, what="compiled grads")
