"""Figures: the attention maps of greedy decoding (the paper's Fig. 3) and training curves.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), at a
fixed size: ``attention_figure`` is ``CELL_W`` x ``CELL_H`` pixels per panel (no tight bounding
box), ``training_curves`` is ``CURVES_SIZE`` pixels.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data.base import normalize, resize_whole
from .model import PAD, greedy_emissions
from .pointing import Box, map_shape, scale_boxes

#: Size of one panel of ``attention_figure`` in pixels (DPI x inches).
DPI = 100
CELL_W, CELL_H = 200, 220
#: Size of the ``training_curves`` image in pixels.
CURVES_SIZE = (1500, 400)

ImageLike = Union[str, os.PathLike, torch.Tensor]


def _new_figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def load_image(image: ImageLike) -> torch.Tensor:
    """A path (JPEG, PNG, ...; decoded to RGB as the evaluation loader does) or a uint8 tensor
    [3, H, W] -> uint8 [3, H, W]."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 tensors [3, H, W], got {image.dtype} {tuple(image.shape)}")
        return image
    from .data.torch_pipeline import decode_rgb  # the evaluation loader's decoder: the same pixels

    return decode_rgb(os.fspath(image))


def preprocess(images: Sequence[ImageLike], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As evaluation does: resize to S x S (bilinear, antialiased), ImageNet normalisation.

    Returns (normalised float [B, 3, S, S], resized uint8 [B, 3, S, S] for display)."""
    raw = torch.stack([resize_whole(load_image(img), image_size) for img in images])
    return normalize(raw), raw


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] with reflect padding."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    pad_h, pad_w = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else x
    x = F.conv2d(x, k[r - pad_w : r + pad_w + 1].view(1, 1, 1, -1)) if pad_w > 0 else x
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else x
    x = F.conv2d(x, k[r - pad_h : r + pad_h + 1].view(1, 1, -1, 1)) if pad_h > 0 else x
    return x


def upsample_attention(attn: torch.Tensor, image_size: int, map_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Attention maps [..., L] -> [..., S, S] in [0, 1]: bilinear upsampling, a small Gaussian blur
    (sigma = half a cell), then each map scaled to its own maximum."""
    a = attn.detach().float().cpu()
    map_hw = map_shape(a.shape[-1], map_hw)
    lead = a.shape[:-1]
    m = a.reshape(-1, 1, *map_hw)
    up = F.interpolate(m, size=(image_size, image_size), mode="bilinear", align_corners=False)
    up = _gaussian_blur(up, 0.5 * image_size / max(map_hw))
    up = up - up.amin(dim=(2, 3), keepdim=True)
    up = up / up.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return up.reshape(*lead, image_size, image_size).numpy()


def _label(image: ImageLike, k: int) -> str:
    return Path(image).stem if isinstance(image, (str, os.PathLike)) else f"image {k}"


def attention_figure(
    model: torch.nn.Module,
    images: Sequence[ImageLike],
    class_names: Sequence[str],
    out_path: Union[str, os.PathLike],
    image_size: Optional[int] = None,
    boxes: Optional[Sequence[Sequence[Box]]] = None,
) -> Path:
    """Draw the attention of greedy decoding, one row per image (the paper's Fig. 3); return the path.

    Columns: the (resized) image, the global attention (variant ``lstm_lg`` only), then each
    decoder step's local attention (variants with local attention), each upsampled to the image and
    overlaid on it, titled with the class that step emitted and its probability ("—" after the
    stop). ``boxes`` (optional, per image ``(class, x1, y1, x2, y2)`` in the image's own pixels, as
    ``MultiLabelSet.boxes``): each step's panel outlines the boxes of the class that step emitted,
    so a map can be read against the object it should point at. ``images``: paths or uint8 tensors [3, H, W], preprocessed as in evaluation (resize to
    S x S, S = ``image_size`` or the model's ``cfg.image_size``; ImageNet normalisation). The model
    runs in eval mode without gradients (its training mode is restored afterwards). The PNG is
    ``CELL_W * columns`` x ``CELL_H * len(images)`` pixels.
    """
    if len(images) == 0:
        raise ValueError("images: expected at least one image")
    cfg = getattr(model, "cfg", None)
    S = int(image_size or getattr(cfg, "image_size", 0) or 0)
    if S <= 0:
        raise ValueError("image_size: not given and the model has no cfg.image_size")
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"boxes: expected one list per image ({len(images)}), got {len(boxes)}")
    loaded = [load_image(img) for img in images]
    x, raw = preprocess(loaded, S)
    # boxes in display pixels: scaled as evaluation scales them (whole-image resize to S x S)
    shown_boxes = [scale_boxes(bx, (int(im.shape[2]), int(im.shape[1])), S) for bx, im in zip(boxes, loaded)] \
        if boxes is not None else None
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else x.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    if out.step_logits.shape[-1] != len(class_names):
        raise ValueError(f"class_names: {len(class_names)} names for {out.step_logits.shape[-1]} classes")
    step_logits = out.step_logits.float().cpu()
    emitted = greedy_emissions(step_logits)  # [B, T]
    probs = torch.sigmoid(step_logits)
    glob = None if out.global_attn is None else upsample_attention(out.global_attn, S)
    local = None if out.local_attn is None else upsample_attention(out.local_attn, S)
    T = 0 if local is None else local.shape[1]
    ncols = 1 + (glob is not None) + T
    B = len(images)

    fig = _new_figure(CELL_W * ncols, CELL_H * B)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.12 / B if B else 0.9, wspace=0.05, hspace=0.25)
    axes = fig.subplots(B, ncols, squeeze=False)
    scores = torch.sigmoid(out.logits.float().cpu())
    for b in range(B):
        img = raw[b].permute(1, 2, 0).numpy()
        col = 0
        ax = axes[b][col]
        ax.imshow(img)
        title = _label(images[b], b)
        if T == 0:  # no local attention: name the (up to 3 best) classes predicted (p >= 0.5)
            best = [int(c) for c in torch.argsort(scores[b], descending=True)[:3] if scores[b, c] >= 0.5]
            title += "\n" + (", ".join(f"{class_names[c]} {float(scores[b, c]):.2f}" for c in best) or "(none)")
        ax.set_title(title, fontsize=7 if T == 0 else 8)
        col += 1
        if glob is not None:
            ax = axes[b][col]
            ax.imshow(img)
            ax.imshow(glob[b], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title("global attention", fontsize=8)
            col += 1
        for t in range(T):
            ax = axes[b][col + t]
            ax.imshow(img)
            ax.imshow(local[b, t], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            c = int(emitted[b, t])
            title = f"t={t + 1}: {class_names[c]} {float(probs[b, t, c]):.2f}" if c != PAD else f"t={t + 1}: —"
            ax.set_title(title, fontsize=8)
            if shown_boxes is not None and c != PAD:
                _outline_boxes(ax, [bx for bx in shown_boxes[b] if bx[0] == c])
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path


def boxes_from_run(checkpoint: Union[str, os.PathLike], images: Sequence[ImageLike]) -> Optional[list[list[Box]]]:
    """The boxes of ``images`` from the test split of the run that ``checkpoint`` belongs to (a run
    folder, or a file in one), matched by resolved path; an image not in that split gets none.
    None when there is no run config, the split cannot be read, or no image has a box."""
    import torch

    from .config import ConfigError, load_config
    from .distributed import DistInfo
    from .runtime import CONFIG_FILE, load_datasets

    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    if not (run_dir / CONFIG_FILE).is_file():
        return None
    try:
        cfg = load_config(run_dir / CONFIG_FILE)
        _, test_set = load_datasets(cfg, DistInfo(0, 1, 0, torch.device("cpu")), train=False)
    except (ConfigError, OSError, ValueError):  # data moved or gone: the figure goes without boxes
        return None
    by_path = {Path(p).resolve(): bx for p, bx in zip(test_set.image_paths, test_set.boxes)}
    found = [list(by_path.get(Path(img).resolve(), [])) if isinstance(img, (str, os.PathLike)) else []
             for img in images]
    return found if any(found) else None


def _outline_boxes(ax, boxes: Sequence[Box]) -> None:
    """White-on-black rectangles (visible on any colour of the map) for ``(class, x1, y1, x2, y2)``."""
    from matplotlib.patches import Rectangle

    for _, x1, y1, x2, y2 in boxes:
        for color, width in (("black", 2.5), ("white", 1.2)):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=width))


def read_records(records: Union[str, os.PathLike, Iterable[dict]]) -> list[dict]:
    """The engine's JSONL records (a path) or a list of dicts; blank and malformed lines skipped."""
    if isinstance(records, (str, os.PathLike)):
        out = []
        for line in Path(records).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # e.g. a line cut short by an interrupted run
            if isinstance(rec, dict):
                out.append(rec)
        return out
    return [dict(r) for r in records]


def _ema(values: np.ndarray, n: int) -> np.ndarray:
    """Exponential moving average with a bias correction (so it starts at the first values)."""
    if len(values) == 0:
        return values
    alpha = 2.0 / (max(1, n) + 1)
    out, acc, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        norm = (1 - alpha) * norm + alpha
        out[i] = acc / norm
    return out


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def training_curves(records: Union[str, os.PathLike, Iterable[dict]], out_path: Union[str, os.PathLike]) -> Path:
    """A PNG (``CURVES_SIZE`` pixels) of the engine's JSONL records; return its path.

    Panels: training loss per step (raw, faint, and smoothed) with the epoch means; test mAP per
    epoch (and the pointing game, local and global, when recorded); learning rate per step.
    Step records: ``{"kind": "step", "step", "loss", "lr", ...}``; epoch records:
    ``{"kind": "epoch", "epoch", "step", "train_loss", "eval": {"mAP", "pointing_local", ...}}``.
    """
    recs = read_records(records)
    steps = [r for r in recs if r.get("kind") == "step" and r.get("step") is not None]
    epochs = [r for r in recs if r.get("kind") == "epoch" and r.get("epoch") is not None]
    fig = _new_figure(*CURVES_SIZE)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.9, wspace=0.28)
    ax_loss, ax_eval, ax_lr = fig.subplots(1, 3)

    s = np.array([r["step"] for r in steps], dtype=float)
    loss = np.array([_num(r.get("loss")) for r in steps], dtype=float)
    if len(s):
        ax_loss.plot(s, loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
        ax_loss.plot(s, _ema(loss, max(5, len(s) // 50)), color="tab:blue", lw=1.5, label="smoothed")
    ep_loss = [(r.get("step"), r.get("train_loss")) for r in epochs if r.get("train_loss") is not None]
    if ep_loss and all(st is not None for st, _ in ep_loss):
        ax_loss.plot(*zip(*ep_loss), "o", color="tab:orange", ms=4, label="epoch mean")
    ax_loss.set(title="training loss", xlabel="step")
    if ax_loss.lines:
        ax_loss.legend(fontsize=7)

    ev = [(r["epoch"], r.get("eval") or {}) for r in epochs]
    ev = [(e, d) for e, d in ev if d]
    for key, label, style in (
        ("mAP", "test mAP", "o-"),
        ("pointing_local", "pointing (local)", "s--"),
        ("pointing_global", "pointing (global)", "^:"),
    ):
        pts = [(e, d[key]) for e, d in ev if d.get(key) is not None]
        if pts:
            ax_eval.plot(*zip(*pts), style, ms=4, label=label)
    ax_eval.set(title="evaluation", xlabel="epoch", ylim=(0, 1.02))
    from matplotlib.ticker import MaxNLocator

    ax_eval.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax_eval.lines:
        ax_eval.legend(fontsize=7, loc="lower right")
    else:
        ax_eval.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_eval.transAxes)

    lr = np.array([_num(r.get("lr")) for r in steps], dtype=float)
    if len(s) and np.isfinite(lr).any():
        ax_lr.plot(s, lr, color="tab:green", lw=1.2)
    ax_lr.set(title="learning rate", xlabel="step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path


__all__ = ["attention_figure", "boxes_from_run", "training_curves", "read_records", "preprocess", "upsample_attention", "load_image"]
