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
kernels (``ModelConfig.fast_kernels``); on the CPU eager PyTorch with bf16 autocast where the CPU
computes bf16 natively (AMX or AVX512-BF16: :func:`c2f_fast.runtime.cpu_bf16_support`), fp32
elsewhere, channels_last with batch norm folded into the convolutions, the convolutions packed
for oneDNN with their ReLU fused (``_PackedConv2d``), each 2x2 max-pool as two contiguous maxima,
the attention scores from ``sigmoid`` with the factors folded into the weights,
and for batches of up to 16 images (any batch in fp32) the greedy loop rearranged in float32
(``_GreedyDecoder``) (``optimize``; the same function up to rounding, tested), next to
ONNX Runtime (``backend="auto"``, below). The weights stay fp32 in every case; a 16-bit ``dtype``
is the autocast compute type, as in training and evaluation. Every model call runs under
``torch.inference_mode``. ``compile=True`` on the CPU compiles with Inductor's freezing
(constant-folded, prepacked oneDNN weights); it costs about a minute per bucket at the first call.

Backends (``backend``):

- ``"torch"``: the PyTorch model (above).
- ``"onnxruntime"`` (CPU, fp32): the model exported by ``c2f export --format onnx`` and run by
  ONNX Runtime's CPU provider with as many intra-op threads as torch has
  (``torch.get_num_threads()`` when the classifier is built). ``onnx=`` names a ``.onnx`` file;
  otherwise :meth:`C2FClassifier.from_checkpoint` exports one beside the weights as
  ``{stem}.{weights hash}.onnx`` (e.g. ``best.3c9b4d1c7be287fa.onnx``; checked against the torch
  model as ``c2f export`` checks, written atomically), reuses it while the weights hash is the
  same, and replaces it when the weights change. One image runs on a second session of the graph
  with the batch fixed to 1 (ONNX Runtime folds the decoder loop's shape arithmetic there).
- ``"auto"`` (default): on the CPU, both, bucket by bucket (below): on first use each bucket is
  timed on both backends (in alternating blocks of calls) on seeded random images, and the
  timings are stored beside the ``.onnx`` (``*.timings.json``, keyed by the thread count, dtype,
  CPU capability and the torch/onnxruntime versions); each bucket then runs on the backend that
  was faster for it. On
  the demo model at one thread on the 2-core Intel Xeon (AMX) that is ONNX Runtime for one image and
  bf16 torch for 2-32 (an AMD Zen 4 without AMX measured ONNX Runtime up to 8 images, before the
  rearranged greedy loop).
  ``auto`` is plain ``torch`` on CUDA, with ``compile`` or ``fast_kernels``, without onnxruntime,
  or without a run folder or ``onnx=`` file (direct construction).

Same ``predict``/``forward`` API and per-item errors on every backend (decoding and resizing are
the classifier's own; only the model call differs).

Batching and determinism (``batching``). CPU conv/matmul kernels pick their algorithm and blocking
from the shapes, the batch included (batch 1 and batch 16 differ in the last bits of float32), and
SIMD loops finish a tensor's last ``numel % 16`` elements with scalar code that rounds differently.
So the model runs only on a few fixed batch sizes, the *buckets*:

- ``"buckets"`` (default): 1, 2, 4, ... up to ``model_batch`` (default 32 on the CPU and on
  CUDA). A call on B images runs full chunks of ``model_batch``, then the rest in the smallest
  bucket that holds it, zero-padded (7 images: one call of 8). A lone image costs one batch-1
  call.
- ``"strict"``: always ``model_batch`` rows, the last call zero-padded (the earlier behaviour,
  then with 16 rows on the CPU; a lone image now runs with 31 zero images there).

The guarantee (for a given device, backend choice, dtype and thread count): an image's prediction
depends only on its pixels and its bucket. Within a bucket it is bit-identical whatever its
position, its neighbours, the ``batch_size`` or the list it comes in (``tests/test_infer.py``
checks every position of every bucket). In strict mode there is one bucket, so predictions are
bit-identical whatever the batch. Between two buckets (or a bucket and strict mode) the scores of
an image differ by at most :data:`BUCKET_TOLERANCE`: 1e-5 when both calls run fp32 torch, 1e-4
between fp32 torch and ONNX Runtime (the export check's bound), 0.03 when either runs in bf16 (as
``auto`` may, bucket by bucket); greedy steps and labels can then differ only where a score sits
within that distance of the 0.5 threshold or of another class's score. Set ``model_batch=1`` to
run every image alone in both modes.

Thread safety: ``predict`` and ``forward`` may be called from several threads at once. Decoding
and preprocessing run in the calling threads; the model itself runs one batch at a time under a
lock (a CPU model already uses every core per batch; a GPU runs one stream), and so does nvJPEG.

EXIF orientation is not applied (as in training: the boxes of VOC/COCO refer to stored pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import sys
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .checkpoint import add_checkpoint_arguments
from .data.base import normalize, resize_whole
from .data.images import _JPEG_TAIL_WINDOW, BadImageError, sniff_format
from .model import C2FNet, LocalAttention, greedy_emissions
from .runtime import cpu_bf16_support

warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

#: Images per model call at most (the largest bucket: see the module docstring), by device type;
#: 32 on the CPU ran ~10 % faster per image than 16 (bf16, demo model). On the CPU a multiple
#: of 16: every tensor of the model then has a multiple of 16 elements, so no image lands on the
#: scalar tail of a SIMD loop (16 float32 lanes with AVX-512), which rounds differently.
DEFAULT_MODEL_BATCH = {"cpu": 32, "cuda": 32}

#: Inference backends (see the module docstring) and batching policies.
BACKENDS = ("auto", "torch", "onnxruntime")
BATCHINGS = ("buckets", "strict")

#: The stated bound on max |score difference| for one image between two buckets (or between
#: buckets and strict mode), by how the two calls compute: both fp32 torch; fp32 torch against
#: ONNX Runtime (the export check's bound); anything in bf16. tests/test_infer.py checks them.
BUCKET_TOLERANCE = {"fp32": 1e-5, "onnxruntime": 1e-4, "bf16": 0.03}

#: The largest bucket that runs the bf16 CPU runner's decoder as :class:`_GreedyDecoder` (in
#: float32); larger ones keep the model's loop under autocast, whose products run on the bf16 units
#: (demo model, one thread: 6.0 against 7.1 ms at 16 images, 12.4 against 10.5 ms at 32). A float32
#: runner uses it for every bucket (as fast or faster at every size measured, 1 to 64 images).
GREEDY_DECODER_MAX_BF16 = 16

#: Changes when a runner changes (the torch CPU rewrites, the ONNX Runtime sessions): stored
#: timings are then measured again.
_RUNNER_VERSION = 8

#: What follows the stem in a cached ONNX file's name: the weights hash.
_CACHE_NAME = re.compile(r"[0-9a-f]{16}\.onnx")

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

    Attributes: ``model`` (the plain C2FNet, eval mode, fp32 weights; on the CPU the torch backend
    runs an optimised private copy), ``class_names``, ``image_size`` (S), ``device``, ``dtype``
    (compute dtype of the torch backend), ``model_batch`` (images per model call at most),
    ``batching`` and ``buckets`` (the model-call sizes), ``backend`` ("torch", "onnxruntime" or
    "auto"), ``bucket_backends`` (bucket → the backend it runs on), ``onnx_path`` (the ONNX file in
    use, or None), ``timings`` (auto's stored per-bucket milliseconds), ``meta`` (the checkpoint's
    model.json content). Build it with :meth:`from_checkpoint`; moving it afterwards with ``.to()``
    is not supported (``device`` would be stale).
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
        backend: str = "auto",
        batching: str = "buckets",
        optimize: bool = True,
        onnx: Optional[str | os.PathLike] = None,
        cache: Optional[tuple[str | os.PathLike, str]] = None,
    ) -> None:
        super().__init__()
        self.device = _resolve_device(device)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if batching not in BATCHINGS:
            raise ValueError(f"batching: expected one of {BATCHINGS}, got {batching!r}")
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
        self.batching = batching
        self.buckets = bucket_sizes(model_batch) if batching == "buckets" else [model_batch]
        self.model = model.to(self.device).eval()
        cpu = self.device.type == "cpu"
        if backend == "onnxruntime":
            if not cpu:
                raise ValueError(f"backend='onnxruntime': runs on the CPU only, not on {self.device}")
            if dtype is not None and _resolve_dtype(dtype, self.device) != torch.float32:
                raise ValueError(f"backend='onnxruntime': computes in float32; got dtype {dtype!r}")
            if compile:
                raise ValueError("backend='onnxruntime': compile applies to the torch backend only")
        #: why the dtype is what it is, in words (``c2f predict`` prints it at start-up)
        self.dtype_reason = "set" if dtype is not None else f"auto on {self.device.type}"
        if dtype is None and cpu:  # bf16 where the CPU computes it natively (fp32 in the ONNX model)
            fast, why = cpu_bf16_support()
            dtype = torch.bfloat16 if fast and backend != "onnxruntime" else torch.float32
            self.dtype_reason = ("auto: fp32 because the ONNX model computes in fp32" if backend == "onnxruntime"
                                 else f"auto: {'bf16' if fast else 'fp32'} because {why}")
        self.dtype = _resolve_dtype(dtype, self.device)
        if compile is None:
            compile = not cpu
        self.compiled = bool(compile)
        self.optimize = bool(optimize)
        # the torch runner: on the CPU a copy in channels_last with batch norm folded into the
        # convolutions (``model`` stays the plain reference C2FNet)
        runner_model: nn.Module = self.model
        if self.optimize and cpu:
            runner_model = copy.deepcopy(self.model)
            _fold_batchnorm(runner_model)
            _pool_before_relu(runner_model)
            _sigmoid_attention_scores(runner_model)
            _cast_matmul_weights(runner_model, self.dtype)
            if not compile:  # Inductor's freezing packs (and fuses) the convolutions its own way
                _pack_convolutions(runner_model, self.dtype)
            runner_model = runner_model.to(memory_format=torch.channels_last)
        self.__dict__["_channels_last"] = self.optimize and cpu
        # the greedy loop rearranged for small CPU batches (built from the plain float32 model)
        greedy = self.optimize and cpu and not compile and _GreedyDecoder.supports(self.model)
        self.__dict__["_greedy"] = _GreedyDecoder(self.model) if greedy else None
        self.__dict__["_greedy_max"] = GREEDY_DECODER_MAX_BF16 if self.dtype != torch.float32 else math.inf
        runner: Any = runner_model
        if compile:
            mode = compile if isinstance(compile, str) else None
            runner = torch.compile(runner_model, mode=mode, dynamic=False,
                                   recompile_limit=max(8, len(self.buckets) + 2))
        self.__dict__["_runner"] = runner  # not a registered submodule: no duplicate state dict
        self.__dict__["_cudagraphs"] = self.compiled and compile == "reduce-overhead" and not cpu
        self.__dict__["_model_lock"] = threading.RLock()
        self.__dict__["_decode_lock"] = threading.Lock()
        self.__dict__["_ort"] = None
        self.__dict__["_one_image"] = torch.Size([1, 3, self.image_size, self.image_size])
        self.onnx_path: Optional[Path] = None
        self.timings: Optional[dict] = None
        self.backend = self._setup_backend(backend, onnx, cache)
        #: the backend each bucket runs on ("torch" or "onnxruntime")
        self.bucket_backends: dict[int, str] = self._choose_backends()

    def _setup_backend(self, backend: str, onnx: Any, cache: Any) -> str:
        """The backend after "auto" is narrowed down; loads or builds the ONNX model when needed."""
        if backend == "torch":
            return "torch"
        if backend == "auto":
            why = None
            if self.device.type != "cpu":
                why = "not on the CPU"
            elif self.compiled:
                why = "compile was asked for"
            elif self.model.cfg.fast_kernels:
                why = "fast_kernels (the Triton ops) have no ONNX form"
            elif onnx is None and cache is None:
                why = "no .onnx given and no run folder to cache one in"
            else:
                try:
                    import onnxruntime  # noqa: F401
                except ImportError:
                    why = "onnxruntime is not installed"
            if why:
                self.__dict__["_auto_reason"] = why
                return "torch"
        elif self.model.cfg.fast_kernels:
            raise ValueError("backend='onnxruntime': fast_kernels=True (the Triton ops) have no ONNX form")
        elif onnx is None and cache is None:
            raise ValueError("backend='onnxruntime': give onnx= (an exported .onnx file), or load with "
                             "from_checkpoint() so that one can be exported and cached beside the weights")
        try:
            path = Path(onnx) if onnx is not None else self._cached_onnx(*cache)
            self.__dict__["_ort"] = _OrtRunner(path, self)
        except Exception as err:
            if backend == "onnxruntime":
                raise
            warnings.warn(f"C2FClassifier(backend='auto'): the ONNX Runtime backend is not available "
                          f"({type(err).__name__}: {_first_line(err)}); using torch", stacklevel=3)
            self.__dict__["_auto_reason"] = f"ONNX Runtime failed: {_first_line(err)}"
            return "torch"
        self.onnx_path = path
        if backend == "auto":
            self.timings = self._measured_timings(path)
        return backend

    def _cached_onnx(self, folder: str | os.PathLike, stem: str) -> Path:
        """``folder/{stem}.{weights hash}.onnx``: exported and checked once (atomically: a
        verified file or nothing), reused while the weights are the same; files of other weights
        with the same stem are removed when a new one is written."""
        from .export import REFERENCE_OPTIONS, export_classifier

        folder = Path(folder)
        digest = weights_hash(self.model, self.class_names)
        path = folder / f"{stem}.{digest}.onnx"
        if path.is_file():
            return path
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder}: not writable, cannot cache the ONNX export there (give onnx=)")
        reference = C2FClassifier(self.model.cpu(), self.class_names, device="cpu", dtype=torch.float32,
                                  compile=False, meta=self.meta, **REFERENCE_OPTIONS)
        export_classifier(reference, "onnx", path)
        for old in folder.glob(f"{stem}.*.onnx"):
            if old != path and _CACHE_NAME.fullmatch(old.name[len(stem) + 1:]):
                old.unlink(missing_ok=True)
                old.with_suffix(".timings.json").unlink(missing_ok=True)
        return path

    def _measured_timings(self, onnx_path: Path) -> dict:
        """Milliseconds per model call of each bucket on each backend, measured on seeded random
        images and stored beside the .onnx (``*.timings.json``), keyed by what changes them
        (threads, dtype, torch/onnxruntime versions, CPU capability).

        Each backend is timed in blocks of consecutive calls, the blocks alternating (torch,
        ONNX Runtime, torch, ...), and the first call of each block is not counted. Why not call by
        call: with more than one thread, both runtimes keep their worker threads spinning for a
        while after a call, and a call right after the other runtime's competes with them for the
        cores. Timed call by call on the 2-core machine with 2 threads, that made torch look
        slower than ONNX Runtime at 32 images (64 against 43 ms) when, called on its own, it is
        twice as fast (35 against 63 ms at 64 images), and ``auto`` ran every bucket on the slower
        one."""
        import onnxruntime as ort

        store = onnx_path.with_suffix(".timings.json")
        key = {"runner": _RUNNER_VERSION, "threads": torch.get_num_threads(),
               "dtype": str(self.dtype).replace("torch.", ""),
               "optimize": self.optimize, "torch": torch.__version__, "onnxruntime": ort.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        entries: list = []
        try:
            entries = json.loads(store.read_text(encoding="utf-8")).get("entries", [])
        except (OSError, ValueError, AttributeError):
            entries = []
        for entry in entries:
            if entry.get("key") == key and all(str(b) in entry.get("ms", {}).get(name, {})
                                               for b in self.buckets for name in ("torch", "onnxruntime")):
                return entry
        ms: dict[str, dict[str, float]] = {"torch": {}, "onnxruntime": {}}
        generator = torch.Generator().manual_seed(0)
        S = self.image_size
        for bucket in self.buckets:
            x = torch.randn(bucket, 3, S, S, generator=generator)
            runs = {"torch": lambda: self._run_torch(x), "onnxruntime": lambda: self._ort(x)}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(3):  # alternating blocks; the first call of a block hands the cores over
                for name, fn in runs.items():
                    fn()
                    for _ in range(3):
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
            for name in runs:
                ms[name][str(bucket)] = round(1e3 * sorted(times[name])[len(times[name]) // 2], 4)
        entry = {"key": key, "ms": ms}
        entries = [e for e in entries if e.get("key") != key] + [entry]
        try:
            tmp = store.with_name(f".{store.name}.{uuid.uuid4().hex[:12]}.tmp")
            tmp.write_text(json.dumps({"entries": entries}, indent=1), encoding="utf-8")
            os.replace(tmp, store)
        except OSError as err:
            warnings.warn(f"{store}: cannot store the backend timings ({err}); measured again next time", stacklevel=4)
        return entry

    def _choose_backends(self) -> dict[int, str]:
        if self.backend != "auto":
            return {b: self.backend for b in self.buckets}
        ms = self.timings["ms"]
        return {b: "onnxruntime" if ms["onnxruntime"][str(b)] <= ms["torch"][str(b)] else "torch"
                for b in self.buckets}

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
        backend: str = "auto",
        batching: str = "buckets",
        optimize: bool = True,
        onnx: Optional[str | os.PathLike] = None,
    ) -> "C2FClassifier":
        """Load a trained model (a run folder, a ``.safetensors`` file with ``model.json`` beside
        it, or a training ``checkpoint.pt``; ``which`` = "best" or "final" weights of a folder).

        ``device``: None → CUDA when available, else CPU. ``dtype``: None → bf16 on CUDA and on a
        CPU with native bf16 (AMX or AVX512-BF16), else fp32 (the autocast compute type of the
        torch backend; weights stay fp32). ``compile``: None → on for CUDA, off for CPU; True, or
        a ``torch.compile`` mode string ("reduce-overhead": CUDA graphs, one per bucket).
        ``fast_kernels``: None → on for CUDA. ``backend``: "torch", "onnxruntime" (CPU, fp32:
        the ``.onnx`` given by ``onnx``, else exported, checked and cached beside the weights as
        ``{stem}.{weights hash}.onnx``) or "auto" (see the module docstring). ``batching``:
        "buckets" or "strict" (see the module docstring). ``optimize``: the torch backend's CPU
        layout changes (channels_last, batch norm folded into the convolutions); False runs the
        plain reference C2FNet.
        Raises :class:`c2f_fast.checkpoint.CheckpointError` naming the file when it cannot be read.
        """
        from .checkpoint import load_model, resolve_weights

        dev = _resolve_device(device)
        fast = dev.type == "cuda" if fast_kernels is None else bool(fast_kernels)
        model, meta = load_model(path, which=which, fast_kernels=fast)
        weights, _ = resolve_weights(path, which)
        cache = (Path(weights).parent, Path(weights).stem)
        return cls(model, meta["class_names"], device=dev, dtype=dtype, compile=compile,
                   model_batch=model_batch, meta=meta, backend=backend, batching=batching, optimize=optimize,
                   onnx=onnx, cache=cache)

    def describe_backend(self) -> str:
        """E.g. ``auto (onnxruntime for 1 image, torch bf16 for 2-32 images)``, ``torch fp32``."""
        dtype = str(self.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
        name = lambda b: "onnxruntime" if b == "onnxruntime" else f"torch {dtype}"  # noqa: E731
        if self.backend != "auto":
            return name(self.backend)
        groups: dict[str, list[int]] = {}
        for bucket, backend in self.bucket_backends.items():
            groups.setdefault(backend, []).append(bucket)
        parts = [f"{name(b)} for {sizes[0]}" + (f"-{sizes[-1]} images" if len(sizes) > 1
                                                  else " image" if sizes[0] == 1 else " images")
                 for b, sizes in groups.items()]
        return f"auto ({', '.join(parts)})"

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
        ``device``. Runs the model on its buckets, zero-padded (:meth:`_plan`)."""
        if (type(images) is torch.Tensor and images.shape == self._one_image and images.dtype is torch.float32
                and images.device.type == "cpu" and self._ort is not None and not images.requires_grad
                and self.bucket_backends.get(1) == "onnxruntime" and images.is_contiguous()):
            # the latency case, one image on ONNX Runtime: straight to its batch-1 session (at ~2 ms
            # a call, the general path's Python below is a measurable part of the latency)
            with self._model_lock:
                return self._ort.run_one(images.numpy())
        S = self.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a normalised float tensor [B, 3, {S}, {S}], got {shape} "
                             "(use preprocess() for raw images)")
        if not images.is_floating_point():
            raise ValueError(f"images: expected a normalised floating-point tensor, got {images.dtype} "
                             "(use preprocess() for uint8 images)")
        # the calls below skip what is a no-op (each torch call costs microseconds: at batch 1 on
        # ONNX Runtime they are a measurable part of the latency)
        if images.device != self.device or images.dtype != torch.float32:
            images = images.to(self.device, torch.float32)
        count = images.shape[0]
        scores, emissions = [], []
        for start, n, bucket in self._plan(count):
            chunk = images if n == count else images[start:start + n]
            if n < bucket:
                chunk = torch.cat([chunk, chunk.new_zeros(bucket - n, 3, S, S)])
            with self._model_lock:
                if self.bucket_backends[bucket] == "onnxruntime":
                    s_, e_ = self._ort(chunk)
                else:
                    s_, e_ = self._run_torch(chunk)
            scores.append(s_ if n == bucket else s_[:n])
            emissions.append(e_ if n == bucket else e_[:n])
        if not scores:
            return (images.new_zeros(0, self.num_classes),
                    torch.zeros(0, self.steps, dtype=torch.long, device=self.device))
        if len(scores) == 1:  # one call (a lone image, say): no copy
            return scores[0], emissions[0]
        return torch.cat(scores), torch.cat(emissions)

    def _plan(self, count: int) -> list[tuple[int, int, int]]:
        """``[(start, n, bucket)]``: model calls of ``bucket`` rows (``n`` images, zero-padded).
        Full ``model_batch`` chunks, then the rest in the smallest bucket that holds it."""
        M, plan = self.model_batch, []
        for start in range(0, count, M):
            n = min(M, count - start)
            plan.append((start, n, next(b for b in self.buckets if b >= n)))
        return plan

    def _run_torch(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call on the torch backend: ``(scores, emissions)`` of a padded chunk."""
        layout = torch.channels_last if self._channels_last else torch.contiguous_format
        freezing = (torch._inductor.config.patch(freezing=True) if self.compiled and self.device.type == "cpu"
                    else contextlib.nullcontext())  # constant-folded, prepacked oneDNN weights
        with torch.inference_mode(), self._autocast(), freezing:
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            # into the runner's dtype, then its layout (autocast would cast a float32 input again):
            # two passes that way run ~2x faster on the CPU than one ``to(dtype, memory_format)``
            # (3-channel images, bf16: 2.1 against 4.0 ms for 64 at 128 px; the same values)
            dtype = self.dtype if self.device.type == "cpu" and self.optimize else chunk.dtype
            x = chunk.to(dtype=dtype).contiguous(memory_format=layout)
            if self._greedy is not None and chunk.shape[0] <= self._greedy_max:
                feats, f_fc = self._runner.encoder(x)
                with torch.autocast("cpu", enabled=False):
                    logits, step_logits = self._greedy(feats, f_fc)
            else:
                out = self._runner(x)
                logits, step_logits = out.logits.float(), out.step_logits.float()
            return _rowwise_sigmoid(logits), greedy_emissions(step_logits)

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


def bucket_sizes(model_batch: int) -> list[int]:
    """The model-call batch sizes: 1, 2, 4, ... below ``model_batch``, then ``model_batch``."""
    sizes, b = [], 1
    while b < model_batch:
        sizes.append(b)
        b *= 2
    return sizes + [model_batch]


def weights_hash(model: nn.Module, class_names: Sequence[str]) -> str:
    """16 hex digits of a SHA-256 over the model config, the class names and every tensor of the
    state dict (name, dtype, shape, bytes): the key of a cached export."""
    digest = hashlib.sha256()
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in ("fast_kernels", "pretrained")}
    digest.update(json.dumps([cfg, list(class_names)], sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _rewrite_adjacent(module: nn.Module, rewrite) -> None:
    """In place: for every pair of neighbours ``(a, b)`` in every ``nn.Sequential`` of ``module``,
    ``rewrite(a, b)`` returns the pair's replacement ``(a', b')``, or None to keep it."""
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        names = list(child._modules)
        for first, second in zip(names, names[1:]):
            new = rewrite(child._modules[first], child._modules[second])
            if new is not None:
                child._modules[first], child._modules[second] = new


def _fold_batchnorm(module: nn.Module) -> None:
    """In place: every eval-mode ``BatchNorm2d`` right after a ``Conv2d`` in an ``nn.Sequential``
    folded into the convolution's weights and bias (what ONNX Runtime and Inductor's freezing
    do); the norm becomes an ``Identity``. Same function, rounding changes in the last bits."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(conv, norm):
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
            return fuse_conv_bn_eval(conv, norm), nn.Identity()
        return None

    _rewrite_adjacent(module, fold)


class _MaxPool2x2(nn.Module):
    """``max_pool2d(x, 2)`` as the elementwise max of the four strided 2x2 phases: the same values
    (max is exact; NaN propagates), about twice as fast as the CPU pooling kernel on
    channels_last tensors with few channels (16-32 channels: one or two SIMD vectors a pixel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        if H % 2 == 0 and W % 2 == 0 and x.is_contiguous(memory_format=torch.channels_last):
            # channels_last memory is [N, H, W, C]: a row pair is two contiguous [W, C] blocks and a
            # column pair two neighbouring C-vectors, so two maxima over contiguous halves (a
            # further 1.2-1.6x over the strided phases)
            rows = x.permute(0, 2, 3, 1).reshape(N, H // 2, 2, W // 2, 2 * C)
            pairs = torch.maximum(rows[:, :, 0], rows[:, :, 1])
            return torch.maximum(pairs[..., :C], pairs[..., C:]).permute(0, 3, 1, 2)
        H, W = H // 2 * 2, W // 2 * 2  # floor mode: an odd last row/column is dropped
        x = x[..., :H, :W]
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


def _is_pool_2x2(pool: nn.Module) -> bool:
    return (isinstance(pool, nn.MaxPool2d) and _pair(pool.kernel_size) == (2, 2)
            and _pair(pool.stride or pool.kernel_size) == (2, 2) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def _pool_before_relu(module: nn.Module) -> None:
    """In place: in every ``nn.Sequential``, a ``ReLU`` followed by a 2x2/stride-2 ``MaxPool2d``
    (VGG's order) becomes the pool then the ``ReLU`` (they commute exactly: relu is monotonic), so
    the ReLU runs on a quarter of the elements; then every such pool becomes :class:`_MaxPool2x2`
    (the tiny backbone already pools before its ReLU)."""

    def swap(relu, pool):
        return (pool, relu) if isinstance(relu, nn.ReLU) and _is_pool_2x2(pool) else None

    _rewrite_adjacent(module, swap)
    for child in module.modules():
        if isinstance(child, nn.Sequential):
            for name, pool in child._modules.items():
                if _is_pool_2x2(pool):
                    child._modules[name] = _MaxPool2x2()


class _SigmoidScoreAttention(LocalAttention):
    """The local attention with its scores from ``sigmoid`` instead of ``tanh``: the same weights
    β. ``tanh(u) = 2·sigmoid(2u) − 1``, so ``v · tanh(u) = 2v · sigmoid(2u) − Σv``; the constant
    ``−Σv`` cancels in the softmax, and the factors 2 are folded into the weights once
    (:func:`_sigmoid_attention_scores`). Why: torch's CPU ``tanh`` costs 2.7 ns an element in fp32
    against 0.5 for ``sigmoid``, and this [B, L, A] map is the decoder's largest tensor, computed
    at every step."""

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(u) @ self.v


@torch.no_grad()
def _sigmoid_attention_scores(model: nn.Module) -> None:
    """In place: the local attention of ``model`` (a private copy) becomes
    :class:`_SigmoidScoreAttention`, with W_a, b, W_h (and the fed token's W_y) doubled and v
    doubled. Same function; the rounding changes in the last bits."""
    attention = getattr(model, "local_attn", None)
    if type(attention) is not LocalAttention or model.cfg.fast_kernels:  # the Triton op takes tanh's weights
        return
    attention.feat_proj.weight.mul_(2)
    attention.feat_proj.bias.mul_(2)
    attention.query_proj.weight.mul_(2)
    attention.v.mul_(2)
    if getattr(model, "token_query", None) is not None:
        model.token_query.weight.mul_(2)
    attention.__class__ = _SigmoidScoreAttention


@torch.no_grad()
def _cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """In place: the weights that autocast casts to ``dtype`` at every call (convolutions, linear
    layers, the LSTM cell's products, the attention vector v) stored in ``dtype`` once. The same
    values (autocast's cast rounds as ``Tensor.to`` does), without the per-call copies: at batch 1
    on the CPU those copies were most of the bf16 decoder's time. Embeddings and norms, which
    autocast leaves in float32, stay float32. A no-op for float32."""
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.LSTMCell)):
            module.to(dtype)
        elif isinstance(module, LocalAttention):
            module.v.data = module.v.data.to(dtype)


class _PackedConv2d(nn.Module):
    """A ``Conv2d`` (and the ``ReLU`` after it, when ``relu``) run by oneDNN with its weight
    reordered into oneDNN's own blocked layout, the ReLU fused into the convolution
    (``torch.ops.mkldnn._convolution_pointwise``, what Inductor's freezing emits on the CPU).
    Why: the plain eager ``conv2d`` reorders the weight at every call and the ReLU is a pass of
    its own; on the 2-core AMX machine the demo backbone's five convolutions + ReLUs took 613 µs
    at one image and 77 ms at 64 in bf16 channels_last, 410 µs and 31 ms packed (bit-identical
    outputs in bf16; float32 differs in the last bits: oneDNN picks another algorithm).

    The weight is packed for each input shape it meets (a runner meets one per bucket; at most
    :data:`PACKED_SHAPES` are kept), as Inductor's freezing packs for its static shapes: the
    layout oneDNN picks without the input's shape suits large batches only. On a 2-core AMD Zen 3
    (AVX2, fp32) a 128→128 convolution at 16x16 took 12.5 ms at one image packed without the shape,
    1.0 ms with it (the plain convolution: 1.0 ms). Each packing is a copy of the weight (the demo
    backbone's: 1 MB in float32; VGG-16's: 59 MB, so up to ~350 MB for six buckets). The plain
    module stays inside (``conv``): it runs any input the packed weight does not fit (another
    dtype, e.g. a float32 input under autocast) and makes copies."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.relu = conv, relu
        self.__dict__["_args"] = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
                                  "relu" if relu else "none", [None], "")
        self.__dict__["_key"] = None
        self.__dict__["_packed"] = {}  # input shape -> the weight packed for it

    def _pack(self, shape: torch.Size) -> torch.Tensor:
        """The weight packed for inputs of ``shape``; every packing is dropped if the weight was
        replaced, cast or changed in place (its storage, dtype or version counter differ)."""
        weight = self.conv.weight
        # (an inference tensor, e.g. a copy made under inference_mode, has no version counter)
        key = (weight.data_ptr(), weight.dtype, 0 if weight.is_inference() else weight._version)
        if key != self._key:
            self._packed.clear()
            self.__dict__["_key"] = key
        packed = self._packed.get(shape)
        if packed is None:
            if len(self._packed) >= PACKED_SHAPES:
                self._packed.clear()
            padding, stride, dilation, groups = self._args[:4]
            packed = self._packed[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().to_mkldnn(), padding, stride, dilation, groups, list(shape))
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if (x.dtype is not conv.weight.dtype or x.requires_grad or x.device.type != "cpu"
                or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is not x.dtype)):
            y = conv(x)  # what the packed op cannot do as the module would (it ignores autocast)
            return torch.relu(y) if self.relu else y
        bias = None if conv.bias is None else conv.bias.detach()
        return torch.ops.mkldnn._convolution_pointwise(x, self._pack(x.shape), bias, *self._args)

    def __deepcopy__(self, memo: dict) -> "_PackedConv2d":
        return _PackedConv2d(copy.deepcopy(self.conv, memo), self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu} (oneDNN, packed weight)"


#: How many input shapes a :class:`_PackedConv2d` keeps a packed weight for (a runner's buckets:
#: 1, 2, 4, ... 32 on the CPU); a new shape past that starts the collection afresh.
PACKED_SHAPES = 8


def _can_pack(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype in (torch.float32, torch.bfloat16))


def _packed_convolutions_work(dtype: torch.dtype) -> bool:
    """Whether this torch build runs :class:`_PackedConv2d` and it computes conv2d + ReLU (checked
    once per dtype on a small random convolution: a build without oneDNN, or an internal API that
    changed, keeps the plain convolutions)."""
    if dtype not in _PACKED_CONV_OK:
        try:
            generator = torch.Generator().manual_seed(0)
            conv = nn.Conv2d(5, 7, 3, padding=1).to(dtype)
            x = torch.randn(2, 5, 9, 9, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                got, want = _PackedConv2d(conv, relu=True)(x), torch.relu(conv(x))
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            _PACKED_CONV_OK[dtype] = bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
        except Exception:  # noqa: BLE001 -- no oneDNN, or an op that moved: the plain path
            _PACKED_CONV_OK[dtype] = False
    return _PACKED_CONV_OK[dtype]


_PACKED_CONV_OK: dict[torch.dtype, bool] = {}


def _pack_convolutions(module: nn.Module, dtype: torch.dtype) -> None:
    """In place: every ``Conv2d`` of every ``nn.Sequential`` in ``module`` (weights in ``dtype``)
    becomes a :class:`_PackedConv2d`; a ``ReLU`` after it (past identities and 2x2 max-pools, which
    commute with it exactly) is fused into it and becomes an ``Identity``. A no-op where packed
    convolutions do not work (:func:`_packed_convolutions_work`)."""
    if not _packed_convolutions_work(dtype):
        return
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        names = list(child._modules)
        for i, name in enumerate(names):
            conv = child._modules[name]
            if not _can_pack(conv) or conv.weight.dtype != dtype:
                continue
            relu_at = None
            for later in names[i + 1:]:
                nxt = child._modules[later]
                if isinstance(nxt, nn.ReLU):
                    relu_at = later
                if not isinstance(nxt, (nn.Identity, _MaxPool2x2)):
                    break
            child._modules[name] = _PackedConv2d(conv, relu=relu_at is not None)
            if relu_at is not None:
                child._modules[relu_at] = nn.Identity()


class _GreedyDecoder:
    """The greedy decoding of :meth:`C2FNet.decode` (no label sequence) for the CPU runner, in
    float32, with the model's weights rearranged once so that a decoder step is ~25 small ops
    instead of ~45: the same function up to rounding (tested against the model).

    What is rearranged (``model`` is the plain float32 C2FNet; nothing of it is changed):
    - the fed token's share of the LSTM gates, ``E[token] W_ih[:, :E]ᵀ + b_ih + b_hh``, is one row
      of a table computed once, so a step's gates are ``table[token] + [z; h] [W_z; W_hh]ᵀ`` (one
      gather and one product, instead of the embedding, two products, a concatenation and a sum);
    - every weight is stored transposed and contiguous (``x @ Wᵀ`` with a transposed view runs
      ~2x slower in MKL at these small batches than with the contiguous transpose), its output
      columns zero-padded to a multiple of :data:`GEMM_COLUMNS` (an image's result then does not
      depend on its row: the determinism guarantee);
    - the image feature's share of the prediction, ``W_p[:, H:] f_fc + b_p``, once per image;
      the prior-weighted features ``α̂_i a_i`` once per image;
    - the local attention scores in sigmoid form, as :class:`_SigmoidScoreAttention`;
    - the greedy bookkeeping in place (a mask of fed classes, a stop flag).

    Why: at small batches the decoder costs its ops' dispatch, not its arithmetic: 2.6 ms of a
    3.5 ms batch-1 call of the bf16 runner went to the eager decoder loop (1.1 ms with this one),
    5.2 against 3.4 ms at batch 8 (demo model, one thread). From 32 images on, the bf16 runner's
    decoder is faster (its products run on the bf16 units); see :data:`GREEDY_DECODER_MAX_BF16`.
    Covers the variants ``lstm``, ``lstm_l`` and ``lstm_lg`` (``scaled_prior`` included) without
    the opt-in decoder options (``attend_after_update``, ``query_token``, ``glimpse_head``):
    :meth:`supports` says which; the others run the model's own loop."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        cfg = getattr(model, "cfg", None)
        return (isinstance(model, C2FNet) and cfg.variant in ("lstm", "lstm_l", "lstm_lg") and not cfg.fast_kernels
                and not (cfg.attend_after_update or cfg.query_token or cfg.glimpse_head))

    @torch.no_grad()
    def __init__(self, model: C2FNet) -> None:
        cfg = model.cfg
        C, H, E = cfg.num_classes, cfg.hidden, cfg.embed
        self.C, self.H, self.T, self.variant, self.scaled_prior = C, H, cfg.steps, cfg.variant, cfg.scaled_prior
        self.start_token, self.pad_token = model.start_token, model.pad_token

        def cols(w: torch.Tensor) -> torch.Tensor:  # W -> Wᵀ, contiguous, float32, detached, padded
            return _pad_columns(w.detach().float().t())

        lstm = model.lstm
        w_ih, w_hh = lstm.weight_ih.detach().float(), lstm.weight_hh.detach().float()
        bias = lstm.bias_ih.detach().float() + lstm.bias_hh.detach().float()
        self.gate_table = _pad_columns(torch.addmm(bias, model.embedding.weight.detach().float(), w_ih[:, :E].t()))
        self.w_zh = _pad_columns(torch.cat([w_ih[:, E:], w_hh], dim=1).t())  # [D + H, 4H]
        w_p = model.predict.weight
        self.w_ph, self.w_pf = cols(w_p[:, :H]), cols(w_p[:, H:])
        self.b_p = _pad_columns(model.predict.bias.detach().float())
        if cfg.variant != "lstm":  # local attention, sigmoid form: every factor 2 folded in
            attention = model.local_attn
            self.w_a = cols(2 * attention.feat_proj.weight)
            self.b_a = _pad_columns(2 * attention.feat_proj.bias.detach().float())
            self.w_q = cols(2 * attention.query_proj.weight)
            self.v = _pad_columns(2 * attention.v.detach().float()).reshape(-1, 1)
        if cfg.variant == "lstm_lg":
            self.w_score = model.global_attn.score.weight.detach().float().t().contiguous()  # [D, 1]
            self.b_score = model.global_attn.score.bias.detach().float()
            self.w_init = cols(torch.cat([model.init_h.weight, model.init_c.weight]))
            self.b_init = _pad_columns(torch.cat([model.init_h.bias, model.init_c.bias]).detach().float())

    def __call__(self, feats: torch.Tensor, f_fc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], step_logits [B, T, C])``, float32, as :meth:`C2FNet.decode` gives
        them in greedy decoding, for encoder outputs ``feats`` [B, L, D] and ``f_fc`` [B, F]."""
        C, H, T = self.C, self.H, self.T
        feats, f_fc = feats.float().contiguous(), f_fc.float()
        B, L, D = feats.shape
        if self.variant == "lstm_lg":  # Eq. 1-3: global attention, then the initial state
            # a product per image (bmm), not one over all B*L rows: with L not a multiple of the
            # kernel's row block an image's rows would fall differently at each position
            score = torch.bmm(feats, self.w_score.expand(B, D, 1)).squeeze(2)
            alpha = torch.softmax(torch.tanh(score + self.b_score), dim=1)
            z_hat = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
            state = torch.addmm(self.b_init, z_hat / L, self.w_init)
            h, c = state[:, :H], state[:, H:2 * H]
            prior = alpha * L if self.scaled_prior else alpha
            weighted = feats * prior.unsqueeze(2)  # prior_i a_i, once
        else:
            h, c = feats.new_zeros(B, H), feats.new_zeros(B, H)
            weighted = feats
        local = self.variant != "lstm"
        if local:
            projected = torch.addmm(self.b_a, feats.view(B * L, D), self.w_a).view(B, L, -1)
            scores_map = torch.empty_like(projected)  # reused by every step
            q = torch.mm(h, self.w_q)
        else:
            z = feats.mean(dim=1)
        image_logit = torch.addmm(self.b_p, f_fc, self.w_pf)
        token = torch.full((B,), self.start_token, dtype=torch.long)
        fed = torch.zeros(B, C + 2, dtype=torch.bool)
        fed_classes = fed[:, :C]  # a view: sees every later scatter
        alive = torch.ones(B, dtype=torch.bool)
        step_logits = []
        for t in range(T):
            if local:
                torch.add(projected, q.unsqueeze(1), out=scores_map).sigmoid_()
                beta = torch.softmax(torch.bmm(scores_map, self.v.expand(B, -1, 1)).squeeze(2), dim=1)
                z = torch.bmm(beta.unsqueeze(1), weighted).squeeze(1)
            gates = torch.addmm(self.gate_table[token], torch.cat([z, h], dim=1), self.w_zh)[:, :4 * H]
            gate = torch.sigmoid(gates)  # i, f, o (g's sigmoid is unused)
            c = torch.addcmul(gate[:, H:2 * H] * c, gate[:, :H], torch.tanh(gates[:, 2 * H:3 * H]))
            h = gate[:, 3 * H:] * torch.tanh(c)
            logit = torch.addmm(image_logit, h, self.w_ph)[:, :C]
            if t > 0:  # no copying: a class already fed scores -inf
                logit.masked_fill_(fed_classes, float("-inf"))
            step_logits.append(logit)
            if t + 1 < T:
                best, choice = logit.max(dim=1)
                alive &= best >= 0  # logit >= 0 <=> p >= 0.5; -inf or NaN stops for good
                token = torch.where(alive, choice, self.pad_token)
                fed.scatter_(1, token.unsqueeze(1), True)
                if local:
                    q = torch.mm(h, self.w_q)
        stacked = torch.stack(step_logits, dim=1)
        return stacked.amax(dim=1), stacked


#: The products of :class:`_GreedyDecoder` have their output columns zero-padded to a multiple of
#: this. Why: MKL's float32 GEMM computes a row of ``x @ W`` differently depending on the row's
#: index when ``W`` has few or odd columns (on a 2-core AMD Zen 3, AVX2: the 4th row of every 4
#: with 5 columns, rows 1-2 of 4 with 33), which broke "bit-identical at every position of a
#: bucket" for models with 5 classes; with columns padded to 16 every row was computed alike in
#: every case measured (2-32 rows; 5, 20, 33 columns).
GEMM_COLUMNS = 16


def _pad_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., N] with its last dimension zero-padded to a multiple of :data:`GEMM_COLUMNS`,
    contiguous."""
    extra = -t.shape[-1] % GEMM_COLUMNS
    return torch.nn.functional.pad(t, (0, extra)).contiguous() if extra else t.contiguous()


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


_ORT_OUTPUTS = ["scores", "emissions"]


class _OrtRunner:
    """ONNX Runtime sessions of an exported model: ``(scores, emissions)`` torch tensors for a
    normalised float32 batch. Intra-op threads: torch's thread count when it was built.

    The graph is loaded once and tuned for the runtime before the sessions are made:
    :func:`c2f_fast.export.tune_onnx_graph` (a no-op on files ``c2f export`` wrote; older or
    foreign exports get it here), and one image, the latency case, runs a second session of the
    graph with the batch fixed to 1, in which ONNX Runtime folds the decoder loop's shape
    arithmetic (Shape, Expand, Concat, ...) into constants: about 3 % of a batch-1 call. Only
    batch 1 gets one: each session holds its own copy of the weights."""

    def __init__(self, path: Path, clf: "C2FClassifier") -> None:
        import onnx
        import onnxruntime as ort

        from .export import tune_onnx_graph

        if not path.is_file():
            raise FileNotFoundError(f"onnx {path}: no such file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            proto = onnx.load(str(path))
            tune_onnx_graph(proto)
            self.session = ort.InferenceSession(proto.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 -- name the file
            raise ValueError(f"onnx {path}: cannot load it with onnxruntime: {_first_line(err)}") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get("c2f_fast")
        if meta is None:
            raise ValueError(f"onnx {path}: no 'c2f_fast' metadata entry (not written by c2f export)")
        meta = json.loads(meta)
        if meta.get("class_names") != clf.class_names or meta.get("image_size") != clf.image_size:
            raise ValueError(f"onnx {path}: exported for another model ({len(meta.get('class_names') or [])} "
                             f"classes at {meta.get('image_size')} px; this one has {clf.num_classes} "
                             f"at {clf.image_size} px)")
        self.threads = options.intra_op_num_threads
        for value in [*proto.graph.input, *proto.graph.output]:
            dim = value.type.tensor_type.shape.dim[0]
            if dim.dim_param:
                dim.Clear()
                dim.dim_value = 1
        del proto.graph.value_info[:]  # inferred again, now with the fixed batch
        #: batch size -> its own session (batch 1); other sizes run ``session``
        self.sessions = {1: ort.InferenceSession(proto.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.requires_grad or images.device.type != "cpu" or images.dtype != torch.float32:
            images = images.detach().to("cpu", torch.float32)
        x = (images if images.is_contiguous() else images.contiguous()).numpy()
        return self._outputs(self.sessions.get(x.shape[0], self.session).run(_ORT_OUTPUTS, {"images": x}))

    def run_one(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One contiguous float32 image ``[1, 3, S, S]`` on the batch-1 session."""
        return self._outputs(self.sessions[1].run(_ORT_OUTPUTS, {"images": image}))

    @staticmethod
    def _outputs(outputs: list) -> tuple[torch.Tensor, torch.Tensor]:
        scores, emissions = outputs
        if emissions.dtype.kind != "i" or emissions.dtype.itemsize != 8:
            emissions = emissions.astype("int64")
        return torch.from_numpy(scores), torch.from_numpy(emissions)


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
                        help="compute dtype of the torch backend (default: bf16 on CUDA and on CPUs with native "
                             "bf16, AMX or AVX512-BF16; fp32 otherwise)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the model (default: on CUDA only)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="torch, onnxruntime (CPU: the ONNX export, cached beside the weights) or auto "
                             "(default: per batch bucket, the faster of the two as measured once and stored)")
    parser.add_argument("--onnx", default=None, metavar="FILE", help="an exported .onnx for --backend onnxruntime/auto")
    parser.add_argument("--batching", default="buckets", choices=BATCHINGS,
                        help="buckets (default: model calls of 1, 2, 4, ... images) or strict (always the full "
                             "model batch, zero-padded: results bit-identical whatever the batch)")
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
                                            compile=args.compile, which=args.weights, backend=args.backend,
                                            batching=args.batching, onnx=args.onnx)
    except CheckpointError as err:
        return _usage_error(f"--checkpoint: {err}")
    except ValueError as err:
        return _usage_error(str(err))
    print(f"settings: {clf.device.type}: {str(clf.dtype).replace('torch.', '')}, compile="
          f"{'on' if clf.compiled else 'off'}, backend {args.backend} ({clf.dtype_reason})",
          file=sys.stderr, flush=True)
    failed = 0
    from torchvision.io import decode_image  # noqa: F401 -- a one-time import (seconds): not in the rate

    t0 = time.perf_counter()
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
    seconds = time.perf_counter() - t0
    if failed:
        print(f"c2f predict: {failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    if len(args.images) > 1:  # on stderr: stdout stays one line (or JSON object) per image
        print(f"c2f predict: {len(args.images)} images in {seconds:.2f} s ({len(args.images) / seconds:.1f} images/s: "
              f"reading, decoding and the model; backend {clf.describe_backend()})", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["BACKENDS", "BATCHINGS", "BUCKET_TOLERANCE", "C2FClassifier", "DEFAULT_MODEL_BATCH", "Prediction",
           "add_predict_arguments", "bucket_sizes", "predict_command", "weights_hash"]
