"""The GPU scripts' machinery, on the CPU: benchmarks/_gpu_steps.sh (a time limit per step, one
summary line per step, carried wheels installed only when missing) and benchmarks/gpu_smoke.py
on the reference path. The scripts themselves run where a GPU is lent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = REPO / "benchmarks" / "_gpu_steps.sh"


def _bash(script: str, out: Path, total: int = 60) -> subprocess.CompletedProcess:
    prelude = f'OUT={out}; TOTAL={total}; cd {REPO}; source {STEPS}\n'
    return subprocess.run(["bash", "-c", prelude + script], capture_output=True, text=True, timeout=120)


def test_step_reports_ok_failure_and_timeout(tmp_path):
    script = """
    quick() { echo "all fine"; }
    export -f quick
    step good 20 good.log quick
    step bad 20 bad.log bash -c 'echo "broken here"; exit 3'
    step slow 10 slow.log sleep 30
    """
    proc = _bash(script, tmp_path)
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert len(lines) == 3, (lines, proc.stderr)
    assert lines[0].startswith("STEP good: ok |") and lines[0].endswith("all fine")
    assert lines[1].startswith("STEP bad: FAILED (exit 3) |") and lines[1].endswith("broken here")
    assert lines[2].startswith("STEP slow: TIMEOUT after 10 s |")
    assert int(lines[2].split("|")[1].strip().split()[0]) < 25  # stopped by its limit, not by sleep
    assert proc.stdout.splitlines() == lines


def test_step_is_skipped_when_the_budget_is_spent(tmp_path):
    proc = _bash("START=$(( $(date +%s) - 100 )); step late 30 late.log echo never", tmp_path, total=100)
    assert "STEP late: SKIPPED (no time left)" in proc.stdout
    assert not (tmp_path / "late.log").exists()


def test_carried_wheels_install_only_what_is_missing(tmp_path):
    # every module of the list imports here (the dev install has them): nothing to install
    proc = _bash(f"install_carried_wheels {tmp_path / 'absent'}", tmp_path)
    assert proc.returncode == 0 and "nothing to install" in proc.stdout, proc.stdout + proc.stderr


def test_carried_wheels_list_is_what_the_readers_import():
    listed = {line.split()[0] for line in (REPO / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert {"defusedxml", "pycocotools", "pytest_benchmark", "safetensors", "yaml"} <= listed


@pytest.mark.slow
def test_gpu_smoke_runs_on_the_reference_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--device", "cpu", "--batch", "2",
                           "--size", "32", "--calls", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke train: ok:" in proc.stdout and "smoke infer: ok:" in proc.stdout, proc.stdout
