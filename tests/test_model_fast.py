"""The fast path (Triton ops) against the reference path of the same model, same weights.

On CPU the ops run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), fp32.
"""

import pytest
import torch

from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss
from c2f_fast.model import C2FNet, ModelConfig

SMALL = dict(backbone="tiny", num_classes=5, steps=3, hidden=24, embed=8, attn=20, image_size=48)


def twin_models(variant, **kw):
    ref = C2FNet(ModelConfig(variant=variant, **{**SMALL, **kw}, fast_kernels=False))
    fast = C2FNet(ModelConfig(variant=variant, **{**SMALL, **kw}, fast_kernels=True))
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def run_decoder(model, feats, f_fc, seq, targets):
    feats = feats.clone().requires_grad_(True)
    f_fc = f_fc.clone().requires_grad_(True)
    out = model.decode(feats, f_fc, seq)
    loss, _ = c2f_loss(out, targets, seq)
    # also push a gradient through the attention maps, so their backward is exercised too
    extra = sum((m * torch.linspace(0, 1, m.shape[-1])).sum() for m in (out.global_attn, out.local_attn) if m is not None)
    (loss + extra).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, feats.grad, f_fc.grad, grads


@pytest.mark.parametrize("variant", ["lstm", "lstm_l", "lstm_lg"])
@pytest.mark.parametrize("L", [49, 197])
def test_fast_decoder_matches_reference(variant, L):
    ref, fast = twin_models(variant)
    B = 2
    feats = torch.rand(B, L, ref.feat_dim)
    f_fc = torch.randn(B, ref.fc_dim)
    targets = torch.tensor([[1, 0, 1, 0, -1], [0, 1, 0, 0, 1]])
    seq = label_sequences(targets, class_frequency_order(targets), 3)
    o_ref, gf_ref, gfc_ref, g_ref = run_decoder(ref, feats, f_fc, seq, targets)
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


def test_fast_greedy_decoding_matches_reference():
    ref, fast = twin_models("lstm_lg")
    feats, f_fc = torch.rand(2, 49, ref.feat_dim), torch.randn(2, ref.fc_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(feats, f_fc).step_logits, ref.decode(feats, f_fc).step_logits,
                                   rtol=1e-5, atol=1e-5)


def test_fast_full_model_forward():
    ref, fast = twin_models("lstm_lg")
    ref.eval(), fast.eval()
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast(images).logits, ref(images).logits, rtol=1e-5, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_decoder_low_precision_on_gpu(dtype):
    """Fast path in low precision vs the fp32 reference: ≤ 2× PyTorch's own low-precision error."""
    cfg = dict(backbone="tiny", num_classes=20, steps=5, hidden=512, embed=256, attn=512, image_size=224)
    ref = C2FNet(ModelConfig(variant="lstm_lg", **cfg)).cuda()
    fast = C2FNet(ModelConfig(variant="lstm_lg", **cfg, fast_kernels=True)).cuda()
    fast.load_state_dict(ref.state_dict())
    feats = torch.rand(64, 196, ref.feat_dim, device="cuda")
    f_fc = torch.randn(64, ref.fc_dim, device="cuda")
    with torch.no_grad():
        gold = ref.decode(feats, f_fc).step_logits
        low_ref = ref.to(dtype).decode(feats.to(dtype), f_fc.to(dtype)).step_logits.float()
        low_fast = fast.to(dtype).decode(feats.to(dtype), f_fc.to(dtype)).step_logits.float()
    err_torch = (low_ref - gold).abs().max().item()
    err_fast = (low_fast - gold).abs().max().item()
    assert err_fast <= 2 * err_torch + 1e-3, (err_fast, err_torch)


@cuda
def test_fast_model_compiles_without_graph_breaks():
    cfg = ModelConfig(variant="lstm_lg", **SMALL, fast_kernels=True)
    model = C2FNet(cfg).cuda()
    feats = torch.rand(4, 49, model.feat_dim, device="cuda")
    f_fc = torch.randn(4, model.fc_dim, device="cuda")
    seq = torch.tensor([[0, 1, -1]] * 4, device="cuda")
    eager = model.decode(feats, f_fc, seq).step_logits
    compiled = torch.compile(model.decode, fullgraph=True)
    torch.testing.assert_close(compiled(feats, f_fc, seq).step_logits, eager, rtol=1e-4, atol=1e-4)


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
    see test_fast_model_compiles_without_graph_breaks)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "COMPILED-OK" in proc.stdout, proc.stderr[-3000:]
