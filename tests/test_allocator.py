"""runtime.tune_allocator: glibc's malloc keeps freed memory for reuse (fewer page faults a step).

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="tune_allocator tunes glibc's malloc; other C libraries are left alone")

#: Allocates, touches and frees a 64 MiB tensor (above the 32 MiB that glibc's adaptive mmap
#: threshold can reach) eight times and prints the line and each round's minor page faults.
PROBE = """
import json, resource, sys, torch
from c2f_fast.runtime import allocator_tuned, tune_allocator
line = tune_allocator()
assert tune_allocator() is line  # once per process
def touch():
    x = torch.empty(64 << 20, dtype=torch.uint8)
    x.fill_(1)
    del x
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"line": line, "tuned": allocator_tuned(), "faults": faults}))
"""
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def run_fresh(code: str, **env: str):
    """The last line of ``code``'s output, as JSON, from a fresh interpreter whose environment has
    no allocator choice of its own but ``env``."""
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", "C2F_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(**env: str) -> dict:
    return run_fresh(PROBE, **env)


def test_tuned_malloc_reuses_freed_memory_instead_of_faulting_it_in_again():
    tuned = probe()
    assert "keeps freed memory" in tuned["line"] and "C2F_MALLOC=system" in tuned["line"] and tuned["tuned"]
    system = probe(C2F_MALLOC="system")
    assert system["line"] == "allocator: the system's (C2F_MALLOC=system)" and not system["tuned"]
    # the system's malloc maps a fresh 64 MiB block each time: every round faults its pages in
    assert min(system["faults"]) >= 0.9 * PAGES, system
    # tuned, the block is reused from the heap: the pages fault in while the heap grows (one or
    # two of the first rounds, depending on what else the interpreter allocated), then no more
    assert sum(f < PAGES // 8 for f in tuned["faults"][2:]) >= 5, tuned
    assert max(tuned["faults"][-3:]) < PAGES // 8, tuned


@pytest.mark.parametrize("env, says", [({"MALLOC_MMAP_THRESHOLD_": "262144"}, "as configured (MALLOC_MMAP_THRESHOLD_)"),
                                       ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "as configured (GLIBC_TUNABLES)"),
                                       ({"C2F_MALLOC": "off"}, "the system's (C2F_MALLOC=off)")])
def test_a_choice_already_made_is_kept(env, says):
    result = probe(**env)
    assert result["line"].endswith(says) and not result["tuned"]


def test_c2f_info_reports_the_allocator():
    out = subprocess.run([sys.executable, "-m", "c2f_fast.cli", "info"], capture_output=True, text=True, timeout=120,
                         check=True, env={**os.environ, "C2F_MALLOC": "system"})
    assert "memory       the system's (C2F_MALLOC=system)" in out.stdout


def test_a_loader_worker_tunes_as_its_parent_did():
    """DataLoader workers (c2f_fast.data.torch_pipeline._init_worker) set the allocator only
    when the parent had."""
    code = """
import json
from c2f_fast.runtime import allocator_state
from c2f_fast.data.torch_pipeline import _init_worker
from c2f_fast.runtime import allocator_tuned
_init_worker(0, tune_allocator=False)
before = allocator_state()
assert not allocator_tuned()
_init_worker(1, tune_allocator=True)
assert allocator_tuned()
print(json.dumps([before, allocator_state()]))
"""
    before, after = run_fresh(code)
    assert "not called" in before and "keeps freed memory" in after
