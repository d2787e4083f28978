"""Tests of the ahead-of-time SASS report (``benchmarks/kernel_report.py``, issues 5 and 12).

Three layers:

* parsers and occupancy arithmetic on fixed text (no Triton compile);
* probe kernels with known properties (``tests/kernel_report_probes.py``), compiled for sm_90 in a
  subprocess: a vectorised bf16 stream must pass, its deliberately broken copies (scalar loop,
  unprovable stride) must be rejected for narrow loads, a ``tl.dot`` kernel must show HGMMA and a
  kernel that only claims ``uses_dot`` must be rejected;
* the registered kernels themselves, compiled for sm_90 in every dtype and config they declare:
  no spills, 16-byte loads of the streamed tensors in bf16/fp16, tensor cores where ``tl.dot`` is
  used. A failing assertion prints the report row that broke.

The compiles run in a subprocess because this session sets ``TRITON_INTERPRET=1`` (conftest.py),
under which ``@triton.jit`` functions cannot be compiled for a GPU target.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import _sass
from kernels.registry import KernelSpec
from benchmarks.kernel_report import (
    WIDE_KINDS,
    KernelReport,
    ReportError,
    ReportRun,
    check,
    find_tools,
    report_subprocess,
)

PROBES = Path(__file__).with_name("kernel_report_probes.py")
HEADER = "| " + " | ".join(KernelReport.COLUMNS) + " |"


def _spec(name: str = "k", streamed: tuple[str, ...] = (), uses_dot: bool = False) -> KernelSpec:
    return KernelSpec(name, None, ("bf16",), lambda dtype: [], streamed=streamed, uses_dot=uses_dot)


def _failures(run: ReportRun, topic: str) -> list[str]:
    """'problem + report row' for every report whose check mentions ``topic``."""
    out = []
    for report in run.reports:
        for problem in check(report, run.specs[report.kernel]):
            if topic in problem:
                where = f"{report.kernel} {report.dtype} [{report.config}] sm_{report.arch}"
                out.append(f"{where}: {problem}\n{HEADER}\n{report.row()}")
    return out


# ----------------------------------------------------------------------------- parsers


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0140*/              @!P0 LDG.E.U16 R0, desc[UR4][R10.64] ;
        /*0150*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0160*/                   LDG.E.64 R4, desc[UR4][R2.64+0x10] ;
        /*0170*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR18][R24.64], P0 ;
        /*0180*/                   LDGSTS.E.LTC128B [R5+0x10], desc[UR18][R26.64] ;
        /*0190*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*01a0*/                   MUFU.EX2 R3, R3 ;
        /*01b0*/                   MUFU.RCP R4, R4 ;
        /*01c0*/                   MUFU.EX2 R5, R5 ;
        /*01d0*/                   STL [R1+0x4], R3 ;
        /*01e0*/                   LDL R3, [R1+0x4] ;
        /*01f0*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0200*/                   STG.E.128 desc[UR4][R4.64], R8 ;
        /*0210*/              @!P1 STG.E desc[UR4][R6.64], R0 ;
        /*0220*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R7 ;
        /*0230*/                   EXIT ;
"""


def test_sass_widths_and_counts():
    s = _sass.summarise_sass(SASS)
    assert s.loads == {128: 1, 64: 1, 16: 1}
    assert s.async_copies == {128: 1, 32: 1}  # "LTC128B" is a cache hint, not a width
    assert s.stores == {128: 1, 32: 1}
    assert s.tensor_core_ops == {"HGMMA": 1}
    assert s.mufu == {"EX2": 2, "RCP": 1}
    assert (s.spill_loads, s.spill_stores, s.tma_loads, s.atomics, s.instructions) == (1, 1, 1, 1, 17)
    with pytest.raises(ValueError, match="no instructions"):
        _sass.summarise_sass("not a listing")


def test_resource_usage_parsing():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function attention_pool_fwd:
  REG:160 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function spiller:
  REG:255 STACK:416 SHARED:0 LOCAL:8 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = _sass.parse_resource_usage(text)
    assert usage["attention_pool_fwd"] == _sass.ResourceUsage(regs=160, local_bytes=0, stack_bytes=0, shared_bytes=1024)
    assert usage["spiller"] == _sass.ResourceUsage(regs=255, local_bytes=8, stack_bytes=416, shared_bytes=0)
    with pytest.raises(ValueError, match="no 'Function"):
        _sass.parse_resource_usage("Resource usage:\n")


PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 2;
$L__BB0_1:
	add.s64 	%rd4, %rd5, %rd3;
	// begin inline asm
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	// end inline asm
	ld.global.b16 	%rs1, [%rd2];
	mov.b64 	%rd5, %rd1;
	cp.async.cg.shared.global [ %r6 + 0 ], [ %rd4 + 0 ], 0x10, %r7;
	@%p2 bra 	$L__BB0_1;
	st.global.v2.b32 [ %rd2 + 0 ], { %r2, %r3 };
	ret;
}
"""


def test_ptx_loads_are_attributed_to_their_pointer_argument():
    # %rd4 is computed from %rd5 *before* the mov that makes %rd5 a copy of param 0 (a loop-carried
    # register): the flow-insensitive fixed point must still attribute it to "x".
    acc = _sass.ptx_global_accesses(PTX, ["x", "w", "n", "out"], pointers={"x", "w", "out"})
    assert acc.loads == {"x": {"16B": 1, "cp.async 16B": 1}, "w": {"2B": 1}}
    assert acc.stores == {"w": {"8B": 1}}
    everything = _sass.ptx_global_accesses(PTX, ["x", "w", "n", "out"])
    assert everything.loads["n"] == {"16B": 1, "cp.async 16B": 1}  # the int offset flows in too


def test_occupancy_arithmetic():
    # The kernel: 160 regs x 32 threads = 5120 regs/warp -> 12 warps fit in 65536 -> 3 blocks of 4 warps.
    assert _sass.occupancy(160, 1024, 4, 90) == _sass.Occupancy(3, 12, "regs")
    # 32 regs: 64 warps by registers and by the warp limit alike.
    assert _sass.occupancy(32, 0, 4, 90) == _sass.Occupancy(16, 64, "regs+warps")
    # 100 KB of shared memory per block (+1 KB reserved): 2 blocks on sm_90 (228 KB), 1 on sm_80 (164 KB).
    assert _sass.occupancy(64, 100 * 1024, 4, 90) == _sass.Occupancy(2, 8, "smem")
    assert _sass.occupancy(64, 100 * 1024, 4, 80) == _sass.Occupancy(1, 4, "smem")
    # Register granularity: 33 regs -> 1056 -> 1280 per warp -> 51 warps -> 12 blocks of 4 warps.
    assert _sass.occupancy(33, 0, 4, 90).blocks_per_sm == 12
    assert _sass.occupancy(16, 0, 1, 90) == _sass.Occupancy(32, 32, "blocks")
    assert _sass.occupancy(64, 228 * 1024, 4, 90).blocks_per_sm == 0  # over the 227 KB per-block limit
    with pytest.raises(ValueError, match="arch"):
        _sass.occupancy(32, 0, 4, 75)


def test_check_rules_on_constructed_reports():
    clean = KernelReport("k", "bf16", "cfg", 90, num_warps=4, regs=64, blocks_per_sm=8, warps_per_sm=32,
                         arg_loads={"feats": {"16B": 8}, "w": {"8B": 1}}, tensor_core_ops={"HGMMA": 4})  # fmt: skip
    spec = _spec(streamed=("feats",), uses_dot=True)
    assert check(clean, spec) == []
    spilled = KernelReport(**{**clean.to_json(), "local_bytes": 416, "spill_instructions": 12})
    assert any(p.startswith("spills") for p in check(spilled, spec))
    narrow = KernelReport(**{**clean.to_json(), "arg_loads": {"feats": {"16B": 8, "2B": 1}}})
    assert any("'feats'" in p and "narrower than 16 bytes" in p for p in check(narrow, spec))
    assert check(narrow, spec, dtype="fp32") == []  # the width rule is for bf16/fp16 streams
    missing = KernelReport(**{**clean.to_json(), "arg_loads": {"w": {"16B": 1}}})
    assert any("no global load" in p for p in check(missing, spec))
    # Streamed outputs are checked through their stores.
    out_spec = _spec(streamed=("feats", "out"))
    wide_out = KernelReport(**{**clean.to_json(), "arg_stores": {"out": {"16B": 2}}})
    assert check(wide_out, out_spec) == []
    narrow_out = KernelReport(**{**clean.to_json(), "arg_stores": {"out": {"16B": 2, "4B": 1}}})
    assert any("'out'" in p and "1 of 3 global accesses narrower" in p for p in check(narrow_out, out_spec))
    no_tc = KernelReport(**{**clean.to_json(), "tensor_core_ops": {}})
    assert any("tensor-core" in p for p in check(no_tc, spec))
    broken = KernelReport("k", "bf16", "cfg", 90, error="CompilationError: at 3:4: bad")
    assert check(broken, spec) == ["compile failed: CompilationError: at 3:4: bad"]
    assert KernelReport.from_json(clean.to_json()) == clean


def test_missing_tools_fail_clearly(monkeypatch, tmp_path):
    import benchmarks.kernel_report as report

    monkeypatch.setattr(report, "_triton_bin_dir", lambda: tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TRITON_CUOBJDUMP_PATH", raising=False)
    with pytest.raises(ReportError, match="cuobjdump not found"):
        find_tools()


def test_unimportable_op_module_is_named(monkeypatch):
    import kernels
    from benchmarks.kernel_report import load_specs

    monkeypatch.setattr(kernels, "OP_MODULES", kernels.OP_MODULES + ("no_such_op",))
    with pytest.raises(ReportError, match="no_such_op"):
        load_specs()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs the interpreter on")
def test_interpreted_kernels_are_refused_in_process():
    import triton
    import triton.language as tl

    from benchmarks.kernel_report import compile_kernel
    from kernels.registry import CompileConfig

    @triton.jit
    def interpreted(x_ptr, N: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, N), 0.0)

    spec = KernelSpec("interpreted", interpreted, ("fp32",), lambda dtype: [])
    config = CompileConfig("N=16", {"x_ptr": "*fp32"}, {"N": 16})
    with pytest.raises(ReportError, match="report_subprocess"):
        compile_kernel(spec, config, 90)


# ----------------------------------------------------------------------------- probe kernels


@pytest.fixture(scope="module")
def probes() -> ReportRun:
    return report_subprocess(archs=(90,), modules=[str(PROBES)])


def _one(run: ReportRun, kernel: str, dtype: str = "bf16") -> KernelReport:
    rows = [r for r in run.reports if r.kernel == kernel and r.dtype == dtype]
    assert len(rows) == 1, [r.row() for r in run.reports]
    assert not rows[0].error, rows[0].error
    return rows[0]


@pytest.mark.slow
def test_probe_vectorised_stream_passes(probes):
    good = _one(probes, "probe_pool")
    assert check(good, probes.specs["probe_pool"]) == [], good.row()
    assert good.widest_load == 128 and set(good.loads) == {128}, good.row()
    assert set(good.arg_loads["x_ptr"]) <= WIDE_KINDS, good.row()
    assert good.regs > 0 and good.blocks_per_sm > 0 and good.local_bytes == 0, good.row()
    assert "stride_l" in good.hints, good.row()  # the int-divisibility hint was applied


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["probe_pool_scalar_loop", "probe_pool_strided"])
def test_probe_narrow_stream_is_rejected(probes, kernel):
    bad = _one(probes, kernel)
    problems = check(bad, probes.specs[kernel])
    assert any("'x_ptr'" in p and "narrower than 16 bytes" in p for p in problems), (problems, bad.row())
    assert bad.widest_load == 16 and "2B" in bad.arg_loads["x_ptr"], bad.row()


@pytest.mark.slow
def test_probe_tensor_core_rule(probes):
    mm = _one(probes, "probe_matmul")
    assert mm.tensor_core_ops.get("HGMMA", 0) > 0 and check(mm, probes.specs["probe_matmul"]) == [], mm.row()
    assert mm.async_copies.get(128, 0) > 0, mm.row()  # operands arrive by 16-byte cp.async
    fake = _one(probes, "probe_no_dot")
    assert any("tensor-core" in p for p in check(fake, probes.specs["probe_no_dot"])), fake.row()


@pytest.mark.slow
def test_inductor_gate_rejects_a_helper_called_through_its_module(probes):
    """The torch.compile gate: a kernel whose jit helper is reached as ``module.helper`` compiles
    on its own but not as Inductor re-emits it; the same kernel calling the helper by name passes."""
    by_name = [g for g in probes.gate if g.kernel == "probe_helper_by_name"]
    by_module = [g for g in probes.gate if g.kernel == "probe_helper_by_module"]
    assert {g.arch for g in by_name} == {g.arch for g in by_module} == {90, 80}, probes.gate
    assert all(not g.error for g in by_name), [g.error for g in by_name]
    assert by_module and all(g.error for g in by_module), by_module
    assert all("attention_common" in g.error for g in by_module), by_module[0].error
    original = _one(probes, "probe_helper_by_module", "fp32")  # the kernel itself compiles
    assert not original.error


# ----------------------------------------------------------------------------- registered kernels


@pytest.fixture(scope="module")
def registered() -> ReportRun:
    return report_subprocess(archs=(90,))


@pytest.mark.slow
def test_every_registered_kernel_compiles_for_sm90(registered):
    from kernels import all_kernels

    assert set(registered.specs) == set(all_kernels()), "the report must cover every registered kernel"
    assert registered.specs, "no kernels registered"
    for name, spec in registered.specs.items():
        for dtype in spec.dtypes:
            rows = [r for r in registered.reports if r.kernel == name and r.dtype == dtype]
            assert rows, f"{name} {dtype}: spec.configs({dtype!r}) gave no configuration to compile"
    failures = _failures(registered, "compile failed")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_every_registered_kernel_compiles_as_inductor_reemits_it(registered):
    """What ``torch.compile`` does with each kernel on a GPU, checked here for sm_90 and sm_80."""
    kernels = {g.kernel for g in registered.gate}
    assert kernels == set(registered.specs), "the gate must cover every registered kernel"
    assert {g.arch for g in registered.gate} == {90, 80}
    failures = [f"{g.kernel} {g.dtype} sm_{g.arch}: {g.error}" for g in registered.gate if g.error]
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_report_covers_every_autotune_candidate(registered):
    """Every kernel is autotuned over several candidates, and the report compiled each of them
    (the registry's configs are the launchers' candidates at the benchmark sizes)."""
    from kernels import all_kernels

    for name, spec in all_kernels().items():
        for dtype in spec.dtypes:
            labels = [c.label for c in spec.configs(dtype)]
            reported = [r.config for r in registered.reports if r.kernel == name and r.dtype == dtype]
            assert sorted(reported) == sorted(labels), f"{name} {dtype}"
            per_size: dict[str, int] = {}
            for label in labels:
                size = label.split(" grid=")[0]
                per_size[size] = per_size.get(size, 0) + 1
            assert min(per_size.values()) >= 2, f"{name} {dtype}: fewer than two autotune candidates {per_size}"


@pytest.mark.slow
def test_registered_kernels_do_not_spill(registered):
    failures = _failures(registered, "spills") + _failures(registered, "cannot launch")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_registered_half_precision_kernels_stream_with_16_byte_loads(registered):
    failures = _failures(registered, "streamed argument")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_registered_dot_kernels_use_tensor_cores(registered):
    failures = _failures(registered, "tensor-core")
    assert not failures, "\n\n".join(failures)


def test_autotune_report_finds_the_autotuners_launches_built():
    """``benchmarks.autotune_report`` lists the autotuner a launch built (kernels._utils.autotuned),
    under its registry name, and a kernel not launched as such."""
    import torch

    import kernels
    from benchmarks import autotune_report

    kernels.attention_pool(torch.randn(2, 49, 40), torch.randn(2, 49), None)
    report = autotune_report.collect()
    fwd = report["attention_pool_fwd"]
    assert fwd["autotuned"] and fwd["candidates"] >= 1, fwd
    assert set(report) >= {"attention_pool_bwd", "lstm_cell_fwd", "lstm_cell_bwd"}
    text = autotune_report.format_report(report)
    assert "attention_pool_fwd: autotuned over" in text
