"""The fast path (Triton ops) against the reference path of the same model, same weights.

Every twin-model test runs on ``DEVICE`` (conftest): compiled kernels on a GPU, Triton's
interpreter on CPU (fp32); the ``kernels_only`` fixture makes the ops' ``*_ref`` fallbacks raise,
so a fast model that silently took the reference path cannot pass on either machine.
The GPU-only tests add forward + backward of the whole model in fp32 and under bf16 autocast,
eager and compiled, at two batch sizes.
"""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from c2f_fast.encoders import feature_map_size
from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss
from c2f_fast.model import C2FNet, ModelConfig
from conftest import DEVICE, SMALL_MODEL, assert_low_precision, requires_cuda

OP_MODULES = {name: importlib.import_module(f"kernels.{name}") for name in kernels.OP_MODULES}


def twin_models(variant, device=DEVICE, **kw):
    """(reference, fast): the same weights, on ``device``."""
    ref = C2FNet(ModelConfig(variant=variant, **{**SMALL_MODEL, **kw}, fast_kernels=False))
    fast = C2FNet(ModelConfig(variant=variant, **{**SMALL_MODEL, **kw}, fast_kernels=True))
    fast.load_state_dict(ref.state_dict())
    return ref.to(device), fast.to(device)


@pytest.fixture
def kernels_only(monkeypatch):
    """The ops' reference fallbacks raise: whatever runs must be the Triton kernels."""
    assert kernels.available(), "conftest runs the kernels on a GPU or in the interpreter"

    def refuse(name):
        def boom(*args, **kwargs):
            raise AssertionError(f"{name} ran: the fast model fell back to the reference path")

        return boom

    for name, module in OP_MODULES.items():
        monkeypatch.setattr(module, f"{name}_ref", refuse(f"{name}_ref"))


def run_decoder(model, feats, f_fc, seq, targets):
    feats = feats.clone().requires_grad_(True)
    f_fc = f_fc.clone().requires_grad_(True)
    out = model.decode(feats, f_fc, seq)
    loss, _ = c2f_loss(out, targets, seq)
    # also push a gradient through the attention maps, so their backward is exercised too
    extra = sum(
        (m * torch.linspace(0, 1, m.shape[-1], device=m.device)).sum()
        for m in (out.global_attn, out.local_attn)
        if m is not None
    )
    (loss + extra).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, feats.grad, f_fc.grad, grads


def _targets_and_seq(device=DEVICE):
    targets = torch.tensor([[1, 0, 1, 0, -1], [0, 1, 0, 0, 1]], device=device)
    return targets, label_sequences(targets, class_frequency_order(targets), 3)


@pytest.mark.parametrize("variant", ["lstm", "lstm_l", "lstm_lg"])
@pytest.mark.parametrize("L", [49, 197])
def test_fast_decoder_matches_reference(variant, L, kernels_only):
    ref, fast = twin_models(variant)
    B = 2
    feats = torch.rand(B, L, ref.feat_dim, device=DEVICE)
    f_fc = torch.randn(B, ref.fc_dim, device=DEVICE)
    targets, seq = _targets_and_seq()
    o_ref, gf_ref, gfc_ref, g_ref = run_decoder(ref, feats, f_fc, seq, targets)  # plain nn code
    o_fast, gf_fast, gfc_fast, g_fast = run_decoder(fast, feats, f_fc, seq, targets)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_fast.step_logits, o_ref.step_logits, **tol)
    for a, b in ((o_fast.global_attn, o_ref.global_attn), (o_fast.local_attn, o_ref.local_attn)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(gf_fast, gf_ref, **tol)
    torch.testing.assert_close(gfc_fast, gfc_ref, **tol)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], **tol, msg=lambda m: f"{name}: {m}")


def test_fast_greedy_decoding_matches_reference(kernels_only):
    ref, fast = twin_models("lstm_lg")
    feats = torch.rand(2, 49, ref.feat_dim, device=DEVICE)
    f_fc = torch.randn(2, ref.fc_dim, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(feats, f_fc).step_logits, ref.decode(feats, f_fc).step_logits,
                                   rtol=1e-5, atol=1e-5)


def test_fast_full_model_forward(kernels_only, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # on a GPU: exact fp32 convs
    ref, fast = twin_models("lstm_lg")
    ref.eval(), fast.eval()
    images = torch.randn(1, 3, 48, 48, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast(images).logits, ref(images).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# no copies of the feature map
# ----------------------------------------------------------------------------------------------

COPY_OPS = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy")


def _feature_map_copies(prof, numel: int) -> list[str]:
    """Copy-like ops (COPY_OPS) of a tensor of ``numel`` elements with at least two dimensions
    (the interpreter's own transfers are 1-D byte storages)."""
    found = []
    for evt in prof.events():
        if evt.name in COPY_OPS:
            for shape in evt.input_shapes:
                if isinstance(shape, (list, tuple)) and len(shape) >= 2 and math.prod(shape) == numel:
                    found.append(f"{evt.name}{list(shape)}")
    return found


def _profiled_decode(model, feats, f_fc, seq, targets) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    feats = feats.detach().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = model.decode(feats, f_fc, seq)
        loss, _ = c2f_loss(out, targets, seq)
        (loss + out.global_attn.square().sum() + out.local_attn.square().sum()).backward()
    return _feature_map_copies(prof, feats.numel())


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_decode_makes_no_feature_map_copy(path, kernels_only):
    """One decode, forward and backward, of a dense [B, L, D] feature map (what the encoders emit)
    copies no [B, L, D] tensor: the kernels read the encoder's tensor as it is. Fast path on
    DEVICE (the interpreter on CPU), and the reference path too."""
    ref, fast = twin_models("lstm_lg")
    model = fast if path == "fast" else ref
    B, L = 2, 49
    feats = torch.rand(B, L, model.feat_dim, device=DEVICE)
    f_fc = torch.randn(B, model.fc_dim, device=DEVICE)
    targets, seq = _targets_and_seq()
    copies = _profiled_decode(model, feats, f_fc, seq, targets)
    assert copies == [], f"{path} decode copied the feature map: {copies}"
    if path == "fast":
        # the check itself can see a copy: a transposed view of the same map must be copied
        view = feats.transpose(1, 2).contiguous().transpose(1, 2)
        assert not view.is_contiguous()
        assert _profiled_decode(model, view, f_fc, seq, targets), "the profiler check saw no copy of a strided map"


def test_encoders_emit_a_dense_feature_map():
    _, fast = twin_models("lstm_lg")
    feats, _ = fast.encoder(torch.randn(2, 3, 48, 48, device=DEVICE))
    assert feats.dim() == 3 and feats.is_contiguous()


# ----------------------------------------------------------------------------------------------
# where the kernels cannot run
# ----------------------------------------------------------------------------------------------


def test_fast_kernels_warn_once_where_they_cannot_run(monkeypatch):
    from kernels import _utils

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_utils, "_WARNED", set())
    assert not kernels.available()
    with pytest.warns(RuntimeWarning, match="reference path is used"):
        C2FNet(ModelConfig(variant="lstm_lg", **SMALL_MODEL, fast_kernels=True))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C2FNet(ModelConfig(variant="lstm_lg", **SMALL_MODEL, fast_kernels=True))  # once only
        C2FNet(ModelConfig(variant="lstm_lg", **SMALL_MODEL, fast_kernels=False))


NO_TRITON_SCRIPT = r"""
import sys, warnings
sys.modules["triton"] = None  # as if triton were not installed
import torch
from c2f_fast.model import C2FNet, ModelConfig
import kernels
assert not kernels.available()
cfg = dict(variant="lstm_lg", backbone="tiny", num_classes=5, steps=3, hidden=24, embed=8, attn=20, image_size=48)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fast = C2FNet(ModelConfig(**cfg, fast_kernels=True))
assert any("triton is not installed" in str(w.message) for w in caught), [str(w.message) for w in caught]
ref = C2FNet(ModelConfig(**cfg))
fast.load_state_dict(ref.state_dict())
images = torch.randn(2, 3, 48, 48)
torch.testing.assert_close(fast(images).logits, ref(images).logits, rtol=1e-5, atol=1e-5)
print("NO-TRITON-OK")
"""


def test_without_triton_the_package_imports_warns_and_runs_the_reference():
    """triton missing: ``import kernels`` still works, the model warns at construction and the
    fast model computes the reference's result (the ops take their references)."""
    proc = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "NO-TRITON-OK" in proc.stdout, proc.stderr[-3000:]


def test_no_warning_where_the_kernels_run(monkeypatch):
    import warnings

    from kernels import _utils

    monkeypatch.setattr(_utils, "_WARNED", set())
    assert kernels.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C2FNet(ModelConfig(variant="lstm_lg", **SMALL_MODEL, fast_kernels=True))


# ----------------------------------------------------------------------------------------------
# GPU: low precision, autocast, torch.compile, two batch sizes
# ----------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_decoder_low_precision_on_gpu(dtype, kernels_only):
    """Fast path in low precision vs the fp32 reference: ≤ 2× PyTorch's own low-precision error."""
    cfg = dict(backbone="tiny", num_classes=20, steps=5, hidden=512, embed=256, attn=512, image_size=224)
    ref = C2FNet(ModelConfig(variant="lstm_lg", **cfg)).cuda()
    fast = C2FNet(ModelConfig(variant="lstm_lg", **cfg, fast_kernels=True)).cuda()
    fast.load_state_dict(ref.state_dict())
    feats = torch.rand(64, 196, ref.feat_dim, device="cuda")
    f_fc = torch.randn(64, ref.fc_dim, device="cuda")
    with torch.no_grad():
        gold = ref.decode(feats, f_fc).step_logits
        low_ref = ref.to(dtype).decode(feats.to(dtype), f_fc.to(dtype)).step_logits
        low_fast = fast.to(dtype).decode(feats.to(dtype), f_fc.to(dtype)).step_logits
    assert_low_precision("step_logits", low_fast, low_ref, gold, atol=1e-3)


@requires_cuda
def test_fast_model_compiles_without_graph_breaks(kernels_only):
    cfg = ModelConfig(variant="lstm_lg", **SMALL_MODEL, fast_kernels=True)
    model = C2FNet(cfg).cuda()
    feats = torch.rand(4, 49, model.feat_dim, device="cuda")
    f_fc = torch.randn(4, model.fc_dim, device="cuda")
    seq = torch.tensor([[0, 1, -1]] * 4, device="cuda")
    eager = model.decode(feats, f_fc, seq).step_logits
    compiled = torch.compile(model.decode, fullgraph=True)
    torch.testing.assert_close(compiled(feats, f_fc, seq).step_logits, eager, rtol=1e-4, atol=1e-4)


#: The whole-model GPU test: the tiny backbone at 64 px (L = 16), sizes that all differ.
GPU_MODEL = dict(backbone="tiny", num_classes=20, steps=5, hidden=64, embed=32, attn=48, image_size=64)
GPU_BATCHES = (8, 12)


def _train_step(model, forward, images, seq, targets, weights, autocast):
    """Forward and backward of the whole model: (step logits, attention maps, loss, every
    parameter gradient), all in fp32. The loss is smooth (fixed random weights on the step
    logits and both attention maps), so that bf16 rounding cannot flip a max or a hinge."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = forward(images, seq)
        w_logits, w_global, w_local = weights
        loss = (
            (out.step_logits.float() * w_logits).sum()
            + (out.global_attn.float() * w_global).sum()
            + (out.local_attn.float() * w_local).sum()
        )
    loss.backward()
    results = {
        "step_logits": out.step_logits.detach().float(),
        "global_attn": out.global_attn.detach().float(),
        "local_attn": out.local_attn.detach().float(),
        "loss": loss.detach().float(),
    }
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        results[f"grad {name}"] = p.grad.detach().float().clone()
    return results


@requires_cuda
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast"])
def test_fast_model_forward_backward_on_gpu(precision, mode, kernels_only, monkeypatch):
    """The whole fast model (encoder, global and local attention, LSTM; teacher forcing), forward
    and backward, against the reference model with the same weights, at two batch sizes:
    fp32 to 1e-4; under bf16 autocast (the kernels then get mixed dtypes: bf16 features and
    projections, the fp32 parameter ``v``) the fast path's error against the fp32 reference is at
    most twice the reference-under-autocast's, plus one bf16 eps. ``compiled``: the fast model
    under ``torch.compile(fullgraph=True, dynamic=False)``, one specialisation per batch size
    (sizes are static, see kernels/_utils.py)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs exact on both paths
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch._dynamo.reset()
    ref, fast = twin_models("lstm_lg", device="cuda", **GPU_MODEL)
    ref.train(), fast.train()
    forward = torch.compile(fast, fullgraph=True, dynamic=False) if mode == "compiled" else fast
    T, C, S = GPU_MODEL["steps"], GPU_MODEL["num_classes"], GPU_MODEL["image_size"]
    for B in GPU_BATCHES:
        g = torch.Generator(device="cuda").manual_seed(B)
        images = torch.randn(B, 3, S, S, device="cuda", generator=g)
        targets = (torch.rand(B, C, device="cuda", generator=g) < 0.2).long()
        seq = label_sequences(targets, class_frequency_order(targets), T)
        L = feature_map_size(GPU_MODEL["backbone"], S) ** 2  # the backbone decides the stride (tiny: 8)
        weights = (
            torch.randn(B, T, C, device="cuda", generator=g),
            torch.randn(B, L, device="cuda", generator=g),
            torch.randn(B, T, L, device="cuda", generator=g),
        )
        gold = _train_step(ref, ref, images, seq, targets, weights, autocast=False)
        got = _train_step(fast, forward, images, seq, targets, weights, autocast=precision != "fp32")
        assert got.keys() == gold.keys()
        if precision == "fp32":
            for name in gold:
                scale = max(1.0, gold[name].abs().max().item())
                torch.testing.assert_close(got[name], gold[name], rtol=1e-4, atol=1e-4 * scale,
                                           msg=lambda m: f"B={B} {name}: {m}")
        else:
            torch_lp = _train_step(ref, ref, images, seq, targets, weights, autocast=True)
            for name in gold:
                assert_low_precision(f"B={B} {name}", got[name], torch_lp[name], gold[name],
                                     eps=torch.finfo(torch.bfloat16).eps)


COMPILE_SCRIPT = r"""
import torch
from c2f_fast.model import C2FNet, ModelConfig
torch.manual_seed(0)
cfg = ModelConfig(variant="lstm_lg", backbone="tiny", num_classes=5, steps=3, hidden=24, embed=8,
                  attn=20, image_size=48, fast_kernels=True)
model = C2FNet(cfg)
feats, f_fc = torch.rand(2, 49, model.feat_dim), torch.randn(2, model.fc_dim)
seq = torch.tensor([[0, 1, -1]] * 2)
eager = model.decode(feats, f_fc, seq).step_logits
compiled = torch.compile(model.decode, fullgraph=True)(feats, f_fc, seq).step_logits
torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
print("COMPILED-OK")
"""


@pytest.mark.slow
def test_fast_model_dispatch_compiles_fullgraph_on_cpu():
    """The fast path's dispatch (device / interpreter checks around the ops) traces with no graph
    break. Without CUDA and without the interpreter the ops take their references, so this runs on
    CPU in a subprocess without TRITON_INTERPRET (the Triton ops themselves compile only on a GPU:
    see test_fast_model_compiles_without_graph_breaks and test_fast_model_forward_backward_on_gpu)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU machine too: the reference dispatch on CPU
    proc = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", COMPILE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "COMPILED-OK" in proc.stdout, proc.stderr[-3000:]
