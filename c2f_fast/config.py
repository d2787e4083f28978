"""One run's configuration: four dataclasses (model, data, optim, run), loaded from YAML and
overridden by dotted ``key=value`` flags (``optim.lr=1e-3``).

Every key is checked: an unknown key or a value of the wrong type or out of range raises
:class:`ConfigError` naming the key (``optim.lr: expected a number > 0, got 'fast'``). The resolved
config (after overrides and defaults) is saved as ``config.yaml`` in the run folder, so a run can be
repeated with ``c2f train --config runs/NAME/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .data.base import _ON_BAD, _VERIFY, BACKENDS, DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE
from .data.synthetic import PRESETS
from .model import ModelConfig


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


DATA_FORMATS = ("synthetic", "voc", "coco", "list")
LOADERS = BACKENDS  # the loaders' own lists: one place to add a choice
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
FEEDS = ("teacher", "greedy")
DEVICES = ("auto", "cpu", "cuda")
DIFFICULT = ("ignore", "positive", "negative")
RESUME = ("auto", "never", "must")
ON_BAD_IMAGE = _ON_BAD


@dataclass
class DataConfig:
    """Where the images come from and how they are loaded.

    format: "synthetic" (the built-in set, written to ``root`` on first use; empty ``root``: the
        cache folder, see :func:`cache_dir`), "voc" (``root`` = the
        VOC2007/VOC2012 folder or the VOCdevkit), "coco" (``root`` holds
        ``annotations/instances_{split}.json`` and the ``{split}/`` image folder) or "list"
        (``train_split``/``test_split`` are list files, images relative to ``root``).
    train_split, test_split: split names (VOC: ImageSets/Main/NAME.txt; COCO: train2014, val2014;
        synthetic: train, test) or list-file paths.
    preset, synthetic_seed: the synthetic set's preset ("demo" or "hard") and seed.
    difficult: training target of a VOC class present only through difficult objects (evaluation
        always ignores it).
    loader: "auto" (default: "dali" when nvidia.dali imports, else "nvjpeg" on CUDA, else "torch"),
        "dali" (DALI pipeline; GPU decoding with nvJPEG on CUDA), "nvjpeg" (torchvision's batched
        nvJPEG decoding and the transforms on the GPU, no DALI) or "torch" (torchvision DataLoader).
    workers: DALI threads or DataLoader worker processes; empty (null): from the CPU cores.
    batch_size: per process (GPU); eval_batch_size defaults to batch_size.
    limit_train, limit_test: use only the first N images (0: all); for smoke tests.
    features: a feature cache written by ``c2f cache-features`` (empty: none). The run then
        trains the decoder on the cached outputs of its frozen encoder instead of decoding images
        (needs ``optim.freeze_encoder=true``; see docs/features.md).
    """

    format: str = "synthetic"
    root: str = ""
    train_split: str = "train"
    test_split: str = "test"
    year: str = "2007"
    preset: str = "demo"
    synthetic_seed: int = 0
    difficult: str = "ignore"
    drop_empty: bool = False
    loader: str = "auto"
    workers: Optional[int] = None
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE
    crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO
    on_bad_image: str = "error"
    verify: str = "header"
    limit_train: int = 0
    limit_test: int = 0
    features: str = ""


@dataclass
class OptimConfig:
    """Optimisation. ``lr`` is the decoder's (head's) learning rate; the encoder uses
    ``lr * backbone_lr_mult`` (pretrained backbones want a smaller one). The schedule is a linear
    warm-up over ``warmup_epochs`` then ``schedule`` ("cosine" down to ``lr * min_lr_ratio``, or
    "constant"). ``feed``: what the decoder is fed in training, "teacher" (the ground-truth label
    sequence) or "greedy" (free-running: its own detached greedy choices). ``lambda3`` weights the
    glimpse loss (needs ``model.glimpse_head``) and ``lambda4`` the coverage penalty (needs local
    attention); both 0, the paper's objective, by default (docs/model.md, "Aligned local
    attention")."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 10
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.01
    grad_clip: float = 10.0
    freeze_encoder: bool = False
    lambda1: float = 0.05
    lambda2: float = 0.05
    eps: float = 0.1
    eps_v: float = 0.1
    feed: str = "teacher"
    lambda3: float = 0.0
    lambda4: float = 0.0


@dataclass
class RunConfig:
    """Where the run goes and how it executes. None / "auto" are decided for the machine
    (``runtime.resolve_settings``): on CUDA, bf16, channels_last, compile and the fast kernels; on
    a CPU with bf16 units (AMX-BF16 or AVX512-BF16), bf16 and channels_last; on other CPUs, fp32.
    Explicit values always win.

    resume: what a start does with a checkpoint already in ``out``: "auto" (continue it when its
        config is this one, refuse a changed config naming the keys; start fresh when there is
        none; a damaged newest checkpoint falls back to the previous one), "never" (refuse a folder
        that holds one) or "must" (continue it, fail without one; ``c2f train --resume``).
    checkpoint_every: steps between checkpoints (0: only at the end of each epoch and on a signal);
        under torchrun a restart loses at most this many steps.
    dist_timeout: seconds a collective (all-reduce, barrier, gather) may wait for the other
        processes before it fails, so that a dead or stuck peer ends the group and torchrun
        restarts it; must exceed the longest one-sided work (rank 0 writing a checkpoint or
        building the synthetic set).
    progress_every: seconds between the plain progress lines printed when the output is not a
        terminal (a log file, CI); a terminal gets the redrawn bar.
    """

    out: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: Optional[bool] = None
    channels_last: Optional[bool] = None
    fast_kernels: Optional[bool] = None
    checkpoint_every: int = 0
    eval_every: int = 1
    log_every: int = 10
    progress: bool = True
    progress_every: float = 30.0
    max_nonfinite: int = 20
    resume: str = "auto"
    dist_timeout: float = 600.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def cache_dir() -> Path:
    """Where built data (the synthetic sets) is cached: ``$C2F_CACHE``, else
    ``$XDG_CACHE_HOME/c2f_fast``, else ``~/.cache/c2f_fast``."""
    if os.environ.get("C2F_CACHE"):
        return Path(os.environ["C2F_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "c2f_fast"


def data_root(data: DataConfig) -> Path:
    """``data.root``, or for the synthetic set with no root, its folder in the cache."""
    if data.root:
        return Path(data.root)
    if data.format == "synthetic":
        return cache_dir() / f"synthetic-{data.preset}-seed{data.synthetic_seed}"
    raise ConfigError(f"data.root: required for data.format={data.format} (the dataset's folder)")


def _plain(value: Any) -> Any:
    """Tuples as lists, so that the YAML stays plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_CHOICES = {
    "data.format": DATA_FORMATS, "data.loader": LOADERS, "data.difficult": DIFFICULT,
    "data.on_bad_image": ON_BAD_IMAGE, "data.verify": _VERIFY,
    "data.preset": tuple(sorted(PRESETS)),
    "optim.optimizer": OPTIMIZERS, "optim.schedule": SCHEDULES, "optim.feed": FEEDS,
    "run.device": DEVICES, "run.precision": PRECISIONS, "run.resume": RESUME,
}
_POSITIVE = {"data.batch_size", "data.eval_batch_size", "optim.epochs", "optim.lr", "run.eval_every",
             "run.log_every", "run.max_nonfinite", "run.dist_timeout", "run.progress_every"}
_NON_NEGATIVE = {"data.workers", "data.limit_train", "data.limit_test", "optim.backbone_lr_mult",
                 "optim.momentum", "optim.weight_decay", "optim.warmup_epochs", "optim.min_lr_ratio",
                 "optim.grad_clip", "optim.lambda1", "optim.lambda2", "optim.lambda3", "optim.lambda4",
                 "optim.eps", "optim.eps_v",
                 "run.checkpoint_every"}


def _convert(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` of field ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(key, value, inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {hint!r}")  # a bug in this module, not the user's


def _check_value(key: str, value: Any) -> None:
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{key}: expected one of {list(_CHOICES[key])}, got {value!r}")
    if value is None:
        return
    if key in _POSITIVE and not value > 0:
        raise ConfigError(f"{key}: expected a value > 0, got {value!r}")
    if key in _NON_NEGATIVE and not value >= 0:
        raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")


def _build_section(name: str, cls: type, values: dict) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (the {name} section has: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in values.items():
        full = f"{name}.{key}"
        kwargs[key] = _convert(full, value, hints[key])
        _check_value(full, kwargs[key])
    try:
        return cls(**kwargs)
    except ValueError as exc:  # ModelConfig's own checks name the field
        raise ConfigError(f"{name}.{exc}") from None


_SECTIONS = {f.name: f for f in fields(TrainConfig)}


def config_from_dict(values: dict) -> TrainConfig:
    """A :class:`TrainConfig` from nested dicts ``{"model": {...}, "data": {...}, ...}``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping with sections {list(_SECTIONS)}, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (expected: {', '.join(_SECTIONS)})")
    hints = typing.get_type_hints(TrainConfig)
    cfg = TrainConfig(**{name: _build_section(name, hints[name], values.get(name) or {}) for name in _SECTIONS})
    _check_across_sections(cfg)
    return cfg


def _check_across_sections(cfg: TrainConfig) -> None:
    """Loss terms that need a part of the model."""
    if cfg.optim.lambda3 > 0 and not cfg.model.glimpse_head:
        raise ConfigError(f"optim.lambda3: {cfg.optim.lambda3} weights the glimpse loss, which needs model.glimpse_head=true")
    if cfg.optim.lambda4 > 0 and cfg.model.variant not in ("lstm_l", "lstm_lg"):
        raise ConfigError(f"optim.lambda4: {cfg.optim.lambda4} weights the coverage penalty, which needs local attention "
                          f"(model.variant lstm_l or lstm_lg), got {cfg.model.variant!r}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` → ``(["optim", "lr"], 0.001)``; the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{item!r}: expected SECTION.KEY=VALUE (e.g. optim.lr=1e-3)")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{key}: expected SECTION.KEY with a section of {', '.join(_SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read the value {raw!r} ({exc})") from None
    if isinstance(value, str):
        value = _number_or_text(value)
    return parts, value


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; accept it as the number it plainly is."""
    try:
        return float(text) if any(c in text for c in ".eE") else text
    except ValueError:
        return text


def load_config(path: str | os.PathLike | dict | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The config of ``path`` (a YAML file, or an already-read dict; None: the defaults) with
    ``overrides`` applied."""
    values: dict = {}
    if isinstance(path, dict):
        values, path = {k: dict(v) for k, v in path.items()}, None
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping with sections {list(_SECTIONS)}")
        values = _fix_numbers(values)
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in _SECTIONS:
            raise ConfigError(f"{section}.{key}: unknown section (expected: {', '.join(_SECTIONS)})")
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        values[section][key] = value
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


#: Keys a continued run may change: how it executes and reports, not what it computes.
RESUMABLE_CHANGES = frozenset({
    "run.out", "run.resume", "run.dist_timeout", "run.progress", "run.progress_every", "run.log_every",
    "run.checkpoint_every", "run.eval_every", "run.max_nonfinite", "data.workers", "data.verify",
})


def config_differences(saved: dict, current: TrainConfig) -> list[str]:
    """The dotted keys whose values differ between a saved config dict (a checkpoint's) and
    ``current``, leaving out :data:`RESUMABLE_CHANGES`; sorted. A key the saved config lacks (an
    older version) counts with its default."""
    try:
        old = config_from_dict(saved).to_dict()
    except ConfigError:  # a key that no longer exists: compare the plain values
        old = _plain(saved)
    new = current.to_dict()
    keys = {f"{section}.{key}" for d in (old, new) for section, values in d.items()
            if isinstance(values, dict) for key in values}
    missing = object()

    def value(d: dict, key: str):
        section, name = key.split(".", 1)
        return (d.get(section) or {}).get(name, missing)

    return sorted(k for k in keys if k not in RESUMABLE_CHANGES and value(old, k) != value(new, k))


def _fix_numbers(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _fix_numbers(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_fix_numbers(v) for v in values]
    if isinstance(values, str):
        return _number_or_text(values)
    return values


__all__ = [
    "cache_dir", "config_differences", "data_root", "ConfigError", "RESUMABLE_CHANGES", "DataConfig",
    "OptimConfig", "RunConfig", "TrainConfig", "config_from_dict", "load_config", "parse_override"
]
