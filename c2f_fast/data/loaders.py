"""Image loaders: an NVIDIA DALI pipeline (the fast path), torchvision's nvJPEG decoding on the GPU
(the fast path without DALI) and a torchvision ``DataLoader`` (the baseline).

Backends (``backend=``): ``"dali"``, ``"nvjpeg"`` (``nvjpeg_pipeline.py``: files read in
``DataLoader`` workers, JPEGs decoded in batches on the device with ``torchvision.io.decode_jpeg``,
crop, flip, resize and normalisation on the device), ``"torch"``, and ``"auto"`` (the default):
DALI when ``nvidia.dali`` imports; else, on a CUDA device where torchvision decodes JPEGs, nvjpeg;
else torch (see :func:`choose_backend`; ``loader.reason`` says which and why).

Every backend yields ``(images, targets, indices)``:

- ``images``: ``[B, 3, S, S]`` in ``dtype`` (float32, float16 or bfloat16), RGB, normalised with the
  ImageNet mean/std (the torchvision VGG-16 weights expect it);
- ``targets``: ``[B, C]`` int8, the dataset's rows ``dataset.targets[indices]`` (1 / 0 / -1);
- ``indices``: ``[B]`` int64, the dataset indices of the images,

all on ``device`` (None: CPU). The backends compute the same function:

- evaluation: decode, resize the whole image to ``S x S`` (aspect ratio not kept: multi-label
  models need every object, a centre crop could cut some off; ML-GCN does the same), bilinear with
  antialiasing when shrinking (DALI ``INTERP_LINEAR`` + ``antialias``; torchvision ``BILINEAR`` +
  ``antialias=True``: both a triangle filter widened by the scale), then normalise;
- training: a random-resized crop (area fraction in ``crop_scale``, aspect ratio in ``crop_ratio``,
  10 attempts, the torchvision algorithm) resized to ``S x S`` the same way, a horizontal flip with
  probability 1/2, then normalise. DALI decodes only the crop (``decoders.image_random_crop``,
  ROI decoding); the others decode the whole image and then crop. ``torch`` and ``nvjpeg`` draw
  each view from ``(seed, epoch, index)`` and the decoded size (same seed, same crops); DALI draws
  from the same distribution with its own generator (same seed, different crops).
- EXIF orientation is not applied (boxes in VOC/COCO refer to the stored pixels); grayscale, CMYK
  and 16-bit images come out as 8-bit RGB.

Epochs and shards (``shard_id`` of ``num_shards``, e.g. one per GPU):

- evaluation visits every (kept) image exactly once per epoch over all shards, in dataset order;
  shard ``k`` holds the contiguous slice ``[floor(k N / K), floor((k+1) N / K))`` (DALI's
  partition, used by both backends) and yields ``ceil(len(slice) / B)`` batches, the last one
  partial. Shards may then differ by one batch, which is fine for evaluation (no collective per
  step: gather the outputs at the end).
- training draws one global permutation per epoch, the same on every shard (same ``seed``), and
  gives shard ``k`` the same contiguous slice of it. Every shard yields the same number of full
  batches, ``(N // K) // B``, so data-parallel ranks run the same number of steps and batch shapes
  stay static (compiled / graph-captured training steps); the (at most ``B``) images left over at
  the end of a shard's slice are not used in that epoch (a different random few each epoch).

Bad images: ``build_loader`` scans the images up front with :func:`c2f_fast.data.images.check_image`
(``verify="header"``: stat + the header + the last KiB, ~50 us per file; ``"decode"``: a full PIL
decode; ``"none"``). With ``on_bad_image="error"`` it raises :class:`BadImageError` naming the file
and the problem before any decoding starts; with ``"skip"`` it removes the bad images from the
epoch, lists them in ``loader.report`` and logs a warning with the count. A decoder error during
iteration (corruption the cheap scan cannot see) is raised as :class:`BadImageError` naming the file.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os

import numpy as np
import torch

from .base import (  # noqa: F401  (re-exported: the names' old home)
    _DTYPES,
    _ON_BAD,
    _VERIFY,
    BACKENDS,
    DEFAULT_CROP_RATIO,
    DEFAULT_CROP_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    ImageLoader,
    LoaderConfig,
    sample_seed,
    shard_bounds,
)
from .images import BadImageError, BadImageReport, scan_images  # noqa: F401 (BadImageError: re-exported)
from .records import MultiLabelSet

log = logging.getLogger(__name__)


def _resolve_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {dev} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device: expected None, 'cpu' or a CUDA device, got {dev}")
    return dev


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (min, max), got {value!r}") from None
    if not (low < a <= b <= high):
        raise ValueError(f"{name}: expected {low} < min <= max <= {high}, got ({a}, {b})")
    return a, b


def build_loader(
    dataset: MultiLabelSet,
    batch_size: int,
    train: bool,
    image_size: int,
    backend: str = "auto",
    device: torch.device | str | int | None = None,
    num_workers: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    on_bad_image: str = "error",
    dtype: torch.dtype = torch.float32,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    crop_ratio: tuple[float, float] = DEFAULT_CROP_RATIO,
    verify: str = "header",
    prefetch: int = 2,
) -> ImageLoader:
    """Build a loader over ``dataset`` (see the module docstring for what it yields and how).

    Args:
        dataset: the images and their int8 target rows.
        batch_size: images per batch (the last evaluation batch of a shard may be smaller).
        train: random-resized crop + flip, reshuffled every epoch, full batches only; else resize,
            dataset order, every image exactly once.
        image_size: side ``S`` of the square output.
        backend: ``"dali"`` (DALI pipeline; decodes on the GPU with nvJPEG when ``device`` is CUDA),
            ``"nvjpeg"`` (torchvision's batched JPEG decoding and the transforms on ``device``),
            ``"torch"`` (torchvision decode + transforms v2 in a ``DataLoader``), or ``"auto"``
            (:func:`choose_backend`).
        device: where the batches are delivered: None / ``"cpu"``, or a CUDA device.
        num_workers: DALI CPU threads, or ``DataLoader`` worker processes (0: in-process); None:
            :func:`default_workers`.
        shard_id, num_shards: this process's shard (e.g. its data-parallel rank and world size).
        seed: shuffling and augmentation seed; the same on every shard (the shards then share one
            permutation per epoch and split it).
        on_bad_image: ``"error"`` (raise :class:`BadImageError` before any decoding) or ``"skip"``
            (leave bad images out; listed in ``loader.report``).
        dtype: image dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``.
        crop_scale, crop_ratio: area fraction and aspect-ratio (w/h) ranges of the training crop.
        verify: up-front check of every image: ``"header"`` (cheap), ``"decode"`` (full PIL decode,
            milliseconds per image) or ``"none"``.
        prefetch: batches prepared ahead (DALI queue depth; ``DataLoader`` prefetch per worker).
    """
    if not isinstance(dataset, MultiLabelSet):
        raise ValueError(f"dataset: expected a MultiLabelSet, got {type(dataset).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards: expected a positive int, got {num_shards!r}")
    if not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id: expected 0 <= shard_id < num_shards={num_shards}, got {shard_id!r}")
    if on_bad_image not in _ON_BAD:
        raise ValueError(f"on_bad_image: expected one of {_ON_BAD}, got {on_bad_image!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {_DTYPES}, got {dtype!r}")
    if verify not in _VERIFY:
        raise ValueError(f"verify: expected one of {_VERIFY}, got {verify!r}")
    if not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch: expected a positive int, got {prefetch!r}")
    resolved_device = _resolve_device(device)
    backend, reason = choose_backend(backend, resolved_device)
    if num_workers is None:
        num_workers = default_workers(backend)
    config = LoaderConfig(
        batch_size=batch_size,
        train=bool(train),
        image_size=image_size,
        device=resolved_device,
        num_workers=num_workers,
        shard_id=shard_id,
        num_shards=num_shards,
        seed=int(seed),
        dtype=dtype,
        crop_scale=_check_range("crop_scale", crop_scale, 0.0, 1.0),
        crop_ratio=_check_range("crop_ratio", crop_ratio, 0.0, math.inf),
        prefetch=prefetch,
    )

    # Scan every image (not only this shard's): the partition into shards depends on which images
    # are kept, so all shards must agree on the kept set.
    report = BadImageReport(verify=verify)
    indices = np.arange(len(dataset), dtype=np.int64)
    if verify != "none":
        bad, seconds = scan_images(dataset.image_paths, decode=verify == "decode", num_threads=max(1, num_workers))
        report.checked, report.seconds = len(dataset), seconds
        if bad and on_bad_image == "error":
            _, path, problem = bad[0]
            raise BadImageError(path, problem, others=[(p, q) for _, p, q in bad[1:]])
        if bad:
            report.skipped = bad
            indices = np.setdiff1d(indices, [i for i, _, _ in bad])
            log.warning("skipping %d bad image(s) of %d: %s", len(bad), len(dataset),
                        "; ".join(f"{p}: {q}" for _, p, q in bad[:5]) + (" ..." if len(bad) > 5 else ""))

    n = len(indices)
    if n < num_shards:
        raise ValueError(f"num_shards: {num_shards} shards for {n} usable image(s); every shard needs one")
    if train and n // num_shards < batch_size:
        raise ValueError(
            f"batch_size: {batch_size} exceeds the {n // num_shards} training images per shard "
            f"({n} usable images, {num_shards} shard(s)); an epoch would have no full batch"
        )

    if backend == "dali":
        from .dali_pipeline import DaliLoader as Loader
    elif backend == "nvjpeg":
        from .nvjpeg_pipeline import NvjpegLoader as Loader
    else:
        from .torch_pipeline import TorchLoader as Loader
    loader = Loader(dataset, indices, config, report)
    loader.reason = reason
    return loader


def choose_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """``(backend, why)``: ``backend`` itself unless it is ``"auto"``, which picks

    1. ``"dali"`` when ``nvidia.dali`` imports (nvJPEG inside DALI on CUDA, its CPU operators
       otherwise);
    2. else, on a CUDA ``device``, ``"nvjpeg"`` when torchvision decodes a JPEG there (a probe of a
       few pixels: a torchvision built without CUDA, or a broken nvJPEG, fails it);
    3. else ``"torch"``.
    """
    if backend != "auto":
        return backend, "requested"
    problem = _dali_import_problem()
    if problem is None:
        where = "its nvJPEG decoding on CUDA" if device.type == "cuda" else "its CPU operators (no CUDA)"
        return "dali", f"auto: nvidia.dali imports; {where}"
    if device.type != "cuda":
        return "torch", f"auto: {problem}, " + ("CPU device" if torch.cuda.is_available() else "no CUDA")
    nvjpeg_problem = _nvjpeg_problem(device)
    if nvjpeg_problem is None:
        return "nvjpeg", f"auto: {problem}; CUDA: torchvision's nvJPEG decoding on {device}"
    return "torch", f"auto: {problem}; {nvjpeg_problem}"


def _dali_import_problem() -> str | None:
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return "nvidia.dali not importable"
    except Exception as err:  # noqa: BLE001 -- a broken install (missing CUDA libraries, ...)
        return f"nvidia.dali fails to import ({type(err).__name__}: {err})"
    return None


@functools.lru_cache(maxsize=None)
def _nvjpeg_problem(device: torch.device) -> str | None:
    """None when torchvision decodes a small JPEG on ``device``, else why not."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    from . import torch_pipeline  # noqa: F401 -- silences torchvision's deprecation warning

    try:
        data = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    except Exception as err:  # noqa: BLE001 -- any failure means: not this backend
        return f"torchvision cannot decode JPEGs on {device} ({type(err).__name__}: {err})"
    return None


def default_workers(backend: str) -> int:
    """Loader workers for ``backend`` from this process's share of the CPU cores (the cores it may
    run on, divided by ``LOCAL_WORLD_SIZE`` processes per machine under torchrun):

    - ``dali``: that many threads, at most 8;
    - ``nvjpeg``: one less (the main process drives the GPU), at most 4 (workers only read files);
    - ``torch``: one less, at most 12 (workers decode and resize on the CPU).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    share = max(1, cores // local_processes)
    if backend == "dali":
        return min(8, share)
    return min(4 if backend == "nvjpeg" else 12, share - 1)
