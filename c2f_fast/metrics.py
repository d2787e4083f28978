"""Multi-label evaluation metrics, in plain vectorised PyTorch.

Everything runs on the device of ``scores`` (CPU or CUDA) without a Python loop over images or
classes: per-class curves come from one sort of the ``[C, N]`` score matrix, per-image rankings
from one sort of the ``[N, C]`` matrix; tied scores are grouped (the way scikit-learn does) by
carrying cumulative counts from the first element of each tie group with a running max. Counts are
exact integers and ratios float64, so results agree with scikit-learn to ~1e-12.

Inputs
------
``scores``: float ``[N, C]`` in ``[0, 1]`` (probabilities, not logits: the 0.5 threshold of the
ML-GCN metrics is meant for probabilities, so values outside ``[0, 1]`` are rejected).
``targets``: ``[N, C]`` with values in ``{1, 0, -1}``: 1 positive, 0 negative, -1 ignored (e.g. a VOC
class present only through ``difficult`` objects).

Where each convention comes from
--------------------------------
Two families of "top-3" numbers are reported, and they are *not* the same thing:

* ``CP, CR, CF1, OP, OR, OF1`` and ``CP@3, CR@3, CF1@3, OP@3, OR@3, OF1@3`` follow the evaluation
  code of ML-GCN (Chen et al., CVPR 2019; ``AveragePrecisionMeter.overall`` / ``overall_topk`` /
  ``evaluation`` in its ``util.py``), which later work (Q2L, CSRA, ...) reuses, so these numbers
  are comparable with the published COCO / VOC tables. There a class is predicted when its score
  is >= ``threshold`` (ML-GCN: logit >= 0, i.e. probability >= 0.5); at top-3 a class is predicted
  only when it is among the image's 3 highest scores **and** its score is >= ``threshold``. So an
  image may have fewer than 3 (even 0) predicted classes at top-3.
* ``P@k, R@k, F1@k, H@k, A@k`` (k = 3, 5) follow Table II of the Coarse-to-Fine paper (Lyu et
  al.): the predicted set of an image is its k highest-scoring classes, with no threshold, so
  every image with >= k non-ignored classes has exactly k predictions. ``P@3`` therefore
  generally differs from ``OP@3`` (equal only when every top-3 score is >= ``threshold``).
* AP follows ``sklearn.metrics.average_precision_score`` (or the VOC2007 devkit's 11-point AP);
  one-error, coverage and ranking loss follow Zhang & Zhou's definitions as implemented by
  scikit-learn.

How an ignored (-1) entry is treated
------------------------------------
One rule for every metric family: an ignored entry ``(n, c)`` is **deleted** -- it is as if class
``c`` did not exist for image ``n``. It is neither positive, nor negative, nor predicted, and its
score has no influence on any metric (moving it anywhere in ``[0, 1]`` changes nothing):

* AP: the entry is left out of class ``c``'s ranking (as if image ``n`` were absent for ``c``).
* Threshold metrics (CP ... OF1): not counted in Nc, Np or Ng, even if its score is >= threshold.
* Top-k metrics (both families): the top k of image ``n`` are its k highest-scoring
  *non-ignored* classes (an ignored class cannot take a top-k slot, so at top-3 the ML-GCN rule
  thresholds the 3 best non-ignored classes); H@k divides by the number of non-ignored entries
  instead of N·C; A@k uses only the non-ignored classes of each image. (ML-GCN itself turns -1
  into 0 and lets it compete for the top 3; the two agree whenever there is no -1.)
* Ranking metrics: the image's ranking is over its non-ignored classes only; coverage counts only
  non-ignored classes, ranking loss only (positive, negative) pairs of non-ignored classes.

Tie conventions
---------------
* AP: tied scores form one threshold (precision/recall steps only at distinct score values),
  exactly as ``sklearn.metrics.average_precision_score``.
* Coverage: rank of the lowest-scored positive = number of classes with score >= that score
  (= ``sklearn.metrics.coverage_error`` - 1, Zhang & Zhou's definition).
* Ranking loss: a (positive, negative) pair counts as mis-ordered when
  ``score_neg >= score_pos`` (ties count as errors), normalised by ``n_pos * n_neg``; an image with
  no negative scores 0. This is ``sklearn.metrics.label_ranking_loss``.
* Top-k (both families) and one-error: among tied scores the class with the lower index is ranked
  first (stable sort), so the predicted sets are deterministic and the same on CPU and CUDA.
  (ML-GCN's ``torch.topk`` leaves the order of ties unspecified; without ties they agree.)
* Threshold: ``score >= threshold`` is predicted (a score equal to the threshold counts), for
  ``CP ... OF1`` and for the ``@3`` six alike; the comparison is made in the scores' dtype (with
  float32 scores, ``threshold=0.7`` means ``float32(0.7)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["METRIC_KEYS", "multilabel_metrics", "per_class_ap"]

#: Keys of :func:`multilabel_metrics`'s result, in order.
METRIC_KEYS: tuple[str, ...] = (
    "mAP",
    "CP", "CR", "CF1", "OP", "OR", "OF1",
    "CP@3", "CR@3", "CF1@3", "OP@3", "OR@3", "OF1@3",
    "P@3", "R@3", "F1@3", "H@3", "A@3",
    "P@5", "R@5", "F1@5", "H@5", "A@5",
    "one_error", "coverage", "ranking_loss", "n_ranking_excluded",
)  # fmt: skip

_F64 = torch.float64


def _count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of True entries (over ``dim``) as float64; count_nonzero avoids the int64 copy that
    ``bool.sum()`` makes, several times faster on CPU."""
    return torch.count_nonzero(mask, dim=dim).to(_F64)


def _validate(scores: Any, targets: Any) -> tuple[Tensor, Tensor]:
    """Check shapes/values and return ``(scores, targets)`` as tensors on the scores' device.

    ``targets`` comes back as int8 with values in {1, 0, -1}; half-precision scores are widened to
    float32 (exactly, so ties are unchanged) so that :func:`_sort_key` sees float32 or float64 only.
    """
    scores = torch.as_tensor(scores)
    targets = torch.as_tensor(targets, device=scores.device)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D [N, C] tensor, got shape {tuple(scores.shape)}")
    if targets.ndim != 2:
        raise ValueError(f"targets must be a 2-D [N, C] tensor, got shape {tuple(targets.shape)}")
    if scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must have the same shape, got scores {tuple(scores.shape)} "
            f"and targets {tuple(targets.shape)}"
        )
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must hold at least one image and one class, got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    # NaN fails both comparisons, so this also rejects NaN.
    if not bool(((scores >= 0) & (scores <= 1)).all()):
        raise ValueError("scores must lie in [0, 1] (probabilities, not logits) and contain no NaN")
    if targets.dtype == torch.bool:
        targets = targets.to(torch.int8)
    if targets.is_complex() or not bool(((targets == 1) | (targets == 0) | (targets == -1)).all()):
        raise ValueError("targets must only contain 1 (positive), 0 (negative) or -1 (ignore)")
    return scores, targets.to(torch.int8)


def _sort_key(scores: Tensor) -> Tensor:
    """An integer view of ``scores`` that sorts and ties exactly like the scores themselves.

    For non-negative IEEE floats the bit pattern read as a signed integer is monotone in the value,
    and integer sorts are ~25% faster on CPU. Adding +0.0 first folds -0.0 (which passes the
    ``>= 0`` check) into +0.0 so that the two zeros stay tied.
    """
    scores = scores + 0.0
    return scores.view(torch.int32 if scores.dtype == torch.float32 else torch.int64)


def _count_dtype(n: int) -> torch.dtype:
    """Narrowest integer type for running counts up to ``n`` (int32 cumsum/cummax are faster)."""
    return torch.int32 if n < 2**31 else torch.int64


def _group_start_values(sorted_keys: Tensor, running: Tensor) -> Tensor:
    """For each position of ``sorted_keys`` (sorted along dim 1), ``running`` at the first position
    of its tie group.

    ``running`` must be non-decreasing along dim 1 (an exclusive cumulative count), so a running
    maximum over the values kept at group starts propagates each group's start value to the whole
    group: an O(n) alternative to ``searchsorted`` + ``gather``.
    """
    is_start = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_start[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    return torch.where(is_start, running, torch.zeros_like(running)).cummax(dim=1).values


def _per_class_ap(scores: Tensor, targets: Tensor, voc07_11point: bool) -> Tensor:
    """AP of every class (float64 ``[C]``, NaN where the class has no positive); inputs validated.

    Works on the ascending sort of each class's scores: for the element at sorted position i with
    score v, the operating point "predict every image with score >= v" has
    ``tp = npos - #pos with score < v`` and ``tp + fp = nvalid - #non-ignored with score < v``, the
    "< v" counts being exclusive cumulative counts at the first element of v's tie group. All
    elements of a tie group thereby share the group's (tp, fp): sklearn's distinct-threshold curve.
    Ignored entries are neither positive nor negative, so they never move tp or fp.
    """
    n_img, n_cls = scores.shape
    count_dtype = _count_dtype(n_img)
    keys, order = torch.sort(_sort_key(scores).t().contiguous(), dim=1)
    sorted_t = targets.t().contiguous().gather(1, order)
    pos = sorted_t == 1
    valid = sorted_t != -1
    cum_pos = pos.cumsum(1, dtype=count_dtype)
    cum_valid = valid.cumsum(1, dtype=count_dtype)
    n_pos = cum_pos[:, -1].long()
    n_valid = cum_valid[:, -1].long()
    pos_before = _group_start_values(keys, cum_pos - pos.to(count_dtype))
    valid_before = _group_start_values(keys, cum_valid - valid.to(count_dtype))

    if not voc07_11point:
        # AP = sum over thresholds of (R_t - R_{t-1}) * P_t = mean over positives of the precision
        # at the positive's own (tie-group) threshold; evaluated at the positives only.
        cls, idx = pos.nonzero(as_tuple=True)
        tp = (n_pos[cls] - pos_before[cls, idx]).to(_F64)
        predicted = (n_valid[cls] - valid_before[cls, idx]).to(_F64)  # >= tp >= 1
        # Scatter into a dense zero matrix (unique indices) and sum rows: unlike index_add_, this
        # is deterministic on CUDA too.
        per_pos = torch.zeros(keys.shape, dtype=_F64, device=scores.device)
        per_pos[cls, idx] = tp / predicted
        ap = per_pos.sum(1) / n_pos.to(_F64)
    else:
        # VOC2007: mean over t in {0, 0.1, ..., 1} of max{P : R >= t} (0 if no such point). Recall
        # (tp) does not increase along the ascending sort, so {R >= t} is a prefix and the max a
        # prefix maximum. R >= t/10 is tested exactly in integers as 10*tp >= t*npos, avoiding the
        # float 0.1*3 > 0.3 trap of np.arange-based ports. tp + fp = 0 only where nothing scored
        # lies at or above v (ignored entries at the top): recall 0 there, and precision 0 cannot
        # raise a maximum.
        tp = n_pos[:, None] - pos_before.long()
        predicted = n_valid[:, None] - valid_before.long()
        precision = tp.to(_F64) / predicted.clamp_min(1).to(_F64)
        prefix_max = precision.cummax(dim=1).values
        ap = torch.zeros(n_cls, dtype=_F64, device=scores.device)
        for t in range(11):  # 11 fixed recall levels, not a loop over data
            n_ok = torch.count_nonzero(10 * tp >= t * n_pos[:, None], dim=1)
            best = prefix_max.gather(1, (n_ok - 1).clamp_min(0)[:, None]).squeeze(1)
            ap = ap + torch.where(n_ok > 0, best, torch.zeros_like(best))
        ap = ap / 11
    return torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))


@torch.no_grad()  # metrics never need a graph, even for scores that require grad
def per_class_ap(scores: Tensor, targets: Tensor, voc07_11point: bool = False) -> Tensor:
    """Average precision of each class, float64 ``[C]`` on the scores' device.

    Non-interpolated AP equal to ``sklearn.metrics.average_precision_score`` on the class's
    non-ignored images, tied scores included (grouped into one threshold). With
    ``voc07_11point=True`` the VOC2007 11-point interpolated AP (mean over recall levels
    0, 0.1, ..., 1 of the maximum precision at recall >= the level) computed on the same
    tie-grouped curve. Entries with target -1 are left out of their class; a class without any
    positive gets NaN.
    """
    scores, targets = _validate(scores, targets)
    return _per_class_ap(scores, targets, voc07_11point)


def _nan_like(x: Tensor) -> Tensor:
    return torch.full_like(x, float("nan"))


def _safe_div(num: Tensor, den: Tensor, empty: float) -> Tensor:
    """num / den with ``empty`` where den == 0 (scalar tensors)."""
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, empty))


def _f1(p: Tensor, r: Tensor) -> Tensor:
    """Harmonic mean; 0 when p + r == 0; NaN propagates."""
    s = p + r
    return torch.where(s > 0, 2 * p * r / torch.where(s > 0, s, torch.ones_like(s)), s * 0)


def _count_metrics(pred: Tensor, pos: Tensor) -> dict[str, Tensor]:
    """CP, CR, CF1, OP, OR, OF1 for a boolean prediction matrix (``pred`` excludes ignored entries).

    Per class: Nc = correct predictions, Np = predictions, Ng = positives. Following ML-GCN, a class
    with Np = 0 contributes precision Nc/max(Np, 1) = 0 to CP. Classes with Ng = 0 are left out of
    both class means (their recall is undefined; mAP leaves them out too), which coincides with
    ML-GCN whenever every class has a positive. Pooled: OP = ΣNc/ΣNp (0 if nothing is predicted),
    OR = ΣNc/ΣNg (NaN if there is no positive). F1s are 2PR/(P+R), 0 when P = R = 0.
    """
    nc = _count(pred & pos, 0)
    np_ = _count(pred, 0)
    ng = _count(pos, 0)
    has_pos = ng > 0
    n_cls = _count(has_pos)
    cls_p = torch.where(has_pos, nc / np_.clamp_min(1), torch.zeros_like(nc))
    cls_r = torch.where(has_pos, nc / ng.clamp_min(1), torch.zeros_like(nc))
    cp = torch.where(n_cls > 0, cls_p.sum() / n_cls.clamp_min(1), _nan_like(n_cls))
    cr = torch.where(n_cls > 0, cls_r.sum() / n_cls.clamp_min(1), _nan_like(n_cls))
    op = _safe_div(nc.sum(), np_.sum(), 0.0)
    or_ = _safe_div(nc.sum(), ng.sum(), float("nan"))
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": or_, "OF1": _f1(op, or_)}


@torch.no_grad()
def multilabel_metrics(
    scores: Tensor,
    targets: Tensor,
    *,
    threshold: float = 0.5,
    voc07_11point: bool = False,
) -> dict[str, float]:
    """All metrics of ``scores`` [N, C] in [0, 1] against ``targets`` [N, C] in {1, 0, -1}.

    Returns a dict with keys :data:`METRIC_KEYS` (Python floats; ``n_ranking_excluded`` an int).
    Ignored (-1) entries are deleted for every metric (see the module docstring), ties follow
    scikit-learn (AP, coverage, ranking loss) or lower-class-index-first (top-k, one-error).

    * ``mAP``: mean of :func:`per_class_ap` over classes with >= 1 positive (VOC2007 11-point AP
      when ``voc07_11point``); NaN if no class has a positive.
    * ``CP, CR, CF1, OP, OR, OF1`` -- ML-GCN's evaluation code: class predicted iff
      ``score >= threshold`` (ML-GCN's ``logit >= 0``). CP = mean_c Nc/max(Np, 1), CR = mean_c
      Nc/Ng, both over the classes with Ng >= 1; CF1 = 2·CP·CR/(CP+CR); OP = ΣNc/ΣNp,
      OR = ΣNc/ΣNg, OF1 likewise pooled. (ML-GCN itself counts -1 as negative; here it is ignored.)
    * ``CP@3 ... OF1@3`` -- ML-GCN's evaluation code (``overall_topk(3)``): the same six, where a
      class is predicted for an image iff it is among the image's 3 highest-scoring non-ignored
      classes **and** ``score >= threshold`` (the same ``threshold`` argument as ``CP ... OF1``,
      default 0.5 = ML-GCN's logit >= 0). A class never predicted contributes precision 0 to CP@3.
    * ``P@k, R@k, F1@k, H@k, A@k`` (k = 3, 5) -- the Coarse-to-Fine paper's Table II: the predicted
      set is the image's k highest-scoring non-ignored classes, no threshold (``threshold`` has no
      effect on them). P@k, R@k, F1@k are pooled over all entries like OP/OR/OF1 (so ``P@3``
      equals ``OP@3`` only when no top-3 score is below ``threshold``). ``H@k``: Hamming loss,
      wrong entries / non-ignored entries. ``A@k``: mean over images (with >= 1 non-ignored class)
      of |Y ∩ Ŷ| / |Y ∪ Ŷ|. If an image has fewer than k non-ignored classes, all are predicted.
    * ``one_error``: share of images whose top-ranked class is not positive; ``coverage``:
      sklearn ``coverage_error`` - 1; ``ranking_loss``: sklearn ``label_ranking_loss``. Images
      without a positive are left out of these three (NaN if none is left);
      ``n_ranking_excluded`` is how many were left out.

    Raises:
        ValueError: wrong rank or shape of ``scores``/``targets``, non-float or out-of-range
            ``scores``, ``targets`` values outside {1, 0, -1}, ``threshold`` outside [0, 1].
    """
    scores, targets = _validate(scores, targets)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    n_img, n_cls = scores.shape
    valid = targets != -1
    pos = targets == 1
    neg = targets == 0
    out: dict[str, Tensor] = {}

    ap = _per_class_ap(scores, targets, voc07_11point)
    has_pos_cls = ~torch.isnan(ap)
    out["mAP"] = torch.where(
        has_pos_cls.any(),
        torch.where(has_pos_cls, ap, torch.zeros_like(ap)).sum() / _count(has_pos_cls).clamp_min(1),
        torch.tensor(float("nan"), dtype=_F64, device=ap.device),
    )

    above = valid & (scores >= threshold)
    out.update(_count_metrics(above, pos))

    # Ranking by descending score over non-ignored classes; the stable sort puts the lower class
    # index first among ties, and key -1 (below every valid score's key) sends ignored classes last.
    sorted_desc, rank_order = torch.sort(
        _sort_key(scores).masked_fill(~valid, -1), dim=1, descending=True, stable=True
    )
    n_valid = _count(valid)
    has_valid_img = valid.any(1)
    for k in (3, 5):
        pred = torch.zeros_like(valid).scatter_(1, rank_order[:, : min(k, n_cls)], True) & valid
        if k == 3:  # ML-GCN's overall_topk: a top-3 class counts only if also >= threshold
            out.update({f"{name}@3": v for name, v in _count_metrics(pred & above, pos).items()})
        nc = _count(pred & pos)
        p_k = _safe_div(nc, _count(pred), 0.0)
        r_k = _safe_div(nc, _count(pos), float("nan"))
        wrong = _count((pred & neg) | (~pred & pos))
        inter = _count(pred & pos, 1)
        union = _count(pred | pos, 1)  # >= 1 wherever the image has a non-ignored class
        jac = torch.where(has_valid_img, inter / union.clamp_min(1), torch.zeros_like(inter))
        out[f"P@{k}"] = p_k
        out[f"R@{k}"] = r_k
        out[f"F1@{k}"] = _f1(p_k, r_k)
        out[f"H@{k}"] = _safe_div(wrong, n_valid, float("nan"))
        out[f"A@{k}"] = _safe_div(jac.sum(), _count(has_valid_img), float("nan"))

    # Ranking metrics over images with at least one positive.
    n_pos = _count(pos, 1)
    n_neg = _count(neg, 1)
    kept = n_pos > 0
    n_kept = _count(kept)
    top_is_pos = pos.gather(1, rank_order[:, :1]).squeeze(1)
    one_err = _count(kept & ~top_is_pos)
    # coverage: non-ignored classes scored >= the lowest positive score, minus one.
    min_pos = scores.masked_fill(~pos, float("inf")).min(1, keepdim=True).values
    cov = _count((scores >= min_pos) & valid, 1) - 1
    # ranking loss: mis-ordered pairs = sum over negatives of #positives with score <= the
    # negative's = n_pos - #positives strictly above its tie group, i.e. the exclusive cumulative
    # positive count (descending order) at the group's first element.
    count_dtype = _count_dtype(n_cls)
    pos_desc = pos.gather(1, rank_order).to(count_dtype)
    pos_above = _group_start_values(sorted_desc, pos_desc.cumsum(1, dtype=count_dtype) - pos_desc)
    neg_desc = neg.gather(1, rank_order)
    bad_pairs = n_pos * n_neg - (pos_above * neg_desc).sum(1).to(_F64)
    rl = torch.where(
        kept & (n_neg > 0), bad_pairs / (n_pos * n_neg).clamp_min(1), torch.zeros_like(bad_pairs)
    )
    zeros = torch.zeros_like(cov)
    out["one_error"] = _safe_div(one_err, n_kept, float("nan"))
    out["coverage"] = _safe_div(torch.where(kept, cov, zeros).sum(), n_kept, float("nan"))
    out["ranking_loss"] = _safe_div(rl.sum(), n_kept, float("nan"))

    out["n_ranking_excluded"] = n_img - n_kept
    values = torch.stack([out[key].to(_F64).reshape(()) for key in METRIC_KEYS]).tolist()  # 1 sync
    result: dict[str, float] = dict(zip(METRIC_KEYS, values))
    result["n_ranking_excluded"] = int(result["n_ranking_excluded"])
    return result
