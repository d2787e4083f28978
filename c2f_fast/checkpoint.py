"""Checkpoints: atomic training state for ``--resume``, and the exported weights.

A run folder holds:

- ``checkpoint.pt``: the whole training state (model, optimiser, schedule, grad scaler, RNG
  states, the loaders' positions, epoch, step, history), written atomically: a temporary file in the
  same folder, fsync, then ``os.replace``. The one it replaces is kept as ``checkpoint.prev.pt``, so
  a checkpoint that is damaged later (a full disk, a copy cut short) still leaves one to resume
  from. Each carries a content hash (SHA-256 over every tensor's bytes and every value), checked on
  load: a file that unpickles but was altered is refused like a truncated one.
- ``model.safetensors`` (the final weights), ``best.safetensors`` (the epoch with the best test
  mAP) and ``model.json`` (model config, class names, class order, best epoch and mAP): what
  :func:`load_model` and the inference module read. No pickle is involved.

Loading never unpickles arbitrary objects: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FINAL_WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
MODEL_JSON = "model.json"
FORMAT = "c2f_fast-checkpoint"
FORMAT_VERSION = 2  # 2: with the content hash "sha256"; version 1 files (no hash) still load
_READABLE_VERSIONS = (1, 2)
HASH_KEY = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that is missing, damaged or of another format; names the file."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write the training ``state`` to ``run_dir/checkpoint.pt`` atomically, keeping the previous
    one as ``checkpoint.prev.pt``. Returns the path."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    state = {"format": FORMAT, "version": FORMAT_VERSION, **state}
    state[HASH_KEY] = content_hash(state)
    if path.exists():  # keep the last good one aside before the new one replaces it
        _keep_previous(path, run_dir / PREVIOUS)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def content_hash(state: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: every tensor's dtype, shape and bytes, and every
    other value, in the dict's order (which ``torch.load`` keeps)."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(f"B{len(value)};".encode())
        digest.update(value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        digest.update(f"S{len(data)};".encode())
        digest.update(data)
    else:  # int, float, bool, None: repr is exact
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _keep_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` the file ``path`` is now, atomically: a hard link renamed over it (no
    copy of a checkpoint that may be gigabytes; ``path`` is then replaced by a new file, so the two
    never share data), or a streamed copy where the file system has no hard links."""
    link = previous.with_name(f".{previous.name}.{os.getpid()}.link")
    link.unlink(missing_ok=True)  # left by a run killed between the two steps below
    try:
        os.link(path, link)
    except OSError:
        with open(path, "rb") as src:
            atomic_write(previous, lambda f: shutil.copyfileobj(src, f, 1 << 24))
        return
    os.replace(link, previous)
    _fsync_dir(previous.parent)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A training checkpoint (a file, or a run folder holding ``checkpoint.pt``), loaded with
    ``weights_only=True``. Raises :class:`CheckpointError` naming the file when it is missing,
    truncated, corrupt or not one of ours, and points to ``checkpoint.prev.pt`` when that exists."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, a pickle with foreign objects...
        hint = ""
        prev = path.with_name(PREVIOUS)
        if path.name == CHECKPOINT and prev.is_file():
            hint = f"; the previous checkpoint is still there: resume from {prev}"
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a c2f_fast training checkpoint")
    if state.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('version')}, expected one of "
                              f"{list(_READABLE_VERSIONS)}")
    if state["version"] >= 2:
        stored = state.pop(HASH_KEY, None)
        if stored is None:
            raise CheckpointError(f"{path}: no content hash (damaged, or not written by c2f_fast)")
        computed = content_hash(state)
        if computed != stored:
            raise CheckpointError(f"{path}: bad content hash (stored {stored[:12]}..., computed {computed[:12]}...): "
                                  f"the file was altered or damaged")
        state[HASH_KEY] = stored
    return state


def newest_valid_checkpoint(run_dir: str | os.PathLike) -> tuple[Optional[Path], Optional[dict], list]:
    """``(path, state, damaged)``: the newest checkpoint of ``run_dir`` that loads and passes its
    hash check (``checkpoint.pt``, else ``checkpoint.prev.pt``), or ``(None, None, damaged)``;
    ``damaged`` lists ``(path, reason)`` of the newer ones that did not load."""
    run_dir = Path(run_dir)
    damaged = []
    for name in (CHECKPOINT, PREVIOUS):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            return path, load_checkpoint(path), damaged
        except CheckpointError as exc:
            damaged.append((path, str(exc)))
    return None, None, damaged


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged file to ``NAME.damaged`` (``NAME.damaged.1``, ... when taken), so that it
    is neither read again nor lost; returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.damaged")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged.{n}")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


def save_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """The model's state dict as safetensors (contiguous CPU copies; shared tensors cloned)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(tensors)))


def write_model_json(run_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """``model.json``: ``{"model": ModelConfig dict, "class_names": [...], "class_order": [...], ...}``."""
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(Path(run_dir) / MODEL_JSON, lambda f: f.write(text.encode("utf-8")))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the model config and class names are read from it)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    for key in ("model", "class_names"):
        if key not in meta:
            raise CheckpointError(f"{path}: no {key!r} entry")
    return meta


def resolve_weights(path: str | os.PathLike, which: str = "best") -> tuple[Path, Optional[Path]]:
    """``(weights file, model.json or None)`` for a run folder, a ``.safetensors`` file (its
    ``model.json`` beside it) or a training checkpoint ``.pt`` (config inside)."""
    path = Path(path)
    if path.is_dir():
        order = [BEST_WEIGHTS, FINAL_WEIGHTS] if which == "best" else [FINAL_WEIGHTS, BEST_WEIGHTS]
        for name in order:
            if (path / name).is_file():
                return path / name, path / MODEL_JSON
        if (path / CHECKPOINT).is_file():
            return path / CHECKPOINT, None
        raise CheckpointError(f"{path}: no {BEST_WEIGHTS}, {FINAL_WEIGHTS} or {CHECKPOINT} in this folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return path, path.with_name(MODEL_JSON)
    return path, None


#: The ``which`` values of :func:`resolve_weights`: a run folder's best or final weights.
WEIGHTS_CHOICES = ("best", "final")


def add_checkpoint_arguments(parser) -> None:
    """``--checkpoint PATH`` and ``--weights best|final``, shared by every command that reads what
    training wrote (``c2f eval``, ``visualize``, ``predict``, ``export``)."""
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="PATH",
                        help="a run folder, a .safetensors file with model.json beside it, or checkpoint.pt")
    parser.add_argument("--weights", default="best", choices=WEIGHTS_CHOICES,
                        help="which weights of a run folder (default: best)")


def load_model(path: str | os.PathLike, which: str = "best", fast_kernels: bool = False):
    """``(C2FNet, meta)`` from what training wrote (see :func:`resolve_weights`), on the CPU in
    eval mode. ``meta`` holds ``class_names``, ``class_order`` and the ``model`` config dict."""
    weights, meta_path = resolve_weights(path, which)
    if meta_path is None:  # a training checkpoint
        state = load_checkpoint(weights)
        return model_from_state(state["meta"], state["model"], weights, fast_kernels), state["meta"]
    meta = _read_json(meta_path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model_state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    return model_from_state(meta, model_state, weights, fast_kernels), meta


def model_from_state(meta: dict, model_state: dict, source: Path, fast_kernels: bool = False):
    """A C2FNet (CPU, eval mode) built from ``meta["model"]`` with ``model_state`` loaded;
    errors name ``source``."""
    from .model import C2FNet, ModelConfig

    try:
        cfg = ModelConfig(**{**meta["model"], "fast_kernels": fast_kernels, "pretrained": None})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad model config ({exc})") from None
    model = C2FNet(cfg)
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit the model config: {exc}") from None
    return model.eval()


__all__ = ["CheckpointError", "add_checkpoint_arguments", "atomic_write", "content_hash", "load_checkpoint",
           "newest_valid_checkpoint", "set_aside", "load_model", "model_from_state", "resolve_weights",
           "save_checkpoint", "save_weights", "write_model_json", "CHECKPOINT", "PREVIOUS",
           "FINAL_WEIGHTS", "BEST_WEIGHTS", "MODEL_JSON", "WEIGHTS_CHOICES"]
