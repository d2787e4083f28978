"""StepLinears (c2f_fast/step_linear.py): linear layers used at every decoder step whose weight
gradient is one product over the steps. Checked against plain F.linear / nn.LSTMCell: forward
bit for bit, every gradient (fp32 to 1e-5 relative; bf16 autocast by the 2x-PyTorch-error rule),
a stride-0 output gradient, gradients that also reach the weight by ordinary uses, no deferral
where no gradient is wanted; and the model's decoder with and without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from c2f_fast import step_linear
from c2f_fast.model import C2FNet, ModelConfig
from c2f_fast.step_linear import StepLinears


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def unrolled(x_seq, w, b, h0, linear):
    """A toy recurrence with the weight used at every step: h_t = tanh(W [x_t; h_{t-1}] + b)."""
    h, outs = h0, []
    for x in x_seq:
        h = torch.tanh(linear(torch.cat([x, h], dim=1), w, b))
        outs.append(h)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("steps, batch, d_in, d_out", [(5, 8, 13, 7), (1, 3, 4, 4), (7, 1, 33, 12)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_deferred_gradients_equal_autograds(steps, batch, d_in, d_out, bias):
    torch.manual_seed(0)
    x_seq = [torch.randn(batch, d_in, requires_grad=True) for _ in range(steps)]
    h0 = torch.randn(batch, d_out, requires_grad=True)
    w = torch.randn(d_out, d_in + d_out, requires_grad=True)
    b = torch.randn(d_out, requires_grad=True) if bias else None
    grad_out = torch.randn(batch, steps, d_out)
    leaves = [*x_seq, h0, w] + ([b] if bias else [])

    ref = unrolled(x_seq, w, b, h0, F.linear)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    out = unrolled(x_seq, w, b, h0, StepLinears().linear)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert torch.equal(out, ref)  # the forward is F.linear's product, bit for bit
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_stride0_gradient_and_other_uses_of_the_weight():
    """``.sum().backward()`` hands the steps an expanded (stride-0) gradient; a use of the weight
    outside the steps adds its own gradient to the deferred product's."""
    torch.manual_seed(1)
    w = torch.randn(6, 9, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    x_seq = [torch.randn(4, 3) for _ in range(3)]
    h0 = torch.randn(4, 6)

    def loss(linear):
        out = unrolled(x_seq, w, b, h0, linear)
        return out.sum() + (w * w).sum()  # the second term reaches w directly

    loss(F.linear).backward()
    ref_w, ref_b = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None
    loss(StepLinears().linear).backward()
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, ref_b, rtol=1e-5, atol=1e-6)


def test_no_deferral_without_gradients():
    w = torch.randn(5, 4, requires_grad=True)
    x = torch.randn(2, 4)
    steps = StepLinears()
    with torch.no_grad():
        assert steps.linear(x, w).grad_fn is None
    frozen = torch.randn(5, 4)
    assert not StepLinears.defers(frozen)
    assert type(steps.linear(x, w).grad_fn).__name__.startswith("_StepLinear")


def _decoder_case():
    torch.manual_seed(0)
    cfg = ModelConfig(variant="lstm_lg", backbone="tiny", num_classes=7, image_size=64, steps=4, hidden=24,
                      embed=8, attn=16)
    model = C2FNet(cfg)
    images = torch.randn(3, 3, 64, 64)
    seq = torch.tensor([[0, 2, -1, -1], [1, -1, -1, -1], [3, 4, 5, -1]])
    return model, images, seq


def _run(model, images, seq, defer: bool, autocast: bool, monkeypatch):
    model.zero_grad(set_to_none=True)
    with monkeypatch.context() as patch:
        if not defer:
            patch.setattr(step_linear.StepLinears, "defers", staticmethod(lambda weight: False))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(images, seq)
        (out.step_logits.float().clamp_min(-30).sum() + out.logits.float().sum()).backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_decoder_with_deferred_lstm_gradients_equals_nn_lstmcell(monkeypatch):
    """fp32: the forward bit for bit (the same products, nn.LSTMCell's formula), gradients to 1e-5."""
    model, images, seq = _decoder_case()
    logits, grads = _run(model, images, seq, True, False, monkeypatch)
    ref_logits, ref_grads = _run(model, images, seq, False, False, monkeypatch)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and "lstm.weight_ih" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_decoder_bf16_autocast_within_twice_pytorchs_error(monkeypatch):
    """bf16 autocast: the deferred product rounds once where autograd rounds each step's gradient;
    its error against the fp32 gradients stays within 2x that of PyTorch's own bf16 path (+ atol)."""
    model, images, seq = _decoder_case()
    _, fp32 = _run(model, images, seq, False, False, monkeypatch)
    logits, grads = _run(model, images, seq, True, True, monkeypatch)
    ref_logits, ref_grads = _run(model, images, seq, False, True, monkeypatch)
    assert torch.equal(logits, ref_logits)  # the same bf16 products and cell
    for name in ("lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih", "lstm.bias_hh"):
        ours, torchs = rel_err(grads[name], fp32[name]), rel_err(ref_grads[name], fp32[name])
        assert ours <= 2 * torchs + 1e-3, f"{name}: {ours:.2e} against PyTorch's bf16 {torchs:.2e}"
