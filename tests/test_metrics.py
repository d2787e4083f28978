"""Tests of c2f_fast.metrics against scikit-learn, a VOC-devkit loop, a loop transcription of
ML-GCN's evaluation code and hand-computed values.

The random data have tied scores (rounded to one decimal), ignored (-1) entries, a class without
any positive, an image without any positive, an image whose entries are all ignored and an image
with fewer than 3 non-ignored classes. The references apply the module's rule for -1 literally --
an ignored entry is deleted -- by calling scikit-learn on the non-ignored entries only (per class,
per image, or flattened), so the vectorised code is checked against an independent formulation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    coverage_error,
    f1_score,
    hamming_loss,
    jaccard_score,
    label_ranking_loss,
    precision_score,
    recall_score,
)

from c2f_fast.metrics import METRIC_KEYS, multilabel_metrics, per_class_ap

N_IMG, N_CLS = 80, 9
NO_POS_CLASS = N_CLS - 1


def _make_data(seed: int, *, ignore: bool, decimals: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 scores in [0, 1] (tied when ``decimals`` is set) and targets in {1, 0, -1}."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((N_IMG, N_CLS)) < 0.35).astype(np.int64)
    scores = np.clip(rng.random((N_IMG, N_CLS)) * 0.75 + 0.25 * targets, 0.0, 1.0)
    if decimals is not None:
        scores = scores.round(decimals)
    targets[0] = 0  # an image without any positive
    targets[1] = 1  # an image without any negative (once its NO_POS_CLASS entry is ignored)
    targets[:, NO_POS_CLASS] = 0  # a class without any positive
    if ignore:
        targets[rng.random((N_IMG, N_CLS)) < 0.12] = -1
        targets[0, :3] = -1
        targets[1, NO_POS_CLASS] = -1
        targets[2] = -1  # an image with every entry ignored
        targets[3] = -1  # an image with only 2 non-ignored classes (< k)
        targets[3, 1], targets[3, 4] = 1, 0
        targets[4:7, NO_POS_CLASS] = -1
    return scores.astype(np.float32), targets


def _topk_pred(scores: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Top-k among each image's non-ignored classes, lower class index first among ties."""
    pred = np.zeros(scores.shape, dtype=np.int64)
    for i in range(scores.shape[0]):
        cols = np.flatnonzero(targets[i] != -1)
        chosen = cols[np.argsort(-scores[i, cols], kind="stable")[:k]]
        pred[i, chosen] = 1
    return pred


def _reference(scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Every metric from scikit-learn, applied to the non-ignored entries only."""
    valid = targets != -1
    ref: dict[str, float] = {}
    aps = []
    for c in range(scores.shape[1]):
        m = valid[:, c]
        if (targets[m, c] == 1).any():
            aps.append(average_precision_score(targets[m, c], scores[m, c]))
    ref["mAP"] = float(np.mean(aps))

    # With the predictions already restricted to non-ignored entries, zeroing the ignored targets
    # leaves every per-class and pooled TP/FP/FN count unchanged, so 2-D sklearn calls apply.
    targets0 = np.where(valid, targets, 0)
    labels = np.flatnonzero((targets == 1).any(0))  # classes with a positive

    def counts(pred: np.ndarray, suffix: str) -> None:
        cp = precision_score(targets0, pred, average="macro", labels=labels, zero_division=0)
        cr = recall_score(targets0, pred, average="macro", labels=labels)
        ref["CP" + suffix], ref["CR" + suffix] = cp, cr
        ref["CF1" + suffix] = 2 * cp * cr / (cp + cr)
        ref["OP" + suffix] = precision_score(targets0, pred, average="micro", zero_division=0)
        ref["OR" + suffix] = recall_score(targets0, pred, average="micro")
        ref["OF1" + suffix] = f1_score(targets0, pred, average="micro")

    counts(((scores >= threshold) & valid).astype(np.int64), "")
    # ML-GCN's top-3 rule: among the image's top 3 AND score >= threshold.
    counts(_topk_pred(scores, targets, 3) * (scores >= threshold), "@3")
    rows = valid.any(1)  # an image whose entries are all ignored has no A@k
    for k in (3, 5):
        pred = _topk_pred(scores, targets, k)
        ref[f"P@{k}"] = precision_score(targets0, pred, average="micro", zero_division=0)
        ref[f"R@{k}"] = recall_score(targets0, pred, average="micro")
        ref[f"F1@{k}"] = f1_score(targets0, pred, average="micro")
        ref[f"H@{k}"] = hamming_loss(targets[valid], pred[valid])  # over non-ignored entries
        ref[f"A@{k}"] = jaccard_score(targets0[rows], pred[rows], average="samples", zero_division=0)

    one_err, cov, rl = [], [], []
    for i in range(scores.shape[0]):
        v = valid[i]
        y, s = targets[i, v], scores[i, v]
        if not (y == 1).any():
            continue
        one_err.append(float(y[np.argmax(s)] != 1))  # argmax: first of tied maxima
        if v.sum() == 1:  # sklearn rejects a 1-label problem; a lone positive is trivially right
            cov.append(0.0), rl.append(0.0)
            continue
        cov.append(coverage_error(y[None], s[None]) - 1)
        rl.append(label_ranking_loss(y[None], s[None]))
    ref["one_error"], ref["coverage"], ref["ranking_loss"] = map(np.mean, (one_err, cov, rl))
    ref["n_ranking_excluded"] = scores.shape[0] - len(one_err)
    return {key: float(v) for key, v in ref.items()}


def _assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12, nan_ok=True), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_metrics_match_sklearn_with_ties_and_ignored(seed: int) -> None:
    scores, targets = _make_data(seed, ignore=True)
    assert len(np.unique(scores)) <= 11  # the data really are full of ties
    got = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    _assert_close(got, _reference(scores, targets))
    # image 0 (no positive) and image 2 (all ignored) are left out of the ranking metrics
    assert got["n_ranking_excluded"] >= 2
    assert isinstance(got["n_ranking_excluded"], int)


def test_all_metrics_match_sklearn_2d_calls_without_ignored() -> None:
    """Without -1 the references are single 2-D scikit-learn calls (no per-class/per-image loop)."""
    scores, targets = _make_data(3, ignore=False)
    got = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets), threshold=0.6)
    has_pos = targets.sum(0) > 0
    kept = targets.sum(1) > 0
    assert got["mAP"] == pytest.approx(
        average_precision_score(targets[:, has_pos], scores[:, has_pos], average="macro"), rel=1e-10
    )
    pred = (scores >= 0.6).astype(np.int64)
    labels = np.flatnonzero(has_pos)
    assert got["CP"] == pytest.approx(
        precision_score(targets, pred, average="macro", labels=labels, zero_division=0), rel=1e-10
    )
    assert got["CR"] == pytest.approx(recall_score(targets, pred, average="macro", labels=labels), rel=1e-10)
    assert got["OP"] == pytest.approx(precision_score(targets, pred, average="micro"), rel=1e-10)
    assert got["OR"] == pytest.approx(recall_score(targets, pred, average="micro"), rel=1e-10)
    assert got["OF1"] == pytest.approx(f1_score(targets, pred, average="micro"), rel=1e-10)
    for k in (3, 5):
        pred = _topk_pred(scores, targets, k)
        assert got[f"P@{k}"] == pytest.approx(precision_score(targets, pred, average="micro"), rel=1e-10)
        assert got[f"R@{k}"] == pytest.approx(recall_score(targets, pred, average="micro"), rel=1e-10)
        assert got[f"F1@{k}"] == pytest.approx(f1_score(targets, pred, average="micro"), rel=1e-10)
        assert got[f"H@{k}"] == pytest.approx(hamming_loss(targets, pred), rel=1e-10)
        assert got[f"A@{k}"] == pytest.approx(
            jaccard_score(targets, pred, average="samples", zero_division=0), rel=1e-10
        )
    pred3 = _topk_pred(scores, targets, 3) * (scores >= 0.6)  # the @3 six use the threshold too
    assert got["CP@3"] == pytest.approx(
        precision_score(targets, pred3, average="macro", labels=labels, zero_division=0), rel=1e-10
    )
    assert got["CR@3"] == pytest.approx(
        recall_score(targets, pred3, average="macro", labels=labels), rel=1e-10
    )
    assert got["coverage"] == pytest.approx(coverage_error(targets[kept], scores[kept]) - 1, rel=1e-10)
    assert got["ranking_loss"] == pytest.approx(label_ranking_loss(targets[kept], scores[kept]), rel=1e-10)
    assert got["n_ranking_excluded"] == int((~kept).sum())


def test_per_class_ap_matches_sklearn_and_nan_for_class_without_positive() -> None:
    scores, targets = _make_data(4, ignore=True)
    ap = per_class_ap(torch.from_numpy(scores), torch.from_numpy(targets))
    assert ap.shape == (N_CLS,) and ap.dtype == torch.float64
    assert math.isnan(ap[NO_POS_CLASS].item())
    for c in range(N_CLS - 1):
        m = targets[:, c] != -1
        assert ap[c].item() == pytest.approx(average_precision_score(targets[m, c], scores[m, c]), rel=1e-12)
    got = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    assert got["mAP"] == pytest.approx(torch.nanmean(ap).item(), rel=1e-12)


def test_ap_ties_are_grouped_like_sklearn() -> None:
    # Each tie group holds a positive and a negative and forms a single threshold: points
    # (R=1/2, P=1/2), (R=1, P=2/4), AP = 0.5. Ranking row by row (positive first) would give 5/6.
    scores = torch.tensor([[0.5], [0.5], [0.3], [0.3]])
    targets = torch.tensor([[1], [0], [1], [0]])
    want = average_precision_score(targets.numpy().ravel(), scores.numpy().ravel())
    assert want == pytest.approx(0.5)
    assert per_class_ap(scores, targets).item() == pytest.approx(want, rel=1e-12)
    # Order of tied rows must not matter.
    perm = torch.tensor([1, 0, 3, 2])
    assert per_class_ap(scores[perm], targets[perm]).item() == pytest.approx(want, rel=1e-12)


def _voc07_loop(scores: np.ndarray, targets: np.ndarray) -> float:
    """VOC2007 devkit (VOCevalcls + 11-point VOCap) for one class, written as a plain loop.

    Ignored entries stay in the ranked list but count as neither tp nor fp (as the devkit's
    difficult = 0 entries). Tied scores: a curve point only after the last member of a tie group;
    with distinct scores this is exactly the devkit.
    """
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # stable
    n_pos = int((targets == 1).sum())
    tp = fp = 0
    rec, prec = [], []
    for j, i in enumerate(order):
        tp += int(targets[i] == 1)
        fp += int(targets[i] == 0)
        if j + 1 == len(order) or scores[order[j + 1]] != scores[i]:
            rec.append(tp / n_pos)
            prec.append(tp / (tp + fp) if tp + fp else 0.0)
    ap = 0.0
    for t in [i / 10 for i in range(11)]:
        above = [p for r, p in zip(rec, prec) if r >= t]
        ap += (max(above) if above else 0.0) / 11
    return ap


@pytest.mark.parametrize("decimals", [None, 1])
def test_voc07_11point_matches_devkit_loop(decimals: int | None) -> None:
    scores, targets = _make_data(5, ignore=True, decimals=decimals)
    if decimals is None:
        assert len(np.unique(scores)) == scores.size  # tie-free: exactly the devkit
    ap = per_class_ap(torch.from_numpy(scores), torch.from_numpy(targets), voc07_11point=True)
    assert math.isnan(ap[NO_POS_CLASS].item())
    for c in range(N_CLS - 1):
        assert ap[c].item() == pytest.approx(_voc07_loop(scores[:, c], targets[:, c]), rel=1e-12), c
    got = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets), voc07_11point=True)
    assert got["mAP"] == pytest.approx(torch.nanmean(ap).item(), rel=1e-12)
    # The option must change only mAP.
    plain = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    assert got["mAP"] != plain["mAP"]
    assert {k: v for k, v in got.items() if k != "mAP"} == pytest.approx(
        {k: v for k, v in plain.items() if k != "mAP"}, nan_ok=True
    )


def test_hand_checked_example() -> None:
    scores = torch.tensor(
        [[0.9, 0.6, 0.1, 0.2],
         [0.8, 0.4, 0.7, 0.1],
         [0.3, 0.2, 0.5, 0.9]]
    )  # fmt: skip
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    # APs: 5/6, 1/2, 5/6, 1. Threshold 0.5 (0.5 itself is predicted): per class (Nc, Np, Ng) =
    # (1,2,2), (0,1,1), (1,2,2), (1,1,1). Top-3 sets: {0,1,3}, {0,1,2}, {0,2,3}: per class
    # (2,3,2), (1,2,1), (1,2,2), (1,2,1) for P@3..A@3. ML-GCN's @3 rule keeps only the top-3
    # entries >= 0.5: {0,1}, {0,2}, {2,3} = the thresholded sets, so CP@3..OF1@3 = CP..OF1 here.
    # Top-5 = everything (C = 4).
    want = {
        "mAP": 19 / 24,
        "CP": 1 / 2, "CR": 1 / 2, "CF1": 1 / 2, "OP": 1 / 2, "OR": 1 / 2, "OF1": 1 / 2,
        "CP@3": 1 / 2, "CR@3": 1 / 2, "CF1@3": 1 / 2, "OP@3": 1 / 2, "OR@3": 1 / 2, "OF1@3": 1 / 2,
        "P@3": 5 / 9, "R@3": 5 / 6, "F1@3": 2 / 3, "H@3": 5 / 12, "A@3": 19 / 36,
        "P@5": 1 / 2, "R@5": 1.0, "F1@5": 2 / 3, "H@5": 1 / 2, "A@5": 1 / 2,
        "one_error": 1 / 3, "coverage": 7 / 3, "ranking_loss": 5 / 12, "n_ranking_excluded": 0,
    }  # fmt: skip
    _assert_close(multilabel_metrics(scores, targets), want)
    # VOC07 11-point on [0.9+, 0.8-, 0.7+]: P = 1 up to R = 0.5 (6 levels), then 2/3 (5 levels).
    ap11 = per_class_ap(
        torch.tensor([[0.9], [0.8], [0.7]]), torch.tensor([[1], [0], [1]]), voc07_11point=True
    )
    assert ap11.item() == pytest.approx(28 / 33, rel=1e-12)


def test_moving_an_ignored_entry_changes_nothing() -> None:
    scores, targets = _make_data(6, ignore=True)
    base = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    ignored = targets == -1
    for fill in (0.0, 1.0, 0.5):
        moved = np.where(ignored, np.float32(fill), scores)
        got = multilabel_metrics(torch.from_numpy(moved), torch.from_numpy(targets))
        assert got == pytest.approx(base, rel=1e-12, nan_ok=True), fill
        ap_moved = per_class_ap(torch.from_numpy(moved), torch.from_numpy(targets))
        ap_base = per_class_ap(torch.from_numpy(scores), torch.from_numpy(targets))
        np.testing.assert_allclose(ap_moved.numpy(), ap_base.numpy(), rtol=1e-12)  # NaNs must match


def test_input_types_and_dtypes_agree() -> None:
    scores, targets = _make_data(7, ignore=True)
    base = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    as_f64 = multilabel_metrics(torch.from_numpy(scores).double(), torch.from_numpy(targets).float())
    as_numpy = multilabel_metrics(scores, targets)
    assert as_f64 == pytest.approx(base, rel=1e-12, nan_ok=True)
    assert as_numpy == pytest.approx(base, rel=1e-12, nan_ok=True)
    binary = np.clip(targets, 0, 1).astype(bool)
    assert multilabel_metrics(scores, binary) == pytest.approx(
        multilabel_metrics(scores, binary.astype(np.int64)), rel=1e-12, nan_ok=True
    )


def test_negative_zero_ties_with_zero() -> None:
    # -0.0 passes the [0, 1] check and must tie with +0.0 (the sort works on the float bit patterns).
    scores = torch.tensor([[0.5, 0.5], [0.0, 0.5], [-0.0, 0.2]])
    targets = torch.tensor([[0, 0], [1, 1], [0, 1]])
    # Class 0: the positive at +0.0 ties with the negative at -0.0, so AP = 1/3 (1/2 if split).
    assert per_class_ap(scores, targets)[0].item() == pytest.approx(1 / 3)
    got = multilabel_metrics(scores, targets)
    assert got == pytest.approx(multilabel_metrics(scores.abs(), targets), nan_ok=True)


def test_nothing_positive_gives_nan_and_counts_every_image_excluded() -> None:
    scores = torch.rand(5, 4)
    got = multilabel_metrics(scores, torch.zeros(5, 4, dtype=torch.long))
    for key in ("mAP", "CP", "CR", "OR", "one_error", "coverage", "ranking_loss"):
        assert math.isnan(got[key]), key
    assert got["n_ranking_excluded"] == 5
    assert got["H@3"] == pytest.approx(3 / 4)  # top-3 of 4 classes, all negatives
    assert got["A@3"] == 0.0


@pytest.mark.parametrize(
    ("scores", "targets", "match"),
    [
        (torch.rand(4, 3), torch.zeros(4, 2), "same shape"),
        (torch.rand(4), torch.zeros(4), "scores must be a 2-D"),
        (torch.rand(4, 3), torch.zeros(4, 3, 1), "targets must be a 2-D"),
        (torch.rand(2, 4, 3), torch.zeros(2, 4, 3), "scores must be a 2-D"),
        (torch.rand(4, 3), torch.full((4, 3), 2), "targets must only contain"),
        (torch.rand(4, 3), torch.full((4, 3), 0.5), "targets must only contain"),
        (torch.full((4, 3), 1.5), torch.zeros(4, 3), "scores must lie in"),
        (torch.full((4, 3), float("nan")), torch.zeros(4, 3), "scores must lie in"),
        (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, 3), "scores must be a floating"),
        (torch.rand(0, 3), torch.zeros(0, 3), "at least one image"),
    ],
)
def test_validation_errors(scores: torch.Tensor, targets: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(scores, targets)
    with pytest.raises(ValueError, match=match):
        per_class_ap(scores, targets)


def test_threshold_out_of_range() -> None:
    with pytest.raises(ValueError, match="threshold"):
        multilabel_metrics(torch.rand(4, 3), torch.zeros(4, 3), threshold=1.5)


# --- The two top-3 conventions -----------------------------------------------------------------
# CP@3..OF1@3 follow ML-GCN's evaluation code (top 3 AND score >= threshold); P@k..A@k follow the
# paper's Table II (top k, no threshold). Each is checked against its own loop written here.

TOP3_SIX = ("CP@3", "CR@3", "CF1@3", "OP@3", "OR@3", "OF1@3")
NEVER_CLASS = 0  # capped below 0.5 in _top3_data: has positives but is never predicted at @3


def _loop_top_k(scores: np.ndarray, targets: np.ndarray, i: int, k: int) -> list[int]:
    """The k highest-scoring non-ignored classes of image i, lower class index first among ties."""
    cands = [j for j in range(scores.shape[1]) if targets[i, j] != -1]
    cands.sort(key=lambda j: (-float(scores[i, j]), j))
    return cands[:k]


def _f1_plain(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _mlgcn_top3_loop(
    scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5, k: int = 3
) -> dict[str, float]:
    """ML-GCN's overall_topk(3) + evaluation() as plain Python loops, with ignored (-1) entries
    deleted: a class is predicted for image i iff it is among i's top 3 AND its score >= threshold
    (compared in the scores' dtype). CP/CR average over the classes with a positive; a class with
    Np = 0 has precision 0."""
    thr = scores.dtype.type(threshold)
    n_img, n_cls = scores.shape
    nc, np_, ng = [0] * n_cls, [0] * n_cls, [0] * n_cls
    for i in range(n_img):
        top = _loop_top_k(scores, targets, i, k)
        for j in range(n_cls):
            if targets[i, j] == -1:
                continue
            predicted = j in top and scores[i, j] >= thr
            positive = targets[i, j] == 1
            ng[j] += positive
            np_[j] += predicted
            nc[j] += predicted and positive
    classes = [j for j in range(n_cls) if ng[j] > 0]
    cp = sum(nc[j] / max(np_[j], 1) for j in classes) / len(classes)
    cr = sum(nc[j] / ng[j] for j in classes) / len(classes)
    op = sum(nc) / sum(np_) if sum(np_) else 0.0
    or_ = sum(nc) / sum(ng)
    vals = (cp, cr, _f1_plain(cp, cr), op, or_, _f1_plain(op, or_))
    return dict(zip(TOP3_SIX, vals))


def _table2_loop(scores: np.ndarray, targets: np.ndarray, k: int) -> dict[str, float]:
    """The paper's Table II top-k metrics as plain loops: the top k classes, no threshold."""
    correct = predicted = positives = wrong = entries = 0
    jaccards = []
    for i in range(scores.shape[0]):
        top = set(_loop_top_k(scores, targets, i, k))
        pos = {j for j in range(scores.shape[1]) if targets[i, j] == 1}
        correct += len(top & pos)
        predicted += len(top)
        positives += len(pos)
        wrong += len(top ^ pos)
        n_valid = int((targets[i] != -1).sum())
        entries += n_valid
        if n_valid:
            jaccards.append(len(top & pos) / len(top | pos) if top | pos else 0.0)
    p, r = correct / predicted, correct / positives
    return {
        f"P@{k}": p, f"R@{k}": r, f"F1@{k}": _f1_plain(p, r),
        f"H@{k}": wrong / entries, f"A@{k}": sum(jaccards) / len(jaccards),
    }  # fmt: skip


def _top3_data(seed: int, *, ignore: bool, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    scores, targets = _make_data(seed, ignore=ignore, decimals=decimals)
    scores[:, NEVER_CLASS] = np.minimum(scores[:, NEVER_CLASS], np.float32(0.49))  # all < 0.5
    return scores, targets


@pytest.mark.parametrize(
    ("seed", "ignore", "decimals"), [(0, True, 1), (1, True, 1), (2, True, None), (3, False, None)]
)
def test_both_top3_conventions_match_their_loops(seed: int, ignore: bool, decimals: int | None) -> None:
    scores, targets = _top3_data(seed, ignore=ignore, decimals=decimals)
    top3 = np.zeros(scores.shape, dtype=bool)
    for i in range(N_IMG):
        top3[i, _loop_top_k(scores, targets, i, 3)] = True
    # The data exercise the rule: some top-3 entries are below 0.5, and NEVER_CLASS has positives
    # but is never predicted at @3 (it still takes top-3 slots, so Table II predicts it).
    assert (top3 & (scores < 0.5)).any()
    assert (targets[:, NEVER_CLASS] == 1).any()
    assert not (top3 & (scores >= 0.5))[:, NEVER_CLASS].any()
    assert top3[:, NEVER_CLASS].any()

    got = multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets))
    mlgcn = _mlgcn_top3_loop(scores, targets)
    for key in TOP3_SIX:
        assert got[key] == pytest.approx(mlgcn[key], rel=1e-12, abs=1e-15), key
    for k in (3, 5):
        table2 = _table2_loop(scores, targets, k)
        for key, want in table2.items():
            assert got[key] == pytest.approx(want, rel=1e-12, abs=1e-15), key

    # The two conventions really differ on these data, each matching its own loop: the ML-GCN
    # six are not the Table II-style (no threshold) six, and OP@3/OR@3 are not P@3/R@3.
    unthresholded = _mlgcn_top3_loop(scores, targets, threshold=0.0)
    for key in TOP3_SIX:
        assert mlgcn[key] != pytest.approx(unthresholded[key], rel=1e-6), key
    assert got["OP@3"] != pytest.approx(got["P@3"], rel=1e-6)
    assert got["OR@3"] != pytest.approx(got["R@3"], rel=1e-6)
    assert unthresholded["OP@3"] == pytest.approx(got["P@3"], rel=1e-12)  # same sets, pooled


def test_threshold_moves_the_mlgcn_top3_six_but_not_table2() -> None:
    scores, targets = _top3_data(4, ignore=True, decimals=1)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    table2_keys = [key for key in METRIC_KEYS if key[0] in "PRFHA" and "@" in key]
    base = multilabel_metrics(s, t)
    for thr in (0.0, 0.3, 0.7, 1.0):
        got = multilabel_metrics(s, t, threshold=thr)
        want = _mlgcn_top3_loop(scores, targets, threshold=thr)
        for key in TOP3_SIX:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), (thr, key)
        assert {key: got[key] for key in table2_keys} == {key: base[key] for key in table2_keys}
    # threshold 0 keeps every top-3 entry: the ML-GCN rule then reduces to plain top-3
    zero = multilabel_metrics(s, t, threshold=0.0)
    assert (zero["OP@3"], zero["OR@3"], zero["OF1@3"]) == pytest.approx(
        (zero["P@3"], zero["R@3"], zero["F1@3"]), rel=1e-12
    )


def test_top3_conventions_hand_example() -> None:
    scores = torch.tensor(
        [[0.9, 0.4, 0.3, 0.1, 0.05],
         [0.8, 0.2, 0.6, 0.7, 0.1]]
    )  # fmt: skip
    targets = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 0, 1]])
    # Top-3 sets: {0,1,2} and {0,2,3}. ML-GCN keeps those >= 0.5: {0} (0.4 and 0.3 dropped) and
    # {0,2,3}. Per class (Nc, Np, Ng) under ML-GCN: (1,2,1), (0,0,2) [a positive class never
    # predicted: precision 0], (1,1,2), (0,1,0) [no positive: out of CP/CR, in OP], (0,0,1).
    # CP@3 = (1/2 + 0 + 1 + 0)/4, CR@3 = (1 + 0 + 1/2 + 0)/4, OP@3 = 2/4, OR@3 = 2/6.
    # Table II (no threshold): correct 3 + 1 of 6 predicted, 6 positives; wrong entries 0 + 4 of 10;
    # Jaccard 3/3 and 1/5.
    want = {
        "CP@3": 3 / 8, "CR@3": 3 / 8, "CF1@3": 3 / 8, "OP@3": 1 / 2, "OR@3": 1 / 3, "OF1@3": 2 / 5,
        "P@3": 2 / 3, "R@3": 2 / 3, "F1@3": 2 / 3, "H@3": 2 / 5, "A@3": 3 / 5,
    }  # fmt: skip
    got = multilabel_metrics(scores, targets)
    assert {key: got[key] for key in want} == pytest.approx(want, rel=1e-12)
    assert got["OP@3"] != pytest.approx(got["P@3"])  # the two conventions differ here


def _mlgcn_util(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """ML-GCN util.py, AveragePrecisionMeter.overall() and overall_topk(3) with evaluation(),
    transcribed (it works on logits: predicted iff logit >= 0; -1 targets become 0)."""

    def evaluation(scores_: np.ndarray, targets_: np.ndarray) -> tuple[float, ...]:
        n, n_class = scores_.shape
        Nc, Np, Ng = np.zeros(n_class), np.zeros(n_class), np.zeros(n_class)  # noqa: N806
        for k in range(n_class):
            scores = scores_[:, k]
            targets = targets_[:, k]
            targets[targets == -1] = 0
            Ng[k] = np.sum(targets == 1)
            Np[k] = np.sum(scores >= 0)
            Nc[k] = np.sum(targets * (scores >= 0))
        Np[Np == 0] = 1
        OP = np.sum(Nc) / np.sum(Np)  # noqa: N806
        OR = np.sum(Nc) / np.sum(Ng)  # noqa: N806
        OF1 = (2 * OP * OR) / (OP + OR)  # noqa: N806
        CP = np.sum(Nc / Np) / n_class  # noqa: N806
        CR = np.sum(Nc / Ng) / n_class  # noqa: N806
        CF1 = (2 * CP * CR) / (CP + CR)  # noqa: N806
        return OP, OR, OF1, CP, CR, CF1

    out = {}
    overall = evaluation(logits.numpy().copy(), targets.numpy().copy())
    n, c = logits.size()
    scores = np.zeros((n, c)) - 1
    index = logits.topk(3, 1, True, True)[1].numpy()
    tmp = logits.numpy()
    for i in range(n):
        for ind in index[i]:
            scores[i, ind] = 1 if tmp[i, ind] >= 0 else -1
    top3 = evaluation(scores, targets.numpy().copy())
    names = ("OP", "OR", "OF1", "CP", "CR", "CF1")
    for suffix, vals in (("", overall), ("@3", top3)):
        out.update({name + suffix: float(v) for name, v in zip(names, vals)})
    return out


def test_matches_mlgcn_evaluation_code_on_logits() -> None:
    """Without -1 targets or tied scores, and with every class positive somewhere, the twelve
    ML-GCN metrics equal what ML-GCN's own code reports for the logits of the same scores."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(200, 12, generator=gen, dtype=torch.float64) * 1.5 - 1.0
    targets = (torch.rand(200, 12, generator=gen) < 0.3).long()
    assert bool((targets.sum(0) > 0).all()) and float(logits.abs().min()) > 1e-9
    assert torch.unique(logits).numel() == logits.numel()
    want = _mlgcn_util(logits, targets)
    got = multilabel_metrics(torch.sigmoid(logits), targets)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    # ... and on these data the published top-3 rule is not the plain top 3
    plain_top3 = _mlgcn_top3_loop(torch.sigmoid(logits).numpy(), targets.numpy(), threshold=0.0)
    assert got["CP@3"] != pytest.approx(plain_top3["CP@3"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    scores, targets = _make_data(8, ignore=True)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    cpu = multilabel_metrics(s, t)
    gpu = multilabel_metrics(s.cuda(), t.cuda())
    assert gpu == pytest.approx(cpu, rel=1e-12, nan_ok=True)
    ap_gpu = per_class_ap(s.cuda(), t.cuda(), voc07_11point=True)
    assert ap_gpu.device.type == "cuda"
    ap_cpu = per_class_ap(s, t, voc07_11point=True)
    np.testing.assert_allclose(ap_gpu.cpu().numpy(), ap_cpu.numpy(), rtol=1e-12)
