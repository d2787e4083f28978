"""The joint max-margin loss against hand-computed values; label sequences on edge cases."""

import math

import pytest
import torch

from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss
from c2f_fast.model import PAD, C2FOutput


def logit(p):
    return math.log(p / (1 - p))


def output_from_probs(step_probs):
    step_logits = torch.tensor(step_probs, dtype=torch.float64).logit()
    return C2FOutput(step_logits.amax(1), step_logits, None, None)


def bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_hand_computed_loss_parts():
    # one image, 4 classes, 2 steps; targets: class 0 and 2 positive, 1 negative, 3 ignored
    Q = [[[0.9, 0.3, 0.2, 0.99], [0.4, 0.6, 0.7, 0.01]]]
    out = output_from_probs(Q)
    targets = torch.tensor([[1, 0, 1, -1]])
    seq = torch.tensor([[0, 2]])  # step 0 targets class 0, step 1 targets class 2
    loss, parts = c2f_loss(out, targets, seq, lambda1=0.5, lambda2=0.25, eps=0.15, eps_v=0.6)
    exp_bce = bce(0.9, 1) + bce(0.6, 0) + bce(0.7, 1)  # the ignored class 3 adds nothing
    # R1 on p-hat = max_t = [0.9, 0.6, 0.7, 0.99]: max_neg = 0.6, min_pos = 0.7 (0.99 is ignored)
    exp_r1 = 0.6 - 0.7 + 0.15
    # R2: class 0 at step 0: Q[1,0] - Q[0,0] + 0.6 = 0.4 - 0.9 + 0.6
    #     class 2 at step 1: Q[0,2] - Q[1,2] + 0.6 = 0.2 - 0.7 + 0.6
    exp_r2 = (0.4 - 0.9 + 0.6) + (0.2 - 0.7 + 0.6)
    assert parts["bce"].item() == pytest.approx(exp_bce, rel=1e-9)
    assert parts["r1"].item() == pytest.approx(exp_r1, rel=1e-9)
    assert parts["r2"].item() == pytest.approx(exp_r2, rel=1e-9)
    assert loss.item() == pytest.approx(exp_bce + 0.5 * exp_r1 + 0.25 * exp_r2, rel=1e-9)


def test_hinge_sign_penalises_only_violations():
    """Eq. 13 as the text states it: penalty when max_neg + eps > min_pos (Eq. 14's printed sign
    would penalise the satisfied constraint instead)."""
    targets = torch.tensor([[1, 0]])
    ok = output_from_probs([[[0.9, 0.1]]])  # well separated: no penalty
    bad = output_from_probs([[[0.3, 0.8]]])  # negative above positive
    _, p_ok = c2f_loss(ok, targets, eps=0.1)
    _, p_bad = c2f_loss(bad, targets, eps=0.1)
    assert p_ok["r1"].item() == 0.0
    assert p_bad["r1"].item() == pytest.approx(0.8 - 0.3 + 0.1, rel=1e-9)


def test_vertical_margin_violations():
    Q = [[[0.2, 0.5, 0.1], [0.7, 0.1, 0.1], [0.3, 0.6, 0.1]]]  # 3 steps, 3 classes
    out = output_from_probs(Q)
    targets = torch.tensor([[1, 1, 0]])
    seq = torch.tensor([[0, 1, PAD]])
    _, parts = c2f_loss(out, targets, seq, eps_v=0.1)
    # class 0, step 0: others max(0.7, 0.3) = 0.7 -> 0.7 - 0.2 + 0.1 = 0.6
    # class 1, step 1: others max(0.5, 0.6) = 0.6 -> 0.6 - 0.1 + 0.1 = 0.6
    assert parts["r2"].item() == pytest.approx(1.2, rel=1e-9)


def test_margins_average_over_images_and_skip_degenerate_ones():
    Q = [
        [[0.3, 0.8], [0.3, 0.8]],  # image 0: violation, r1 = 0.6
        [[0.5, 0.5], [0.5, 0.5]],  # image 1: no positive -> 0
        [[0.5, 0.5], [0.5, 0.5]],  # image 2: all ignored/positive, no negative -> 0
    ]
    out = output_from_probs(Q)
    targets = torch.tensor([[1, 0], [0, 0], [1, -1]])
    seq = torch.tensor([[0, PAD], [PAD, PAD], [0, PAD]])
    _, parts = c2f_loss(out, targets, seq, eps=0.1, eps_v=0.1)
    assert parts["r1"].item() == pytest.approx(0.6 / 3, rel=1e-9)
    # r2: image 0 class 0: 0.3 - 0.3 + 0.1; image 2 class 0: 0.5 - 0.5 + 0.1
    assert parts["r2"].item() == pytest.approx(0.2 / 3, rel=1e-9)


def test_labels_beyond_the_steps_have_no_responsible_step():
    out = output_from_probs([[[0.1, 0.9, 0.9]]])  # T = 1
    targets = torch.tensor([[1, 1, 0]])
    _, parts = c2f_loss(out, targets, torch.tensor([[0]]))
    assert parts["r2"].item() == 0.0


def test_bce_is_stable_for_saturated_logits():
    step_logits = torch.tensor([[[80.0, -80.0]]], requires_grad=True)
    out = C2FOutput(step_logits.amax(1), step_logits, None, None)
    loss, parts = c2f_loss(out, torch.tensor([[0, 1]]))
    assert math.isfinite(loss.item()) and parts["bce"].item() == pytest.approx(160.0)
    loss.backward()
    assert torch.isfinite(step_logits.grad).all()


def test_loss_input_checks():
    out = output_from_probs([[[0.3, 0.8]]])
    with pytest.raises(ValueError, match="targets"):
        c2f_loss(out, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="num_classes"):
        c2f_loss(out, torch.tensor([[1, 0, 0]]))
    with pytest.raises(ValueError, match="label_seq"):
        c2f_loss(out, torch.tensor([[1, 0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="lambda1"):
        c2f_loss(out, torch.tensor([[1, 0]]), lambda1=-1)


# ------------------------------------------------------------------ labels
def test_class_frequency_order():
    targets = torch.tensor([[1, 0, 1, -1], [0, 0, 1, 1], [1, 0, 1, 0]])
    # counts: c0=2, c1=0, c2=3, c3=1 (the -1 does not count)
    assert class_frequency_order(targets).tolist() == [2, 0, 3, 1]
    # ties keep the lower class index first
    assert class_frequency_order(torch.tensor([[1, 1, 0]])).tolist() == [0, 1, 2]


def test_label_sequences_edge_cases():
    targets = torch.tensor(
        [
            [0, 0, 0, 0],  # no labels
            [1, 1, 1, 1],  # more labels than T
            [0, -1, 1, 0],  # an ignored entry is not a label
        ]
    )
    order = torch.tensor([2, 0, 3, 1])
    seq = label_sequences(targets, order, steps=3)
    assert seq.dtype == torch.long
    assert seq.tolist() == [[PAD, PAD, PAD], [2, 0, 3], [2, PAD, PAD]]
    # more steps than classes: padded
    assert label_sequences(targets[1:2], order, steps=6).tolist() == [[2, 0, 3, 1, PAD, PAD]]
    assert label_sequences(torch.zeros(0, 4, dtype=torch.long), order, 2).shape == (0, 2)


def test_label_sequences_checks():
    t = torch.tensor([[1, 0]])
    with pytest.raises(ValueError, match="steps"):
        label_sequences(t, [0, 1], 0)
    with pytest.raises(ValueError, match="class_order"):
        label_sequences(t, [0, 0], 2)
    with pytest.raises(ValueError, match="targets"):
        label_sequences(torch.tensor([[2, 0]]), [0, 1], 2)
