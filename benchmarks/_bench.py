"""Shared machinery of the benchmark suite: sizes, timing, the per-session result table, ratios
and goals.

Every case calls :func:`measure`, which warms the callable up (compilation, autotuning, worker
start-up) outside the timing, times it with ``benchmark.pedantic`` (each timed call ends with a
device synchronisation), and keeps a :class:`Result` here. At the end of the session
(``conftest.pytest_sessionfinish``) :func:`finalise` computes, for every case, the ratio to each of
its baselines *measured in the same session*:

    ratio = case rate / baseline rate,   rate = work per call / median time per call

which is ``baseline median / case median`` whenever both do the same work (same sizes), and
compares throughputs when they do not (e.g. the loader's images/s against the training step's).
The ratios go into each benchmark's ``extra_info`` (hence into ``--benchmark-json``) and into the
compact table printed last.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from c2f_fast.runtime import cpu_bf16_support

# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """The sizes one machine runs at: "gpu" (the goals' sizes) or "cpu" (small, minutes)."""

    name: str
    device: torch.device
    dtype: torch.dtype  # attention ops, LSTM cell, decoder (autocast dtype on the GPU)
    B: int  # batch of the kernels and of the decoder
    Ls: tuple[int, ...]  # feature-map lengths of the kernel cases (the first: the decoder's)
    D: int
    A: int
    H: int
    E: int  # label embedding
    T: int
    C: int
    backbone: str  # decoder (its D/F), training step and inference
    image_size: int  # training step and inference
    train_batch: int
    infer_batch: int  # throughput batch of the inference case
    data_batch: int
    data_images: int  # synthetic JPEGs written per session
    data_batches_per_round: int
    workers: int  # DALI threads = DataLoader workers
    inner: int  # op calls per timed call of the kernel cases (one sync per timed call)
    threads: int  # torch intra-op threads (0: torch's default)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def L(self) -> int:
        return self.Ls[0]


def make_profile() -> Profile:
    """GPU sizes on CUDA, CPU sizes otherwise; ``C2F_BENCH_PROFILE=cpu`` forces the small sizes
    (a quick smoke run on a GPU), ``C2F_BENCH_WORKERS`` sets the loader threads/workers and
    ``C2F_BENCH_THREADS`` torch's intra-op threads (CPU default 1: on a shared 2-core machine two
    OpenMP threads spin against the other tenants' processes and a 40 us op takes 10+ ms).
    """
    cuda = torch.cuda.is_available()
    forced = os.environ.get("C2F_BENCH_PROFILE", "").strip().lower()
    if forced not in ("", "cpu", "gpu"):
        raise ValueError(f"C2F_BENCH_PROFILE: expected 'cpu' or 'gpu', got {forced!r}")
    big = cuda and forced != "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if forced == "gpu" and not cuda:
        raise RuntimeError("C2F_BENCH_PROFILE=gpu needs a CUDA device")
    if big:
        profile = dict(
            name="gpu", dtype=torch.bfloat16, B=256, Ls=(196, 784), D=512, A=512, H=512, E=256, T=5, C=20,
            backbone="vgg16", image_size=224, train_batch=256, infer_batch=256,
            data_batch=256, data_images=1024, data_batches_per_round=4,
            workers=min(8, os.cpu_count() or 8), inner=20, threads=0,
        )
    else:
        # The tiny backbone's feature map is D=128 (F=256), so the decoder sizes follow it.
        profile = dict(
            name="cpu", dtype=torch.float32, B=16, Ls=(196, 49), D=128, A=128, H=128, E=64, T=5, C=20,
            backbone="tiny", image_size=128, train_batch=16, infer_batch=64,
            data_batch=32, data_images=256, data_batches_per_round=8,
            workers=2, inner=10, threads=1,
        )
    if os.environ.get("C2F_BENCH_THREADS"):
        profile["threads"] = int(os.environ["C2F_BENCH_THREADS"])
    if os.environ.get("C2F_BENCH_WORKERS"):
        profile["workers"] = int(os.environ["C2F_BENCH_WORKERS"])
    return Profile(device=device, **profile)


def sizes_str(**sizes: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop(fn: Callable[[], Any], inner: int, device: torch.device) -> Callable[[], None]:
    """A timed call: ``inner`` calls of ``fn`` then one device synchronisation."""

    def call() -> None:
        for _ in range(inner):
            fn()
        sync(device)

    return call


def graphed(fn: Callable[[], Any], inner: int, device: torch.device) -> tuple[Callable[[], None], str]:
    """On CUDA: ``inner`` calls of ``fn`` captured once in a CUDA graph; a timed call replays it
    and synchronises, so the time is the GPU's (no Python/launch overhead) for every variant alike.
    Falls back to :func:`loop` (and says so) when capture fails. ``fn`` must be warm."""
    if device.type != "cuda":
        return loop(fn, inner, device), "loop"
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any capture problem: time the eager loop instead
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass
        return loop(fn, inner, device), f"loop (CUDA graph capture failed: {type(exc).__name__})"

    def call() -> None:
        graph.replay()
        torch.cuda.synchronize(device)

    call.graph = graph  # keep it alive
    return call, "cuda_graph"


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    group: str
    sizes: str
    baselines: list[str]
    median: float  # seconds per call (one op call, one step, one batch...)
    items: Optional[float] = None  # images per call (img/s)
    bytes_moved: Optional[float] = None  # bytes the op must move per call (GB/s)
    flops: Optional[float] = None  # FLOPs per call
    timing: str = "loop"
    notes: str = ""
    extra: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)
    min: Optional[float] = None  # fastest timed call, per call (the least disturbed by other load)
    ratios_min: dict = field(default_factory=dict)  # the ratios from the minima
    info: Optional[dict] = None  # the benchmark's extra_info (mutated at the end of the session)

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes_moved / self.median / 1e9 if self.bytes_moved else None

    @property
    def img_s(self) -> Optional[float]:
        return self.items / self.median if self.items else None

    @property
    def work(self) -> float:
        """Per-call work that the rate of a ratio counts (images, else bytes, else one call)."""
        return self.items or self.bytes_moved or 1.0


RESULTS: dict[str, Result] = {}


def measure(
    benchmark,
    profile: Profile,
    fn: Callable[[], Any],
    *,
    case: str,
    group: str,
    sizes: str,
    baselines: tuple[str, ...] = (),
    inner: int = 1,
    rounds: int = 5,
    warmup: int = 1,
    prewarm: int = 1,
    graph: bool = False,
    items: Optional[float] = None,
    bytes_moved: Optional[float] = None,
    flops: Optional[float] = None,
    notes: str = "",
    extra: Optional[dict] = None,
) -> Result:
    """Warm ``fn`` up, time it, keep the result; see the module docstring.

    ``fn`` is one call of the thing measured (one op call, one training step, one batch).
    ``inner`` calls make one timed call (ended by one device sync; captured in a CUDA graph when
    ``graph``); ``items``/``bytes_moved``/``flops`` are per call of ``fn``. ``prewarm`` calls run
    before any timing (compilation, autotuning); pytest-benchmark then runs ``warmup`` untimed
    rounds and ``rounds`` timed ones.
    """
    device = profile.device
    for _ in range(prewarm):
        fn()
    sync(device)
    if graph:
        timed, timing = graphed(fn, inner, device)
    else:
        timed, timing = loop(fn, inner, device), "loop"
    benchmark.group = group
    info = benchmark.extra_info
    info.update(
        case=case, sizes=sizes, baselines=list(baselines), inner=inner, timing=timing,
        device=device_name(device), dtype=str(profile.dtype).replace("torch.", ""), profile=profile.name,
    )
    if items is not None:
        info["images_per_call"] = items
    if bytes_moved is not None:
        info["bytes_per_call"] = bytes_moved
    if flops is not None:
        info["flops_per_call"] = flops
    if notes:
        info["notes"] = notes
    if extra:
        info.update(extra)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # --benchmark-disable: nothing timed
        return None
    median = stats.median / inner
    result = Result(case=case, group=group, sizes=sizes, baselines=list(baselines), median=median,
                    min=stats.min / inner,
                    items=items, bytes_moved=bytes_moved, flops=flops, timing=timing, notes=notes,
                    extra=dict(extra or {}), info=info)
    info["median_per_call_s"] = median
    if result.gbps:
        info["GB_per_s"] = result.gbps
    if result.img_s:
        info["images_per_s"] = result.img_s
    RESULTS[case] = result
    _append_log(result)
    return result


def measure_interleaved(
    benchmark,
    profile: Profile,
    fns: dict[str, Callable[[], Any]],
    *,
    group: str,
    sizes: str,
    baselines: dict[str, tuple[str, ...]],
    items: Optional[float] = None,
    rounds: int = 10,
    prewarm: int = 2,
    notes: str = "",
    extra: Optional[dict[str, dict]] = None,
) -> dict[str, Result]:
    """Time several callables (case name -> one call) round-robin in the same process: each
    round calls every one once, in a (seeded) random order, so that the load of the other tenants
    and the cache state a call finds (what ran just before it) fall on all of them alike and their
    ratios compare like with like. Keeps one
    :class:`Result` per case (median and minimum over the rounds). The pytest-benchmark entry of
    the test is the whole interleaved block, timed once."""
    device = profile.device
    names = list(fns)
    for _ in range(prewarm):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}

    def block() -> None:
        shuffle = random.Random(0)
        for _ in range(rounds):
            order = shuffle.sample(names, len(names))
            for name in order:
                c0, t0 = time.thread_time(), time.perf_counter()
                fns[name]()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.thread_time() - c0)

    benchmark.group = group
    benchmark.extra_info.update(cases=names, sizes=sizes, rounds=rounds, timing="interleaved",
                                device=device_name(device), profile=profile.name)
    benchmark.pedantic(block, rounds=1, warmup_rounds=0, iterations=1)
    out = {}
    for name in names:
        ts = sorted(times[name])
        if not ts:  # --benchmark-disable: nothing timed
            continue
        median = _median(ts)
        # CPU time of the calling thread: with one thread (torch and ONNX Runtime both compute on
        # the caller's thread then) it leaves out the time the other tenants held the core
        more = {**((extra or {}).get(name, {})), "thread_cpu_median_s": _median(sorted(cpu_times[name]))}
        info = {"case": name, "sizes": sizes, "baselines": list(baselines.get(name, ())), "timing": "interleaved",
                "median_per_call_s": median, **more}
        result = Result(case=name, group=group, sizes=sizes, baselines=list(baselines.get(name, ())), median=median,
                        min=ts[0], items=items, timing="interleaved", notes=notes, extra=more, info=info)
        benchmark.extra_info[name] = info
        RESULTS[name] = result
        _append_log(result)
        out[name] = result
    return out


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    return sorted_values[n // 2] if n % 2 else (sorted_values[n // 2 - 1] + sorted_values[n // 2]) / 2


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _append_log(result: Result) -> None:
    """With ``C2F_BENCH_OUT``: one JSON line per case as soon as it is measured, so a run cut
    short by a timeout keeps what it measured."""
    out = os.environ.get("C2F_BENCH_OUT")
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    record = {k: v for k, v in asdict(result).items() if k != "info"}
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["profile"] = (result.info or {}).get("profile")
    with open(os.path.join(out, "cases.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# Ratios, goals, the table
# ----------------------------------------------------------------------------------------------

COPY_CASE = "copy"


def speed_ratios(r: Result, base: Result) -> tuple[float, Optional[float]]:
    """How many times faster ``r`` is than ``base`` (work per second), from the medians and (None
    when a minimum is missing) from the minima."""
    from_min = (r.work / r.min) / (base.work / base.min) if r.min and base.min else None
    return (r.work / r.median) / (base.work / base.median), from_min


def finalise(results: dict[str, Result]) -> None:
    """Ratios to the baselines measured in this session, share of the copy bandwidth and MFU,
    written into each result and its benchmark's ``extra_info``."""
    copy = results.get(COPY_CASE)
    for r in results.values():
        for base in r.baselines:
            b = results.get(base)
            r.ratios[base] = None
            if b is not None:
                r.ratios[base], from_min = speed_ratios(r, b)
                if from_min is not None:
                    r.ratios_min[base] = from_min
        if copy is not None and r is not copy and r.gbps:
            r.extra["copy_share"] = r.gbps / copy.gbps
        peak = r.extra.get("peak_flops")
        if peak and r.flops:
            r.extra["mfu"] = r.flops / r.median / peak
        if r.info is not None:
            r.info["ratios"] = dict(r.ratios)
            r.info["ratios_from_min"] = dict(r.ratios_min)
            for key in ("copy_share", "mfu"):
                if key in r.extra:
                    r.info[key] = r.extra[key]


@dataclass(frozen=True)
class Goal:
    """A speed goal: ``kind`` "ratio" (case vs baseline ≥ target), "copy_share" (≥ target),
    "mfu" (≥ target), "img_s" (≥ target), "latency" (median ≤ target seconds)."""

    profile: str
    text: str
    kind: str
    case: str
    target: float
    baseline: str = ""
    alternates: tuple[str, ...] = ()  # other cases that stand in when ``case`` was not measured
    applies: Optional[Callable[[], tuple[bool, str]]] = None  # (whether the goal applies here, why)


def _ops_goals() -> list[Goal]:
    goals = []
    for op in ("attention_pool", "additive_attention"):
        goals.append(Goal("gpu", f"{op} forward ≥ 75 % of copy bandwidth", "copy_share",
                          f"{op}/fwd/L196/fast", 0.75))
        goals.append(Goal("gpu", f"{op} fwd+bwd ≥ 2.5× eager reference", "ratio",
                          f"{op}/fwdbwd/L196/fast", 2.5, f"{op}/fwdbwd/L196/eager"))
        goals.append(Goal("gpu", f"{op} fwd+bwd ≥ 1.3× compiled reference", "ratio",
                          f"{op}/fwdbwd/L196/fast", 1.3, f"{op}/fwdbwd/L196/compiled"))
    return goals


GOALS: list[Goal] = [
    *_ops_goals(),
    Goal("gpu", "lstm_cell fwd+bwd ≥ 1.5× nn.LSTMCell", "ratio", "lstm_cell/fwdbwd/fast", 1.5,
         "lstm_cell/fwdbwd/nn.LSTMCell"),
    Goal("gpu", "decoder fwd+bwd ≥ 3× reference path (eager)", "ratio", "decoder/fwdbwd/fast_compiled", 3.0,
         "decoder/fwdbwd/ref_eager"),
    Goal("gpu", "training step ≥ 45 % MFU", "mfu", "train/fast_bf16_compiled", 0.45),
    Goal("gpu", "DALI GPU decode ≥ 1.2× the training step's image rate", "ratio", "data/dali", 1.2,
         "train/fast_bf16_compiled", alternates=("data/nvjpeg", "data/tv_decode_jpeg")),
    Goal("gpu", "inference ≥ 10,000 img/s at batch 256 (decoded tensors)", "img_s", "infer/b256/compiled", 10_000),
    Goal("gpu", "inference batch-1 latency ≤ 3 ms", "latency", "infer/b1/compiled", 3e-3),
    Goal("cpu", "inference batch-1 latency of the default C2FClassifier ≤ 1.0× ONNX Runtime's, same threads",
         "ratio", "infer/b1/default", 1.0, "infer/b1/onnxruntime"),
    Goal("cpu", "inference batch-64 throughput of the default C2FClassifier ≥ 1.2× ONNX Runtime's, same threads",
         "ratio", "infer/b64/default", 1.2, "infer/b64/onnxruntime"),
    Goal("cpu", "DALI (fused decode+crop) ≥ 1.1× torch DataLoader, same threads", "ratio", "data/dali", 1.1,
         "data/torch"),
    Goal("cpu", "bf16 + channels_last training step ≥ 1.5× fp32 NCHW (a CPU with bf16 units)", "ratio",
         "train/cpu_bf16_cl", 1.5, "train/ref_fp32_eager", applies=lambda: cpu_bf16_support()),
    Goal("cpu", "compiled decoder fwd+bwd ≥ 1.5× eager", "ratio", "decoder/fwdbwd/ref_compiled", 1.5,
         "decoder/fwdbwd/ref_eager"),
    Goal("cpu", "VGG-16 training step from cached features ≥ 50× the frozen-encoder image step", "ratio",
         "train/features/vgg16", 50, "train/frozen_images/vgg16"),
]


def evaluate_goals(results: dict[str, Result], profile: str) -> list[dict]:
    rows = []
    for g in GOALS:
        if g.profile != profile:
            continue
        case = next((c for c in (g.case, *g.alternates) if c in results), None)
        r = results.get(case) if case else None
        value = value_min = None
        if r is not None:
            if g.kind == "ratio":
                base = results.get(g.baseline)
                if base:
                    value, value_min = speed_ratios(r, base)
            elif g.kind == "copy_share":
                value = r.extra.get("copy_share")
            elif g.kind == "mfu":
                value = r.extra.get("mfu")
            elif g.kind == "img_s":
                value = r.img_s
            elif g.kind == "latency":
                value = r.median
        applies, why = g.applies() if g.applies else (True, "")
        if not applies:  # still measured and shown: what the case costs where the goal does not apply
            status = f"not applicable: {why}"
        elif value is None:
            status = "not measured"
        elif g.kind == "latency":
            status = "met" if value <= g.target else "missed"
        else:
            status = "met" if value >= g.target else "missed"
        rows.append(dict(goal=g.text, case=case or g.case, baseline=g.baseline, target=g.target, kind=g.kind,
                         value=value, value_from_min=value_min, status=status))
    return rows


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_rate(r: Result) -> str:
    parts = []
    if r.gbps:
        parts.append(f"{r.gbps:.1f} GB/s")
        if "copy_share" in r.extra:
            parts.append(f"{100 * r.extra['copy_share']:.0f}% copy")
    if r.img_s:
        parts.append(f"{r.img_s:,.0f} img/s")
    if r.extra.get("mfu") is not None:
        parts.append(f"MFU {100 * r.extra['mfu']:.1f}%")
    elif r.flops and not r.gbps:
        parts.append(f"{r.flops / r.median / 1e9:.1f} GFLOP/s")
    return ", ".join(parts)


def _short(base: str, case: str) -> str:
    """A baseline's name relative to the case's (the common prefix dropped)."""
    a, b = case.split("/"), base.split("/")
    i = 0
    while i < min(len(a), len(b)) - 1 and a[i] == b[i]:
        i += 1
    return "/".join(b[i:])


def _fmt_goal_value(row: dict) -> str:
    v = row["value"]
    if v is None:
        return "-"
    if row["kind"] in ("copy_share", "mfu"):
        return f"{100 * v:.1f}% (target {100 * row['target']:.0f}%)"
    if row["kind"] == "img_s":
        return f"{v:,.0f} img/s (target {row['target']:,.0f})"
    if row["kind"] == "latency":
        return f"{v * 1e3:.2f} ms (target {row['target'] * 1e3:.1f} ms)"
    from_min = f", from minima {row['value_from_min']:.2f}x" if row.get("value_from_min") else ""
    return f"{v:.2f}x (target {row['target']:.2f}x{from_min})"


def table(results: dict[str, Result], profile: Optional[str] = None) -> str:
    """The compact table: case, sizes, median, GB/s or img/s, baseline, ratio; then the goals."""
    rows = [("case", "sizes", "median", "rate", "baseline", "ratio", "(from min)")]
    for r in results.values():
        bases = r.baselines or [""]
        for i, base in enumerate(bases):
            ratio = r.ratios.get(base) if base else None
            rows.append((
                r.case if i == 0 else "", r.sizes if i == 0 else "", _fmt_time(r.median) if i == 0 else "",
                _fmt_rate(r) if i == 0 else "", _short(base, r.case) if base else "-",
                (f"{ratio:.2f}x" if ratio is not None else ("not run" if base else "-")),
                (f"{r.ratios_min[base]:.2f}x" if base and base in r.ratios_min else ""),
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if profile:
        goals = evaluate_goals(results, profile)
        if goals:
            lines += ["", f"goals ({profile}):"]
            for g in goals:
                vs = f" vs {g['baseline']}" if g["baseline"] else ""
                lines.append(f"  [{g['status']}] {g['goal']}: {g['case']}{vs}: {_fmt_goal_value(g)}")
    return "\n".join(lines)


def environment() -> dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = None
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    env["torch_threads"] = torch.get_num_threads()
    env["device"] = device_name(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        env["loadavg"] = None
    from c2f_fast.runtime import allocator_state

    env["allocator"] = allocator_state()  # benchmarks/conftest.py tunes it once
    return env


def summary_json(results: dict[str, Result], profile: str) -> dict:
    return {
        "environment": environment(),
        "profile": profile,
        "cases": [{k: v for k, v in asdict(r).items() if k != "info"} | {"gbps": r.gbps, "img_s": r.img_s}
                  for r in results.values()],
        "goals": evaluate_goals(results, profile),
    }
