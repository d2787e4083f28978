"""What a run resolves before it trains or evaluates: the machine-dependent settings, the run
folder's file names, the datasets and their loaders. Shared by ``train``, ``evaluate``, ``demo``,
``ablate`` and the feature cache, so that none of them imports the training loop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import TrainConfig, data_root
from .distributed import DistInfo, barrier

#: Files of a run folder.
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------- allocator
#: glibc's ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from malloc's heap, where a freed block is reused, instead of fresh
#: mmap'd pages that the kernel must fault in (and zero) on first touch.
HEAP_BLOCKS_UP_TO = 1 << 30
#: Free memory at the top of the heap is returned to the kernel only beyond this (the largest
#: value ``mallopt`` takes): the next step's tensors reuse it instead.
TRIM_ABOVE = 2**31 - 1
#: ``C2F_MALLOC=system`` leaves the allocator as it is.
MALLOC_ENV = "C2F_MALLOC"
_allocator_state: Optional[str] = None
_allocator_tuned = False  # whether tune_allocator set glibc's parameters in this process


def tune_allocator() -> str:
    """Make glibc's malloc keep the memory a process frees, for the next allocation, and return
    one line saying what it did (``c2f`` commands print it at start-up).

    Why: PyTorch's CPU tensors come from ``malloc``, and glibc serves blocks above its mmap
    threshold (128 KiB at first, adjusted up to at most 32 MiB) with fresh pages mapped for that
    block alone, unmapped again when the tensor is freed. A training step frees and reallocates
    its activations every step, so every step page-faults all of them in again: 36,000 faults a
    step (57 ms of system time) in the demo's training step on the 2-core machine. With blocks up
    to :data:`HEAP_BLOCKS_UP_TO` from the heap and no trimming, the faults go and the step runs
    1.43x faster, the whole ``c2f demo`` 1.33x (docs/cli.md, "Memory: the allocator"). The cost:
    the process keeps its peak heap instead of handing freed memory back to the kernel. The same effect as the
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` variables, or as preloading jemalloc or
    tcmalloc, as PyTorch's CPU performance guides advise.

    A no-op (and the line says why) where the C library is not glibc, where
    ``C2F_MALLOC=system`` is set, or where the user already chose: an allocator in
    ``LD_PRELOAD``, ``MALLOC_*_`` variables or ``glibc.malloc`` tunables. Called once per
    process: later calls return the first call's line. Process-wide: the library does not call
    it on its own (``c2f_fast.C2FClassifier`` leaves the allocator alone); the ``c2f`` commands
    do."""
    global _allocator_state
    if _allocator_state is None:
        _allocator_state = _tune_allocator()
    return _allocator_state


def allocator_state() -> str:
    """What :func:`tune_allocator` did in this process, without doing anything."""
    return _allocator_state or "allocator: the system's (tune_allocator() not called in this process)"


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` set glibc's parameters in this process (e.g. for a worker
    process to do the same)."""
    return _allocator_tuned


def _tune_allocator() -> str:
    global _allocator_tuned
    setting = os.environ.get(MALLOC_ENV, "").strip().lower()
    if setting in ("system", "0", "off", "no"):
        return f"allocator: the system's ({MALLOC_ENV}={setting})"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "allocator: the system's (not glibc: nothing to tune)"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "allocator: the preloaded one (LD_PRELOAD)"
    chosen = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if chosen or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"allocator: glibc as configured ({', '.join(chosen) or 'GLIBC_TUNABLES'})"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        refused = [name for name, param, value in (("mmap threshold", _M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO),
                                                   ("trim threshold", _M_TRIM_THRESHOLD, TRIM_ABOVE))
                   if mallopt(param, value) != 1]
    except (OSError, AttributeError) as err:
        return f"allocator: the system's (mallopt unavailable: {err})"
    if refused:
        return f"allocator: glibc, partly tuned (mallopt refused the {' and the '.join(refused)})"
    _allocator_tuned = True
    return (f"allocator: glibc malloc keeps freed memory (heap blocks up to {HEAP_BLOCKS_UP_TO >> 30} GiB, "
            f"no trimming; {MALLOC_ENV}=system turns this off)")


# ----------------------------------------------------------------------------- settings
#: /proc/cpuinfo flags of the CPUs whose bf16 matrix units make bf16 autocast pay (oneDNN's
#: bf16 convolutions and matmuls): Intel AMX (Sapphire Rapids and later) and AVX512-BF16 (Cooper
#: Lake, AMD Zen 4 and later). Without them oneDNN emulates bf16 and it is slower than fp32.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_support() -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, the reason in words), from its flags."""
    found = [flag for flag in CPU_BF16_FLAGS if flag in _cpu_flags()]
    if found:
        return True, f"the CPU has {' and '.join(f.upper().replace('_', '-') for f in found)}"
    capability = torch.backends.cpu.get_cpu_capability()
    return False, f"no AMX-BF16 or AVX512-BF16 on this CPU (vector unit: {capability})"


@dataclass(frozen=True)
class Settings:
    """The "auto" choices of the config, resolved for this machine; ``reason`` says why, in one
    line (printed when a run starts)."""

    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    compile: bool
    channels_last: bool
    fast_kernels: bool
    reason: str = ""

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def describe(self) -> str:
        return (f"{self.device.type}: {self.precision}, channels_last={'on' if self.channels_last else 'off'}, "
                f"compile={'on' if self.compile else 'off'}, fast_kernels={'on' if self.fast_kernels else 'off'}"
                f"{' (' + self.reason + ')' if self.reason else ''}")


def resolve_settings(cfg: TrainConfig, device: torch.device) -> Settings:
    """The run section's "auto" values for ``device``; explicit values are kept as they are.

    CUDA: bf16 autocast, channels_last, torch.compile and the Triton kernels. CPU: channels_last,
    and bf16 autocast where the CPU has bf16 units (:data:`CPU_BF16_FLAGS`: about 1.9x the fp32
    training step on a 2-core AVX512-BF16 machine), fp32 elsewhere (channels_last in fp32: 1.14x
    the NCHW training step at 2 threads, 1.19x at one, on a 2-core AVX2 AMD Zen 3); never compiled
    by default (about 1.02x for a whole demo run, for ~30 s of compilation) and no Triton kernels
    (they run on the CPU only in Triton's interpreter)."""
    r = cfg.run
    cuda = device.type == "cuda"
    reasons = []
    if cuda:
        auto_fast = True
    else:
        auto_fast, why = cpu_bf16_support()
        if r.precision == "auto":
            reasons.append(f"auto: {'bf16' if auto_fast else 'fp32'} because {why}")
        if r.channels_last is None:
            reasons.append("auto: channels_last on (the faster layout for CPU convolutions, fp32 and bf16)")
    precision = r.precision if r.precision != "auto" else ("bf16" if auto_fast else "fp32")
    if precision == "fp16" and not cuda:
        raise ValueError("run.precision: fp16 (with a grad scaler) needs CUDA; use bf16 or fp32 on the CPU")
    channels_last = True if r.channels_last is None else bool(r.channels_last)
    compile = cuda if r.compile is None else bool(r.compile)
    fast_kernels = cuda if r.fast_kernels is None else bool(r.fast_kernels)
    explicit = [f"{name}={value}" for name, value, given in (
        ("precision", r.precision, r.precision != "auto"), ("channels_last", r.channels_last, r.channels_last is not None),
        ("compile", r.compile, r.compile is not None), ("fast_kernels", r.fast_kernels, r.fast_kernels is not None),
    ) if given]  # fmt: skip
    if explicit:
        reasons.append("set: " + ", ".join(explicit))
    return Settings(device, precision, compile, channels_last, fast_kernels, "; ".join(reasons))


# ----------------------------------------------------------------------------- data
def load_datasets(cfg: TrainConfig, info: DistInfo, train: bool = True):
    """(train set, test set) from the data section (train set None when ``train`` is false); the
    synthetic set is written on first use (by rank 0; the others wait)."""
    from .data import load_coco, load_list, load_voc, make_synthetic

    d = cfg.data
    root = data_root(d)
    if d.format == "synthetic":
        if info.is_main:
            make_synthetic(root, preset=d.preset, seed=d.synthetic_seed)
        barrier(info)
    if d.format in ("synthetic", "voc"):
        year = d.year if d.format == "voc" else "2007"
        train_set = load_voc(root, year, d.train_split, difficult=d.difficult) if train else None
        test_set = load_voc(root, year, d.test_split, difficult="ignore")
    elif d.format == "coco":
        ann = lambda split: root / "annotations" / f"instances_{split}.json"  # noqa: E731
        for split in (d.train_split, d.test_split) if train else (d.test_split,):
            if not ann(split).is_file():
                raise FileNotFoundError(f"data.root: no COCO annotation file {ann(split)}")
        train_set = load_coco(ann(d.train_split), root / d.train_split, drop_empty=d.drop_empty) if train else None
        test_set = load_coco(ann(d.test_split), root / d.test_split, drop_empty=False)
    else:  # list: the class list is the training file's (sorted names), or the model's
        train_set = load_list(_under(root, d.train_split), root) if train else None
        names = train_set.class_names if train else None
        test_set = load_list(_under(root, d.test_split), root, class_names=names)
    if not train:
        return None, _limit(test_set, d.limit_test)
    if train_set.class_names != test_set.class_names:
        raise ValueError(f"data: the train and test splits have different class lists "
                         f"({len(train_set.class_names)} vs {len(test_set.class_names)} classes)")
    return _limit(train_set, d.limit_train), _limit(test_set, d.limit_test)


def _under(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() or path.exists() else root / path


def _limit(dataset, n: int):
    if not n or n >= len(dataset):
        return dataset
    from .data import MultiLabelSet

    return MultiLabelSet(dataset.image_paths[:n], dataset.targets[:n], dataset.class_names, dataset.boxes[:n])


def build_loaders(cfg: TrainConfig, train_set, test_set, info: DistInfo, settings: Settings):
    from .data import build_loader

    d = cfg.data
    common = dict(backend=d.loader, device=settings.device, num_workers=d.workers, shard_id=info.rank,
                  num_shards=info.world_size, seed=cfg.run.seed, on_bad_image=d.on_bad_image,
                  verify=d.verify, image_size=cfg.model.image_size)
    train_loader = None if train_set is None else build_loader(
        train_set, d.batch_size, train=True, crop_scale=d.crop_scale, crop_ratio=d.crop_ratio, **common)
    test_loader = build_loader(test_set, d.eval_batch_size or d.batch_size, train=False, **common)
    return train_loader, test_loader
