"""The ``nvjpeg`` backend of :func:`c2f_fast.data.build_loader`: JPEG decoding on the GPU without
DALI (see ``loaders.py`` for the contract every backend follows).

    DataLoader workers (CPU)       read each file's bytes; a non-JPEG file (PNG, WebP) is decoded
                                   here with torchvision, as the ``torch`` backend does
    main process, on ``device``    torchvision.io.decode_jpeg(list of byte tensors, device=cuda):
                                   one batched nvJPEG call per batch
                                   -> per image: training view (crop + flip) or whole-image resize,
                                      bilinear + antialias, on the device
                                   -> stack, normalise, cast

Only torchvision is needed (its CUDA build ships nvJPEG), so this is the GPU path where DALI is not
installed. On a CPU ``device`` the same code decodes with libjpeg-turbo; the tests use that to
check it against the ``torch`` backend.

Randomness is the ``torch`` backend's: the sampler hands every image the seed
:func:`~c2f_fast.data.torch_pipeline.train_view_seed` of ``(seed, epoch, index)``, and
:func:`~c2f_fast.data.torch_pipeline.draw_train_view` draws the crop and the flip from it and the
decoded size. Both backends thus use the same permutation and the same views for the same seed:
on the CPU their batches are equal; on CUDA they differ only by the decoders' rounding (nvJPEG's
chroma upsampling and the float resize of uint8 images on the GPU, against libjpeg-turbo's and
torchvision's uint8 CPU resize): a few grey levels at most.

Decoding errors: a failed batched decode is retried image by image; an image nvJPEG cannot decode
(e.g. a CMYK JPEG) is decoded on the CPU instead, and one nothing decodes raises
:class:`BadImageError` naming the file, like the other backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from .base import Batch, normalize, resize_whole
from .images import BadImageError, check_image, sniff_format
from .torch_pipeline import (
    TorchLoader,
    _Failed,
    apply_train_view,
    decode_rgb,
    draw_train_view,
)

#: What a worker hands over per image: ("jpeg", encoded bytes) or ("rgb", decoded uint8 [3, H, W]).
Item = tuple[str, torch.Tensor]


@dataclass
class EncodedBatch:
    """A batch as the workers hand it over: every JPEG file's bytes in one buffer (one shared-memory
    transfer per batch, not one per image), other formats already decoded."""

    jpeg_bytes: torch.Tensor  # uint8 [total bytes]: the batch's JPEG files, one after another
    jpeg_spans: list[tuple[int, int, int]]  # (position in the batch, start, end) in jpeg_bytes
    decoded: dict[int, torch.Tensor]  # position in the batch -> uint8 [3, H, W] (PNG, WebP)
    indices: torch.Tensor  # int64 [B], dataset indices
    seeds: list[int]  # the images' view seeds


class EncodedImageDataset(Dataset):
    """One ``(dataset index, view seed)`` key → ``(item or None, index, view seed, problem or None)``.

    JPEG files come back as their bytes (decoded later, in batches, on the device); other formats
    decoded to uint8 RGB on the CPU. A failure is returned, not raised (see
    :class:`~c2f_fast.data.torch_pipeline.ImageFileDataset`).
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Item | None, int, int, str | None]:
        index, seed = key
        path = self.paths[index]
        try:
            # Not torchvision's read_file: its tensor maps the file, and a worker cannot hand such a
            # storage to the main process (its file descriptor is closed: EBADF when pickled).
            with open(path, "rb") as fh:
                raw = fh.read()
            if sniff_format(raw[:32]) == "JPEG":
                data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                return ("jpeg", data), index, seed, None
            return ("rgb", decode_rgb(path)), index, seed, None
        except Exception as err:  # noqa: BLE001 -- reported with the file name by the main process
            problem = check_image(path, decode=True) or f"torchvision cannot decode it ({type(err).__name__}: {err})"
            return None, index, seed, problem


def _collate_encoded(items: list) -> EncodedBatch | _Failed:
    errors = [(index, problem) for _, index, _, problem in items if problem is not None]
    if errors:
        return _Failed(errors)
    spans, decoded, chunks, offset = [], {}, [], 0
    for position, ((kind, data), _, _, _) in enumerate(items):
        if kind == "jpeg":
            spans.append((position, offset, offset + data.numel()))
            chunks.append(data)
            offset += data.numel()
        else:
            decoded[position] = data
    jpeg_bytes = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    indices = torch.tensor([index for _, index, _, _ in items], dtype=torch.int64)
    return EncodedBatch(jpeg_bytes, spans, decoded, indices, [seed for _, _, seed, _ in items])


class NvjpegLoader(TorchLoader):
    """:class:`ImageLoader` that reads files in ``DataLoader`` workers and decodes and transforms on
    ``config.device`` (built by :func:`c2f_fast.data.build_loader` with ``backend="nvjpeg"``).
    Epochs, shards and :meth:`set_epoch` (with ``start_batch``) are the ``torch`` backend's."""

    backend = "nvjpeg"
    _collate = staticmethod(_collate_encoded)
    _pin_memory = False  # nvJPEG reads the bytes from (pageable) host memory itself

    def _worker_dataset(self) -> Dataset:
        return EncodedImageDataset(list(self.dataset.image_paths))

    def _epoch(self) -> Iterator[Batch]:
        c = self.config
        for batch in self.dataloader:
            if isinstance(batch, _Failed):
                index, problem = batch.errors[0]
                others = [(self.dataset.image_paths[i], p) for i, p in batch.errors[1:]]
                raise BadImageError(self.dataset.image_paths[index], problem, others=others)
            decoded = self.decode(batch)
            indices, seeds = batch.indices, batch.seeds
            if c.train:
                views = [draw_train_view(seed, img.shape[-2], img.shape[-1], c.crop_scale, c.crop_ratio)
                         for img, seed in zip(decoded, seeds)]
                images = [apply_train_view(img, view, c.image_size) for img, view in zip(decoded, views)]
            else:
                images = [resize_whole(img, c.image_size) for img in decoded]
            images = normalize(torch.stack(images)).to(c.dtype)
            indices = indices.to(c.device, non_blocking=True)
            yield images, self._gather_targets(indices), indices

    def decode(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """The batch's images as uint8 ``[3, H, W]`` on the device: the JPEGs in one batched call."""
        device = self.config.device
        out: list[torch.Tensor | None] = [None] * len(batch.indices)
        for position, image in batch.decoded.items():
            out[position] = image.to(device)
        files = [batch.jpeg_bytes[start:end] for _, start, end in batch.jpeg_spans]
        if files:
            try:
                images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad image fails the whole call: find it (or them)
                images = [self._decode_one(data, int(batch.indices[position]))
                          for data, (position, _, _) in zip(files, batch.jpeg_spans)]
            for (position, _, _), image in zip(batch.jpeg_spans, images):
                out[position] = image
        return out

    def _decode_one(self, data: torch.Tensor, index: int) -> torch.Tensor:
        """One JPEG on the device; failing that on the CPU (nvJPEG refuses some valid files, e.g.
        CMYK ones); failing that a :class:`BadImageError` naming the file."""
        device = self.config.device
        path = self.dataset.image_paths[index]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as err:
            device_error = err
        try:
            return decode_rgb(path).to(device)
        except Exception:  # noqa: BLE001 -- the file is bad: say why, naming it
            problem = check_image(path, decode=True) or (
                f"neither nvJPEG nor torchvision can decode it ({type(device_error).__name__}: {device_error})")
            raise BadImageError(path, problem) from None
