"""benchmarks/_bench.py: how a goal's status is decided from the session's results."""

from __future__ import annotations

from benchmarks import _bench
from benchmarks._bench import Goal, Result, evaluate_goals


def result(case: str, median: float) -> Result:
    return Result(case=case, group="g", sizes="", baselines=[], median=median, items=8, min=median)


def test_goal_status_met_missed_not_measured_and_not_applicable(monkeypatch):
    goals = [
        Goal("cpu", "fast ≥ 1.5× slow", "ratio", "x/fast", 1.5, "x/slow"),
        Goal("cpu", "faster ≥ 3× slow", "ratio", "x/fast", 3.0, "x/slow"),
        Goal("cpu", "absent ≥ 1× slow", "ratio", "x/absent", 1.0, "x/slow"),
        Goal("cpu", "needs a unit", "ratio", "x/fast", 1.5, "x/slow", applies=lambda: (False, "no such unit")),
        Goal("cpu", "has the unit", "ratio", "x/fast", 1.5, "x/slow", applies=lambda: (True, "")),
        Goal("gpu", "another profile", "ratio", "x/fast", 1.0, "x/slow"),
    ]
    monkeypatch.setattr(_bench, "GOALS", goals)
    rows = evaluate_goals({"x/fast": result("x/fast", 1.0), "x/slow": result("x/slow", 2.0)}, "cpu")
    assert [r["status"] for r in rows] == ["met", "missed", "not measured", "not applicable: no such unit", "met"]
    assert rows[0]["value"] == rows[3]["value"] == 2.0  # measured and shown even where it does not apply


def test_the_bf16_training_goal_applies_only_on_a_cpu_with_bf16_units():
    from c2f_fast.runtime import cpu_bf16_support

    goal = next(g for g in _bench.GOALS if g.case == "train/cpu_bf16_cl")
    assert goal.applies is not None and goal.applies() == cpu_bf16_support()
