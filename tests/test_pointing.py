"""The pointing game on hand-built attention maps and boxes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from c2f_fast.pointing import (
    PointingGame,
    box_distance,
    peak_xy,
    pointing_game,
    scale_boxes,
    tolerance_px,
)

S = 224  # tolerance 15 px exactly
C = 4
H = W = 8  # 8x8 attention map: a cell is 28 px, centres at 14, 42, 70, ...


def one_hot_map(i: int, j: int, h: int = H, w: int = W) -> torch.Tensor:
    m = torch.full((h * w,), 0.1)
    m[i * w + j] = 5.0
    return torch.softmax(m, 0)


def logits_emitting(classes: list[int], T: int = 3) -> torch.Tensor:
    """Step logits [1, T, C] that emit ``classes`` in order, then stop."""
    lg = torch.full((1, T, C), -5.0)
    for t, c in enumerate(classes):
        lg[0, t, c] = 5.0
    return lg


def test_tolerance_and_geometry() -> None:
    assert tolerance_px(224) == 15.0
    assert tolerance_px(128) == pytest.approx(15 * 128 / 224)
    assert box_distance(5, 5, (0, 0, 10, 10)) == 0.0
    assert box_distance(10, 10, (0, 0, 10, 10)) == 0.0  # on the border
    assert box_distance(13, 14, (0, 0, 10, 10)) == pytest.approx(5.0)
    xy = peak_xy(one_hot_map(2, 5).view(1, -1), S)
    assert xy.tolist() == [[(5 + 0.5) * 28, (2 + 0.5) * 28]]
    # a non-square map needs its shape
    with pytest.raises(ValueError, match="square"):
        peak_xy(torch.ones(1, 12), S)
    assert peak_xy(torch.arange(12.0).view(1, 12), 120, map_hw=(3, 4)).tolist() == [[105.0, 100.0]]
    # boxes of a 448 x 112 original, resized to 224 x 224 without keeping the aspect
    assert scale_boxes([(1, 40.0, 10.0, 80.0, 20.0)], (448, 112), 224) == [(1, 20.0, 20.0, 40.0, 40.0)]
    assert scale_boxes([(0, 10.0, 10.0, 20.0, 20.0)], 112, 224) == [(0, 20.0, 20.0, 40.0, 40.0)]


def _local(box, peak=(2, 2), emitted=(1,), cls=1, orig=None):
    local = torch.stack([one_hot_map(*peak)] * 3).unsqueeze(0)  # [1, T=3, L]
    return pointing_game(logits_emitting(list(emitted)), local, None, [[(cls, *box)]], S, orig_sizes=orig)


def test_local_hit_and_miss() -> None:
    # peak of (2, 2) at (70, 70)
    hit = _local((60.0, 60.0, 80.0, 80.0))
    assert (hit.local, hit.local_hits, hit.local_total) == (1.0, [0, 1, 0, 0], [0, 1, 0, 0])
    assert hit.global_ is None
    miss = _local((150.0, 150.0, 200.0, 200.0))
    assert miss.local == 0.0 and miss.local_total[1] == 1


def test_tolerance_edge() -> None:
    # peak at x = 70: a box starting 15 px to its right is just within, 15.01 just outside
    assert _local((85.0, 60.0, 100.0, 80.0)).local == 1.0
    assert _local((85.01, 60.0, 100.0, 80.0)).local == 0.0
    # diagonal: distance sqrt(2)*10.6 = 14.99 inside, sqrt(2)*10.7 = 15.13 outside
    assert _local((80.6, 80.6, 100.0, 100.0)).local == 1.0
    assert _local((80.7, 80.7, 100.0, 100.0)).local == 0.0
    # the tolerance scales with the input (15 * 112 / 224 = 7.5 px) and boxes with the original size
    local = one_hot_map(2, 2).view(1, 1, -1)  # peak at (35, 35) of 112 px
    lg = logits_emitting([0], T=1)
    assert pointing_game(lg, local, None, [[(0, 42.5, 30.0, 60.0, 40.0)]], 112).local == 1.0
    assert pointing_game(lg, local, None, [[(0, 42.6, 30.0, 60.0, 40.0)]], 112).local == 0.0
    # same box given in a 224-px original: scaled by 1/2 first
    assert pointing_game(lg, local, None, [[(0, 85.0, 60.0, 120.0, 80.0)]], 112, orig_sizes=[224]).local == 1.0


def test_class_not_emitted_is_a_miss() -> None:
    res = _local((60.0, 60.0, 80.0, 80.0), emitted=(2,))  # the box's class 1 was never emitted
    assert res.local == 0.0 and res.local_total == [0, 1, 0, 0]
    res = _local((60.0, 60.0, 80.0, 80.0), emitted=())  # nothing emitted at all
    assert res.local == 0.0


def test_uses_the_step_that_emitted_the_class() -> None:
    # step 0 looks at (0, 0) and emits class 3; step 1 looks at (5, 5) and emits class 1
    local = torch.stack([one_hot_map(0, 0), one_hot_map(5, 5), one_hot_map(0, 0)]).unsqueeze(0)
    lg = logits_emitting([3, 1])
    boxes = [[(1, 150.0, 150.0, 160.0, 160.0), (3, 0.0, 0.0, 20.0, 20.0)]]
    res = pointing_game(lg, local, None, boxes, S)
    assert res.local_hits == [0, 1, 0, 1] and res.local_total == [0, 1, 0, 1]
    # swap the maps: both miss
    res = pointing_game(lg, local[:, [1, 0, 2]], None, boxes, S)
    assert res.local_hits == [0, 0, 0, 0] and res.local == 0.0
    # the stop rule: after a step below 0.5 nothing counts, even a later confident step
    lg2 = logits_emitting([3])
    lg2[0, 2, 1] = 5.0
    res = pointing_game(lg2, local[:, [0, 2, 1]], None, boxes, S)
    assert res.local_hits == [0, 0, 0, 1]


def test_reference_figures_any_object_and_chance() -> None:
    # image 0 holds classes 1 and 3: step 0 emits 3 but looks at class 1's box (some present object,
    # the wrong one), step 1 emits 1 and looks at the background; image 1 holds class 0, never emitted
    local = torch.stack([one_hot_map(0, 0), one_hot_map(7, 0), one_hot_map(7, 0)]).unsqueeze(0)  # (14, 210): far
    local = torch.cat([local, local])
    lg = torch.cat([logits_emitting([3, 1]), logits_emitting([])])
    boxes = [[(1, 0.0, 0.0, 20.0, 20.0), (3, 150.0, 150.0, 160.0, 160.0)], [(0, 0.0, 0.0, 20.0, 20.0)]]
    res = pointing_game(lg, local, None, boxes, S)
    assert res.local == 0.0
    assert res.local_any == pytest.approx(1 / 3)  # one of three trials peaks on a present object
    assert res.local_chance == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    d = res.to_dict()
    assert d["local_any"] == pytest.approx(1 / 3) and d["local_chance"] == pytest.approx(2 / 3)
    # merged games add the figures' counts too
    game = PointingGame(C, S)
    for b in range(2):
        game.update(lg[b : b + 1], local[b : b + 1], None, boxes[b : b + 1])
    merged = PointingGame(C, S)
    merged.merge(game)
    assert merged.result().local_any == pytest.approx(1 / 3)
    assert merged.result().local_chance == pytest.approx(2 / 3)
    # without local attention there are no such figures
    assert pointing_game(None, None, local[:, 0], boxes, S, num_classes=C).local_chance is None


def test_global_peak_against_any_present_class() -> None:
    glob = torch.stack([one_hot_map(2, 2), one_hot_map(7, 7), one_hot_map(0, 0)])
    boxes = [
        [(0, 100.0, 100.0, 120.0, 120.0), (2, 60.0, 60.0, 80.0, 80.0)],  # peak (70, 70) in class 2's box
        [(1, 0.0, 0.0, 30.0, 30.0)],  # peak (210, 210): far
        [],  # no boxes: no trial
    ]
    res = pointing_game(None, None, glob, boxes, S, num_classes=C)
    assert (res.global_hits, res.global_total, res.global_) == (1, 2, 0.5)
    assert res.local is None and res.to_dict()["local"] is None
    # targets restrict the trials to present classes (e.g. VOC boxes of difficult-only classes)
    targets = torch.tensor([[1, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    res = pointing_game(None, None, glob, boxes, S, num_classes=C, targets=targets)
    assert (res.global_hits, res.global_total) == (0, 2)


def test_accumulates_and_serialises() -> None:
    names = ["a", "b", "c", "d"]
    game = PointingGame(C, S, class_names=names)
    local = torch.stack([one_hot_map(2, 2)] * 3).unsqueeze(0)
    glob = one_hot_map(2, 2).view(1, -1)
    for box in ((60.0, 60.0, 80.0, 80.0), (150.0, 150.0, 200.0, 200.0)):
        game.update(logits_emitting([1]), local, glob, [[(1, *box)]])
    other = PointingGame(C, S, class_names=names)
    other.update(logits_emitting([0]), local, glob, [[(0, 60.0, 60.0, 80.0, 80.0)]])
    game.merge(other)
    res = game.result()
    assert res.local == pytest.approx(2 / 3) and res.global_ == pytest.approx(2 / 3)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["local_per_class"] == {"a": 1.0, "b": 0.5, "c": None, "d": None}
    assert d["local_per_class_counts"]["b"] == [1, 2]
    assert (d["global_hits"], d["global_total"]) == (2, 3)
    assert math.isclose(d["local"], 2 / 3)


def test_shape_errors() -> None:
    local = torch.ones(2, 3, 64) / 64
    with pytest.raises(ValueError, match="do not match"):
        pointing_game(torch.zeros(2, 4, C), local, None, [[], []], S)
    with pytest.raises(ValueError, match="step_logits"):
        pointing_game(None, local, None, [[], []], S, num_classes=C)
    with pytest.raises(ValueError, match="class_names"):
        PointingGame(C, S, class_names=["a"])
    assert pointing_game(None, None, None, [[]], S, num_classes=C).to_dict()["global"] is None


def test_original_sizes(tmp_path) -> None:
    from PIL import Image

    from c2f_fast.pointing import original_sizes

    Image.new("RGB", (30, 20)).save(tmp_path / "a.jpg")
    Image.new("RGB", (7, 9)).save(tmp_path / "b.png")
    assert original_sizes([tmp_path / "a.jpg", str(tmp_path / "b.png")]) == [(30, 20), (7, 9)]
