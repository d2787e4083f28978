"""The DALI backend of :func:`c2f_fast.data.build_loader` (see ``loaders.py`` for the contract).

One DALI pipeline per loader:

    readers.file(files, labels=dataset indices, shard, pad_last_batch)      CPU: file bytes
    -> decoders.image_random_crop (train: only the crop is decoded)         "mixed" (nvJPEG) on
       or decoders.image (eval), RGB                                         CUDA, else "cpu"
    -> resize to S x S (linear + antialias)                                 GPU or CPU
    -> crop_mirror_normalize (random mirror in training, ImageNet mean/std,
       CHW, float32 or float16)                                             GPU or CPU

The "label" of every file is its dataset index, so the multi-hot row is gathered afterwards from a
device-resident copy of ``dataset.targets`` (DALI labels are scalars).

Shuffling uses the reader's ``shuffle_after_epoch`` (one permutation of the whole list per epoch,
the same on every shard when the seed is the same, split into the shards' slices) rather than
``random_shuffle``, which only shuffles within a buffer of ``initial_fill`` samples of the shard's
own contiguous slice: with a sorted list (VOC ids, COCO ids) that leaves batches far from i.i.d.

Epoch bookkeeping: the reader pads every shard to the same number of batches by repeating its last
sample (``pad_last_batch``); ``DALIGenericIterator`` with ``reader_name`` and
``LastBatchPolicy.PARTIAL`` trims the padding from the last batch, and it returns an *empty* batch
when a shard needs one batch fewer than the longest shard: those are skipped here. Training then
yields only the first ``(N // K) // B`` (full) batches and reads the rest of the epoch without
yielding it, so the reader stays aligned with the epochs. (``LastBatchPolicy.DROP`` with padding
does not: measured with DALI 2.4, the padded batch it does not read shows up in the next epoch as
duplicates.)

Exact resume: a training pipeline is built with DALI's checkpointing on, so
:meth:`DaliLoader.resume_state` holds the reader's position and shuffle state and the random
operators' states after the batches handed out; :meth:`DaliLoader.resume` rebuilds the pipeline from
it, and the epoch goes on with the same order and the same crops and flips as without the
interruption. The batches before that position are not read or decoded again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import backend as dali_backend
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .images import BadImageError, BadImageReport, check_image
from .base import IMAGENET_MEAN, IMAGENET_STD, Batch, ImageLoader, LoaderConfig, sample_seed
from .records import MultiLabelSet

log = logging.getLogger(__name__)

_READER = "Reader"


def build_pipeline(files: list[str], labels: list[int], config: LoaderConfig,
                   checkpoint: bytes | None = None) -> Pipeline:
    """The DALI pipeline for ``files`` (labelled with ``labels``) under ``config``; training
    pipelines trace their state (DALI checkpointing), and start from ``checkpoint`` when given.

    On a CUDA ``config.device`` the JPEG decoding runs in nvJPEG (``device="mixed"``: Huffman
    decoding on the CPU or the hardware decoder, the rest on the GPU) and the resize and
    normalisation on the GPU; otherwise everything runs on the CPU (libjpeg-turbo) and no GPU is
    touched.
    """
    on_gpu = config.device.type == "cuda"
    decoder_device = "mixed" if on_gpu else "cpu"
    op_device = "gpu" if on_gpu else "cpu"
    size = config.image_size
    out_dtype = types.FLOAT16 if config.dtype == torch.float16 else types.FLOAT  # no bf16 in DALI
    # nvJPEG's default chroma upsampling differs from libjpeg-turbo's "fancy" (triangular) one,
    # which the CPU decoders of both backends use: ask for the same, so GPU and CPU results agree.
    decoder_args: dict = {"jpeg_fancy_upsampling": True} if on_gpu else {}
    # EXIF orientation is not applied (DALI's default applies it, torchvision's does not): boxes in
    # VOC XML and COCO JSON refer to the stored pixels, as PIL and torchvision read them.
    decoder_args["adjust_orientation"] = False

    shuffle: dict = {}
    if config.train:
        shuffle["shuffle_after_epoch"] = True
        if dali_backend.GetSchema("readers__File").HasArgument("shuffle_after_epoch_seed"):
            shuffle["shuffle_after_epoch_seed"] = config.seed & 0x7FFFFFFF
        else:  # older DALI: a fixed internal seed; the permutation then ignores `seed`
            log.warning("DALI without shuffle_after_epoch_seed: the epoch order ignores seed=%d", config.seed)
    else:
        shuffle["stick_to_shard"] = True  # evaluation: the same slice every epoch

    pipe = Pipeline(
        batch_size=config.batch_size,
        num_threads=max(1, config.num_workers),
        device_id=config.device.index if on_gpu else None,
        # Augmentation randomness differs per shard (the shards see different images anyway) and
        # is reproducible for a given (seed, shard).
        seed=sample_seed(config.seed, config.shard_id, 1) & 0x7FFFFFFF,
        prefetch_queue_depth=config.prefetch,
        enable_checkpointing=config.train,
        checkpoint=checkpoint,
    )
    with pipe:
        encoded, label = fn.readers.file(
            files=files,
            labels=labels,
            shard_id=config.shard_id,
            num_shards=config.num_shards,
            pad_last_batch=True,
            name=_READER,
            **shuffle,
        )
        if config.train:
            images = fn.decoders.image_random_crop(
                encoded,
                device=decoder_device,
                output_type=types.RGB,
                random_area=list(config.crop_scale),
                random_aspect_ratio=list(config.crop_ratio),
                num_attempts=10,
                **decoder_args,
            )
        else:
            images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB, **decoder_args)
        images = fn.resize(
            images,
            device=op_device,
            resize_x=size,
            resize_y=size,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        mirror = fn.random.coin_flip(probability=0.5) if config.train else 0
        images = fn.crop_mirror_normalize(
            images,
            device=op_device,
            dtype=out_dtype,
            output_layout="CHW",
            mean=[255.0 * m for m in IMAGENET_MEAN],
            std=[255.0 * s for s in IMAGENET_STD],
            mirror=mirror,
        )
        pipe.set_outputs(images, label)
    return pipe


class DaliLoader(ImageLoader):
    """:class:`ImageLoader` over a DALI pipeline (built by :func:`c2f_fast.data.build_loader`)."""

    backend = "dali"

    def __init__(
        self, dataset: MultiLabelSet, indices: np.ndarray, config: LoaderConfig, report: BadImageReport
    ) -> None:
        super().__init__(dataset, indices, config, report)
        self._files = [dataset.image_paths[i] for i in self.indices]
        self._build()
        self._in_epoch = False  # an epoch was started and not read to its end
        self._failed: BaseException | None = None
        self._yielded = 0  # training batches of the current epoch handed out
        self._resume_batch = 0  # where the next epoch starts (after a resume mid-epoch)

    def _build(self, checkpoint: bytes | None = None) -> None:
        self.pipeline = build_pipeline(self._files, self.indices.tolist(), self.config, checkpoint)
        # prepare_first_batch=False: nothing is decoded before the first batch is asked for.
        self._iterator = DALIGenericIterator(
            self.pipeline,
            ["images", "labels"],
            reader_name=_READER,
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=True,
            prepare_first_batch=False,
        )

    def resume_state(self) -> dict:
        if not self.config.train:
            return {}
        return {"dali": self._iterator.checkpoints()[0], "batch": self._yielded}

    def resume(self, state: dict) -> None:
        if not self.config.train or "dali" not in state:
            raise ValueError(f"DaliLoader.resume: expected a training loader's state with the DALI reader state, "
                             f"got keys {sorted(state)} (a checkpoint of another loader or an older version?)")
        del self._iterator, self.pipeline  # one pipeline at a time: its threads and buffers go first
        self._build(state["dali"])
        self._resume_batch, self._yielded, self._in_epoch = int(state["batch"]), 0, False

    def __iter__(self) -> Iterator[Batch]:
        if self._failed is not None:
            message = f"the DALI pipeline failed earlier ({self._failed}); build a new loader"
            raise RuntimeError(message) from self._failed
        if self._in_epoch:
            # DALI cannot restart an epoch midway: read the rest, so this epoch starts at its start.
            for _ in self._raw_batches():
                pass
            self._yielded = 0
        return self._epoch()

    def _epoch(self) -> Iterator[Batch]:
        yielded, self._resume_batch = self._resume_batch, 0  # after a resume: the batches already trained on
        self._yielded = yielded
        for images, indices in self._raw_batches():
            if yielded < self._steps:
                yielded += 1
                self._yielded = yielded
                targets = self._gather_targets(indices)
                yield images, targets, indices.to(self.config.device, non_blocking=True)
            # else: training leftovers past the last full batch, read only to finish the epoch
        self._yielded = 0

    def _raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The DALI iterator's batches of one epoch, empty ones dropped, as (images, int64 indices)."""
        self._in_epoch = True
        while True:
            try:
                out = next(self._iterator)[0]
            except StopIteration:
                break
            except RuntimeError as err:
                self._failed = err
                self._in_epoch = False
                bad = self._translate(err)
                if bad is None:
                    raise
                raise bad from err
            images, labels = out["images"], out["labels"]
            if images.shape[0] == 0:
                continue
            if self.config.dtype == torch.bfloat16:
                images = images.to(torch.bfloat16)
            yield images, labels.reshape(-1).to(torch.int64)
        self._in_epoch = False

    def _translate(self, err: RuntimeError) -> BadImageError | None:
        """A DALI error as a BadImageError naming the file, when the message names one of ours."""
        message = str(err)
        named = [path for path in self._files if path in message]
        if named:
            path = max(named, key=len)  # "/a/img1.jpg" is also inside "/a/img10.jpg": take the longest
            problem = check_image(path, decode=True)
            if problem is None:  # PIL decodes it: report what DALI said about it
                lines = [ln.strip() for ln in message.splitlines() if path in ln]
                problem = f"DALI cannot decode it ({lines[0] if lines else message.splitlines()[0]})"
            return BadImageError(path, problem)
        return None
