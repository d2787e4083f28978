"""Ahead-of-time SASS report of every Triton kernel in ``kernels`` (no GPU needed).

    python -m benchmarks.kernel_report [--arch 90 80] [--out benchmarks/KERNELS.md] [--kernel NAME ...]
    python benchmarks/kernel_report.py ...          (the same, from a checkout)

Part of the repository's benchmark tooling, not of the shipped ``kernels`` package: it needs a
checkout (it writes ``benchmarks/KERNELS.md``, and its tests compile ``tests/`` probe kernels).

For every kernel in :func:`kernels.registry.all_kernels` (so a new kernel cannot be forgotten),
every dtype in ``spec.dtypes`` and every :class:`~kernels.registry.CompileConfig` of
``spec.configs(dtype)`` (every autotune candidate the launchers offer), the kernel is compiled with ``triton.compile`` for ``sm_90`` (H100/H200)
and ``sm_80`` (A100) on the CPU, and the cubin is read with the ``cuobjdump`` / ``nvdisasm`` that
ship inside the Triton wheel. Reported per kernel: registers, local memory (spills), shared
memory, global load/store widths (LDG/STG .128/.64/32/U16...), cp.async (LDGSTS) and TMA copies,
tensor-core (HGMMA/HMMA) and MUFU instructions, occupancy per SM, and per pointer argument the
widths of the PTX accesses made through it (see :mod:`benchmarks._sass`).

Specialisation. At launch, Triton's JIT specialises each argument on its value: pointers whose
address is a multiple of 16 and integers that are multiples of 16 get a ``tt.divisibility=16``
hint, integers equal to 1 become constants. Those hints decide whether loads vectorise (without
them a contiguous bf16 row is read with ``LDG.E.U16``), so the report applies the same rule:

* pointers: 16-byte aligned (PyTorch allocations are; a view at an odd offset would not be, and
  would get narrower loads at run time than reported here);
* integers: specialised from their value when the config provides one -- ``config.scalars``
  (``CompileConfig.scalars``, which the ops' registries fill) or ``spec.extra["scalars"]`` (a callable
  ``config -> dict[str, int]``, or a dict ``label -> dict[str, int]``); integers without a value
  get no hint, which is the conservative assumption.
The hints applied are shown per row (column "hints").

With ``TRITON_INTERPRET=1`` (the test session sets it) ``@triton.jit`` returns interpreter
functions that cannot be compiled for a GPU target, so :func:`report_subprocess` (and the CLI
itself, when started under the interpreter) run the compilation in a fresh Python process with
``TRITON_INTERPRET`` removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/kernel_report.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._sass import (  # noqa: E402
    ARCH_LIMITS,
    TMA,
    occupancy,
    parse_resource_usage,
    ptx_global_accesses,
    summarise_sass,
)
from kernels.registry import KERNELS, CompileConfig, KernelSpec  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = (90, 80)
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "KERNELS.md"
#: dtypes whose streamed arguments must be read 16 bytes at a time.
HALF_DTYPES = ("bf16", "fp16")
#: per-argument access kinds that count as wide (16-byte vector, 16-byte cp.async, TMA tiles).
WIDE_KINDS = frozenset({"16B", "cp.async 16B", TMA})
#: exit status of the CLI when no report can be made (kernel modules broken, tools missing, bad arguments).
EXIT_CANNOT_REPORT = 2


class ReportError(RuntimeError):
    """The report cannot be produced (tools missing, kernel modules broken, interpreter active)."""


# --------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tools:
    cuobjdump: str
    nvdisasm: str


def _triton_bin_dir() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"


def find_tools() -> Tools:
    """Locate ``cuobjdump`` and ``nvdisasm``: ``$TRITON_<TOOL>_PATH``, the Triton wheel, then ``$PATH``."""
    bin_dir = _triton_bin_dir()
    found: dict[str, str] = {}
    for tool in ("cuobjdump", "nvdisasm"):
        candidates = [os.environ.get(f"TRITON_{tool.upper()}_PATH", "")]
        if bin_dir is not None:
            candidates.append(str(bin_dir / tool))
        candidates.append(shutil.which(tool) or "")
        usable = [c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)]
        if not usable:
            raise ReportError(
                f"{tool} not found: looked at $TRITON_{tool.upper()}_PATH, {bin_dir}/{tool} (inside the "
                f"triton wheel) and $PATH. Install triton>=3.2 with its NVIDIA backend (the Linux x86-64 "
                f"wheel ships {tool}) or point $TRITON_{tool.upper()}_PATH at a CUDA toolkit's {tool}."
            )
        found[tool] = usable[0]
    return Tools(**found)


def _run_tool(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ReportError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr.strip()[:2000]}")
    return proc.stdout


def _tool_version(path: str) -> str:
    try:
        lines = _run_tool([path, "--version"]).strip().splitlines()
    except (ReportError, OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next((ln.strip() for ln in lines if "release" in ln), lines[-1].strip() if lines else "unknown")


# --------------------------------------------------------------------------- compiling


@dataclass
class CompiledArtifact:
    """What :func:`analyse` needs from one ``triton.compile`` result."""

    kernel: str
    dtype: str
    config: str  # CompileConfig.label
    arch: int
    num_warps: int
    num_stages: int
    function_name: str
    cubin: bytes
    ptx: str
    dynamic_shared: int  # Triton's metadata.shared, passed as dynamic shared memory at launch
    param_names: list[str]  # names of the PTX parameters <kernel>_param_<i>, in order
    pointer_args: list[str]
    hints: str
    compile_s: float


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _jit_function(spec: KernelSpec) -> Any:
    """The ``JITFunction`` behind ``spec.fn`` (unwrapping autotuner/heuristics wrappers)."""
    from triton.runtime.jit import JITFunction

    fn = spec.fn
    for _ in range(8):
        if isinstance(fn, JITFunction):
            return fn
        if type(fn).__name__ == "InterpretedFunction":
            raise ReportError(
                f"kernel {spec.name!r}: spec.fn is a Triton InterpretedFunction because TRITON_INTERPRET=1 "
                f"was set when triton was imported; it cannot be compiled for a GPU. Use "
                f"benchmarks.kernel_report.report_subprocess() or run `python -m benchmarks.kernel_report` (both compile in a "
                f"process without TRITON_INTERPRET)."
            )
        fn = getattr(fn, "fn", None)
    raise ReportError(f"kernel {spec.name!r}: spec.fn is {type(spec.fn).__name__}, not a @triton.jit function")


def scalar_values(spec: KernelSpec, config: CompileConfig) -> dict[str, int]:
    """Integer argument values the launcher passes for ``config`` (empty when not provided)."""
    values = getattr(config, "scalars", None)
    if values is None:
        source = spec.extra.get("scalars")
        if callable(source):
            values = source(config)
        elif isinstance(source, dict):
            values = source.get(config.label)
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(v, int) for v in values.values()):
        raise ValueError(
            f"kernel {spec.name!r} config {config.label!r}: scalars must be a dict[str, int], got {values!r}"
        )
    return dict(values)


@dataclass(frozen=True)
class Specialisation:
    """Arguments of one compilation, specialised the way Triton's JIT would at launch."""

    signature: dict[str, str]  # every argument; "constexpr" for constexprs
    constexprs: dict[str, Any]
    divisible: tuple[str, ...]  # tt.divisibility=16
    ones: tuple[str, ...]  # integers equal to 1 (constants)

    @property
    def hints(self) -> str:
        pointers = [n for n in self.divisible if self.signature[n].startswith("*")]
        ints = [n for n in self.divisible if not self.signature[n].startswith("*")]
        parts = []
        if pointers:
            parts.append("16B-aligned: " + ",".join(pointers))
        parts.append("ints %16: " + (",".join(ints) if ints else "none"))
        if self.ones:
            parts.append("=1: " + ",".join(self.ones))
        return "; ".join(parts)


def specialise(
    spec: KernelSpec, config: CompileConfig, arg_names: Sequence[str], params: Sequence[Any] = ()
) -> Specialisation:
    """Check ``config`` against the kernel's arguments and apply the JIT's specialisation rule."""
    where = f"kernel {spec.name!r} config {config.label!r}"
    known = set(arg_names)
    unknown = (set(config.signature) | set(config.constexprs)) - known
    if unknown:
        raise ValueError(f"{where}: {sorted(unknown)} are not arguments of {spec.name} {list(arg_names)}")
    both = set(config.signature) & set(config.constexprs)
    if both:
        raise ValueError(f"{where}: {sorted(both)} appear in both signature and constexprs")
    missing = [a for a in arg_names if a not in config.signature and a not in config.constexprs]
    if missing:
        raise ValueError(f"{where}: arguments {missing} are in neither signature nor constexprs")
    scalars = scalar_values(spec, config)
    signature: dict[str, str] = {}
    constexprs = dict(config.constexprs)
    divisible: list[str] = []
    ones: list[str] = []
    for i, name in enumerate(arg_names):
        if name in config.constexprs:
            signature[name] = "constexpr"
            continue
        ty = config.signature[name]
        signature[name] = ty
        param = params[i] if i < len(params) else None
        no_spec = bool(getattr(param, "do_not_specialize", False))
        no_align = bool(getattr(param, "do_not_specialize_on_alignment", False))
        if ty.startswith("*"):
            if not (no_spec or no_align):
                divisible.append(name)
        elif ty[:1] in ("i", "u") and ty not in ("i1", "u1") and name in scalars and not no_spec:  # not bools
            if scalars[name] == 1:
                ones.append(name)
            elif scalars[name] % 16 == 0 and not no_align:
                divisible.append(name)
    return Specialisation(signature, constexprs, tuple(divisible), tuple(ones))


def _ast_source(fn: Any, spec_: Specialisation) -> tuple[Any, list[str]]:
    """Build ``ASTSource`` for the installed Triton; also return the PTX parameter names.

    triton >= 3.3: ``ASTSource(fn, signature, constexprs={(index,): value}, attrs={(index,): [[
    "tt.divisibility", 16]]})`` with every argument in ``signature`` ("constexpr" for constexprs;
    integers equal to 1 become constexprs). triton 3.2: ``ASTSource(fn, signature, constants=
    {name: value}, attrs=AttrsDescriptor)`` with only the non-constexpr arguments in ``signature``.
    """
    from triton.compiler import ASTSource

    accepted = inspect.signature(ASTSource.__init__).parameters
    names = list(fn.arg_names)
    index = {n: i for i, n in enumerate(names)}
    if "constexprs" in accepted:
        signature = dict(spec_.signature)
        constexprs = {(index[k],): v for k, v in spec_.constexprs.items()}
        for name in spec_.ones:
            signature[name] = "constexpr"
            constexprs[(index[name],)] = 1
        attrs = {(index[n],): [["tt.divisibility", 16]] for n in spec_.divisible}
        params = [n for n in names if signature[n] != "constexpr"]
        return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), params
    if "constants" in accepted:
        from triton.backends.compiler import AttrsDescriptor

        signature = {n: t for n, t in spec_.signature.items() if t != "constexpr"}
        constants = dict(spec_.constexprs)
        constants.update({n: 1 for n in spec_.ones})
        hints = {index[n]: 16 for n in spec_.divisible}
        hints.update({index[n]: 1 for n in spec_.ones})
        attrs = AttrsDescriptor.from_hints(hints)
        params = [n for n in names if n in signature and n not in spec_.ones]
        return ASTSource(fn, signature, constants=constants, attrs=attrs), params
    import triton

    raise ReportError(
        f"triton {triton.__version__}: unsupported ASTSource{inspect.signature(ASTSource.__init__)}; need triton >= 3.2"
    )


def compile_kernel(spec: KernelSpec, config: CompileConfig, arch: int, dtype: str = "") -> CompiledArtifact:
    """Compile one kernel configuration for ``sm_<arch>`` without a GPU.

    Must run in a process where ``TRITON_INTERPRET`` was unset when triton was imported.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch: sm_{arch} is not supported; choose from {sorted(ARCH_LIMITS)}")
    fn = _jit_function(spec)
    spec_ = specialise(spec, config, list(fn.arg_names), list(getattr(fn, "params", [])))
    src, param_names = _ast_source(fn, spec_)
    runtime_types = [t for t in spec_.signature.values() if t != "constexpr"]
    if any(not t.startswith("*") and t[:1] not in ("i", "u", "f", "b") for t in runtime_types):
        # Tensor descriptors expand into several PTX parameters: positions no longer map to names.
        param_names = []
    start = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    elapsed = time.perf_counter() - start
    metadata = compiled.metadata
    return CompiledArtifact(
        kernel=spec.name,
        dtype=dtype,
        config=config.label,
        arch=arch,
        num_warps=int(getattr(metadata, "num_warps", config.num_warps)),
        num_stages=int(getattr(metadata, "num_stages", config.num_stages)),
        function_name=str(getattr(metadata, "name", fn.__name__)),
        cubin=compiled.asm["cubin"],
        ptx=compiled.asm["ptx"],
        dynamic_shared=int(getattr(metadata, "shared", 0) or 0),
        param_names=param_names,
        pointer_args=[n for n in param_names if spec_.signature[n].startswith("*")],
        hints=spec_.hints,
        compile_s=round(elapsed, 2),
    )


# --------------------------------------------------------------------------- torch.compile gate


def _inductor_preamble() -> str:
    """The imports Inductor writes above a user kernel it re-emits (torch version dependent)."""
    try:  # torch >= 2.8: a class method of the Triton kernel codegen
        from torch._inductor.codegen.triton import TritonKernel

        return TritonKernel.gen_common_triton_imports()
    except (ImportError, AttributeError):
        pass
    try:  # older torch: a module function
        from torch._inductor.codegen.triton import gen_common_triton_imports

        return gen_common_triton_imports()
    except ImportError:
        return "import triton\nimport triton.language as tl\n"


def inductor_source(spec: KernelSpec) -> str:
    """The module Inductor generates for ``spec``'s kernel when ``torch.compile`` meets its op:
    its common imports, then ``@triton.jit`` and the transitive closure of the kernel's source
    (``user_defined_triton_kernel_transitive_closure_source_code``): the kernel plus every jit
    function, constexpr and constant it reaches by *global name*. Anything it reaches another way
    (``module.helper(...)``) is missing there, which is the bug this gate exists to catch."""
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    closure = user_defined_triton_kernel_transitive_closure_source_code(_jit_function(spec))
    return f"{_inductor_preamble()}\n@triton.jit\n{closure}\n"


def inductor_reemitted(spec: KernelSpec, workdir: Path) -> KernelSpec:
    """``spec`` with ``fn`` replaced by the kernel loaded from :func:`inductor_source`, written to a
    file in ``workdir`` (Triton reads a jit function's source from its file) and imported alone."""
    fn = _jit_function(spec)
    source = inductor_source(spec)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    path = Path(workdir) / f"inductor_{spec.name}_{digest}.py"
    path.write_text(source, encoding="utf-8")
    module_name = f"_c2f_inductor_{spec.name}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ReportError(f"kernel {spec.name!r}: Inductor's re-emitted source ({path}) does not import: "
                          f"{type(exc).__name__}: {exc}") from exc
    reemitted = getattr(module, fn.__name__, None)
    if reemitted is None:
        raise ReportError(f"kernel {spec.name!r}: {fn.__name__} is missing from Inductor's re-emitted source ({path})")
    return dataclasses.replace(spec, fn=reemitted)


@dataclass
class GateResult:
    """One kernel compiled, from Inductor's re-emission, for one architecture."""

    kernel: str
    dtype: str
    config: str
    arch: int
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gate_summary(gate: Sequence[GateResult]) -> str:
    if not gate:
        return "torch.compile gate: not run"
    failed = sorted({(g.kernel, g.arch) for g in gate if g.error})
    archs = ", ".join(f"sm_{a}" for a in sorted({g.arch for g in gate}, reverse=True))
    kernels = len({g.kernel for g in gate})
    if not failed:
        return f"torch.compile gate: {kernels} kernels re-emitted as Inductor does compile for {archs}"
    return ("torch.compile gate: FAILED for " + ", ".join(f"{k} (sm_{a})" for k, a in failed)
            + f" of {kernels} kernels")


def inductor_gate(specs: dict[str, KernelSpec], archs: Iterable[int] = DEFAULT_ARCHS) -> list[GateResult]:
    """Re-emit every kernel the way Inductor does and compile it for every ``arch``: the first
    config of every dtype (the re-emission is the same for all configs; the per-config SASS checks
    run on the original kernels). A failure is a result with ``error``, never an exception, so one
    broken kernel does not hide the others."""
    if interpreter_active():
        raise ReportError("inductor_gate: TRITON_INTERPRET is set in this process; use report_subprocess()")
    results: list[GateResult] = []
    with tempfile.TemporaryDirectory(prefix="c2f_inductor_gate_") as tmp:
        for name, spec in specs.items():
            try:
                reemitted = inductor_reemitted(spec, Path(tmp))
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}".strip()[-1500:]
                results += [GateResult(name, dtype, "-", arch, text) for arch in archs for dtype in spec.dtypes]
                continue
            for dtype in spec.dtypes:
                configs = list(spec.configs(dtype))[:1]
                for arch in archs:
                    for config in configs:
                        try:
                            compile_kernel(reemitted, config, arch, dtype)
                            results.append(GateResult(name, dtype, config.label, arch))
                        except Exception as exc:
                            text = f"{type(exc).__name__}: {exc}".strip()[-1500:]
                            results.append(GateResult(name, dtype, config.label, arch, text))
    return results


# --------------------------------------------------------------------------- analysis


def _int_keys(table: dict) -> dict[int, int]:
    return {int(k): int(v) for k, v in table.items()}


def _fmt_widths(table: dict[int, int]) -> str:
    return " ".join(f"{w}b×{n}" for w, n in sorted(table.items(), reverse=True)) or "-"


def _fmt_kinds(table: dict[str, int]) -> str:
    return " ".join(f"{k}×{n}" for k, n in sorted(table.items())) or "-"


@dataclass
class KernelReport:
    """One compiled configuration: resources, SASS instruction counts, occupancy, per-arg access widths.

    Widths are in bits for SASS (``loads``/``stores``: LDG/STG width -> static instruction count;
    ``async_copies``: LDGSTS) and in PTX access kinds ("16B", "2B", "cp.async 16B", "TMA") for the
    per-argument tables ``arg_loads`` / ``arg_stores``.
    """

    kernel: str
    dtype: str
    config: str
    arch: int
    num_warps: int = 0
    num_stages: int = 0
    regs: int = 0
    local_bytes: int = 0  # local memory per thread, cuobjdump LOCAL + STACK (ptxas spills to the stack frame)
    stack_bytes: int = 0  # the STACK part of local_bytes
    shared_bytes: int = 0  # per block: static (cuobjdump SHARED) + dynamic (Triton metadata.shared)
    spill_instructions: int = 0  # LDL + STL in SASS
    loads: dict[int, int] = field(default_factory=dict)
    stores: dict[int, int] = field(default_factory=dict)
    async_copies: dict[int, int] = field(default_factory=dict)
    tma_loads: int = 0
    tma_stores: int = 0
    widest_load: int = 0  # bits, over LDG and LDGSTS
    widest_store: int = 0
    tensor_core_ops: dict[str, int] = field(default_factory=dict)
    mufu: dict[str, int] = field(default_factory=dict)
    atomics: int = 0
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy_limiter: str = ""
    arg_loads: dict[str, dict[str, int]] = field(default_factory=dict)
    arg_stores: dict[str, dict[str, int]] = field(default_factory=dict)
    hints: str = ""
    compile_s: float = 0.0
    error: str = ""

    @property
    def tensor_core_total(self) -> int:
        return sum(self.tensor_core_ops.values())

    @property
    def mufu_total(self) -> int:
        return sum(self.mufu.values())

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KernelReport":
        data = dict(data)
        for key in ("loads", "stores", "async_copies"):
            data[key] = _int_keys(data.get(key, {}))
        return cls(**data)

    COLUMNS = (
        "kernel", "dtype", "config", "sm", "warps/stages", "regs", "local B", "smem B",
        "blocks/SM (warps, limit)", "LDG widths", "STG widths", "LDGSTS / TMA", "tensor core",
        "MUFU", "PTX loads per pointer arg", "PTX stores per pointer arg", "hints",
    )  # fmt: skip

    def cells(self) -> list[str]:
        head = [self.kernel, self.dtype, self.config, f"sm_{self.arch}"]
        if self.error:
            return head + ["COMPILE ERROR: " + self.error.splitlines()[0][:200]] + [""] * (len(self.COLUMNS) - 5)
        copies = []
        if self.async_copies:
            copies.append("LDGSTS " + _fmt_widths(self.async_copies))
        if self.tma_loads or self.tma_stores:
            copies.append(f"UTMALDG×{self.tma_loads} UTMASTG×{self.tma_stores}")
        per_arg = "; ".join(f"{arg}: {_fmt_kinds(kinds)}" for arg, kinds in sorted(self.arg_loads.items()))
        per_arg_st = "; ".join(f"{arg}: {_fmt_kinds(kinds)}" for arg, kinds in sorted(self.arg_stores.items()))
        local = str(self.local_bytes) + (f" ({self.spill_instructions} LDL/STL)" if self.spill_instructions else "")
        return head + [
            f"{self.num_warps}/{self.num_stages}",
            str(self.regs),
            local,
            str(self.shared_bytes),
            f"{self.blocks_per_sm} ({self.warps_per_sm}, {self.occupancy_limiter})",
            _fmt_widths(self.loads),
            _fmt_widths(self.stores) + (f" +{self.atomics} atomics" if self.atomics else ""),
            " ".join(copies) or "-",
            _fmt_kinds(self.tensor_core_ops),
            _fmt_kinds(self.mufu),
            per_arg or "-",
            per_arg_st or "-",
            self.hints,
        ]

    def row(self) -> str:
        """This report as one Markdown table row (also what failing tests print)."""
        return "| " + " | ".join(c.replace("|", "/") for c in self.cells()) + " |"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "c2f_fast" / "kernel_report"


def _disassemble(compiled: CompiledArtifact, tools: Tools | None) -> tuple[str, str]:
    """``cuobjdump --dump-resource-usage`` and ``nvdisasm -c`` of the cubin.

    Disassembly costs about a second per kernel, so the outputs are cached by the cubin's hash
    (``~/.cache/c2f_fast/kernel_report``): a rerun with unchanged kernels, whose compilations come
    from Triton's own cache, then takes seconds.
    """
    digest = hashlib.sha256(compiled.cubin).hexdigest()
    cached = _cache_dir() / f"{digest}.json"
    try:
        data = json.loads(cached.read_text())
        return data["usage"], data["sass"]
    except (OSError, ValueError, KeyError):
        pass
    tools = tools or find_tools()
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        cubin = Path(tmp) / f"{compiled.function_name}.cubin"
        cubin.write_bytes(compiled.cubin)
        usage_text = _run_tool([tools.cuobjdump, "--dump-resource-usage", str(cubin)])
        sass_text = _run_tool([tools.nvdisasm, "-c", "-ndf", str(cubin)])
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"usage": usage_text, "sass": sass_text}))
        partial.replace(cached)
    except OSError:
        pass  # a read-only home only costs time
    return usage_text, sass_text


def analyse(compiled: CompiledArtifact, tools: Tools | None = None) -> KernelReport:
    """Read the cubin with cuobjdump / nvdisasm and the PTX, and fill a :class:`KernelReport`."""
    usage_text, sass_text = _disassemble(compiled, tools)
    usages = parse_resource_usage(usage_text)
    if compiled.function_name in usages:
        usage = usages[compiled.function_name]
    elif len(usages) == 1:
        usage = next(iter(usages.values()))
    else:
        raise ReportError(f"{compiled.kernel}: cuobjdump lists {sorted(usages)}, not {compiled.function_name!r}")
    sass = summarise_sass(sass_text)
    accesses = ptx_global_accesses(compiled.ptx, compiled.param_names, set(compiled.pointer_args))
    shared = usage.shared_bytes + compiled.dynamic_shared
    occ = occupancy(usage.regs, shared, compiled.num_warps, compiled.arch)
    return KernelReport(
        kernel=compiled.kernel,
        dtype=compiled.dtype,
        config=compiled.config,
        arch=compiled.arch,
        num_warps=compiled.num_warps,
        num_stages=compiled.num_stages,
        regs=usage.regs,
        local_bytes=usage.local_bytes + usage.stack_bytes,
        stack_bytes=usage.stack_bytes,
        shared_bytes=shared,
        spill_instructions=sass.spill_loads + sass.spill_stores,
        loads=sass.loads,
        stores=sass.stores,
        async_copies=sass.async_copies,
        tma_loads=sass.tma_loads,
        tma_stores=sass.tma_stores,
        widest_load=max([*sass.loads, *sass.async_copies], default=0),
        widest_store=max(sass.stores, default=0),
        tensor_core_ops=sass.tensor_core_ops,
        mufu=sass.mufu,
        atomics=sass.atomics,
        blocks_per_sm=occ.blocks_per_sm,
        warps_per_sm=occ.warps_per_sm,
        occupancy_limiter=occ.limiter,
        arg_loads=accesses.loads,
        arg_stores=accesses.stores,
        hints=compiled.hints,
        compile_s=compiled.compile_s,
    )


def _hint_note(report: KernelReport) -> str:
    if "ints %16: none" not in report.hints:
        return ""
    return (
        "; note: no integer argument was specialised because the config gives no values "
        "(CompileConfig.scalars / spec.extra['scalars']): sizes and strides that are multiples of 16 "
        "at run time, which Triton's JIT would mark divisible, were compiled as unknown here"
    )


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def check(report: KernelReport, spec: KernelSpec, dtype: str | None = None) -> list[str]:
    """Problems of one report (empty list = fine). The rules, enforced by the CI tests:

    1. it compiles;
    2. no local memory / spill instructions;
    3. it can launch (registers <= 255, shared memory within the per-block limit);
    4. in bf16/fp16, every global load and store through a pointer argument named in
       ``spec.streamed`` is 16 bytes wide (a 16-byte vector access, a 16-byte cp.async, or a TMA
       tile), and at least one access through it exists (a name that matches nothing is an error,
       not a pass). Accesses are attributed to arguments in PTX (see
       :func:`benchmarks._sass.ptx_global_accesses`); SASS widths are reported alongside. Every
       access, not "most": Triton masks tails per vector, so a correctly laid out stream has no
       reason for a single narrow access; one means a layout that gives each thread fewer than
       16 contiguous bytes or a missing alignment/divisibility hint, and inside a loop it costs
       the bandwidth the kernel exists for;
    5. with ``spec.uses_dot``, bf16/fp16 kernels contain tensor-core instructions (HGMMA/HMMA).
    """
    dtype = dtype or report.dtype
    problems: list[str] = []
    if report.error:
        return [f"compile failed: {report.error.strip().splitlines()[-1][:300] if report.error.strip() else '?'}"]
    if report.local_bytes or report.spill_instructions:
        problems.append(
            f"spills: {report.local_bytes} B local memory per thread, {report.spill_instructions} LDL/STL "
            f"instructions ({report.regs} registers)" + _hint_note(report)
        )
    if report.blocks_per_sm == 0:
        problems.append(f"cannot launch: {report.occupancy_limiter}")
    if dtype in HALF_DTYPES:
        for arg in spec.streamed:
            kinds = _merge(report.arg_loads.get(arg, {}), report.arg_stores.get(arg, {}))
            if not kinds:
                problems.append(
                    f"streamed argument {arg!r}: no global load or store through it found in the PTX "
                    f"(pointer args accessed: {sorted(set(report.arg_loads) | set(report.arg_stores))})"
                )
                continue
            narrow = {k: n for k, n in kinds.items() if k not in WIDE_KINDS}
            if narrow:
                problems.append(
                    f"streamed argument {arg!r}: {sum(narrow.values())} of {sum(kinds.values())} global accesses "
                    f"narrower than 16 bytes ({_fmt_kinds(narrow)}); SASS LDG {_fmt_widths(report.loads)}, "
                    f"STG {_fmt_widths(report.stores)}"
                    + _hint_note(report)
                )
    if spec.uses_dot and dtype in HALF_DTYPES and report.tensor_core_total == 0:
        problems.append(f"uses tl.dot but the sm_{report.arch} SASS has no tensor-core instruction (HGMMA/HMMA)")
    return problems


# --------------------------------------------------------------------------- running many


def load_specs(modules: Sequence[str] = (), names: Sequence[str] | None = None) -> dict[str, KernelSpec]:
    """Registered kernels: all of them, or those registered by ``modules`` (dotted names or .py files).

    Raises :class:`ReportError` naming the module when ``all_kernels()`` cannot import one.
    """
    if modules:
        wanted: set[str] = set()
        for module in modules:
            wanted.add(_import_module(module))
        specs = {n: s for n, s in KERNELS.items() if _fn_module(s) in wanted}
    else:
        from kernels import OP_MODULES
        from kernels.registry import all_kernels

        try:
            specs = all_kernels()
        except ImportError as exc:
            raise ReportError(
                f"kernels.registry.all_kernels() failed: {type(exc).__name__}: {exc}. Every module in "
                f"kernels.OP_MODULES {OP_MODULES} must import and register its kernels."
            ) from exc
    if names:
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ValueError(f"--kernel: unknown kernel(s) {unknown}; registered: {sorted(specs)}")
        specs = {n: specs[n] for n in names}
    return specs


def _fn_module(spec: KernelSpec) -> str | None:
    fn = spec.fn
    for _ in range(8):
        module = getattr(fn, "__module__", None)
        if module and not module.startswith("triton"):
            return module
        fn = getattr(fn, "fn", None)
        if fn is None:
            return None
    return None


def _import_module(module: str) -> str:
    """Import a dotted module or a ``.py`` file; return its module name."""
    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise ValueError(f"--module: {module} does not exist")
        name = f"_kernel_report_{path.stem}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        return name
    importlib.import_module(module)
    return module


_SPECS: dict[str, KernelSpec] = {}


def _compile_key(spec: KernelSpec, config: CompileConfig, arch: int) -> str:
    """Everything that determines the compiled code of one job (not the label)."""
    try:
        fn = _jit_function(spec)
        spec_ = specialise(spec, config, list(fn.arg_names), list(getattr(fn, "params", [])))
        what: Any = (sorted(spec_.signature.items()), spec_.divisible, spec_.ones)
    except Exception:  # reported by the job itself
        what = config.label
    constexprs = sorted(config.constexprs.items(), key=str)
    return repr((spec.name, arch, what, constexprs, config.num_warps, config.num_stages))


def _run_job(job: tuple[str, str, CompileConfig, int]) -> KernelReport:
    name, dtype, config, arch = job
    try:
        return analyse(compile_kernel(_SPECS[name], config, arch, dtype))
    except Exception as exc:  # one broken config must not hide the others
        text = f"{type(exc).__name__}: {exc}".strip()
        return KernelReport(name, dtype, config.label, arch, config.num_warps, config.num_stages, error=text[-1500:])


def run_report(specs: dict[str, KernelSpec], archs: Iterable[int] = DEFAULT_ARCHS, jobs: int = 1) -> list[KernelReport]:
    """Compile and analyse every (kernel, dtype, config, arch); failures become reports with ``error``."""
    if interpreter_active():
        raise ReportError("run_report: TRITON_INTERPRET is set in this process; use report_subprocess()")
    archs = list(archs)
    for arch in archs:
        if arch not in ARCH_LIMITS:
            raise ValueError(f"arch: sm_{arch} is not supported; choose from {sorted(ARCH_LIMITS)}")
    find_tools()  # fail early and clearly
    work: list[tuple[str, str, CompileConfig, int]] = []
    reports: list[KernelReport | None] = []
    for name, spec in specs.items():
        for dtype in spec.dtypes:
            try:
                configs = list(spec.configs(dtype))
            except Exception as exc:
                for arch in archs:
                    reports.append(KernelReport(name, dtype, "?", arch, error=f"spec.configs({dtype!r}): {exc}"))
                continue
            if not configs:
                for arch in archs:
                    reports.append(KernelReport(name, dtype, "?", arch, error=f"spec.configs({dtype!r}) is empty"))
            for arch in archs:
                for config in configs:
                    work.append((name, dtype, config, arch))
                    reports.append(None)
    _SPECS.clear()
    _SPECS.update(specs)
    # Configs that differ only in label (e.g. L=196 and L=784 when L is a runtime integer with no
    # value given) are the same compilation: compile once, report under each label.
    unique: dict[str, int] = {}
    first_of: list[int] = []
    for job in work:
        first_of.append(unique.setdefault(_compile_key(specs[job[0]], job[2], job[3]), len(unique)))
    distinct = [work[first_of.index(i)] for i in range(len(unique))]
    if jobs > 1 and len(distinct) > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: the workers inherit the imported kernel modules (spawn would re-import them under
        # whatever module names the parent used, which fails for probe files).
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            compiled = list(pool.map(_run_job, distinct, chunksize=1))
    else:
        compiled = [_run_job(job) for job in distinct]
    done = [dataclasses.replace(compiled[i], config=job[2].label) for i, job in zip(first_of, work)]
    it = iter(done)
    result = [r if r is not None else next(it) for r in reports]
    order = {a: i for i, a in enumerate(archs)}
    return sorted(result, key=lambda r: order.get(r.arch, 99))


@dataclass
class ReportRun:
    """Result of :func:`report_subprocess`. ``specs`` are copies of the registered specs without
    ``fn``/``configs`` (enough for :func:`check`), so nothing is registered in the calling process."""

    reports: list[KernelReport]
    specs: dict[str, KernelSpec]
    wall_s: float
    triton_version: str
    gate: list[GateResult] = field(default_factory=list)


def _spec_json(spec: KernelSpec) -> dict[str, Any]:
    return {
        "dtypes": list(spec.dtypes), "streamed": list(spec.streamed), "uses_dot": spec.uses_dot, "notes": spec.notes
    }


def _spec_from_json(name: str, data: dict[str, Any]) -> KernelSpec:
    return KernelSpec(
        name=name, fn=None, dtypes=tuple(data["dtypes"]), configs=lambda dtype: [], streamed=tuple(data["streamed"]),
        uses_dot=bool(data["uses_dot"]), notes=data.get("notes", ""),
    )  # fmt: skip


def report_subprocess(
    archs: Iterable[int] = (90,),
    modules: Sequence[str] = (),
    kernels: Sequence[str] | None = None,
    jobs: int | None = None,
    timeout: float = 600,
    inductor_archs: Iterable[int] = DEFAULT_ARCHS,
) -> ReportRun:
    """:func:`run_report` in a fresh interpreter without ``TRITON_INTERPRET`` (safe from the tests).

    Raises :class:`ReportError` with the child's stderr when it fails (e.g. a kernel module does
    not import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "benchmarks.kernel_report", "--no-write", "--quiet", "--json", str(out), "--arch"]
        cmd += [str(a) for a in archs]
        for module in modules:
            cmd += ["--module", str(module)]
        for name in kernels or ():
            cmd += ["--kernel", name]
        if jobs is not None:
            cmd += ["--jobs", str(jobs)]
        inductor_archs = list(inductor_archs)
        cmd += ["--inductor-arch", *map(str, inductor_archs)] if inductor_archs else ["--no-inductor"]
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        # exit 1 with a JSON file: some kernel failed; the caller reads which from the reports
        if proc.returncode not in (0, 1) or not out.is_file():
            raise ReportError(
                f"`{' '.join(cmd)}` exited {proc.returncode}:\n"
                f"{proc.stderr.strip()[-3000:]}\n{proc.stdout.strip()[-1000:]}"
            )
        data = json.loads(out.read_text())
    return ReportRun(
        reports=[KernelReport.from_json(d) for d in data["reports"]],
        specs={n: _spec_from_json(n, d) for n, d in data["specs"].items()},
        wall_s=float(data["wall_s"]),
        triton_version=str(data["triton_version"]),
        gate=[GateResult(**g) for g in data.get("gate", [])],
    )


# --------------------------------------------------------------------------- output


def format_table(reports: Sequence[KernelReport]) -> str:
    header = "| " + " | ".join(KernelReport.COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in KernelReport.COLUMNS) + "|"
    return "\n".join([header, rule, *(r.row() for r in reports)])


def problems_of(reports: Sequence[KernelReport], specs: dict[str, KernelSpec]) -> list[tuple[KernelReport, str]]:
    return [(r, p) for r in reports if r.kernel in specs for p in check(r, specs[r.kernel])]


def render_markdown(
    reports: Sequence[KernelReport],
    specs: dict[str, KernelSpec],
    archs: Sequence[int],
    wall_s: float,
    jobs: int,
    argv: Sequence[str],
    gate: Sequence[GateResult] = (),
) -> str:
    import triton

    tools = find_tools()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    problems = problems_of(reports, specs)
    lines = [
        "# Triton kernels: registers, spills, load widths, occupancy (SASS, compiled ahead of time)",
        "",
        f"Generated {now} by `{' '.join(['python -m benchmarks.kernel_report', *argv])}` — do not edit by hand.",
        "",
        f"- triton {triton.__version__}, cuobjdump/nvdisasm from {_tool_version(tools.cuobjdump)}; "
        f"Python {platform.python_version()}",
        f"- compiled on a machine without a GPU for {', '.join(ARCH_LIMITS[a].name for a in archs)}; "
        f"{len(reports)} kernel configurations in {wall_s:.1f} s wall, process start to table, imports included "
        f"({jobs} worker processes, {os.cpu_count()} CPUs; compilations come from Triton's cache ~/.triton/cache and "
        "disassemblies from ~/.cache/c2f_fast/kernel_report when the kernels are unchanged)",
        "- kernels: " + ", ".join(f"`{n}` ({', '.join(s.dtypes)}; streamed: {', '.join(s.streamed) or '-'}"
                                  f"{'; tl.dot' if s.uses_dot else ''})" for n, s in specs.items()),
        "",
        "Regenerate: `python -m benchmarks.kernel_report` (all kernels, sm_90 and sm_80, writes this file); "
        "`python -m benchmarks.kernel_report --arch 90 --kernel NAME --no-write` to look at one kernel. "
        "The checks below run in CI as `python -m pytest tests/test_kernel_report.py`.",
        "",
        "## Columns",
        "",
        "- **regs**: registers per thread; **local B**: local memory per thread (register spills); "
        "**smem B**: shared memory per block, static (cuobjdump) + dynamic (Triton `metadata.shared`). "
        "From `cuobjdump --dump-resource-usage`.",
        "- **blocks/SM (warps, limit)**: resident blocks and warps per SM allowed by registers (65536/SM, "
        "allocated per warp in units of 256), shared memory (228 KB/SM, 227 KB per block on sm_90; 164/163 KB "
        "on sm_80; plus the driver's 1 KB per block), warps (64/SM) and blocks (32/SM); `limit` names the binding one.",
        "- **LDG / STG widths**: static count of global load / store instructions per width in bits in the "
        "`nvdisasm` SASS (128b = `LDG.E.128`, 16b = `LDG.E.U16`, ...); an instruction inside a loop counts once. "
        "**LDGSTS / TMA**: cp.async (`LDGSTS`) and TMA (`UTMALDG`/`UTMASTG`) copies, also wide loads.",
        "- **tensor core**: HGMMA (sm_90 wgmma) / HMMA (mma.sync) instructions; **MUFU**: special-function unit "
        "instructions (EX2 = exp2, RCP = 1/x, ...).",
        "- **PTX loads / stores per pointer arg**: the global accesses attributed to each pointer argument by "
        "following PTX registers back to `ld.param` (bytes per thread per instruction × static count; "
        "`cp.async 16B`, `TMA`). ptxas keeps the width (`ld.global.v4.b32` → `LDG.E.128`) but may unroll, "
        "so counts can differ from the SASS columns.",
        "- **hints**: the specialisation Triton's JIT applies at launch and this report reproduces: pointers "
        "16-byte aligned; integer arguments that are multiples of 16 get `tt.divisibility=16` only when the "
        "config supplies their value (`ints %16: none` = no value given, the conservative case).",
        "",
        "## Checks (enforced by `tests/test_kernel_report.py`)",
        "",
        "1. every kernel compiles for sm_90 in every dtype it supports; 2. no local memory / LDL/STL (no spills); "
        "3. it can launch; 4. in bf16/fp16, **every** global load and store through an argument in `spec.streamed` "
        "is 16 bytes wide (vector access, 16-byte cp.async, or TMA), and at least one access through it exists "
        "(attributed in PTX, see the column above); 5. kernels with `tl.dot` contain HGMMA/HMMA in bf16/fp16. "
        "The rows are also checked for sm_80 here; CI compiles sm_90 only.",
        "",
    ]
    from kernels import _attention_common as attention

    # the op modules (``kernels.attention_pool`` etc. are the ops' functions at package level)
    additive_op = importlib.import_module("kernels.additive_attention")
    pool_op = importlib.import_module("kernels.attention_pool")

    from .dfeats_accumulation import traffic_bytes

    per_step_bytes, batched_bytes = traffic_bytes(256, 784, 512, 5, 2)
    lines += [
        "## Autotuning, launch shapes, known costs",
        "",
        "- Every kernel is `@triton.autotune`d (through `kernels._utils.launch`): each row is one candidate "
        "(config column: tuned tile sizes, `w` warps, `s` stages; the first per kernel/size is the default, "
        "the one the CPU interpreter runs). Grids and partial buffers are fixed by the host, so every "
        "candidate computes the same thing and autotuning (which runs each candidate once per key: the "
        "problem sizes and dtypes) only picks speed.",
        f"- Split launches aim for `{attention.WAVES} waves x {attention.NUM_SMS} SMs x resident programs per "
        f"SM` programs, the resident count taken from this table (additive attention: "
        f"{additive_op.RESIDENT_PER_SM}/SM; attention pool: {pool_op.RESIDENT_PER_SM}/SM).",
        "- Stages: the attention loops do not feed `tl.dot`, and Triton does not software-pipeline their "
        "loads (no LDGSTS): their `s2` rows compile to the same registers and instructions as `s1`. The "
        "LSTM forward (`tl.dot`) pipelines with cp.async; its stages change shared memory and occupancy.",
        "- Sizes are specialised (a new B is a new launch configuration and, under `torch.compile`, a "
        "recompilation): the training engine keeps B static (see `kernels/_utils.py`).",
        "- Not in this table: the decoder's per-step dense `dfeats` terms (one `[B, L, D]` write per "
        f"step, summed by autograd) move ~{per_step_bytes / 1e9:.1f} GB per iteration at B=256, L=784, D=512, "
        f"T=5 (bf16) where one batched product would move ~{batched_bytes / 1e9:.1f} GB; why they stay per step, "
        "and the measurement: "
        "`python -m benchmarks.dfeats_accumulation` and `kernels/additive_attention.py`.",
        "",
    ]
    for arch in archs:
        rows = [r for r in reports if r.arch == arch]
        lines += [f"## {ARCH_LIMITS[arch].name}", "", format_table(rows), ""]
    lines += ["## torch.compile gate (Inductor's re-emission of each kernel)", "",
              "When `torch.compile` meets a kernel's op, Inductor re-emits the kernel's source with the jit "
              "functions it reaches by global name (`user_defined_triton_kernel_transitive_closure_source_code`). "
              "Each kernel is re-emitted that way and compiled here; a helper called through a module "
              "attribute fails this gate.", "", gate_summary(gate), ""]
    lines += [f"- `{g.kernel}` {g.dtype} sm_{g.arch}: {g.error.splitlines()[-1] if g.error else ''}"
              for g in gate if g.error]
    lines += ["## Problems", ""]
    if problems:
        lines += [f"- `{r.kernel}` {r.dtype} `{r.config}` sm_{r.arch}: {p}" for r, p in problems]
    else:
        lines.append("None: every configuration passes the checks above.")
    return "\n".join(lines) + "\n"


def _process_wall_s(fallback_start: float) -> float:
    """Seconds since this process started (includes importing torch/triton), Linux; else since main()."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - fallback_start


def _rerun_without_interpreter(argv: Sequence[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.call([sys.executable, "-m", "benchmarks.kernel_report", *argv], env=env, cwd=REPO_ROOT)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="SM versions (90 80)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report to write")
    parser.add_argument("--no-write", action="store_true", help="do not write --out")
    parser.add_argument("--json", type=Path, help="also write the reports as JSON here")
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    parser.add_argument("--module", action="append", default=[],
                        help="report only the kernels this module (dotted name or .py file) registers")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.add_argument("--inductor-arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="SM versions for the torch.compile gate: every kernel re-emitted as Inductor "
                             "does and compiled (default: 90 80)")  # fmt: skip
    parser.add_argument("--no-inductor", action="store_true", help="skip the torch.compile gate")
    args = parser.parse_args(argv)
    if interpreter_active():
        return _rerun_without_interpreter(argv)
    start = time.perf_counter()
    try:
        specs = load_specs(args.module, args.kernel)
        reports = run_report(specs, args.arch, max(1, args.jobs))
        gate = [] if args.no_inductor else inductor_gate(specs, args.inductor_arch)
    except (ReportError, ValueError) as exc:
        print(f"benchmarks.kernel_report: {exc}", file=sys.stderr)
        return EXIT_CANNOT_REPORT
    wall = _process_wall_s(start)
    problems = problems_of(reports, specs)
    if args.json:
        import triton

        payload = {
            "wall_s": wall,
            "triton_version": triton.__version__,
            "specs": {n: _spec_json(s) for n, s in specs.items()},
            "reports": [r.to_json() for r in reports],
            "gate": [g.to_json() for g in gate],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    if not args.quiet:
        for arch in args.arch:
            print(f"\n{ARCH_LIMITS[arch].name}\n")
            print(format_table([r for r in reports if r.arch == arch]))
        print()
        for r, p in problems:
            print(f"PROBLEM {r.kernel} {r.dtype} [{r.config}] sm_{r.arch}: {p}")
        print(gate_summary(gate))
        print(f"{len(reports)} configurations in {wall:.1f} s wall since the process started ({args.jobs} jobs)")
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_markdown(reports, specs, args.arch, wall, args.jobs, argv, gate))
        if not args.quiet:
            print(f"wrote {args.out}")
    if any(r.error for r in reports) or any(g.error for g in gate) or (args.strict and problems):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
