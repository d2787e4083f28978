"""The joint max-margin objective (Eq. 13–17; docs/model.md, "Loss").

L = BCE + lambda1·R1 + lambda2·R2:
- BCE on p-hat against the multi-hot target, from logits (max over steps of the step logits),
  summed over classes and averaged over images; ignored (-1) entries contribute nothing.
- R1 (horizontal), per image: hinge(max_-(p-hat) − min_+(p-hat) + eps).
- R2 (vertical), per image and positive class j with a responsible step t_j (the step whose
  teacher-forced target is j): hinge(max_{t != t_j} Q_tj − Q_{t_j j} + eps_v), summed over classes.
R1 and R2 act on probabilities and are averaged over the images of the batch; an image (or class)
with no positive or no negative entry contributes 0.

Two opt-in terms for aligned local attention (docs/model.md, "Aligned local attention"), both 0
by default: lambda3·G, G the softmax cross-entropy of the glimpse logits of step t against step
t's teacher-forced target (the mean over the steps that have one); lambda4·V, V the coverage
penalty Σ_i max(Σ_t β_ti − 1, 0)² per image (averaged over images).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .model import C2FOutput, checking_values


def _check_targets(targets: torch.Tensor, logits: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError("targets: expected a [B, C] tensor in {1, 0, -1}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} does not match the model output {tuple(logits.shape)} "
            f"(batch or num_classes mismatch)"
        )
    if checking_values():  # a host sync: off in the training step (see model.value_checks)
        if not bool(((targets == 1) | (targets == 0) | (targets == -1)).all()):
            raise ValueError("targets: values must be 1 (positive), 0 (negative) or -1 (ignore)")


def horizontal_margin(scores: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """R1 per image [B]: hinge(max over negatives − min over positives + eps)."""
    pos, neg = targets == 1, targets == 0
    min_pos = scores.masked_fill(~pos, float("inf")).amin(dim=1)
    max_neg = scores.masked_fill(~neg, float("-inf")).amax(dim=1)
    valid = pos.any(dim=1) & neg.any(dim=1)
    r1 = torch.clamp(max_neg - min_pos + eps, min=0)
    return torch.where(valid, r1, torch.zeros_like(r1))


def vertical_margin(
    step_scores: torch.Tensor, targets: torch.Tensor, label_seq: torch.Tensor, eps_v: float
) -> torch.Tensor:
    """R2 per image [B].

    Step t is responsible for class ``label_seq[b, t]`` (if that class is positive for the image).
    For each such pair: hinge(max over the other steps of Q[·, j] − Q[t, j] + eps_v).
    """
    B, T, C = step_scores.shape
    if T < 2:  # no other step to compare with
        return step_scores.new_zeros(B)
    seq = label_seq[:, :T].long()
    cls = seq.clamp(min=0)
    # G[b, s, t] = Q[b, s, label_seq[b, t]]: column of the class targeted at step t, every step s
    G = step_scores.gather(2, cls.unsqueeze(1).expand(B, T, T))
    own = torch.diagonal(G, dim1=1, dim2=2)  # [B, T]: Q[b, t, label_seq[b, t]]
    eye = torch.eye(T, dtype=torch.bool, device=G.device)
    others = G.masked_fill(eye, float("-inf")).amax(dim=1)  # [B, T]
    responsible = (seq >= 0) & (targets.gather(1, cls) == 1)
    hinge = torch.clamp(others - own + eps_v, min=0)
    return torch.where(responsible, hinge, torch.zeros_like(hinge)).sum(dim=1)


def glimpse_loss(glimpse_logits: torch.Tensor, label_seq: torch.Tensor) -> torch.Tensor:
    """G: softmax cross-entropy of step t's glimpse logits [B, T, C] against ``label_seq[:, t]``,
    averaged over the (image, step) pairs with a target (PAD steps contribute nothing; 0 when
    there is none)."""
    B, T, C = glimpse_logits.shape
    seq = label_seq[:, :T].long()
    valid = seq >= 0
    per_step = F.cross_entropy(glimpse_logits.reshape(B * T, C), seq.clamp(min=0).reshape(-1), reduction="none")
    per_step = per_step.reshape(B, T) * valid.to(per_step.dtype)
    return per_step.sum() / valid.sum().clamp(min=1).to(per_step.dtype)


def coverage_penalty(local_attn: torch.Tensor) -> torch.Tensor:
    """V per image [B] from the local attention [B, T, L]: Σ_i max(Σ_t β_ti − 1, 0)².

    Show-Attend-Tell's doubly stochastic term is Σ_i (1 − Σ_t β_ti)²; with fewer steps than cells
    (T = 5, L = 256 on the demo) its under-coverage half is smallest for uniform maps, so only the
    over-coverage half is kept: it charges the steps for looking at the same cells."""
    total = local_attn.sum(dim=1)
    return torch.clamp(total - 1, min=0).pow(2).sum(dim=1)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE from logits, summed over the non-ignored classes, averaged over images."""
    mask = (targets >= 0).to(logits.dtype)
    per_entry = F.binary_cross_entropy_with_logits(
        logits, targets.clamp(min=0).to(logits.dtype), reduction="none"
    )
    return (per_entry * mask).sum(dim=1).mean()


def c2f_loss(
    output: C2FOutput,
    targets: torch.Tensor,
    label_seq: Optional[torch.Tensor] = None,
    lambda1: float = 0.05,
    lambda2: float = 0.05,
    eps: float = 0.1,
    eps_v: float = 0.1,
    lambda3: float = 0.0,
    lambda4: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The joint objective. Returns ``(loss, {"bce", "r1", "r2"})`` (parts detached), plus
    ``"glimpse"`` when ``lambda3 > 0`` and ``"coverage"`` when ``lambda4 > 0``.

    ``label_seq`` ([B, T] class indices, PAD = -1) is the teacher-forced sequence the decoder
    was run with; without it R2 is 0. Set ``lambda1 = lambda2 = 0`` for the plain BCE of the
    variants without "MM". ``lambda3`` weights the glimpse loss (needs ``output.glimpse_logits``
    and ``label_seq``), ``lambda4`` the coverage penalty (needs ``output.local_attn``).
    """
    logits = output.logits
    _check_targets(targets, logits)
    for name, value in (("lambda1", lambda1), ("lambda2", lambda2), ("eps", eps), ("eps_v", eps_v),
                        ("lambda3", lambda3), ("lambda4", lambda4)):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative number, got {value}")
    # at least fp32: bf16/fp16 logits are upcast, fp64 stays fp64
    dtype = torch.promote_types(logits.dtype, torch.float32)
    bce = masked_bce(logits.to(dtype), targets)
    r1 = horizontal_margin(torch.sigmoid(logits.to(dtype)), targets, eps).mean()
    if label_seq is not None:
        B, T = output.step_logits.shape[:2]
        if label_seq.dim() != 2 or label_seq.shape[0] != B or label_seq.shape[1] < T:
            raise ValueError(f"label_seq: expected [B={B}, T>={T}], got {tuple(label_seq.shape)}")
        r2 = vertical_margin(torch.sigmoid(output.step_logits.to(dtype)), targets, label_seq, eps_v).mean()
    else:
        r2 = bce.new_zeros(())
    loss = bce + lambda1 * r1 + lambda2 * r2
    parts = {"bce": bce.detach(), "r1": r1.detach(), "r2": r2.detach()}
    if lambda3 > 0:
        if output.glimpse_logits is None:
            raise ValueError("lambda3: the glimpse loss needs glimpse logits (ModelConfig.glimpse_head=True)")
        if label_seq is None:
            raise ValueError("lambda3: the glimpse loss needs the teacher-forced label_seq")
        g = glimpse_loss(output.glimpse_logits.to(dtype), label_seq)
        loss = loss + lambda3 * g
        parts["glimpse"] = g.detach()
    if lambda4 > 0:
        if output.local_attn is None:
            raise ValueError("lambda4: the coverage penalty needs local attention (variant lstm_l or lstm_lg)")
        v = coverage_penalty(output.local_attn.to(dtype)).mean()
        loss = loss + lambda4 * v
        parts["coverage"] = v.detach()
    return loss, parts


__all__ = ["c2f_loss", "coverage_penalty", "glimpse_loss", "horizontal_margin", "vertical_margin", "masked_bce"]
