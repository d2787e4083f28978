"""Types shared by the loader front end (``loaders.build_loader``) and its backends
(``dali_pipeline``, ``torch_pipeline``): the settings, the loader base class, the shard partition,
per-sample seeds and the normalisation constants.

They live here, not in ``loaders``, so that the backends import them without importing
``loaders`` (which imports the backends): no import cycle. ``loaders`` re-exports every name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .images import BadImageReport
from .records import MultiLabelSet

#: ImageNet statistics of RGB in [0, 1] (torchvision's pretrained weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Default area fraction of the training crop. torchvision's ImageNet default (0.08, 1) keeps as
#: little as 8 % of the image: with image-level multi-label targets, such crops often cut every
#: instance of a labelled class away and the target row becomes wrong. A quarter keeps most objects.
DEFAULT_CROP_SCALE = (0.25, 1.0)
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

#: ``auto`` picks one of the others for the machine (:func:`c2f_fast.data.loaders.choose_backend`).
BACKENDS = ("auto", "dali", "nvjpeg", "torch")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_VERIFY = ("header", "decode", "none")
_ON_BAD = ("error", "skip")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LoaderConfig:
    """The settings both backends share (validated by :func:`build_loader`)."""

    batch_size: int
    train: bool
    image_size: int
    device: torch.device
    num_workers: int
    shard_id: int
    num_shards: int
    seed: int
    dtype: torch.dtype
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    prefetch: int


def resize_whole(images: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation's resize: uint8 ``[..., 3, H, W]`` → ``[..., 3, size, size]``, the whole image
    (aspect ratio not kept), bilinear with antialiasing. The torch loader, the inference module
    and the figures all go through it, so they see the same pixels."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[B, 3, S, S]`` → float32 ``(x / 255 - mean) / std`` with ImageNet's statistics."""
    mean = torch.tensor([255.0 * m for m in IMAGENET_MEAN], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor([255.0 * s for s in IMAGENET_STD], device=images.device).view(1, 3, 1, 1)
    return images.float().sub_(mean).div_(std)


def shard_bounds(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """``[start, end)`` of shard ``shard_id`` over ``n`` samples: DALI's reader partition."""
    return (shard_id * n) // num_shards, ((shard_id + 1) * n) // num_shards


def sample_seed(*keys: int) -> int:
    """A 63-bit seed mixing ``keys`` (seed, epoch, shard, index): no overlap between nearby keys."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class ImageLoader(ABC):
    """An epoch-iterable loader of ``(images, targets, indices)`` batches (see the module docstring).

    Attributes: ``dataset``; ``indices`` (the dataset indices the loader draws from: all of them
    minus skipped bad images); ``config``; ``report`` (:class:`BadImageReport`); ``backend``.
    """

    backend: str = ""
    #: Why this backend runs (set by :func:`build_loader`, e.g. ``"auto: nvidia.dali not importable"``).
    reason: str = ""

    def __init__(
        self, dataset: MultiLabelSet, indices: np.ndarray, config: LoaderConfig, report: BadImageReport
    ) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.config = config
        self.report = report
        n = len(self.indices)
        start, end = shard_bounds(n, config.shard_id, config.num_shards)
        self.shard_size = end - start
        if config.train:
            self._steps = (n // config.num_shards) // config.batch_size
        else:
            self._steps = math.ceil(self.shard_size / config.batch_size)
        # Targets live on the output device once; a batch's rows are gathered there by index.
        self._targets = torch.from_numpy(np.ascontiguousarray(dataset.targets)).to(config.device)

    def __len__(self) -> int:
        """Batches per epoch on this shard."""
        return self._steps

    @property
    def num_samples(self) -> int:
        """Images per epoch on this shard."""
        return self._steps * self.config.batch_size if self.config.train else self.shard_size

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    # Exact resume of a training loader (a checkpoint taken mid-epoch continues the same epoch
    # order and augmentation). A loader whose order is a function of (seed, epoch, batch) has a
    # ``set_epoch(epoch, start_batch=0)`` and keeps nothing here; one with hidden reader or random
    # state (DALI) returns that state from ``resume_state`` and restores it in ``resume``. Either
    # way the batches before the resume position are skipped without being read or decoded.
    def resume_state(self) -> dict:
        """What a checkpoint keeps to continue this loader where its consumer stands (after the
        batches already handed out): ``{}`` unless the backend has hidden state."""
        return {}

    def resume(self, state: dict) -> None:
        """Continue from ``state`` (``resume_state()`` of a loader over the same data, settings and
        shard): the next ``iter()`` yields the rest of the epoch that state was taken in."""
        if state:
            raise ValueError(f"{type(self).__name__}: cannot resume from a {sorted(state)} loader state "
                             f"(written by another loader backend?)")

    def _gather_targets(self, indices: torch.Tensor) -> torch.Tensor:
        return self._targets.index_select(0, indices.to(self._targets.device))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(n={len(self.indices)}, batch_size={c.batch_size}, train={c.train}, "
            f"image_size={c.image_size}, shard={c.shard_id}/{c.num_shards}, device={c.device}, "
            f"dtype={c.dtype}, batches={len(self)}, skipped={self.report.count})"
        )
