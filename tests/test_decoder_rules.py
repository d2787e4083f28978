"""The decoder's no-copy rule and greedy stop rule (docs/model.md, "Decoder"), on both paths.

Step t may not score a class already fed to the decoder (its own input token or an earlier one):
those logits are -inf before the max over steps, in teacher forcing and in greedy decoding.
Greedy decoding feeds the best class not yet emitted while its probability is >= 0.5, then PAD.
"""

import math

import pytest
import torch

from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss, vertical_margin
from c2f_fast.model import PAD, C2FNet, ModelConfig, greedy_emissions

SMALL = dict(backbone="tiny", num_classes=6, steps=5, hidden=20, embed=8, attn=12, image_size=48)
PATHS = [pytest.param(False, id="reference"), pytest.param(True, id="fast")]


def model_and_inputs(variant, fast, B=4, L=49):
    torch.manual_seed(0)
    model = C2FNet(ModelConfig(variant=variant, **SMALL, fast_kernels=fast)).eval()
    feats = torch.randn(B, L, model.feat_dim)
    f_fc = torch.randn(B, model.fc_dim)
    return model, feats, f_fc


def expected_mask(seq, T, C):
    """mask[b, t, c]: class c was fed before or at step t (seq[b, :t] holds the fed labels)."""
    B = seq.shape[0]
    mask = torch.zeros(B, T, C, dtype=torch.bool)
    for b in range(B):
        for t in range(1, T):
            for c in seq[b, :t].tolist():
                if c >= 0:
                    mask[b, t, c] = True
    return mask


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("variant", ["lstm", "lstm_l", "lstm_lg"])
def test_teacher_forcing_masks_exactly_the_fed_classes(variant, fast):
    model, feats, f_fc = model_and_inputs(variant, fast)
    targets = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]])
    seq = label_sequences(targets, torch.arange(6), 5)
    out = model.decode(feats, f_fc, seq)
    mask = expected_mask(seq, 5, 6)
    assert mask.any()  # the case is not vacuous
    assert torch.isneginf(out.step_logits[mask]).all()
    assert torch.isfinite(out.step_logits[~mask]).all()
    assert torch.isfinite(out.logits).all()  # step 0 is never masked
    torch.testing.assert_close(out.logits, out.step_logits.amax(dim=1))


@pytest.mark.parametrize("fast", PATHS)
def test_masking_does_not_depend_on_the_path(fast):
    """Fast and reference paths give the same masked logits (same weights)."""
    ref, feats, f_fc = model_and_inputs("lstm_lg", False)
    other, _, _ = model_and_inputs("lstm_lg", fast)
    other.load_state_dict(ref.state_dict())
    targets = (torch.rand(4, 6) < 0.5).long()
    seq = label_sequences(targets, torch.arange(6), 5)
    torch.testing.assert_close(other.decode(feats, f_fc, seq).step_logits, ref.decode(feats, f_fc, seq).step_logits,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", PATHS)
def test_greedy_feeds_confident_classes_then_stops(fast):
    """With a prediction layer that ignores its input, every step's logits are the bias: greedy
    must emit 0, 1, 2 (p >= 0.5), then stop (PAD) once the best remaining class has p < 0.5."""
    model, feats, f_fc = model_and_inputs("lstm_lg", fast, B=2)
    bias = torch.tensor([3.0, 2.0, 1.0, -1.0, -2.0, -3.0])
    with torch.no_grad():
        model.predict.weight.zero_()
        model.predict.bias.copy_(bias)
        out = model.decode(feats, f_fc)
    inf = math.inf
    expected = torch.stack([
        bias,
        torch.tensor([-inf, 2.0, 1.0, -1.0, -2.0, -3.0]),
        torch.tensor([-inf, -inf, 1.0, -1.0, -2.0, -3.0]),
        torch.tensor([-inf, -inf, -inf, -1.0, -2.0, -3.0]),  # best p < 0.5: PAD is fed next
        torch.tensor([-inf, -inf, -inf, -1.0, -2.0, -3.0]),  # PAD masks nothing new
    ]).expand(2, 5, 6)
    torch.testing.assert_close(out.step_logits, expected)
    # Teacher forcing with the same choices (PAD after the stop) computes the same thing.
    seq = torch.tensor([[0, 1, 2, PAD, PAD]] * 2)
    torch.testing.assert_close(model.decode(feats, f_fc, seq).step_logits, expected)
    assert greedy_emissions(out.step_logits).tolist() == [[0, 1, 2, PAD, PAD]] * 2


def test_greedy_never_emits_a_class_twice_and_stops_when_all_are_out():
    model = C2FNet(ModelConfig(variant="lstm_l", **{**SMALL, "num_classes": 2, "steps": 4})).eval()
    with torch.no_grad():
        model.predict.weight.zero_()
        model.predict.bias.fill_(5.0)  # every class is confident
        out = model.decode(torch.randn(1, 49, model.feat_dim), torch.randn(1, model.fc_dim))
    # step 0 emits one class, step 1 the other; from step 2 on both are masked
    assert torch.isfinite(out.step_logits[0, 0]).all()
    assert torch.isfinite(out.step_logits[0, 1]).sum() == 1
    assert torch.isneginf(out.step_logits[0, 2:]).all()


@pytest.mark.parametrize("fast", PATHS)
def test_responsible_step_is_never_masked_for_its_class(fast):
    """R2 compares Q[t_j, j] (the step whose teacher-forced target is j) with the other steps:
    the masking must leave Q[t_j, j] alone, so R2 is finite and its gradient reaches that entry."""
    model, feats, f_fc = model_and_inputs("lstm_lg", fast, B=8)
    targets = (torch.rand(8, 6) < 0.6).long()
    targets[0] = 1  # more positives than steps: the labels past T have no responsible step
    order = class_frequency_order(targets)
    seq = label_sequences(targets, order, 5)
    out = model.decode(feats, f_fc, seq)
    resp = seq >= 0
    own = out.step_logits.gather(2, seq.clamp(min=0).unsqueeze(2)).squeeze(2)  # [B, T]
    assert resp.sum() > 8
    assert torch.isfinite(own[resp]).all()
    r2 = vertical_margin(out.step_scores, targets, seq, 0.1)
    assert torch.isfinite(r2).all()
    loss, parts = c2f_loss(out, targets, seq)
    assert torch.isfinite(loss) and parts["r2"] > 0
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
