"""The feature cache: a frozen encoder's outputs, computed once, for training the decoder alone.

With ``optim.freeze_encoder=true`` the encoder's output for an image never changes, yet an image
run recomputes it at every epoch, and the encoder is nearly all of the compute (VGG-16: ~15.5 G
multiply-adds per 224-px image, the decoder well under 1 % of that). ``c2f cache-features`` runs
the encoder once over the train and test splits and stores ``a`` [N, L, D] and ``f_fc`` [N, F];
``c2f train ... data.features=DIR`` then trains from the cache through the same ``train()``: the
same ``C2FNet`` (its encoder is built, checked against the cache and saved, but never run), the
same evaluation, pointing game (boxes from the dataset), checkpoints and DDP. docs/features.md
says when a cache is valid.

A cache folder::

    manifest.json                  what the cache holds (see :func:`manifest_for`)
    train/00000.a.npy              a  [V, n, L, D] of images 0..n-1 of the train split, V views
    train/00000.fc.npy             f_fc [V, n, F]
    train/00001.a.npy ...          the next ``shard_size`` images
    test/00000.a.npy ...           V = 1 (the evaluation view)

Shards are ``.npy`` files (memory-mapped when read), 16-bit by default (``float16``; ``bfloat16``
is stored as its raw ``uint16`` bits, numpy having no bfloat16), written to a temporary file and
renamed into place, so a shard is either whole or absent. A rerun writes only the shards that are
missing (or the wrong size), image batches aligned to the shard, so the result is the same file
byte for byte. Under torchrun, process ``r`` of ``W`` writes the shards ``r, r + W, ...``.

Views: by default the evaluation view (the whole image resized, as the evaluation loaders do).
``views=K`` stores K augmented views of each training image instead (the training loaders'
random-resized crop and flip, each view's randomness fixed by ``(seed, view, image)``); training
draws one of them per image and epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import _fsync_dir, atomic_write
from .config import TrainConfig, data_root
from .distributed import DistInfo, barrier, broadcast_object, init_distributed, shutdown
from .runtime import Settings, load_datasets, resolve_settings

FORMAT = "c2f_fast-features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")

#: Storage dtypes: name -> (numpy dtype of the file, torch dtype of the values).
DTYPES = {"fp16": (np.float16, torch.float16), "bf16": (np.uint16, torch.bfloat16), "fp32": (np.float32, torch.float32)}
DEFAULT_DTYPE = "fp16"
DEFAULT_SHARD_SIZE = 1024

#: The evaluation view, as every loader computes it (``data.base.resize_whole`` + ``normalize``).
EVAL_VIEW = "the whole image resized to SxS (bilinear, antialiased), RGB, ImageNet mean/std"


class FeatureCacheError(ValueError):
    """A feature cache that does not fit the run, or a shard that is missing or damaged; the message
    names the field or the file."""


# ----------------------------------------------------------------------------- fingerprints
def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes; buffers included)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset, root: Path) -> str:
    """SHA-256 of a split's class names, image list (relative to the data root, so that a moved
    data set keeps its fingerprint) and target rows."""
    h = hashlib.sha256()
    h.update(json.dumps(list(dataset.class_names)).encode())
    for path in dataset.image_paths:
        h.update(os.path.relpath(path, root).encode() + b"\n")
    h.update(np.ascontiguousarray(dataset.targets, dtype=np.int8).tobytes())
    return h.hexdigest()


def train_views(cfg: TrainConfig, views: int) -> Optional[dict]:
    """The augmentation of the stored training views (None: the evaluation view)."""
    if not views:
        return None
    return {"crop": "random-resized (torchvision's algorithm)", "crop_scale": list(cfg.data.crop_scale),
            "crop_ratio": list(cfg.data.crop_ratio), "flip": 0.5, "seed": cfg.run.seed}


def manifest_for(cfg: TrainConfig, encoder: nn.Module, train_set, test_set, views: int, dtype: str,
                 shard_size: int, settings: Settings) -> dict:
    """What a cache of ``cfg``'s encoder over its data holds. The fields that decide whether a run
    may train from it (:data:`RUN_FIELDS`): ``backbone``, ``weights`` (the encoder's SHA-256),
    ``image_size``, ``preprocessing`` (the views) and ``splits`` (image lists and labels)."""
    from .encoders import feature_map_size

    root = data_root(cfg.data)
    side = feature_map_size(cfg.model.backbone, cfg.model.image_size)
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "backbone": cfg.model.backbone,
        "weights": {"sha256": weights_digest(encoder),
                    "source": cfg.model.pretrained or f"random initialisation (run.seed={cfg.run.seed})"},
        "image_size": cfg.model.image_size,
        "preprocessing": {"eval_view": EVAL_VIEW, "train_views": train_views(cfg, views)},
        "views": views,
        "dtype": dtype,
        "shapes": {"L": side * side, "D": encoder.feat_dim, "F": encoder.fc_dim},
        "shard_size": shard_size,
        "splits": {
            "train": {"num_images": len(train_set), "views": max(1, views),
                      "fingerprint": dataset_fingerprint(train_set, root)},
            "test": {"num_images": len(test_set), "views": 1, "fingerprint": dataset_fingerprint(test_set, root)},
        },
        # how the features were computed: a resumed cache must compute them the same way
        "compute": {"device": settings.device.type, "precision": settings.precision, "loader": cfg.data.loader},
        "dataset": {"format": cfg.data.format, "root": str(root), "train_split": cfg.data.train_split,
                    "test_split": cfg.data.test_split, "class_names": list(train_set.class_names)},
    }


#: The manifest fields a training run must match, and the fields a resumed cache-features must match.
RUN_FIELDS = ("backbone", "weights", "image_size", "preprocessing", "splits")
RESUME_FIELDS = (*RUN_FIELDS, "views", "dtype", "shapes", "shard_size", "compute")


def _differs(cached: dict, wanted: dict, fields) -> Optional[str]:
    return next((f for f in fields if cached.get(f) != wanted.get(f)), None)


def _chunks(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every shard of a split."""
    return [(s, min(num_images, s + shard_size)) for s in range(0, num_images, shard_size)]


def shard_paths(folder: Path, split: str, chunk: int) -> tuple[Path, Path]:
    """The ``a`` and ``f_fc`` files of shard ``chunk`` of ``split``."""
    return folder / split / f"{chunk:05d}.a.npy", folder / split / f"{chunk:05d}.fc.npy"


def _shard_shapes(manifest: dict, split: str, rows: int) -> tuple[tuple, tuple]:
    v, sh = manifest["splits"][split]["views"], manifest["shapes"]
    return (v, rows, sh["L"], sh["D"]), (v, rows, sh["F"])


def _open_shard(path: Path, shape: tuple, dtype) -> np.ndarray:
    """A shard memory-mapped read-only; :class:`FeatureCacheError` naming the file when it is
    missing, truncated or of another shape or dtype."""
    if not path.is_file():
        raise FeatureCacheError(f"{path}: missing shard (finish the cache with c2f cache-features, same arguments)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FeatureCacheError(f"{path}: damaged or truncated shard ({exc}); delete it and rerun "
                                f"c2f cache-features to rewrite it") from None
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise FeatureCacheError(f"{path}: shard of shape {array.shape} {array.dtype}, the manifest says "
                                f"{shape} {np.dtype(dtype)}; delete it and rerun c2f cache-features")
    return array


def _shard_complete(path: Path, shape: tuple, dtype) -> bool:
    try:
        _open_shard(path, shape, dtype)
        return True
    except FeatureCacheError:
        return False


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FeatureCacheError(f"{folder}: no {MANIFEST}: not a feature cache (write one with c2f cache-features)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FeatureCacheError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise FeatureCacheError(f"{path}: not a c2f_fast feature cache of format version {FORMAT_VERSION}")
    return manifest


# ----------------------------------------------------------------------------- writing
def _bytes_per_image(manifest: dict, split: str) -> int:
    sh, item = manifest["shapes"], np.dtype(DTYPES[manifest["dtype"]][0]).itemsize
    return manifest["splits"][split]["views"] * (sh["L"] * sh["D"] + sh["F"]) * item


def _keep(items):
    """The DataLoader's collate: the items as they are (bad images are raised by the main process,
    with the file's name)."""
    return items


def cache_features(cfg: TrainConfig, out: str | os.PathLike, views: int = 0, dtype: str = DEFAULT_DTYPE,
                   shard_size: int = DEFAULT_SHARD_SIZE, batch_size: Optional[int] = None,
                   progress: bool = True, stop_after: Optional[int] = None) -> dict:
    """``c2f cache-features``: run ``cfg``'s encoder over its train and test splits and write the
    cache to ``out`` (see the module docstring); finish a cache cut short. Returns a summary.

    ``batch_size``: images per encoder batch (default ``data.eval_batch_size`` or
    ``data.batch_size``; must divide ``shard_size``). ``stop_after``: write at most this many
    shards on this process and stop (the tests' interruption).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if not isinstance(views, int) or views < 0:
        raise ValueError(f"views: expected an integer >= 0, got {views!r}")
    batch_size = batch_size or cfg.data.eval_batch_size or cfg.data.batch_size
    if shard_size < 1 or batch_size < 1 or shard_size % batch_size:
        raise ValueError(f"shard_size: expected a positive multiple of the batch size {batch_size} (every "
                         f"shard is computed in the same batches, so a rerun writes the same bytes), got {shard_size}")
    if cfg.data.on_bad_image != "error":
        raise ValueError("data.on_bad_image: the cache stores every image of a split; use 'error'")
    info = init_distributed(cfg.run.device)
    try:
        return _cache_features(cfg, Path(out), views, dtype, shard_size, batch_size, progress, stop_after, info)
    finally:
        shutdown(info)


def _cache_features(cfg, out, views, dtype, shard_size, batch_size, progress, stop_after, info: DistInfo) -> dict:
    from .encoders import build_encoder

    t0 = time.perf_counter()
    settings = resolve_settings(cfg, info.device)
    train_set, test_set = load_datasets(cfg, info)
    sets = {"train": train_set, "test": test_set}
    torch.manual_seed(cfg.run.seed)  # as train() seeds before it builds the model: a random encoder matches
    encoder = build_encoder(cfg.model.backbone, cfg.model.pretrained).eval().requires_grad_(False)
    manifest = manifest_for(cfg, encoder, train_set, test_set, views, dtype, shard_size, settings)
    file_dtype = DTYPES[dtype][0]

    def missing(split: str) -> list[int]:
        return [c for c, (s, e) in enumerate(_chunks(len(sets[split]), shard_size))
                if not all(_shard_complete(p, shape, file_dtype) for p, shape in
                           zip(shard_paths(out, split, c), _shard_shapes(manifest, split, e - s)))]

    # rank 0 checks the folder, the disk and writes the manifest; every rank hears of a refusal
    problem = None
    if info.is_main:
        problem = _prepare_folder(out, manifest, {s: missing(s) for s in SPLITS}, shard_size, sets)
    problem = broadcast_object(info, problem)
    if problem:
        raise FeatureCacheError(problem)
    barrier(info)

    encoder = encoder.to(settings.device)
    if settings.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    todo = {s: [c for c in missing(s) if c % info.world_size == info.rank] for s in SPLITS}
    total = sum((min(len(sets[s]), (c + 1) * shard_size) - c * shard_size) * manifest["splits"][s]["views"]
                for s in SPLITS for c in todo[s])
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="cache-features", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    written = 0
    for split in SPLITS:
        if stop_after is not None and written >= stop_after:
            break
        chunks = todo[split] if stop_after is None else todo[split][: stop_after - written]
        written += _write_split(out, split, sets[split], chunks, manifest, cfg, encoder, settings,
                                batch_size, bar)
    bar.close()
    barrier(info)
    summary = {"out": str(out), "shards_written": written, "seconds": time.perf_counter() - t0,
               "images": {s: len(sets[s]) for s in SPLITS}, "views": views, "dtype": dtype}
    if info.is_main and stop_after is None:
        left = {s: missing(s) for s in SPLITS}
        if any(left.values()):  # another process failed: say which shards are still missing
            raise FeatureCacheError(f"{out}: shards still missing after the run: {left}")
    return summary


def _prepare_folder(out: Path, manifest: dict, missing: dict, shard_size: int, sets: dict) -> Optional[str]:
    """Check ``out`` (a new folder, or a cache of the same config to finish) and the free disk
    space, print the size, write the manifest. Returns the reason to refuse, or None."""
    path = out / MANIFEST
    if path.is_file():
        try:
            cached = _read_manifest(out)
        except FeatureCacheError as exc:
            return str(exc)
        field = _differs(cached, manifest, RESUME_FIELDS)
        if field:
            return (f"{path}: this folder holds a cache of another config ({field}: {cached.get(field)!r}, "
                    f"now {manifest.get(field)!r}); choose another --out or delete it")
    elif out.exists() and any(out.iterdir()):
        return f"{out}: not empty and holds no {MANIFEST}; choose an empty or new --out folder"
    need = {s: len(sets[s]) * _bytes_per_image(manifest, s) for s in SPLITS}
    left = sum(sum(min(len(sets[s]), (c + 1) * shard_size) - c * shard_size for c in missing[s])
               * _bytes_per_image(manifest, s) for s in SPLITS)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    print(f"feature cache {out}: {_gib(sum(need.values()))} in all (train {_gib(need['train'])}, test "
          f"{_gib(need['test'])}; {manifest['dtype']}), {_gib(left)} still to write, {_gib(free)} free")
    if left > free:
        return (f"{out}: {_gib(left)} to write but only {_gib(free)} free on that disk; free some space or "
                f"choose another --out")
    for split in SPLITS:  # temporary files of a run that was killed
        (out / split).mkdir(exist_ok=True)
        for tmp in (out / split).glob(".*.tmp"):
            tmp.unlink()
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _write_split(out: Path, split: str, dataset, chunks: list[int], manifest: dict, cfg: TrainConfig,
                 encoder: nn.Module, settings: Settings, batch_size: int, bar) -> int:
    """Compute and write the shards ``chunks`` of ``split``; returns how many were written."""
    if not chunks:
        return 0
    shard_size, file_dtype = manifest["shard_size"], DTYPES[manifest["dtype"]][0]
    store_dtype = DTYPES[manifest["dtype"]][1]
    spans = _chunks(len(dataset), shard_size)
    open_files: dict[int, tuple] = {}
    left = {c: manifest["splits"][split]["views"] * (spans[c][1] - spans[c][0]) for c in chunks}
    written = 0
    with torch.no_grad():
        for view, x, indices in _view_batches(split, dataset, chunks, spans, manifest, cfg, settings, batch_size):
            c, row = divmod(int(indices[0]), shard_size)
            n = len(indices)
            if not np.array_equal(indices, np.arange(indices[0], indices[0] + n)) or row + n > len(range(*spans[c])):
                raise RuntimeError(f"{split}: a batch of images {indices.tolist()} is not one run of shard {c}")
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with settings.autocast():
                a, fc = encoder(x)
            if c not in open_files:
                shapes = _shard_shapes(manifest, split, len(range(*spans[c])))
                open_files[c] = tuple(
                    (path, _tmp(path), np.lib.format.open_memmap(_tmp(path), mode="w+", dtype=file_dtype, shape=shape))
                    for path, shape in zip(shard_paths(out, split, c), shapes))
            for (path, _, array), value in zip(open_files[c], (a, fc)):
                array[view, row:row + n] = _to_numpy(value, store_dtype, path)
            bar.update(n)
            left[c] -= n
            if left[c] == 0:
                for path, tmp, array in open_files.pop(c):
                    array.flush()
                    del array
                    _fsync_file(tmp)
                    os.replace(tmp, path)
                _fsync_dir(out / split)
                written += 1
    return written


def _view_batches(split: str, dataset, chunks: list[int], spans, manifest: dict, cfg: TrainConfig,
                  settings: Settings, batch_size: int):
    """``(view, normalised images on the device, dataset indices)`` for every image of ``chunks``
    and every view, in batches that start at a shard's first image (the same batches whatever
    else is written).

    The evaluation view comes from the run's loader (``data.loader``: DALI, decoding on the GPU
    when there is one, or torch), in dataset order. Augmented views come from the torch loader's
    transforms, each image's crop and flip drawn from a generator seeded by ``(seed, view, index)``.
    """
    from .data import MultiLabelSet, build_loader
    from .data.base import LoaderConfig, normalize, sample_seed
    from .data.images import BadImageError

    mine = np.concatenate([np.arange(*spans[c]) for c in chunks])
    if not (split == "train" and manifest["views"] > 0):
        subset = MultiLabelSet([dataset.image_paths[i] for i in mine], dataset.targets[mine], dataset.class_names)
        loader = build_loader(subset, batch_size, train=False, image_size=cfg.model.image_size, backend=cfg.data.loader,
                              device=settings.device, num_workers=cfg.data.workers, seed=cfg.run.seed,
                              on_bad_image="error", verify=cfg.data.verify)
        for images, _, indices in loader:
            yield 0, images, mine[indices.cpu().numpy()]
        return

    from torch.utils.data import DataLoader

    from .data.torch_pipeline import ImageFileDataset, worker_context

    batches = []
    for c in chunks:
        start, end = spans[c]
        for v in range(manifest["views"]):
            for b in range(start, end, batch_size):
                batches.append([(i, sample_seed(cfg.run.seed, v, i, 3)) for i in range(b, min(end, b + batch_size))])
    views = [v for c in chunks for v in range(manifest["views"])
             for _ in range(0, spans[c][1] - spans[c][0], batch_size)]
    config = LoaderConfig(batch_size=batch_size, train=True, image_size=cfg.model.image_size,
                          device=torch.device("cpu"), num_workers=cfg.data.workers, shard_id=0, num_shards=1,
                          seed=cfg.run.seed, dtype=torch.float32, crop_scale=cfg.data.crop_scale,
                          crop_ratio=cfg.data.crop_ratio, prefetch=2)
    workers = cfg.data.workers
    loader = DataLoader(ImageFileDataset(list(dataset.image_paths), config), batch_sampler=batches,
                        num_workers=workers, collate_fn=_keep, pin_memory=settings.device.type == "cuda",
                        prefetch_factor=2 if workers else None,
                        multiprocessing_context=worker_context() if workers else None)
    for view, items in zip(views, loader):
        bad = [(index, problem) for _, index, problem in items if problem is not None]
        if bad:
            raise BadImageError(dataset.image_paths[bad[0][0]], bad[0][1],
                                others=[(dataset.image_paths[i], p) for i, p in bad[1:]])
        images = torch.stack([image for image, _, _ in items]).to(settings.device, non_blocking=True)
        yield view, normalize(images), np.array([index for _, index, _ in items])


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_numpy(value: torch.Tensor, dtype: torch.dtype, path: Path) -> np.ndarray:
    """The encoder's output in the storage dtype, as the file's numpy dtype."""
    stored = value.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(value).all()):
        raise FeatureCacheError(f"{path}: encoder outputs exceed float16's range (max {value.abs().max().item():.3g});"
                                f" use --dtype bf16 or fp32")
    stored = stored.cpu()
    if dtype == torch.bfloat16:
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


# ----------------------------------------------------------------------------- reading
class FeatureStore:
    """A cache folder, opened for reading: its manifest, and its shards memory-mapped on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)

    def check(self, cfg: TrainConfig, train_set, test_set, encoder_digest: str) -> None:
        """Refuse (:class:`FeatureCacheError` naming the field) a cache that is not of ``cfg``'s
        encoder, weights, image size, preprocessing or data."""
        m, where = self.manifest, self.folder / MANIFEST
        if m["backbone"] != cfg.model.backbone:
            raise FeatureCacheError(f"{where}: backbone: the cache holds {m['backbone']} features, the run's "
                                    f"model.backbone is {cfg.model.backbone}")
        if m["weights"]["sha256"] != encoder_digest:
            raise FeatureCacheError(
                f"{where}: weights: the cache was computed with other encoder weights ({m['weights']['source']}, "
                f"sha256 {m['weights']['sha256'][:12]}...) than the run's (model.pretrained="
                f"{cfg.model.pretrained}, sha256 {encoder_digest[:12]}...)")
        if m["image_size"] != cfg.model.image_size:
            raise FeatureCacheError(f"{where}: image_size: the cache holds {m['image_size']}-px features, the "
                                    f"run's model.image_size is {cfg.model.image_size}")
        views = m["preprocessing"].get("train_views")
        wanted = {"eval_view": EVAL_VIEW, "train_views": views and train_views(cfg, m["views"])}
        if views:  # the stored views' seed is theirs: only the augmentation itself must agree
            wanted["train_views"]["seed"] = views.get("seed")
        if m["preprocessing"] != wanted:
            raise FeatureCacheError(f"{where}: preprocessing: the cache's {m['preprocessing']} differs from the "
                                    f"run's {wanted} (data.crop_scale, data.crop_ratio)")
        root = data_root(cfg.data)
        for split, dataset in (("train", train_set), ("test", test_set)):
            cached = m["splits"][split]
            if cached["fingerprint"] != dataset_fingerprint(dataset, root):
                raise FeatureCacheError(
                    f"{where}: dataset: the {split} split differs from the cache's ({len(dataset)} images now, "
                    f"{cached['num_images']} cached; image list, order or labels changed: data.*)")

    def open_split(self, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The ``a`` and ``f_fc`` shards of ``split``, memory-mapped; every file checked."""
        m = self.manifest
        file_dtype = DTYPES[m["dtype"]][0]
        a, fc = [], []
        for c, (s, e) in enumerate(_chunks(m["splits"][split]["num_images"], m["shard_size"])):
            shapes = _shard_shapes(m, split, e - s)
            paths = shard_paths(self.folder, split, c)
            a.append(_open_shard(paths[0], shapes[0], file_dtype))
            fc.append(_open_shard(paths[1], shapes[1], file_dtype))
        return a, fc


class FeatureLoader:
    """Batches ``((a, f_fc), targets, indices)`` from a cache, with the image loaders' epochs and
    shards (``data.base.ImageLoader``; the same permutation as the torch loader for a seed), so
    that ``train()`` and ``evaluate()`` take it as they take an image loader. Training draws one of
    an image's stored views per epoch. On CUDA the split is copied to the GPU once when it takes
    at most half of the free memory; otherwise rows are read from the memory-mapped shards."""

    backend = "features"

    def __init__(self, store: FeatureStore, split: str, dataset, batch_size: int, train: bool,
                 device: torch.device, dtype: torch.dtype, shard_id: int = 0, num_shards: int = 1, seed: int = 0):
        m = store.manifest
        self.dataset, self.train, self.device, self.dtype = dataset, train, device, dtype
        self.batch_size, self.shard_id, self.num_shards, self.seed = batch_size, shard_id, num_shards, seed
        self.views = m["splits"][split]["views"]
        self.shard_size = m["shard_size"]
        self.store_dtype = DTYPES[m["dtype"]][1]
        n = len(dataset)
        if n != m["splits"][split]["num_images"]:
            raise FeatureCacheError(f"{store.folder / MANIFEST}: dataset: {n} {split} images, the cache has "
                                    f"{m['splits'][split]['num_images']}")
        from .data.base import shard_bounds

        start, end = shard_bounds(n, shard_id, num_shards)
        if train:
            if n // num_shards < batch_size:
                raise ValueError(f"batch_size: {batch_size} exceeds the {n // num_shards} training images per shard")
            self._steps = (n // num_shards) // batch_size
        else:
            self._steps = math.ceil((end - start) / batch_size)
        self.epoch = 0
        self.a, self.fc = store.open_split(split)
        self._targets = torch.from_numpy(np.ascontiguousarray(dataset.targets)).to(device)
        self._on_device = None
        if device.type == "cuda":
            need = sum(x.nbytes for x in (*self.a, *self.fc))
            if need <= torch.cuda.mem_get_info(device)[0] // 2:
                self._on_device = tuple(
                    torch.cat([self._tensor(np.array(x)).to(device) for x in shards], dim=1)
                    for shards in (self.a, self.fc))

    def __len__(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` from batch ``start_batch`` on (a resume
        mid-epoch: the earlier batches are not read; the later ones are an uninterrupted epoch's)."""
        if not 0 <= int(start_batch) <= self._steps:
            raise ValueError(f"start_batch: expected 0 <= start_batch <= {self._steps}, got {start_batch!r}")
        self.epoch, self._start_batch = int(epoch), int(start_batch)

    def resume_state(self) -> dict:
        return {}  # no hidden reader state: epoch and start batch say everything

    def resume(self, state: dict) -> None:
        pass

    def __iter__(self):
        epoch, start = self.epoch, getattr(self, "_start_batch", 0)
        self.epoch, self._start_batch = self.epoch + 1, 0
        return self._epoch(epoch, start)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if self.store_dtype == torch.bfloat16 else t

    def _epoch(self, epoch: int, start_batch: int = 0):
        from .data.base import sample_seed, shard_bounds

        n, B = len(self.dataset), self.batch_size
        order = np.arange(n)
        if self.train:  # one permutation per epoch, the same on every shard (ShardBatchSampler's)
            order = order[np.random.default_rng(sample_seed(self.seed, epoch, 0)).permutation(n)]
        start, end = shard_bounds(n, self.shard_id, self.num_shards)
        mine = order[start:end]
        if self.train:
            mine = mine[: self._steps * B]
        views = np.zeros(n, dtype=np.int64)
        if self.train and self.views > 1:
            views = np.random.default_rng(sample_seed(self.seed, epoch, 1)).integers(self.views, size=n)
        for b in range(start_batch * B, len(mine), B):
            idx = mine[b:b + B]
            a, fc = self._rows(idx, views[idx])
            indices = torch.from_numpy(idx).to(self.device)
            yield (a, fc), self._targets.index_select(0, indices), indices

    def _rows(self, idx: np.ndarray, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._on_device is not None:
            i = torch.from_numpy(idx).to(self.device)
            v = torch.from_numpy(views).to(self.device)
            return tuple(x[v, i].to(self.dtype) for x in self._on_device)
        chunk, row = idx // self.shard_size, idx % self.shard_size
        out = []
        for shards in (self.a, self.fc):
            rows = np.empty((len(idx), *shards[0].shape[2:]), dtype=shards[0].dtype)
            for c in np.unique(chunk):
                m = chunk == c
                rows[m] = shards[c][views[m], row[m]]
            out.append(self._tensor(rows).to(self.device, self.dtype, non_blocking=True))
        return out[0], out[1]


class CachedEncoderNet(nn.Module):
    """A ``C2FNet`` fed its encoder's outputs: ``forward((a, f_fc), label_seq)`` is
    ``model.decode(a, f_fc, label_seq)``. Training and evaluation call it as they call the model
    on images; ``model`` (encoder included) is what the run saves."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, label_seq: Optional[torch.Tensor] = None):
        a, f_fc = inputs
        return self.model.decode(a, f_fc, label_seq)


def feature_run(cfg: TrainConfig, model: nn.Module, train_set, test_set, info: DistInfo,
                settings: Settings) -> tuple[FeatureLoader, FeatureLoader, CachedEncoderNet, Settings]:
    """For ``train()`` with ``data.features``: the cache checked against the run, its loaders,
    the model to call on their batches, and the settings (channels_last off: no images)."""
    from .config import ConfigError

    if not cfg.optim.freeze_encoder:
        raise ConfigError("data.features: training from a feature cache needs optim.freeze_encoder=true "
                          "(the cache holds a frozen encoder's outputs; fine-tuning needs images)")
    store = FeatureStore(cfg.data.features)
    digest = broadcast_object(info, weights_digest(model.encoder))  # rank 0's encoder: DDP broadcasts it
    store.check(cfg, train_set, test_set, digest)
    dtype = settings.amp_dtype or torch.float32
    common = dict(device=settings.device, dtype=dtype, shard_id=info.rank, num_shards=info.world_size,
                  seed=cfg.run.seed)
    train_loader = FeatureLoader(store, "train", train_set, cfg.data.batch_size, True, **common)
    test_loader = FeatureLoader(store, "test", test_set, cfg.data.eval_batch_size or cfg.data.batch_size,
                                False, **common)
    return train_loader, test_loader, CachedEncoderNet(model), replace(settings, channels_last=False)


__all__ = ["CachedEncoderNet", "FeatureCacheError", "FeatureLoader", "FeatureStore", "cache_features",
           "dataset_fingerprint", "feature_run", "manifest_for", "shard_paths", "weights_digest"]
