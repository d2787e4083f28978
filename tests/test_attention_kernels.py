"""Tests of the two attention ops (kernels/attention_pool.py, kernels/additive_attention.py).

The fp32 comparisons run on ``DEVICE`` (conftest): without a GPU, conftest switches on
``TRITON_INTERPRET=1``, so the Triton kernels themselves run on CPU and are compared with the
plain-PyTorch references; with a GPU the same comparisons run the compiled kernels on CUDA, plus
the bf16/fp16 accuracy rule, benchmark-sized shapes and ``torch.compile``.
``test_fast_path_really_runs_kernels`` checks on both that the public functions do not fall back.
"""

import importlib
import inspect

import pytest
import torch
import triton.language as tl

import kernels
from conftest import DEVICE, assert_low_precision, requires_cuda
from kernels import _attention_common as common
from kernels._utils import config_label, fast_path, interpret_mode
from kernels.additive_attention import additive_attention, additive_attention_ref
from kernels.attention_pool import attention_pool, attention_pool_ref
from kernels.registry import KERNELS

# The package exports the op functions under the op modules' names, so reach the modules (for
# their launch configurations and tile constants) through importlib.
ap_mod = importlib.import_module("kernels.attention_pool")
aa_mod = importlib.import_module("kernels.additive_attention")

#: op name -> (fast op, reference)
OPS = {
    "pool": (attention_pool, attention_pool_ref),
    "additive": (additive_attention, additive_attention_ref),
}
# On CPU the fast path exists only in the interpreter (fp32); the reference runs otherwise.
KERNELS_RUN = kernels.available()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _pool_inputs(B, L, D, with_prior, dtype=torch.float32, device=DEVICE):
    feats = torch.randn(B, L, D, device=device, dtype=dtype)
    scores = (2 * torch.randn(B, L, device=device)).to(dtype)
    prior = torch.rand(B, L, device=device, dtype=dtype) if with_prior else None
    return [feats, scores, prior]


def _additive_inputs(B, L, D, A, with_prior, dtype=torch.float32, device=DEVICE):
    feats = torch.randn(B, L, D, device=device, dtype=dtype)
    feats_proj = torch.randn(B, L, A, device=device, dtype=dtype)
    query_proj = torch.randn(B, A, device=device, dtype=dtype)
    v = (torch.randn(A, device=device) / A**0.5 * 3).to(dtype)
    prior = torch.rand(B, L, device=device, dtype=dtype) if with_prior else None
    return [feats, feats_proj, query_proj, v, prior]


def _run(fn, inputs, grad_context, grad_weights, **kw):
    """(context, weights, *gradients of every present input) of loss = <c, gc> + <w, gw>."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    context, weights = fn(*leaves, **kw)
    loss = (context.float() * grad_context).sum() + (weights.float() * grad_weights).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [context, weights, *grads]


def _names(op, inputs):
    base = ["context", "weights"]
    if op == "pool":
        args = ["feats", "scores", "prior"]
    else:
        args = ["feats", "feats_proj", "query_proj", "v", "prior"]
    return base + ["d" + n for n, t in zip(args, inputs) if t is not None]


def _assert_close_fp32(got, want, names, tol=1e-5):
    assert len(got) == len(want)
    for g, w, name in zip(got, want, names):
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _compare_with_ref(op, inputs, tol=1e-5):
    fast, ref = OPS[op]
    B, L, D = inputs[0].shape
    gc = torch.randn(B, D, device=inputs[0].device)
    gw = torch.randn(B, L, device=inputs[0].device)
    _assert_close_fp32(_run(fast, inputs, gc, gw), _run(ref, inputs, gc, gw), _names(op, inputs), tol)


def _small_tiles(monkeypatch):
    """Shrink every block and the program target so that small test shapes take every path:
    several L-blocks per program, several L-splits and D-blocks per row, ragged tails, several
    chunks in the score passes. (The default candidate -- the one the interpreter runs -- and on
    a GPU every candidate autotuning times.)"""
    monkeypatch.setattr(common, "NUM_SMS", 1)  # target_programs = 1 * resident * WAVES
    monkeypatch.setattr(ap_mod, "RESIDENT_PER_SM", 4)
    monkeypatch.setattr(aa_mod, "RESIDENT_PER_SM", 4)
    monkeypatch.setattr(ap_mod, "TILES_FWD", ((256, 4, 1), (512, 4, 1)))
    monkeypatch.setattr(ap_mod, "TILES_BWD", ((1024, 4, 1), (512, 4, 1)))
    monkeypatch.setattr(ap_mod, "MAX_BLOCK_D_FWD", 32)
    monkeypatch.setattr(ap_mod, "MAX_BLOCK_LS", 32)
    monkeypatch.setattr(aa_mod, "TILES_FWD", ((1024, 4, 1), (512, 4, 1)))
    monkeypatch.setattr(aa_mod, "TILES_BWD", ((1024, 4, 1), (512, 4, 1)))
    monkeypatch.setattr(aa_mod, "MAX_BLOCK_LS", 32)
    # the launch configurations are cached per problem: use the uncached functions meanwhile, so
    # that no small-tile configuration outlives the test (and no cached one hides the small tiles)
    for mod in (ap_mod, aa_mod):
        monkeypatch.setattr(mod, "_launch_config", mod._launch_config.__wrapped__)


SHAPES = [(2, 49, 72, 40), (3, 197, 40, 72), (1, 196, 96, 24)]


# ----------------------------------------------------------------------------------------------
# fp32: kernels (interpreter on CPU, CUDA on a GPU) against the references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_prior", [False, True], ids=["no_prior", "prior"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_D{}_A{}".format(*s))
def test_attention_pool_matches_ref(shape, with_prior):
    B, L, D, _ = shape
    _compare_with_ref("pool", _pool_inputs(B, L, D, with_prior))


@pytest.mark.parametrize("with_prior", [False, True], ids=["no_prior", "prior"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_D{}_A{}".format(*s))
def test_additive_attention_matches_ref(shape, with_prior):
    _compare_with_ref("additive", _additive_inputs(*shape, with_prior))


@pytest.mark.parametrize("op", ["pool", "additive"])
@pytest.mark.parametrize("case", [(3, 197, 40, 72, True), (2, 49, 72, 40, False)], ids=["L197_prior", "L49"])
def test_small_tiles_match_ref(op, case, monkeypatch):
    _small_tiles(monkeypatch)
    B, L, D, A, with_prior = case
    if op == "pool":
        launch = ap_mod._launch_config(B, L, D, "fp32")
        assert launch["fwd"].grid({})[1] > 1 or D <= 32  # several D-blocks per row
        _compare_with_ref("pool", _pool_inputs(B, L, D, with_prior))
    else:
        launch = aa_mod._launch_config(B, L, D, A, "fp32")
        _compare_with_ref("additive", _additive_inputs(B, L, D, A, with_prior))
    for which in ("fwd", "bwd"):  # the paths these shapes are meant to take
        if which in launch and L > 100:
            how = launch[which]
            meta = how.meta(how.configs[0])
            assert how.grid(meta)[1] > 1 or which == "fwd" and op == "pool"
            if "ROWS_PER_SPLIT" in how.ints:  # several BLOCK_L tiles per split
                assert how.ints["ROWS_PER_SPLIT"] > meta["BLOCK_L"]


@pytest.mark.parametrize("candidate", [0, 1, 2])
@pytest.mark.parametrize("op", ["pool", "additive"])
def test_every_autotune_candidate_matches_ref(op, candidate, force_candidate):
    """Each autotune candidate (tile rows, warps, stages) computes the same results: run with every
    launch forced to candidate ``candidate`` (forward, combine and backward kernels)."""
    launched = force_candidate(candidate)
    B, L, D, A = 3, 197, 40, 72
    if op == "pool":
        _compare_with_ref("pool", _pool_inputs(B, L, D, True))
        configs = [ap_mod._launch_config(B, L, D, "fp32")[w].configs for w in ("fwd", "bwd")]
    else:
        _compare_with_ref("additive", _additive_inputs(B, L, D, A, True))
        configs = [aa_mod._launch_config(B, L, D, A, "fp32")[w].configs for w in ("fwd", "combine", "bwd")]
    assert any(len(c) > candidate for c in configs), "the shape offers no such candidate"
    expected = [config_label(c[min(candidate, len(c) - 1)]) for c in configs]  # launch order
    assert [config_label(c) for c in launched] == expected


def test_large_L_once():
    """L = 784 (448-px images) with small B·D so that the interpreter stays quick."""
    _compare_with_ref("pool", _pool_inputs(1, 784, 24, True))
    _compare_with_ref("additive", _additive_inputs(1, 784, 24, 16, True))


def test_outputs_are_softmax_weights_and_prior_multiplies():
    """Semantics, independent of the reference: weights sum to 1 (prior not applied), and the
    context is the prior-weighted (not renormalised) sum."""
    feats, feats_proj, query_proj, v, prior = _additive_inputs(2, 49, 8, 8, True)
    context, weights = additive_attention(feats, feats_proj, query_proj, v, prior)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, device=DEVICE), rtol=1e-5, atol=1e-5)
    expected = torch.einsum("bl,bld->bd", weights * prior, feats)
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
    scores = torch.randn(2, 49, device=DEVICE)
    context, weights = attention_pool(feats, scores, prior)
    torch.testing.assert_close(weights, torch.softmax(scores, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context, torch.einsum("bl,bld->bd", weights * prior, feats), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_kind", ["sums", "slice"])
@pytest.mark.parametrize("op", ["pool", "additive"])
def test_stride0_grads_and_noncontiguous_inputs(op, loss_kind):
    """``.sum().backward()`` hands the backward expanded stride-0 gradients (``sums``: both
    outputs; ``slice``: the context, with a sliced weights gradient); inputs are views
    (transposed feats, strided projections) rather than dense tensors."""
    B, L, D, A = 2, 49, 40, 24
    feats_base = torch.randn(B, D, L, device=DEVICE)
    proj_base = torch.randn(B, L, 2 * A, device=DEVICE)
    q_base = torch.randn(A, B, device=DEVICE)
    scores_base = torch.randn(L, B, device=DEVICE)
    prior_base = torch.rand(B, L, 3, device=DEVICE)

    def leaves():
        bases = (feats_base, proj_base, q_base, scores_base, prior_base)
        return [t.clone().requires_grad_(True) for t in bases]

    def views(fb, pb, qb, sb, prb):
        feats, prior = fb.transpose(1, 2), prb[:, :, 1]
        if op == "pool":
            return [feats, sb.t(), prior]
        v = pb[0, 0, :A].detach().clone().requires_grad_(False) / 3
        return [feats, pb[:, :, ::2], qb.t(), v, prior]

    fast, ref = OPS[op]
    results = []
    for fn in (fast, ref):
        bases = leaves()
        inputs = views(*bases)
        assert not inputs[0].is_contiguous()
        context, weights = fn(*inputs)
        if loss_kind == "sums":
            (context.sum() + weights.sum()).backward()
        else:
            (context.sum() + 3 * weights[:, :5].sum()).backward()
        results.append([context, weights] + [b.grad for b in bases if b.grad is not None])
    names = ["context", "weights", "dfeats_base", "dproj_base", "dq_base", "dprior_base"]
    if op == "pool":
        names = ["context", "weights", "dfeats_base", "dscores_base", "dprior_base"]
    _assert_close_fp32(results[0], results[1], names)


@pytest.mark.parametrize("op", ["pool", "additive"])
@pytest.mark.parametrize("used", ["context_only", "weights_only"])
def test_one_output_unused(op, used):
    """An unused output reaches the backward as None (or zeros): both cases must be right."""
    B, L, D, A = 2, 49, 24, 16
    inputs = _pool_inputs(B, L, D, True) if op == "pool" else _additive_inputs(B, L, D, A, True)
    gc = torch.randn(B, D, device=DEVICE) * (used == "context_only")
    gw = torch.randn(B, L, device=DEVICE) * (used == "weights_only")
    fast, ref = OPS[op]

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        context, weights = fn(*leaves)
        loss = (context * gc).sum() if used == "context_only" else (weights * gw).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # feats, prior: no weights path
        return [context, weights, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))]

    _assert_close_fp32(run(fast), run(ref), _names(op, inputs))


@pytest.mark.parametrize("op", ["pool", "additive"])
def test_partial_requires_grad(op):
    """Only some inputs need gradients (e.g. a frozen encoder's feats): the kernels skip dfeats
    and dprior and the others stay right."""
    B, L, D, A = 2, 49, 24, 16
    inputs = _pool_inputs(B, L, D, True) if op == "pool" else _additive_inputs(B, L, D, A, True)
    fast, ref = OPS[op]
    gc, gw = torch.randn(B, D, device=DEVICE), torch.randn(B, L, device=DEVICE)
    outs = []
    for fn in (fast, ref):
        leaves = [t.detach().clone() for t in inputs]
        for t in leaves[1:-1]:  # everything but feats and prior
            t.requires_grad_(True)
        context, weights = fn(*leaves)
        grads = torch.autograd.grad((context * gc).sum() + (weights * gw).sum(), leaves[1:-1])
        outs.append([context, weights, *grads])
    names = ["context", "weights"] + [f"grad{i}" for i in range(len(outs[0]) - 2)]
    _assert_close_fp32(outs[0], outs[1], names)


def test_reference_path_without_interpreter(monkeypatch):
    """On CPU without the interpreter (and for dtypes the kernels do not take) the ops are their
    references, bit for bit."""
    inputs = _additive_inputs(2, 49, 24, 16, True, device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    got = additive_attention(*inputs)
    want = additive_attention_ref(*inputs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    monkeypatch.undo()
    inputs64 = [t.double() for t in _pool_inputs(2, 49, 24, True, device="cpu")]
    assert not fast_path(*inputs64)
    got = attention_pool(*inputs64)
    assert got[0].dtype == torch.float64
    assert all(torch.equal(g, w) for g, w in zip(got, attention_pool_ref(*inputs64)))


@pytest.mark.skipif(not KERNELS_RUN, reason="kernels run only on CUDA or under TRITON_INTERPRET=1")
def test_fast_path_really_runs_kernels(monkeypatch):
    """The comparisons above would be vacuous if the public functions silently used the refs."""

    def boom(*args, **kwargs):
        raise AssertionError("reference called")

    monkeypatch.setattr(ap_mod, "attention_pool_ref", boom)
    monkeypatch.setattr(aa_mod, "additive_attention_ref", boom)
    attention_pool(*_pool_inputs(1, 49, 8, False))
    additive_attention(*_additive_inputs(1, 49, 8, 8, False))


@pytest.mark.skipif(not interpret_mode(), reason="runs the kernels in Triton's CPU interpreter")
def test_interpreter_mixed_dtypes_fp16():
    """What autocast hands the local attention: fp16/bf16 features, projections and prior with the
    fp32 parameter ``v`` (and the global attention: low-precision feats and scores). The
    interpreter runs fp16 (numpy has no bfloat16) when the custom ops are called directly,
    bypassing the fp32-only CPU dispatch; the low-precision rule holds for every output and
    gradient, and each gradient has its input's dtype."""
    B, L, D, A = 2, 49, 40, 24
    feats, feats_proj, query_proj, v, prior = _additive_inputs(B, L, D, A, True, device="cpu")
    low = [t.half() for t in (feats, feats_proj, query_proj)] + [v, prior.half()]  # v stays fp32
    gc, gw = torch.randn(B, D), torch.randn(B, L)

    def op_additive(f, fp, q, vv, p, upcast=None):
        context, weights, _, _ = torch.ops.c2f_fast.additive_attention(f, fp, q, vv, p)
        return context, weights

    got = _run(op_additive, low, gc, gw)
    want = _run(additive_attention_ref, [t.float() for t in low], gc, gw)
    torch_lp = _run(additive_attention_ref, [t.half() for t in low], gc, gw, upcast=False)  # autocast: v in fp16
    names = _names("additive", low)
    for name, g, t, w, x in zip(names, got, torch_lp, want, [None, None, *low]):
        if x is not None:
            assert g.dtype == x.dtype, f"{name}: {g.dtype} for an input of {x.dtype}"
        assert_low_precision(name, g, t, w, atol=1e-3 * max(1.0, w.abs().max().item()))

    def op_pool(f, sc, p, upcast=None):
        context, weights, _, _ = torch.ops.c2f_fast.attention_pool(f, sc, p)
        return context, weights

    pool_low = [t.half() for t in _pool_inputs(B, L, D, False, device="cpu")[:2]] + [None]
    got = _run(op_pool, pool_low, gc, gw)
    want = _run(attention_pool_ref, [None if t is None else t.float() for t in pool_low], gc, gw)
    torch_lp = _run(attention_pool_ref, pool_low, gc, gw, upcast=False)
    for name, g, t, w in zip(_names("pool", pool_low), got, torch_lp, want):
        assert_low_precision(name, g, t, w, atol=1e-3 * max(1.0, w.abs().max().item()))


# ----------------------------------------------------------------------------------------------
# references: gradcheck in fp64
# ----------------------------------------------------------------------------------------------


def test_refs_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, positive=False):
        make = torch.rand if positive else torch.randn
        return make(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    B, L, D, A = 2, 4, 3, 3
    feats, scores, prior = rnd(B, L, D), rnd(B, L), rnd(B, L, positive=True)
    assert torch.autograd.gradcheck(lambda f, s, p: attention_pool_ref(f, s, p), (feats, scores, prior))
    assert torch.autograd.gradcheck(lambda f, s: attention_pool_ref(f, s), (feats, scores))
    fp, q, v = rnd(B, L, A), rnd(B, A), rnd(A)
    assert torch.autograd.gradcheck(
        lambda f, fp_, q_, v_, p: additive_attention_ref(f, fp_, q_, v_, p), (feats, fp, q, v, prior)
    )


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def _bad_pool_cases():
    f, s, p = torch.randn(2, 5, 3), torch.randn(2, 5), torch.rand(2, 5)
    return [
        ("feats", (f[0], s, p)),
        ("scores", (f, s[:, :4], p)),
        ("scores", (f, s[0], p)),
        ("prior", (f, s, p[:1])),
        ("feats", (f.long(), s, p)),
        ("feats", (f[:, :0], s[:, :0], None)),
        ("scores", (f, "not a tensor", None)),
    ]


def _bad_additive_cases():
    f, fp, q = torch.randn(2, 5, 3), torch.randn(2, 5, 4), torch.randn(2, 4)
    v, p = torch.randn(4), torch.rand(2, 5)
    return [
        ("feats", (f[0], fp, q, v, p)),
        ("feats_proj", (f, fp[:1], q, v, p)),
        ("feats_proj", (f, fp[:, :4], q, v, p)),
        ("feats_proj", (f, fp[0], q, v, p)),
        ("query_proj", (f, fp, q[:, :3], v, p)),
        ("query_proj", (f, fp, q[0], v, p)),
        ("v", (f, fp, q, v[:3], p)),
        ("v", (f, fp, q, q, p)),
        ("prior", (f, fp, q, v, p[:, :4])),
    ]


@pytest.mark.parametrize("fn", [attention_pool, attention_pool_ref], ids=["fast", "ref"])
@pytest.mark.parametrize("case", range(len(_bad_pool_cases())))
def test_attention_pool_bad_inputs(fn, case):
    name, args = _bad_pool_cases()[case]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(*args)


@pytest.mark.parametrize("fn", [additive_attention, additive_attention_ref], ids=["fast", "ref"])
@pytest.mark.parametrize("case", range(len(_bad_additive_cases())))
def test_additive_attention_bad_inputs(fn, case):
    name, args = _bad_additive_cases()[case]
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(*args)


# ----------------------------------------------------------------------------------------------
# launch configurations and the registry
# ----------------------------------------------------------------------------------------------

OUR_KERNELS = [
    "attention_pool_fwd", "attention_pool_bwd",
    "additive_attention_fwd", "additive_attention_combine", "additive_attention_bwd",
]


def _constexpr_names(fn):
    names = []
    for p in inspect.signature(fn.fn).parameters.values():
        if p.annotation is tl.constexpr or (isinstance(p.annotation, str) and "constexpr" in p.annotation):
            names.append(p.name)
    return names


@pytest.mark.parametrize("name", OUR_KERNELS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_registry_configs_are_complete(name, dtype):
    """One registered config per benchmark L and autotune candidate, each complete."""
    spec = KERNELS[name]
    configs = spec.configs(dtype)
    n196 = sum("L=196" in c.label for c in configs)
    n784 = sum("L=784" in c.label for c in configs)
    assert n196 >= 2 and n784 >= 2 and n196 + n784 == len(configs), [c.label for c in configs]
    assert len({c.label for c in configs}) == len(configs), "labels must be unique"
    for cfg in configs:
        assert list(cfg.signature) == common.runtime_arg_names(spec.fn)
        assert set(cfg.constexprs) == set(_constexpr_names(spec.fn)), cfg.label
        for streamed in spec.streamed:
            assert cfg.signature[streamed] == f"*{dtype}"
        assert cfg.num_warps in (1, 2, 4, 8, 16)
        for k, val in cfg.constexprs.items():
            if k.startswith("BLOCK_"):
                assert val & (val - 1) == 0, f"{k}={val} is not a power of two"
        if "FAST_TANH" in cfg.constexprs:
            assert cfg.constexprs["FAST_TANH"] == (dtype != "fp32")
        scalars = cfg.scalars  # the ints the launcher passes, for the report's hints
        assert set(scalars) == {n for n, t in cfg.signature.items() if t == "i32"}, cfg.label
        assert scalars["L"] == (196 if "L=196" in cfg.label else 784)


@pytest.mark.parametrize(
    "B,L,D,A",
    [(256, 196, 512, 512), (256, 784, 512, 512), (1, 49, 72, 40), (3, 197, 40, 72), (7, 1, 2048, 24)],
)
def test_launch_config_invariants(B, L, D, A):
    """Every autotune candidate covers L with the host's split (no empty split, no split boundary
    inside a tile) and keeps its tile bounded; the grid and the partial buffers do not depend on
    the candidate."""
    pool = ap_mod._launch_config(B, L, D, "bf16")
    add = aa_mod._launch_config(B, L, D, A, "bf16")
    tile_max = max(e for e, _, _ in (*ap_mod.TILES_BWD, *aa_mod.TILES_FWD, *aa_mod.TILES_BWD))
    for how in (pool["bwd"], add["fwd"], add["bwd"]):
        rows = how.ints["ROWS_PER_SPLIT"]
        grids = {how.grid(how.meta(c)) for c in how.configs}
        assert len(grids) == 1, grids
        n_split = grids.pop()[1]
        assert (n_split - 1) * rows < L <= n_split * rows  # covers L, no empty split
        assert B * n_split >= min(common.target_programs(1), B * -(-L // rows)) // 2
        assert how.constexprs["BLOCK_D"] >= D
        for cfg in how.configs:
            block_l = cfg.kwargs["BLOCK_L"]
            assert rows % block_l == 0, (rows, block_l)
            assert block_l * how.constexprs["BLOCK_D"] <= max(tile_max, how.constexprs["BLOCK_D"])
            assert cfg.num_warps in (1, 2, 4, 8)
    fwd = pool["fwd"]
    assert fwd.grid({})[1] * fwd.constexprs["BLOCK_D"] >= D
    for cfg in fwd.configs:
        assert cfg.kwargs["BLOCK_L"] * fwd.constexprs["BLOCK_D"] <= max(e for e, _, _ in ap_mod.TILES_FWD)
    assert add["fwd"].constexprs["BLOCK_A"] >= A
    assert add["fwd"].ints["N_SPLIT"] == add["combine"].ints["N_SPLIT"]


# ----------------------------------------------------------------------------------------------
# GPU only: low precision, benchmark sizes, torch.compile
# ----------------------------------------------------------------------------------------------


def _assert_rule(op, inputs_lp, gc, gw):
    """Error of the fast path vs an fp32 reference ≤ 2 × error of PyTorch's own low-precision
    path vs the same reference + one ulp of the dtype at the reference's scale."""
    fast, ref = OPS[op]
    inputs32 = [None if t is None else t.float() for t in inputs_lp]
    got = _run(fast, inputs_lp, gc, gw)
    torch_lp = _run(ref, inputs_lp, gc, gw, upcast=False)
    want = _run(ref, inputs32, gc, gw)
    eps = torch.finfo(inputs_lp[0].dtype).eps
    for name, g, t, w in zip(_names(op, inputs_lp), got, torch_lp, want):
        assert g.dtype == t.dtype, name
        assert_low_precision(name, g, t, w, atol=eps * w.abs().max().item())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("with_prior", [False, True], ids=["no_prior", "prior"])
@pytest.mark.parametrize("shape", [(4, 197, 72, 40), (8, 196, 512, 512)], ids=["small", "D512"])
def test_low_precision_rule(dtype, with_prior, shape):
    B, L, D, A = shape
    gc, gw = torch.randn(B, D, device="cuda"), torch.randn(B, L, device="cuda")
    _assert_rule("pool", _pool_inputs(B, L, D, with_prior, dtype=dtype), gc, gw)
    _assert_rule("additive", _additive_inputs(B, L, D, A, with_prior, dtype=dtype), gc, gw)


@requires_cuda
@pytest.mark.parametrize("L", [196, 784])
def test_benchmark_shapes_bf16(L):
    B, D, A = 256, 512, 512
    gc, gw = torch.randn(B, D, device="cuda"), torch.randn(B, L, device="cuda")
    _assert_rule("pool", _pool_inputs(B, L, D, False, dtype=torch.bfloat16), gc, gw)
    _assert_rule("additive", _additive_inputs(B, L, D, A, True, dtype=torch.bfloat16), gc, gw)


@requires_cuda
def test_benchmark_shapes_fp32():
    # dv sums B·L = 200k terms in a different order than cuBLAS: fp32 rounding ~sqrt(n)·eps.
    _compare_with_ref("pool", _pool_inputs(256, 784, 512, True), tol=1e-4)
    _compare_with_ref("additive", _additive_inputs(256, 784, 512, 512, True), tol=1e-4)


class _GlobalLocal(torch.nn.Module):
    """Global attention whose weights are the prior of one additive-attention step."""

    def __init__(self, D: int, A: int):
        super().__init__()
        self.score = torch.nn.Linear(D, 1)
        self.proj = torch.nn.Linear(D, A)
        self.query = torch.nn.Linear(A, A)
        self.v = torch.nn.Parameter(torch.randn(A) / A**0.5)

    def forward(self, feats, h):
        scores = torch.tanh(self.score(feats).squeeze(-1))
        z, alpha = attention_pool(feats, scores)
        c, beta = additive_attention(feats, self.proj(feats), self.query(h), self.v, alpha)
        return z, c, beta


@requires_cuda
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    B, L, D, A = 4, 196, 72, 40
    model = _GlobalLocal(D, A).cuda()
    feats = torch.randn(B, L, D, device="cuda", requires_grad=True)
    h = torch.randn(B, A, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for m in (model, compiled):
        model.zero_grad()
        feats.grad = None
        z, c, beta = m(feats, h)
        (z.square().sum() + c.square().sum() + (beta * torch.arange(L, device="cuda")).sum()).backward()
        results.append([z, c, beta, feats.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"output/grad {i}: {m}")
