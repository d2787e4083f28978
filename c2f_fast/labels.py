"""Label sequences for the decoder (CNN-RNN order: descending training-set frequency)."""

from __future__ import annotations

import torch

from .model import PAD


def _as_targets(targets, name: str = "targets") -> torch.Tensor:
    t = torch.as_tensor(targets)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a [N, C] matrix in {{1, 0, -1}}, got shape {tuple(t.shape)}")
    if t.numel() and not bool(((t == 1) | (t == 0) | (t == -1)).all()):
        raise ValueError(f"{name}: values must be 1 (positive), 0 (negative) or -1 (ignore)")
    return t


def class_frequency_order(targets) -> torch.Tensor:
    """Class indices sorted by descending count of positives (ties: lower index first)."""
    t = _as_targets(targets)
    counts = (t == 1).sum(dim=0)
    # stable sort on -count keeps the class index order among ties
    return torch.sort(-counts, stable=True).indices


def label_sequences(targets, class_order, steps: int, check: bool = True) -> torch.Tensor:
    """Each image's positive classes (``targets == 1``) in ``class_order``, cut or padded to
    ``steps`` entries with PAD (-1). Returns a LongTensor [N, steps].

    ``check`` validates the values of ``targets`` (1 / 0 / -1) and that ``class_order`` is a
    permutation: two reads of device data on the host. The training step passes ``check=False``
    (its targets were checked when the data set was read, its class order when the step was
    built), so that building the sequences on the GPU never waits for it.
    """
    t = _as_targets(targets) if check else targets
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    N, C = t.shape
    order = torch.as_tensor(class_order, dtype=torch.long, device=t.device)
    if order.shape != (C,):
        raise ValueError(f"class_order: expected a permutation of the {C} class indices, got shape {tuple(order.shape)}")
    if check and not torch.equal(torch.sort(order).values, torch.arange(C, device=t.device)):
        raise ValueError(f"class_order: expected a permutation of the {C} class indices")
    rank = torch.argsort(order)  # the inverse permutation: rank[order[i]] = i
    # positives sort by their rank, everything else after them
    key = torch.where(t == 1, rank.unsqueeze(0), torch.full_like(rank, C).unsqueeze(0))
    sorted_key, classes = torch.sort(key, dim=1, stable=True)
    seq = torch.where(sorted_key < C, classes, torch.full_like(classes, PAD))
    if steps > C:
        seq = torch.cat([seq, seq.new_full((N, steps - C), PAD)], dim=1)
    return seq[:, :steps].long()


__all__ = ["class_frequency_order", "label_sequences", "PAD"]
