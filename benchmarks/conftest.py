"""Benchmark-session setup: the sizes fixture, and at the end of the session the ratios to the
baselines measured in the same run, the autotune winners, and the compact table (printed last).

Run: ``python -m pytest benchmarks --benchmark-only`` (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import _bench
from c2f_fast.runtime import tune_allocator

_PROFILE = _bench.make_profile()
if _PROFILE.threads:
    torch.set_num_threads(_PROFILE.threads)
# the process as the c2f commands run it (glibc malloc keeps freed memory: c2f_fast.runtime.
# tune_allocator); C2F_MALLOC=system measures the system's allocator instead
tune_allocator()


@pytest.fixture(scope="session")
def profile() -> _bench.Profile:
    return _PROFILE


@pytest.fixture(autouse=True)
def _seed_and_free():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


#: On the GPU the cases the goals need run first, so that a run cut short by its time limit
#: (benchmarks/run_gpu.sh) still has every goal's numbers; the other cases follow in file order.
GOAL_CASES_GPU = (
    "test_copy",
    "test_attention_pool[fwd-L1-fast]", "test_attention_pool[fwd-L1-eager]", "test_attention_pool[fwd-L1-compiled]",
    "test_attention_pool[fwdbwd-L1-fast]", "test_attention_pool[fwdbwd-L1-eager]",
    "test_attention_pool[fwdbwd-L1-compiled]",
    "test_additive_attention[fwd-L1-fast]", "test_additive_attention[fwd-L1-eager]",
    "test_additive_attention[fwd-L1-compiled]", "test_additive_attention[fwdbwd-L1-fast]",
    "test_additive_attention[fwdbwd-L1-eager]", "test_additive_attention[fwdbwd-L1-compiled]",
    "test_lstm_cell[fwdbwd-fast]", "test_lstm_cell[fwdbwd-nn.LSTMCell]",
    "test_decoder[fast_compiled]", "test_decoder[ref_eager]",
    "test_train_step[ref_fp32_eager]", "test_train_step[fast_bf16_compiled]",
    "test_data[torch]", "test_data[dali]", "test_data[tv_decode_jpeg]", "test_data[nvjpeg]",
    "test_infer[b1-compiled]", "test_infer[bN-compiled]",
)


GOAL_CASES_CPU = ("test_data[torch]", "test_data[dali]", "test_decoder[ref_eager]", "test_decoder[ref_compiled]",
                  "test_train_step[ref_fp32_eager]", "test_train_step[cpu_bf16_cl]",
                  "test_infer_vs_onnxruntime[b1]", "test_infer_vs_onnxruntime[bN]")


def pytest_collection_modifyitems(session, config, items):
    """GPU: goal cases first. ``C2F_BENCH_GOALS_ONLY=1``: only the cases the goals need."""
    goal_cases = GOAL_CASES_GPU if _PROFILE.name == "gpu" else GOAL_CASES_CPU
    if os.environ.get("C2F_BENCH_GOALS_ONLY", "") not in ("", "0"):
        keep = [item for item in items if item.name in goal_cases or "benchmarks" not in str(item.path)]
        dropped = [item for item in items if item not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    if _PROFILE.name != "gpu":
        return
    first = {name: i for i, name in enumerate(GOAL_CASES_GPU)}
    items.sort(key=lambda item: first.get(item.name, len(first)))  # stable: the rest keep file order


def _profile_name() -> str:
    return _PROFILE.name


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Before pytest-benchmark writes its JSON: ratios into every case's extra_info."""
    if not _bench.RESULTS:
        return
    _bench.finalise(_bench.RESULTS)
    out = os.environ.get("C2F_BENCH_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        name = _profile_name()
        with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(_bench.summary_json(_bench.RESULTS, name), f, indent=2, default=str)
        with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
            f.write(_bench.table(_bench.RESULTS, name) + "\n")
    if torch.cuda.is_available():
        from benchmarks import autotune_report

        report = autotune_report.collect()
        session.config._c2f_autotune = report
        if out:
            with open(os.path.join(out, "autotune.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2, default=str)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The environment, the goals and their status, in the ``--benchmark-json`` file too."""
    if _bench.RESULTS:
        name = _profile_name()
        output_json["c2f"] = {
            "environment": _bench.environment(),
            "profile": name,
            "goals": _bench.evaluate_goals(_bench.RESULTS, name),
            "autotune": getattr(config, "_c2f_autotune", None),
        }


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _bench.RESULTS:
        return
    tr = terminalreporter
    report = getattr(config, "_c2f_autotune", None)
    if report:
        from benchmarks import autotune_report

        tr.write_sep("-", "Triton autotune winners")
        tr.write_line(autotune_report.format_report(report))
    env = _bench.environment()
    tr.write_sep("=", "c2f benchmarks (ratio = case rate / baseline rate, same session)")
    tr.write_line(
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, DALI {env['dali']}, "
        f"torchvision {env['torchvision']}; {env['torch_threads']} torch thread(s); {env['date']}; "
        f"load average {tuple(round(x, 2) for x in env['loadavg'] or ())}; {env['allocator']}"
    )
    tr.write_line(_bench.table(_bench.RESULTS, _profile_name()))
