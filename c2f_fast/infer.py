"""Fast inference with a trained model: :class:`C2FClassifier` and ``c2f predict``.

``C2FClassifier.from_checkpoint(path)`` loads what training writes (a run folder with
``best.safetensors`` / ``model.safetensors`` and ``model.json``, a ``.safetensors`` file with its
``model.json`` beside it, or a training ``checkpoint.pt``; see :mod:`c2f_fast.checkpoint`) and
gives an ``nn.Module`` for three uses:

- ``classifier(images)``: normalised float images ``[B, 3, S, S]`` → scores ``[B, C]`` (p̂, the
  greedy decoding of docs/model.md "Decoder": the no-copy rule and the stop rule, exactly what
  ``C2FNet(images)`` computes), to drop into one's own pipeline;
- ``classifier.preprocess(images)``: uint8 ``[3, H, W]`` / ``[B, 3, H, W]`` tensors or PIL images →
  the normalised batch the model expects (the evaluation preprocessing of the loaders: the whole
  image resized to ``S x S``, bilinear with antialiasing, aspect ratio not kept, then the ImageNet
  mean/std);
- ``classifier.predict(inputs)``: file paths, bytes, PIL images, uint8 tensors, or a list mixing
  them → one :class:`Prediction` per image (labels, scores, the class emitted at each decoder step,
  or the error that kept that one image from being read).

Defaults: CUDA when present, else the CPU; on CUDA bf16 autocast, ``torch.compile`` and the Triton
kernels (``ModelConfig.fast_kernels``); on the CPU fp32, eager, the plain-PyTorch reference path.
The weights stay fp32 in every case; a 16-bit ``dtype`` is the autocast compute type, as in
training and evaluation.

Batch-size independence: the model always runs on batches of exactly ``model_batch`` images
(default 16 on the CPU, 32 on CUDA), the last one padded with zeros. CPU conv/matmul kernels pick
their algorithm and blocking from the shapes, the batch included (batch 1 and batch 16 differ in
the last bits of float32), and SIMD loops finish a tensor's last ``numel % 16`` elements with scalar
code that rounds differently; with one fixed shape, a multiple of 16 images, each image's row is
computed the same way wherever it sits in the batch. So an image's prediction is bit-identical
whatever ``batch_size``, list or position it comes in (``tests/test_infer.py`` checks batch sizes
1, 7 and 64 for exact equality). The fixed shape also means one compiled graph. The price is
latency for a lone image (it runs with 15 zero images on the CPU); for single-image latency use
``model_batch=1`` (every image alone: still independent of the batch size, slower per image).

Thread safety: ``predict`` and ``forward`` may be called from several threads at once. Decoding
and preprocessing run in the calling threads; the model itself runs one batch at a time under a
lock (a CPU model already uses every core per batch; a GPU runs one stream), and so does nvJPEG.

EXIF orientation is not applied (as in training: the boxes of VOC/COCO refer to stored pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .checkpoint import add_checkpoint_arguments
from .data.base import normalize, resize_whole
from .data.images import _JPEG_TAIL_WINDOW, BadImageError, sniff_format
from .model import C2FNet, greedy_emissions

warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

#: Images per model call (fixed: see the module docstring), by device type. On the CPU a multiple
#: of 16: every tensor of the model then has a multiple of 16 elements, so no image lands on the
#: scalar tail of a SIMD loop (16 float32 lanes with AVX-512), which rounds differently.
DEFAULT_MODEL_BATCH = {"cpu": 16, "cuda": 32}

#: SIMD width (float32 lanes, AVX-512) that row lengths are padded to before elementwise ops.
_ROW_ALIGN = 16

#: Formats torchvision decodes (on CPU; nvJPEG on CUDA for JPEG); anything else goes to PIL.
_TORCHVISION_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}  # fmt: skip


@dataclass
class Prediction:
    """The prediction for one image.

    - ``source``: a short description of the input (the path; ``bytes[i] (n bytes)``;
      ``PIL[i] RGB 640x480``; ``tensor[i] 3x480x640``; ``tensor[i][j]`` for image j of a batched
      tensor at list position i).
    - ``labels``: the predicted class names, best first. By default every class whose score is
      ``>= threshold``; with ``top_k`` the ``top_k`` best classes whatever their scores (the
      threshold is then not used). Ties go to the lower class index.
    - ``scores``: ``{class name: p̂}`` for every class, in the model's class order (p̂ = max over
      the decoder steps of the step probability; a float in [0, 1]).
    - ``step_labels``: the class emitted at each of the T greedy decoder steps
      (:func:`c2f_fast.model.greedy_emissions`), ``None`` from the step where decoding stopped on.
    - ``error``: None, or why this image could not be predicted (then the other fields are empty).
    """

    source: str
    labels: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    step_labels: list[Optional[str]] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ItemError(Exception):
    """One input that cannot be predicted: ``source`` names it, ``problem`` says why."""

    def __init__(self, source: str, problem: str, bad_image: bool = True) -> None:
        super().__init__(f"{source}: {problem}")
        self.source, self.problem, self.bad_image = source, problem, bad_image

    def to_exception(self) -> ValueError:
        if self.bad_image:
            return BadImageError(self.source, self.problem)
        return ValueError(f"{self.source}: {self.problem}")


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: expected 'cpu' or 'cuda[:N]'")
    return device


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of fp32, bf16, fp16")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype}: expected torch.float32, torch.bfloat16 or torch.float16")
    return dtype


class C2FClassifier(nn.Module):
    """A trained C2FNet ready for inference (see the module docstring).

    Attributes: ``model`` (the C2FNet, eval mode, fp32 weights), ``class_names``, ``image_size``
    (S), ``device``, ``dtype`` (compute dtype), ``model_batch`` (images per model call), ``meta``
    (the checkpoint's model.json content). Build it with :meth:`from_checkpoint`; moving it
    afterwards with ``.to()`` is not supported (``device`` would be stale).
    """

    def __init__(
        self,
        model: C2FNet,
        class_names: Sequence[str],
        *,
        device: Any = None,
        dtype: Any = None,
        compile: Any = None,
        model_batch: Optional[int] = None,
        meta: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        if len(class_names) != model.cfg.num_classes:
            raise ValueError(f"class_names: {len(class_names)} names for a model of {model.cfg.num_classes} classes")
        self.class_names = [str(c) for c in class_names]
        self.image_size = model.cfg.image_size
        self.meta = dict(meta or {})
        if model_batch is None:
            model_batch = DEFAULT_MODEL_BATCH[self.device.type]
        if isinstance(model_batch, bool) or not isinstance(model_batch, int) or model_batch < 1:
            raise ValueError(f"model_batch: expected a positive integer, got {model_batch!r}")
        self.model_batch = model_batch
        self.model = model.to(self.device).eval()
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = bool(compile)
        runner: Any = self.model
        if compile:
            mode = compile if isinstance(compile, str) else None
            runner = torch.compile(self.model, mode=mode, dynamic=False)
        self.__dict__["_runner"] = runner  # not a registered submodule: no duplicate state dict
        self.__dict__["_model_lock"] = threading.RLock()
        self.__dict__["_decode_lock"] = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: Any = None,
        dtype: Any = None,
        compile: Any = None,
        *,
        which: str = "best",
        fast_kernels: Optional[bool] = None,
        model_batch: Optional[int] = None,
    ) -> "C2FClassifier":
        """Load a trained model (a run folder, a ``.safetensors`` file with ``model.json`` beside
        it, or a training ``checkpoint.pt``; ``which`` = "best" or "final" weights of a folder).

        ``device``: None → CUDA when available, else CPU. ``dtype``: None → bf16 on CUDA, fp32 on
        CPU (the autocast compute type; weights stay fp32). ``compile``: None → on for CUDA, off
        for CPU; True, or a ``torch.compile`` mode string. ``fast_kernels``: None → on for CUDA.
        Raises :class:`c2f_fast.checkpoint.CheckpointError` naming the file when it cannot be read.
        """
        from .checkpoint import load_model

        dev = _resolve_device(device)
        fast = dev.type == "cuda" if fast_kernels is None else bool(fast_kernels)
        model, meta = load_model(path, which=which, fast_kernels=fast)
        return cls(model, meta["class_names"], device=dev, dtype=dtype, compile=compile,
                   model_batch=model_batch, meta=meta)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def steps(self) -> int:
        return self.model.cfg.steps

    # ------------------------------------------------------------------ model
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores p̂ ``[B, C]`` (float32, on ``device``) for normalised images ``[B, 3, S, S]``."""
        return self.decode(images)[0]

    def decode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [B, C] float32, emissions [B, T] int64)`` for normalised images
        ``[B, 3, S, S]``: p̂ and the class each greedy step emits (-1 after the stop), on
        ``device``. Runs the model on fixed batches of ``model_batch`` (zero-padded)."""
        S = self.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a normalised float tensor [B, 3, {S}, {S}], got {shape} "
                             "(use preprocess() for raw images)")
        if not images.is_floating_point():
            raise ValueError(f"images: expected a normalised floating-point tensor, got {images.dtype} "
                             "(use preprocess() for uint8 images)")
        images = images.to(self.device, torch.float32)
        B, M = images.shape[0], self.model_batch
        scores, emissions = [], []
        for start in range(0, B, M):
            chunk = images[start:start + M]
            n = chunk.shape[0]
            if n < M:
                chunk = torch.cat([chunk, chunk.new_zeros(M - n, 3, S, S)])
            with self._model_lock, self._autocast():
                out = self._runner(chunk.contiguous())
                logits, step_logits = out.logits.float(), out.step_logits.float()
            scores.append(_rowwise_sigmoid(logits)[:n])
            emissions.append(greedy_emissions(step_logits)[:n])
        if not scores:
            return (images.new_zeros(0, self.num_classes),
                    torch.zeros(0, self.steps, dtype=torch.long, device=self.device))
        return torch.cat(scores), torch.cat(emissions)

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Any) -> torch.Tensor:
        """Raw images → the normalised float32 batch ``[B, 3, S, S]`` on ``device``.

        ``images``: a uint8 tensor ``[3, H, W]`` or ``[B, 3, H, W]`` (RGB), a PIL image, or a list
        of those (sizes may differ). Each image is resized as a whole to ``S x S`` (bilinear with
        antialiasing, aspect ratio not kept), then normalised with the ImageNet mean/std.
        """
        if isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        resized = []
        for i, item in enumerate(items):
            source = f"images[{i}]" if isinstance(images, (list, tuple)) else "images"
            if isinstance(item, torch.Tensor) and item.dim() == 4:
                if item.dtype != torch.uint8 or item.shape[1] != 3 or 0 in item.shape[2:]:
                    raise ValueError(f"{source}: expected a uint8 RGB tensor [B, 3, H, W], got "
                                     f"{item.dtype} {tuple(item.shape)}")
                resized.extend(self._resize(item))
                continue
            try:
                image = _to_uint8_chw(item, source)
            except _ItemError as err:
                raise err.to_exception() from None
            resized.extend(self._resize(image.unsqueeze(0)))
        if not resized:
            return torch.zeros(0, 3, self.image_size, self.image_size, device=self.device)
        return normalize(torch.stack([r.to(self.device) for r in resized]))

    def _resize(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """uint8 ``[B, 3, H, W]`` → B uint8 ``[3, S, S]`` (on the input's device)."""
        return list(resize_whole(batch, self.image_size).unbind(0))

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        inputs: Any,
        threshold: float = 0.5,
        top_k: Optional[int] = None,
        batch_size: int = 64,
        errors: str = "return",
    ) -> list[Prediction]:
        """One :class:`Prediction` per image, in input order.

        ``inputs``: one item or a list/tuple of items: a file path (str or Path), encoded image
        bytes, a PIL image, a uint8 RGB tensor ``[3, H, W]``, or ``[B, 3, H, W]`` (B images).
        ``threshold``: labels are the classes with score >= threshold (unless ``top_k``).
        ``top_k``: labels are the ``top_k`` best classes instead, whatever their scores.
        ``batch_size``: images decoded and held at a time (memory); it does not change results.
        ``errors``: "return" → an unreadable/corrupt/missing image or an input of the wrong type
        gets a Prediction with ``error`` set, naming the item and the problem, and the rest are
        predicted; "raise" → raise :class:`c2f_fast.data.images.BadImageError` (a ValueError;
        ``ValueError`` for a wrong type) naming the first bad item instead.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected None or a positive integer, got {top_k!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if errors not in ("return", "raise"):
            raise ValueError(f"errors: expected 'return' or 'raise', got {errors!r}")

        items = _expand(inputs)
        results: list[Prediction] = []
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                loaded = self._load(chunk)
                good = [(k, img) for k, (src, img) in enumerate(loaded) if isinstance(img, torch.Tensor)]
                if errors == "raise":
                    for src, img in loaded:
                        if isinstance(img, _ItemError):
                            raise img.to_exception()
                scores = emissions = None
                if good:
                    batch = normalize(torch.stack([img.to(self.device) for _, img in good]))
                    scores, emissions = self.decode(batch)
                    scores, emissions = scores.cpu(), emissions.cpu()
                row = {k: r for r, (k, _) in enumerate(good)}
                for k, (src, img) in enumerate(loaded):
                    if isinstance(img, _ItemError):
                        results.append(Prediction(source=src, error=img.problem))
                    else:
                        results.append(self._prediction(src, scores[row[k]], emissions[row[k]], threshold, top_k))
        return results

    def _prediction(self, source, scores, emissions, threshold, top_k) -> Prediction:
        names = self.class_names
        values = scores.tolist()
        order = sorted(range(len(values)), key=lambda c: (-values[c], c))
        if top_k is not None:
            chosen = order[:top_k]
        else:
            chosen = [c for c in order if values[c] >= threshold]
        steps = [names[e] if e >= 0 else None for e in emissions.tolist()]
        return Prediction(source=source, labels=[names[c] for c in chosen],
                          scores={names[c]: values[c] for c in range(len(values))}, step_labels=steps)

    def _load(self, chunk: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """``[(source, uint8 [3, S, S] tensor or _ItemError)]`` for ``[(source, item)]``."""
        out: list[tuple[str, Any]] = [(src, None) for src, _ in chunk]
        gpu_jpegs: list[tuple[int, bytes]] = []
        for k, (src, item) in enumerate(chunk):
            try:
                if isinstance(item, _ItemError):
                    raise item
                if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
                    data = _read_bytes(item, src)
                    if self.device.type == "cuda" and sniff_format(data[:32]) == "JPEG":
                        _check_bytes(data, src)
                        gpu_jpegs.append((k, data))
                        continue
                    image = _decode_cpu(data, src)
                else:
                    image = _to_uint8_chw(item, src)
                out[k] = (src, self._resize(image.unsqueeze(0))[0])
            except _ItemError as err:
                out[k] = (src, err)
            except Exception as err:  # noqa: BLE001 -- whatever else: this item only
                out[k] = (src, _ItemError(src, f"cannot read or resize it: {type(err).__name__}: {_first_line(err)}"))
        if gpu_jpegs:
            indices = [k for k, _ in gpu_jpegs]
            decoded = self._decode_gpu([d for _, d in gpu_jpegs], [chunk[k][0] for k in indices])
            for k, image in zip(indices, decoded):
                src = chunk[k][0]
                try:
                    out[k] = (src, image if isinstance(image, _ItemError) else self._resize(image.unsqueeze(0))[0])
                except Exception as err:  # noqa: BLE001 -- this item only
                    out[k] = (src, _ItemError(src, f"cannot resize it: {type(err).__name__}: {_first_line(err)}"))
        return out

    def _decode_gpu(self, datas: list[bytes], sources: list[str]) -> list[Any]:
        """nvJPEG batch decode on ``device``; any image it fails on is decoded on the CPU (which
        also yields the error message for data that are really corrupt)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        with self._decode_lock, _on_side_stream(self.device) as ordered:
            try:
                return ordered(list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)))
            except Exception:  # noqa: BLE001 -- find the failing image(s) one by one
                pass
            results: list[Any] = []
            for data, tensor, src in zip(datas, tensors, sources):
                try:
                    results.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except Exception:  # noqa: BLE001 -- e.g. CMYK, or corrupt data: CPU decides
                    try:
                        results.append(_decode_cpu(data, src))
                    except _ItemError as err:
                        results.append(err)
            return ordered(results)


_SIDE_STREAMS: dict[torch.device, Any] = {}


@contextlib.contextmanager
def _on_side_stream(device: torch.device):
    """Run nvJPEG decoding on a side stream and order the model's stream after it.

    Why: torchvision's CUDA ``decode_jpeg`` writes its outputs from nvJPEG's own stream. Recent
    versions make the stream that was current at the call wait for that work; older ones do not
    promise it, and the outputs are allocated from the current stream's memory pool, where a
    block freed by the model may still be read by a kernel in flight. On a side stream the
    outputs come from that stream's own pool, the side stream waits for the model's queued work
    first, and the model's stream waits for the side stream (an event, no host sync) before it
    reads the images. ``record_stream`` tells the caching allocator that the model's stream uses
    them, so their memory is not handed back to the side stream too early. Yields ``ordered``,
    which applies the last two steps to the decoded list (errors pass through)."""
    if device.type != "cuda":
        yield lambda items: items
        return
    model_stream = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(model_stream)

    def ordered(items: list[Any]) -> list[Any]:
        model_stream.wait_stream(side)
        for item in items:
            if isinstance(item, torch.Tensor) and item.is_cuda:
                item.record_stream(model_stream)
        return items

    with torch.cuda.stream(side):
        yield ordered


def _rowwise_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits)`` [B, C], each element computed the same way whatever its row.

    CPU elementwise kernels run SIMD vectors (16 float32 lanes with AVX-512) and finish the last
    ``numel % 16`` elements with scalar code, which can round differently; padding the rows to a
    multiple of 16 puts every element on the vector path."""
    C = logits.shape[1]
    pad = -C % _ROW_ALIGN
    return torch.sigmoid(torch.nn.functional.pad(logits, (0, pad)))[:, :C] if pad else torch.sigmoid(logits)


# ---------------------------------------------------------------------- inputs


def _expand(inputs: Any) -> list[tuple[str, Any]]:
    """``[(source, item)]``, one per image; batched tensors split into their images."""
    top = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    single = not isinstance(inputs, (list, tuple))
    items: list[tuple[str, Any]] = []
    for i, item in enumerate(top):
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            prefix = "tensor" if single else f"tensor[{i}]"
            if item.shape[1] != 3 or item.dtype != torch.uint8:
                items.append((prefix, _ItemError(
                    prefix, f"expected a uint8 RGB tensor [B, 3, H, W], got {item.dtype} {tuple(item.shape)}",
                    bad_image=False)))
                continue
            items.extend((f"{prefix}[{j}]", item[j]) for j in range(item.shape[0]))
        else:
            items.append((_describe(item, i), item))
    return items


def _describe(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        return path if isinstance(path, str) else repr(path)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"bytes[{i}] ({len(item)} bytes)"
    if isinstance(item, torch.Tensor):
        return f"tensor[{i}] {'x'.join(map(str, item.shape))}"
    try:
        from PIL import Image

        if isinstance(item, Image.Image):
            return f"PIL[{i}] {item.mode} {item.width}x{item.height}"
    except ImportError:  # pragma: no cover
        pass
    return f"item[{i}] ({type(item).__name__})"


def _read_bytes(item: Any, source: str) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    else:
        path = os.fspath(item)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise _ItemError(source, "missing file (no such file)") from None
        except IsADirectoryError:
            raise _ItemError(source, "not a regular file (a folder)") from None
        except OSError as err:
            raise _ItemError(source, f"cannot read the file: {err.strerror or err}") from None
    if not data:
        raise _ItemError(source, "empty (zero bytes)")
    return data


def _check_bytes(data: bytes, source: str) -> Optional[str]:
    """Cheap checks before decoding; returns the sniffed format."""
    fmt = sniff_format(data[:32])
    # libjpeg-turbo may decode a JPEG cut short with a grey bottom and only a warning: the end
    # marker must be there (the loaders' header check does the same, data/images.py).
    if fmt == "JPEG" and b"\xff\xd9" not in data[-_JPEG_TAIL_WINDOW:]:
        raise _ItemError(source, "truncated JPEG (no end-of-image marker FF D9 at the end)")
    return fmt


def _decode_cpu(data: bytes, source: str) -> torch.Tensor:
    """Encoded bytes → uint8 RGB ``[3, H, W]``: torchvision for JPEG/PNG/WebP/GIF, PIL otherwise."""
    fmt = _check_bytes(data, source)
    if fmt in _TORCHVISION_FORMATS:
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2 import functional as TF

        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception as err:  # noqa: BLE001 -- corrupt data
            raise _ItemError(source, f"cannot decode {fmt} data: {_first_line(err)}") from None
        if image.dtype != torch.uint8:  # 16-bit PNG
            image = TF.to_dtype(image, torch.uint8, scale=True)
        if image.dim() == 4:  # animated GIF: the first frame
            image = image[0]
        if image.shape[0] == 3:
            return image
    return _decode_pil(data, source, fmt)


def _decode_pil(data: bytes, source: str, fmt: Optional[str]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return _pil_to_tensor(img.convert("RGB"))
    except UnidentifiedImageError:
        what = fmt or f"unrecognised data (first bytes {data[:8].hex(' ')})"
        raise _ItemError(source, f"not an image that can be decoded: {what}") from None
    except Exception as err:  # noqa: BLE001 -- PIL raises many types on corrupt data
        raise _ItemError(source, f"cannot decode {fmt or 'the'} data: {type(err).__name__}: {_first_line(err)}") from None


def _pil_to_tensor(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _to_uint8_chw(item: Any, source: str) -> torch.Tensor:
    """A uint8 ``[3, H, W]`` tensor or a PIL image → uint8 ``[3, H, W]`` (same device)."""
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.dim() != 3 or item.shape[0] != 3 or min(item.shape[1:]) < 1:
            raise _ItemError(source, f"expected a uint8 RGB tensor [3, H, W] or [B, 3, H, W], got "
                                     f"{item.dtype} {tuple(item.shape)}", bad_image=False)
        return item
    from PIL import Image

    if isinstance(item, Image.Image):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _pil_to_tensor(item.convert("RGB"))
        except Exception as err:  # noqa: BLE001 -- a lazily loaded, corrupt file
            raise _ItemError(source, f"cannot decode the PIL image: {type(err).__name__}: {_first_line(err)}") from None
    raise _ItemError(source, f"unsupported input type {type(item).__name__} (expected a file path, bytes, "
                             "a PIL image or a uint8 tensor)", bad_image=False)


def _first_line(err: BaseException) -> str:
    """The first line of an error message, without torchvision's ``function, file.cpp:NN, `` prefix."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    return re.sub(r"^[^,\n]*, [^,\n]*\.cpp:\d+, ", "", text.splitlines()[0])


# ---------------------------------------------------------------------- c2f predict


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``c2f predict``; also sets ``func=predict_command`` as the parser default."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    add_checkpoint_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line (with 'error' for a bad image)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="print the K best classes instead of those with score >= threshold")
    parser.add_argument("--threshold", type=float, default=0.5, metavar="T", help="score threshold (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images decoded at a time (default 64)")
    parser.add_argument("--device", default=None, metavar="D", help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the model (default: on CUDA only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.set_defaults(func=predict_command)
    return parser


def _usage_error(message: str) -> int:
    print(f"c2f predict: error: {message}", file=sys.stderr)
    return 2


def predict_command(args: argparse.Namespace) -> int:
    """``c2f predict``: 0 when every image was predicted, 1 when some could not be read, 2 for a
    usage error (bad option value, missing or unreadable checkpoint, unavailable device)."""
    from .checkpoint import CheckpointError

    if args.top_k is not None and args.top_k < 1:
        return _usage_error(f"--top-k: expected a positive integer, got {args.top_k}")
    if not (0.0 <= args.threshold <= 1.0) or math.isnan(args.threshold):
        return _usage_error(f"--threshold: expected a number in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        return _usage_error(f"--batch-size: expected a positive integer, got {args.batch_size}")
    try:
        clf = C2FClassifier.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                            compile=args.compile, which=args.weights)
    except CheckpointError as err:
        return _usage_error(f"--checkpoint: {err}")
    except ValueError as err:
        return _usage_error(str(err))
    failed = 0
    for start in range(0, len(args.images), args.batch_size):  # print as results come
        preds = clf.predict(args.images[start:start + args.batch_size], threshold=args.threshold,
                            top_k=args.top_k, batch_size=args.batch_size)
        for p in preds:
            failed += p.error is not None
            if args.json:
                print(json.dumps(p.to_dict()), flush=True)
            elif p.error is not None:
                print(f"{p.source}: error: {p.error}", file=sys.stderr, flush=True)
            else:
                shown = ", ".join(f"{name} {p.scores[name]:.3f}" for name in p.labels) or "(no label)"
                print(f"{p.source}: {shown}", flush=True)
    if failed:
        print(f"c2f predict: {failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["C2FClassifier", "Prediction", "add_predict_arguments", "predict_command", "DEFAULT_MODEL_BATCH"]
