"""What a run resolves before it trains or evaluates: the machine-dependent settings, the run
folder's file names, the datasets and their loaders. Shared by ``train``, ``evaluate``, ``demo``,
``ablate`` and the feature cache, so that none of them imports the training loop."""

from __future__ import annotations

import contextlib
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

    CUDA: bf16 autocast, channels_last, torch.compile and the Triton kernels. CPU: bf16 autocast
    and channels_last where the CPU has bf16 units (:data:`CPU_BF16_FLAGS`: about 1.9x the fp32
    training step on a 2-core AVX512-BF16 machine), fp32 and NCHW elsewhere; never compiled by
    default (about 1.02x for a whole demo run, for ~30 s of compilation) and no Triton kernels
    (they run on the CPU only in Triton's interpreter)."""
    r = cfg.run
    cuda = device.type == "cuda"
    reasons = []
    if cuda:
        auto_fast = True
    else:
        auto_fast, why = cpu_bf16_support()
        chosen = [what for what, auto in ((("bf16" if auto_fast else "fp32"), r.precision == "auto"),
                                          (f"channels_last {'on' if auto_fast else 'off'}", r.channels_last is None))
                  if auto]  # fmt: skip
        if chosen:
            reasons.append(f"auto: {' + '.join(chosen)} because {why}")
    precision = r.precision if r.precision != "auto" else ("bf16" if auto_fast else "fp32")
    if precision == "fp16" and not cuda:
        raise ValueError("run.precision: fp16 (with a grad scaler) needs CUDA; use bf16 or fp32 on the CPU")
    channels_last = auto_fast if r.channels_last is None else bool(r.channels_last)
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
