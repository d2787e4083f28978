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
@dataclass(frozen=True)
class Settings:
    """The "auto" choices of the config, resolved for this machine."""

    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    compile: bool
    channels_last: bool
    fast_kernels: bool

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls/convolutions natively (AMX-BF16 or AVX512-BF16),
    so that bf16 autocast is faster than fp32 rather than an emulation. From
    ``torch.backends.cpu.get_cpu_capability()`` (an AVX512 build at least) and the ``amx_bf16`` /
    ``avx512_bf16`` flags of ``/proc/cpuinfo`` (Linux; False where that file is absent)."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 -- an old or unusual build: no claim
        return False
    if "AVX512" not in capability.upper() and "AMX" not in capability.upper():
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_settings(cfg: TrainConfig, device: torch.device) -> Settings:
    cuda = device.type == "cuda"
    precision = cfg.run.precision if cfg.run.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision == "fp16" and not cuda:
        raise ValueError("run.precision: fp16 (with a grad scaler) needs CUDA; use bf16 or fp32 on the CPU")
    pick = lambda value: cuda if value is None else bool(value)  # noqa: E731
    return Settings(device, precision, pick(cfg.run.compile), pick(cfg.run.channels_last), pick(cfg.run.fast_kernels))


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
