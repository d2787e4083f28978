"""The torchvision backend of :func:`c2f_fast.data.build_loader`: the baseline the benchmarks compare
the DALI pipeline against (see ``loaders.py`` for the contract both follow).

A map-style ``Dataset`` decodes with ``torchvision.io.decode_image(mode=RGB)`` (libjpeg-turbo,
libpng, libwebp; grayscale and CMYK JPEGs come out as 3-channel RGB) and transforms with
``torchvision.transforms.v2.functional``: ``resized_crop`` + ``horizontal_flip`` for training,
``resize`` for evaluation, on uint8 tensors. A ``DataLoader`` runs it in ``num_workers`` processes and
collates uint8 batches; normalisation (and the cast to ``dtype``) happens on ``device`` after the
transfer, which moves a quarter of the bytes of float32 over PCIe.

Randomness: the batch sampler hands every sample a seed derived from ``(seed, epoch, index)``, and
the crop and flip are drawn from a generator seeded with it. Augmentation is thus reproducible and
independent of the number of workers and of which worker gets which sample (the global RNG of a
worker depends on both).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import multiprocessing.context
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .images import BadImageError, BadImageReport, check_image
from .base import Batch, ImageLoader, LoaderConfig, normalize, resize_whole, sample_seed, shard_bounds
from .records import MultiLabelSet

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns at every call
# (hundreds of times per epoch). They remain the baseline here (torchvision >= 0.21 is what the
# project supports); silence that one message only.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)


def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop: torchvision's ``RandomResizedCrop.get_params``
    algorithm (10 tries of area x aspect ratio, then a centre crop clamped to ``ratio``), drawing from
    ``generator`` instead of the global RNG (which ``get_params`` uses and cannot be given)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainView:
    """One training view of one image: the random-resized crop ``(top, left, height, width)`` in
    the decoded image's pixels and whether it is flipped horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def train_view_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset image ``index``'s training view in ``epoch`` of a loader seeded ``seed``."""
    return sample_seed(seed, epoch, index, 2)


def draw_train_view(
    view_seed: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> TrainView:
    """The crop and flip of one image (``height x width`` as decoded), drawn from a generator
    seeded with ``view_seed`` (:func:`train_view_seed`): a function of (seed, epoch, index) and the
    image size only, so every backend that decodes the same pixels draws the same view, whichever
    worker or device handles the image."""
    generator = torch.Generator().manual_seed(view_seed)
    top, left, h, w = random_resized_crop_params(height, width, scale, ratio, generator)
    flip = torch.rand(1, generator=generator).item() < 0.5
    return TrainView(top, left, h, w, flip)


def apply_train_view(image: torch.Tensor, view: TrainView, size: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` → uint8 ``[3, size, size]``: ``view``'s crop resized bilinearly with
    antialiasing, flipped when ``view.flip``. Runs on the image's device (CPU or CUDA)."""
    image = TF.resized_crop(
        image, view.top, view.left, view.height, view.width, [size, size],
        interpolation=InterpolationMode.BILINEAR, antialias=True,
    )
    return TF.horizontal_flip(image) if view.flip else image


def decode_rgb(path: str) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``[3, H, W]`` RGB tensor (raises on undecodable data)."""
    # No EXIF rotation (torchvision's default; the DALI pipeline turns its own off to match).
    image = decode_image(read_file(path), mode=ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # 16-bit PNG: torchvision keeps 16 bits, DALI converts to 8
        image = TF.to_dtype(image, torch.uint8, scale=True)
    if image.shape[0] != 3:
        # Not seen with torchvision 0.21+ (CMYK and grayscale JPEGs decode to RGB; tested), but an
        # older build returned CMYK as 4 channels: fall back to PIL's conversion.
        from PIL import Image

        with Image.open(path) as pil:
            image = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    return image


class ImageFileDataset(Dataset):
    """Decodes and transforms one image per ``(dataset index, sample seed)`` key.

    Returns ``(uint8 [3, S, S] or None, index, problem or None)``: a decode failure is returned,
    not raised, so that the main process can raise :class:`BadImageError` with the file's name
    (an exception raised in a worker reaches the main process re-created from its message only).
    """

    def __init__(self, paths: list[str], config: LoaderConfig) -> None:
        self.paths = paths
        self.size = [config.image_size, config.image_size]
        self.train = config.train
        self.crop_scale = config.crop_scale
        self.crop_ratio = config.crop_ratio

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, str | None]:
        index, seed = key
        path = self.paths[index]
        try:
            image = decode_rgb(path)
        except Exception as err:  # noqa: BLE001 -- reported with the file name by the main process
            problem = check_image(path, decode=True) or f"torchvision cannot decode it ({type(err).__name__}: {err})"
            return None, index, problem
        if self.train:
            image = apply_train_view(image, draw_train_view(seed, image.shape[-2], image.shape[-1],
                                                            self.crop_scale, self.crop_ratio), self.size[0])
        else:
            image = resize_whole(image, self.size[0])
        return image, index, None


@dataclass
class _Failed:
    """A collated batch in which some images failed to decode: ``[(index, problem), ...]``."""

    errors: list[tuple[int, str]]


def _collate(items: list[tuple[torch.Tensor | None, int, str | None]]) -> tuple[torch.Tensor, torch.Tensor] | _Failed:
    errors = [(index, problem) for image, index, problem in items if problem is not None]
    if errors:
        return _Failed(errors)
    images = torch.stack([image for image, _, _ in items])
    indices = torch.tensor([index for _, index, _ in items], dtype=torch.int64)
    return images, indices


class ShardBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(dataset index, sample seed)`` for one shard and one epoch (``self.epoch``).

    The same partition as DALI's reader: shard ``k`` of ``K`` takes ``[floor(kN/K), floor((k+1)N/K))``
    of the (per-epoch permuted, in training) list of kept indices.
    """

    def __init__(self, indices: np.ndarray, config: LoaderConfig, steps: int) -> None:
        self.indices = indices
        self.config = config
        self.steps = steps
        self.epoch = 0
        self.start_batch = 0  # batches of the epoch to leave out (resume mid-epoch): never read

    def __len__(self) -> int:
        return max(0, self.steps - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        c = self.config
        n = len(self.indices)
        order = self.indices
        if c.train:  # one permutation per epoch, the same on every shard
            order = order[np.random.default_rng(sample_seed(c.seed, self.epoch, 0)).permutation(n)]
        start, end = shard_bounds(n, c.shard_id, c.num_shards)
        mine = order[start:end]
        if c.train:
            mine = mine[: self.steps * c.batch_size]
        for begin in range(self.start_batch * c.batch_size, len(mine), c.batch_size):
            chunk = mine[begin : begin + c.batch_size]
            if c.train:
                yield [(int(i), train_view_seed(c.seed, self.epoch, int(i))) for i in chunk]
            else:
                yield [(int(i), 0) for i in chunk]


def worker_context() -> multiprocessing.context.BaseContext | None:
    """How ``DataLoader`` workers start: ``None`` (the platform default, fork on Linux) unless DALI
    is loaded in this process, then a fork server.

    Forking a process in which other threads run can hand the child a lock that one of them held at
    the fork, and the child hangs. DALI's pipeline threads keep running (prefetching) between
    epochs; with DALI loaders alive in the parent, forked torch workers hung in 3 of 3 runs of
    ``tests/test_bad_images.py``, and in none of several with a fork server. The fork server is a
    fresh process: it imports this module (torch, torchvision) once, seconds for the first loader,
    and forks the workers from there (~0.1 s for later loaders). Like "spawn", it needs the main
    script to guard its entry point with ``if __name__ == "__main__":``.
    """
    if sys.modules.get("nvidia.dali") is None:  # not imported (None: an import was blocked)
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _allocator_tuned() -> bool:
    from ..runtime import allocator_tuned  # not at the top: runtime imports config, which imports data

    return allocator_tuned()


def _init_worker(worker_id: int, tune_allocator: bool) -> None:
    """Each ``DataLoader`` worker: the parent's allocator setting (:func:`c2f_fast.runtime.
    tune_allocator`). A forked worker inherits it; one started by the fork server (when DALI is
    loaded) is a fresh process and sets it here (each decoded image, a few hundred KiB, was mapped
    and faulted in afresh: ``data/torch`` 291-294 against 298-316 ms a batch in two alternating
    pairs of benchmark runs on the 2-core machine)."""
    if tune_allocator:
        from ..runtime import tune_allocator as tune

        tune()


class TorchLoader(ImageLoader):
    """:class:`ImageLoader` over a torch ``DataLoader`` (built by :func:`c2f_fast.data.build_loader`).

    The epoch counter advances at every ``iter()``; :meth:`set_epoch` sets it and the first batch
    (e.g. on resume).
    """

    backend = "torch"

    def __init__(
        self, dataset: MultiLabelSet, indices: np.ndarray, config: LoaderConfig, report: BadImageReport
    ) -> None:
        super().__init__(dataset, indices, config, report)
        self.epoch = 0
        self.start_batch = 0
        self.sampler = ShardBatchSampler(self.indices, config, self._steps)
        workers = config.num_workers
        self.dataloader = DataLoader(
            self._worker_dataset(),
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=self._collate,
            pin_memory=self._pin_memory and config.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=config.prefetch if workers > 0 else None,
            multiprocessing_context=worker_context() if workers > 0 else None,
            worker_init_fn=functools.partial(_init_worker, tune_allocator=_allocator_tuned()) if workers > 0 else None,
        )

    #: How workers turn a batch of keys into what :meth:`_epoch` reads (the nvJPEG backend changes them).
    _collate = staticmethod(_collate)
    _pin_memory = True

    def _worker_dataset(self) -> Dataset:
        return ImageFileDataset(list(self.dataset.image_paths), self.config)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` (its shuffle and augmentation) from batch
        ``start_batch`` on (resume mid-epoch: the earlier batches are never read nor decoded; the
        later ones are the same as in an uninterrupted epoch)."""
        if not isinstance(start_batch, int) or not 0 <= start_batch <= self._steps:
            raise ValueError(f"start_batch: expected 0 <= start_batch <= {self._steps}, got {start_batch!r}")
        self.epoch = int(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.epoch, self.sampler.start_batch = self.epoch, self.start_batch
        self.epoch, self.start_batch = self.epoch + 1, 0
        return self._epoch()

    def _epoch(self) -> Iterator[Batch]:
        device = self.config.device
        for batch in self.dataloader:
            if isinstance(batch, _Failed):
                index, problem = batch.errors[0]
                others = [(self.dataset.image_paths[i], p) for i, p in batch.errors[1:]]
                raise BadImageError(self.dataset.image_paths[index], problem, others=others)
            images, indices = batch
            images = images.to(device, non_blocking=True)
            indices = indices.to(device, non_blocking=True)
            images = normalize(images).to(self.config.dtype)
            yield images, self._gather_targets(indices), indices
