"""Text parsers behind ``benchmarks.kernel_report``: cuobjdump resource usage, SASS, PTX, and occupancy.

Everything here works on strings, so it is unit-tested without Triton, a GPU or the CUDA tools.

* :func:`parse_resource_usage` reads ``cuobjdump --dump-resource-usage`` (registers, local memory
  = spills, static shared memory).
* :func:`summarise_sass` counts the SASS instructions the report is about (global load / store
  widths, cp.async and TMA copies, tensor-core and MUFU instructions, spill traffic, atomics).
* :func:`ptx_global_accesses` attributes every global memory access in the PTX to the kernel
  pointer argument(s) its address is computed from. SASS has lost the argument names (addresses
  live in anonymous registers), PTX still loads each argument with ``ld.param`` from
  ``<kernel>_param_<i>``, so a def-use walk over PTX registers maps each access to its argument.
  ptxas turns ``ld.global.v4.b32`` into ``LDG.E.128`` one for one, so the widths agree with SASS.
* :func:`occupancy` turns registers / shared memory / warps into blocks and warps per SM.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- resource usage

_FUNCTION_RE = re.compile(r"^\s*Function\s+([^\s:]+)\s*:\s*$")
_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


@dataclass(frozen=True)
class ResourceUsage:
    """Per-function numbers from ``cuobjdump --dump-resource-usage`` (bytes, per thread for LOCAL)."""

    regs: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int


def parse_resource_usage(text: str) -> dict[str, ResourceUsage]:
    """Map each function in a ``cuobjdump --dump-resource-usage`` listing to its resources.

    The listing reads ``Function NAME:`` followed by a line ``REG:160 STACK:0 SHARED:1024 LOCAL:0 ...``.
    """
    result: dict[str, ResourceUsage] = {}
    current: str | None = None
    for line in text.splitlines():
        match = _FUNCTION_RE.match(line)
        if match:
            current = match.group(1)
            continue
        if current is None or "REG:" not in line:
            continue
        fields = dict(_FIELD_RE.findall(line))
        result[current] = ResourceUsage(
            regs=int(fields.get("REG", 0)),
            local_bytes=int(fields.get("LOCAL", 0)),
            stack_bytes=int(fields.get("STACK", 0)),
            shared_bytes=int(fields.get("SHARED", 0)),
        )
        current = None
    if not result:
        raise ValueError("cuobjdump resource usage: no 'Function NAME:' / 'REG:' lines found in:\n" + text[:2000])
    return result


# --------------------------------------------------------------------------- SASS

# "/*0140*/   @!P0 LDG.E.U16 R0, desc[UR4][R10.64] ;"  (nvdisasm -c and cuobjdump -sass alike)
_SASS_RE = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:\{\s*)?(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")

#: Size modifiers of LDG / STG / LDGSTS; no modifier means 32 bits. ("LTC128B" is a cache hint,
#: not a size, which is why modifiers are matched whole.)
_SIZE_MODIFIERS = {"128": 128, "64": 64, "32": 32, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
_TENSOR_CORE_OPS = ("HGMMA", "HMMA", "QGMMA", "IGMMA", "IMMA", "BGMMA", "DMMA")
_TMA_LOAD_OPS = ("UTMALDG", "UBLKCP")
_TMA_STORE_OPS = ("UTMASTG", "UTMAREDG")
_GLOBAL_ATOMIC_OPS = ("ATOMG", "RED", "REDG")


def access_bits(opcode: str) -> int:
    """Width in bits of a global load / store opcode such as ``LDG.E.128.CONSTANT`` (32 by default)."""
    widths = [_SIZE_MODIFIERS[m] for m in opcode.split(".")[1:] if m in _SIZE_MODIFIERS]
    return widths[-1] if widths else 32


@dataclass
class SassSummary:
    """Instruction counts of one kernel's SASS (static counts: an instruction in a loop counts once)."""

    loads: dict[int, int] = field(default_factory=dict)  # LDG width in bits -> count
    stores: dict[int, int] = field(default_factory=dict)  # STG width in bits -> count
    async_copies: dict[int, int] = field(default_factory=dict)  # LDGSTS (cp.async) width -> count
    tma_loads: int = 0  # UTMALDG / UBLKCP
    tma_stores: int = 0  # UTMASTG / UTMAREDG
    tensor_core_ops: dict[str, int] = field(default_factory=dict)  # e.g. {"HGMMA": 8}
    mufu: dict[str, int] = field(default_factory=dict)  # e.g. {"EX2": 9, "RCP": 1}
    spill_loads: int = 0  # LDL
    spill_stores: int = 0  # STL
    atomics: int = 0  # ATOMG / RED(G)
    instructions: int = 0


def summarise_sass(text: str) -> SassSummary:
    """Count the instructions of interest in a SASS listing (``nvdisasm -c`` or ``cuobjdump -sass``)."""
    loads: Counter[int] = Counter()
    stores: Counter[int] = Counter()
    copies: Counter[int] = Counter()
    tensor: Counter[str] = Counter()
    mufu: Counter[str] = Counter()
    summary = SassSummary()
    for line in text.splitlines():
        match = _SASS_RE.match(line)
        if not match:
            continue
        opcode = match.group(1)
        base = opcode.split(".", 1)[0]
        summary.instructions += 1
        if base == "LDG":
            loads[access_bits(opcode)] += 1
        elif base == "STG":
            stores[access_bits(opcode)] += 1
        elif base == "LDGSTS":
            copies[access_bits(opcode)] += 1
        elif base in _TMA_LOAD_OPS:
            summary.tma_loads += 1
        elif base in _TMA_STORE_OPS:
            summary.tma_stores += 1
        elif base in _TENSOR_CORE_OPS:
            tensor[base] += 1
        elif base == "MUFU":
            parts = opcode.split(".")
            mufu[parts[1] if len(parts) > 1 else "?"] += 1
        elif base == "LDL":
            summary.spill_loads += 1
        elif base == "STL":
            summary.spill_stores += 1
        elif base in _GLOBAL_ATOMIC_OPS:
            summary.atomics += 1
    if summary.instructions == 0:
        raise ValueError("SASS listing has no instructions (is this nvdisasm/cuobjdump output?):\n" + text[:2000])
    summary.loads = dict(sorted(loads.items(), reverse=True))
    summary.stores = dict(sorted(stores.items(), reverse=True))
    summary.async_copies = dict(sorted(copies.items(), reverse=True))
    summary.tensor_core_ops = dict(tensor)
    summary.mufu = dict(mufu)
    return summary


# --------------------------------------------------------------------------- PTX

_PARAM_RE = re.compile(r"\[\s*([\w$]+)_param_(\d+)\s*\]")
_REG_RE = re.compile(r"%[A-Za-z_][\w]*")
_LABEL_RE = re.compile(r"^[\w$]+:\s*")
_VEC_RE = re.compile(r"\.v(\d+)\b")
_TYPE_RE = re.compile(r"\.[bsuf](\d+)\b")

#: Instructions whose results are not addresses (loaded data, shuffles, ...) or that have none.
_NO_POINTER_RESULT = ("ld.", "atom.", "st.", "red.", "cp.", "bra", "bar", "call", "ret", "tex", "shfl", "vote")

#: Access kinds used as keys of the per-argument histograms.
TMA = "TMA"


def _split_operands(text: str) -> list[str]:
    """Split ``a, {b, c}, [d + 0]`` at top-level commas."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail:
        parts.append(tail)
    return parts


def _ptx_statements(ptx: str) -> list[tuple[str, list[str]]]:
    """(opcode, operands) of every PTX instruction; directives, labels and scope braces dropped."""
    statements = []
    for raw_line in ptx.splitlines():
        line = raw_line.split("//", 1)[0]
        for stmt in line.split(";"):
            stmt = stmt.strip().lstrip("{}").strip()
            stmt = _LABEL_RE.sub("", stmt)
            if not stmt or stmt.startswith(".") or stmt.startswith("}"):
                continue
            words = stmt.split(None, 1)
            if words[0].startswith("@"):  # predicate guard "@%p1" / "@!%p1"
                words = words[1].split(None, 1) if len(words) > 1 else []
            if not words:
                continue
            statements.append((words[0], _split_operands(words[1]) if len(words) > 1 else []))
    return statements


def _access_bytes(opcode: str) -> int:
    """Bytes moved by ``ld.global.v4.b32`` (16), ``ld.global.b16`` (2), ..."""
    vec = _VEC_RE.search(opcode)
    types = _TYPE_RE.findall(opcode)
    if not types:
        raise ValueError(f"PTX access {opcode!r}: no element type")
    return (int(vec.group(1)) if vec else 1) * int(types[-1]) // 8


def _access_kind(opcode: str, operands: list[str]) -> str | None:
    """Histogram key of a global memory access, or None when ``opcode`` is not one."""
    if opcode.startswith("cp.async.bulk"):  # TMA / bulk copies: whole tiles per instruction
        return TMA
    if opcode.startswith("cp.async") and ".global" in opcode:
        size = operands[2] if len(operands) > 2 else "?"
        try:
            return f"cp.async {int(size, 0)}B"
        except ValueError:
            return f"cp.async {size}"
    if opcode.startswith(("ld.global", "st.global", "atom.global", "red.global")):
        return f"{_access_bytes(opcode)}B"
    return None


@dataclass
class PtxAccesses:
    """Global accesses of one kernel's PTX, per kernel argument: arg -> {kind: count}.

    Kinds are ``"16B"``, ``"8B"``, ``"2B"``, ... for ld/st, ``"cp.async 16B"`` for cp.async and
    ``"TMA"`` for bulk tensor copies. An access computed from two arguments counts for both;
    accesses whose address derives from no argument (none in Triton code) go under ``"?"``.
    """

    loads: dict[str, dict[str, int]] = field(default_factory=dict)
    stores: dict[str, dict[str, int]] = field(default_factory=dict)


def ptx_global_accesses(
    ptx: str, param_names: list[str] | None = None, pointers: set[str] | None = None
) -> PtxAccesses:
    """Attribute each global load/store/cp.async/TMA in ``ptx`` to the argument(s) it addresses.

    The walk is flow-insensitive: every instruction's destination registers inherit the argument
    set of its source registers, iterated to a fixed point (loops re-assign registers). Loaded
    values do not inherit (a loaded bf16 is not a pointer). ``param_names[i]`` names
    ``<kernel>_param_<i>``; unnamed parameters (Triton's scratch pointers) are ``param_<i>``.
    ``pointers``, when given, limits the attribution to those arguments (integer strides also
    flow into addresses, but "which tensor is this" is the question).
    """
    names = list(param_names or [])

    def arg_name(index: int) -> str:
        return names[index] if index < len(names) else f"param_{index}"

    statements = _ptx_statements(ptx)
    taint: dict[str, frozenset[str]] = {}
    flows: list[tuple[list[str], list[str]]] = []
    for opcode, operands in statements:
        if not operands:
            continue
        if opcode.startswith("ld.param"):
            match = _PARAM_RE.search(operands[-1])
            if match and (pointers is None or arg_name(int(match.group(2))) in pointers):
                for reg in _REG_RE.findall(operands[0]):
                    taint[reg] = taint.get(reg, frozenset()) | {arg_name(int(match.group(2)))}
            continue
        if opcode.startswith(_NO_POINTER_RESULT):
            continue
        dst = _REG_RE.findall(operands[0])
        src = [r for op in operands[1:] for r in _REG_RE.findall(op)]
        if dst and src:
            flows.append((dst, src))
    changed = True
    while changed:
        changed = False
        for dst, src in flows:
            incoming = frozenset().union(*(taint.get(r, frozenset()) for r in src))
            if not incoming:
                continue
            for reg in dst:
                old = taint.get(reg, frozenset())
                if not incoming <= old:
                    taint[reg] = old | incoming
                    changed = True

    result = PtxAccesses()
    for opcode, operands in statements:
        kind = _access_kind(opcode, operands)
        if kind is None:
            continue
        is_store = opcode.startswith(("st.", "red.")) or opcode.startswith("cp.async.bulk.global")
        if opcode.startswith(("st.", "red.")):
            address = operands[0]
        elif opcode.startswith("cp.async.bulk.tensor"):
            address = operands[1] if len(operands) > 1 else ""  # [tensormap, {coords}]
            is_store = ".global.shared" in opcode
        elif opcode.startswith("cp.async"):
            address = operands[1] if len(operands) > 1 else ""  # cp.async dst(shared), src(global)
        else:
            address = operands[1] if len(operands) > 1 else ""  # ld/atom dst, [addr]
        args = frozenset().union(*(taint.get(r, frozenset()) for r in _REG_RE.findall(address)))
        param = _PARAM_RE.search(address)
        if param and (pointers is None or arg_name(int(param.group(2))) in pointers):
            args = args | {arg_name(int(param.group(2)))}
        table = result.stores if is_store else result.loads
        for arg in sorted(args) or ["?"]:
            per_arg = table.setdefault(arg, {})
            per_arg[kind] = per_arg.get(kind, 0) + 1
    return result


# --------------------------------------------------------------------------- occupancy


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of a compute capability (CUDA programming guide, 'Technical Specifications')."""

    name: str
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024  # opt-in maximum for one block (static + dynamic)
    reserved_smem_per_block: int = 1024  # the driver's per-block reservation (cc >= 8.0)
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    smem_alloc_unit: int = 128


ARCH_LIMITS: dict[int, ArchLimits] = {
    90: ArchLimits("sm_90 (H100/H200)", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
    80: ArchLimits("sm_80 (A100)", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
}


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    limiter: str  # "regs", "smem", "warps", "blocks" (ties joined with "+"), or why it cannot launch

    @property
    def fraction(self) -> float:
        return self.warps_per_sm / 64


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(regs: int, shared_bytes: int, num_warps: int, arch: int) -> Occupancy:
    """Resident blocks and warps per SM, as the CUDA occupancy calculator computes them.

    ``regs`` per thread, ``shared_bytes`` per block (static + dynamic; the driver's 1 KB per-block
    reservation is added here), ``num_warps`` per block.
    """
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch: no occupancy limits for sm_{arch}; known: {sorted(ARCH_LIMITS)}")
    if num_warps <= 0:
        raise ValueError(f"num_warps must be positive, got {num_warps}")
    lim = ARCH_LIMITS[arch]
    if regs > lim.max_regs_per_thread:
        return Occupancy(0, 0, f"{regs} regs > {lim.max_regs_per_thread}")
    if shared_bytes > lim.smem_per_block:
        return Occupancy(0, 0, f"smem {shared_bytes} B > {lim.smem_per_block} B per block")
    limits = {"blocks": lim.max_blocks_per_sm, "warps": lim.max_warps_per_sm // num_warps}
    if regs > 0:
        regs_per_warp = _round_up(regs * 32, lim.reg_alloc_unit)
        limits["regs"] = (lim.regs_per_sm // regs_per_warp) // num_warps
    smem = _round_up(shared_bytes + lim.reserved_smem_per_block, lim.smem_alloc_unit)
    limits["smem"] = lim.smem_per_sm // smem
    blocks = min(limits.values())
    limiter = "+".join(k for k in ("regs", "smem", "warps", "blocks") if limits.get(k) == blocks)
    return Occupancy(blocks, blocks * num_warps, limiter)
