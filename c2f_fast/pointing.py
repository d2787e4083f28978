"""The pointing game: does an attention map's peak fall on an object of the class it was used for?

Pure tensor/numpy functions, no model inside (docs/model.md, "Local attention" and "Global
attention"; docs/data.md for the boxes).

* **Local** (one trial per image and present class with boxes): the class's attention map is the
  local attention ``beta_t`` of the step ``t`` that emitted the class in greedy decoding
  (``c2f_fast.model.greedy_emissions``). A class that was not emitted is a miss.
* **Global** (one trial per image with boxes): the peak of the global attention against the boxes
  of every present class.

Two reference figures come with the local rate, so that it can be read:

* ``local_any``: the share of local trials whose map peaks on an object of *some* present class
  (the class's own or another): does the attention find objects at all?
* ``local_chance``: the rate a pointer would score that, for every trial, points at one present
  class chosen uniformly at random (per trial 1/k, k = the present classes with boxes in the
  image): the local rate says something about classes only where it is above this.

The peak is the argmax cell of the ``h x w`` map; its centre ``x = (j + 0.5) W / w``,
``y = (i + 0.5) H / h`` in the pixels of the ``S x S`` network input. It is a hit when its distance
to a box of the class is at most the tolerance (0 inside the box): 15 px at 224 px, scaled with the
input size (``15 S / 224``). Boxes ``(class, x1, y1, x2, y2)`` are in pixels of the original image
(``MultiLabelSet.boxes``); evaluation resizes the whole image to ``S x S`` without keeping the
aspect ratio, so boxes are scaled by ``S / W_orig`` and ``S / H_orig``.

Typical use in an evaluation loop::

    game = PointingGame(num_classes, image_size=S)
    for images, targets, index in loader:
        out = model(images)
        game.update(out.step_logits, out.local_attn, out.global_attn,
                    [dataset.boxes[i] for i in index], orig_sizes, targets)
    result = game.result()      # result.local, result.global_, result.to_dict()
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .model import greedy_emissions

#: Tolerance of the pointing game at a 224-px input, in pixels (scaled with the input size).
TOLERANCE_AT_224 = 15.0

Box = tuple[int, float, float, float, float]
Size = Union[int, tuple[int, int]]


def tolerance_px(image_size: int, at_224: float = TOLERANCE_AT_224) -> float:
    """The hit tolerance for an ``image_size`` x ``image_size`` input: ``at_224 * S / 224``."""
    return at_224 * image_size / 224.0


def map_shape(length: int, map_hw: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """``(h, w)`` of an attention map with ``length`` = h*w cells (square unless ``map_hw`` says)."""
    if map_hw is not None:
        h, w = map_hw
        if h * w != length:
            raise ValueError(f"map_hw: {map_hw} has {h * w} cells, the attention has {length}")
        return int(h), int(w)
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"attention of {length} cells is not a square map; pass map_hw=(h, w)")
    return side, side


def peak_xy(attn: torch.Tensor | np.ndarray, image_size: int, map_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Peak (argmax cell centre) of attention maps ``[..., L]`` as ``[..., 2]`` (x, y) input pixels."""
    a = torch.as_tensor(attn).detach().float().cpu()
    h, w = map_shape(a.shape[-1], map_hw)
    idx = a.argmax(dim=-1).numpy()
    i, j = idx // w, idx % w
    return np.stack([(j + 0.5) * image_size / w, (i + 0.5) * image_size / h], axis=-1).astype(np.float64)


def box_distance(x: float, y: float, box: Sequence[float]) -> float:
    """Euclidean distance from point (x, y) to box ``(x1, y1, x2, y2)``; 0 inside or on the border."""
    x1, y1, x2, y2 = box
    dx = max(x1 - x, 0.0, x - x2)
    dy = max(y1 - y, 0.0, y - y2)
    return math.hypot(dx, dy)


def scale_boxes(boxes: Sequence[Box], orig_size: Size, image_size: int) -> list[Box]:
    """Boxes of an original ``orig_size`` image ((W, H) or one side for a square) in input pixels."""
    W, H = (orig_size, orig_size) if isinstance(orig_size, (int, np.integer)) else orig_size
    sx, sy = image_size / float(W), image_size / float(H)
    return [(int(c), x1 * sx, y1 * sy, x2 * sx, y2 * sy) for c, x1, y1, x2, y2 in boxes]


def original_sizes(image_paths: Sequence[Union[str, "os.PathLike[str]"]]) -> list[tuple[int, int]]:
    """(W, H) of each image file, from its header (no decoding): the ``orig_sizes`` of ``update``."""
    from PIL import Image

    sizes = []
    for path in image_paths:
        with Image.open(path) as im:
            sizes.append((int(im.width), int(im.height)))
    return sizes


def _hit(x: float, y: float, boxes: Sequence[Box], tol: float) -> bool:
    return any(box_distance(x, y, b[1:]) <= tol for b in boxes)


@dataclass
class PointingResult:
    """Hits and trials, per class and overall, for the local and the global attention.

    ``local`` / ``global_``: overall hit rates (None when there was no trial or no such attention);
    ``local_per_class``: rate per class name (None for a class without trials).
    """

    class_names: list[str]
    local_hits: list[int]
    local_total: list[int]
    global_hits: int = 0
    global_total: int = 0
    has_local: bool = True
    has_global: bool = True
    local_any_hits: int = 0
    local_chance_sum: float = 0.0

    def _per_local_trial(self, count: float) -> Optional[float]:
        n = sum(self.local_total)
        return count / n if self.has_local and n else None

    @property
    def local(self) -> Optional[float]:
        return self._per_local_trial(sum(self.local_hits))

    @property
    def global_(self) -> Optional[float]:
        return self.global_hits / self.global_total if self.has_global and self.global_total else None

    @property
    def local_any(self) -> Optional[float]:
        """Share of local trials whose peak lies on an object of any present class."""
        return self._per_local_trial(self.local_any_hits)

    @property
    def local_chance(self) -> Optional[float]:
        """The local rate of a pointer at a uniformly random present class."""
        return self._per_local_trial(self.local_chance_sum)

    @property
    def local_per_class(self) -> dict[str, Optional[float]]:
        return {
            name: (h / n if self.has_local and n else None)
            for name, h, n in zip(self.class_names, self.local_hits, self.local_total)
        }

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (rates and counts)."""
        return {
            "local": self.local,
            "global": self.global_,
            "local_any": self.local_any,
            "local_chance": self.local_chance,
            "local_hits": sum(self.local_hits) if self.has_local else None,
            "local_total": sum(self.local_total) if self.has_local else None,
            "global_hits": self.global_hits if self.has_global else None,
            "global_total": self.global_total if self.has_global else None,
            "local_per_class": self.local_per_class,
            "local_per_class_counts": {
                name: [h, n] for name, h, n in zip(self.class_names, self.local_hits, self.local_total)
            },
        }


@dataclass
class PointingGame:
    """Accumulates pointing-game trials over batches; ``result()`` gives the rates.

    image_size: side S of the (square) network input the attention maps were computed on.
    tolerance: hit tolerance in input pixels (default ``15 S / 224``).
    map_hw: (h, w) of the attention map when it is not square.
    """

    num_classes: int
    image_size: int
    tolerance: Optional[float] = None
    map_hw: Optional[tuple[int, int]] = None
    class_names: Optional[list[str]] = None
    local_hits: np.ndarray = field(init=False)
    local_total: np.ndarray = field(init=False)
    global_hits: int = field(init=False, default=0)
    global_total: int = field(init=False, default=0)
    has_local: bool = field(init=False, default=False)
    has_global: bool = field(init=False, default=False)
    local_any_hits: int = field(init=False, default=0)
    local_chance_sum: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.tolerance is None:
            self.tolerance = tolerance_px(self.image_size)
        if self.class_names is None:
            self.class_names = [str(c) for c in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names: expected {self.num_classes} names, got {len(self.class_names)}")
        self.local_hits = np.zeros(self.num_classes, dtype=np.int64)
        self.local_total = np.zeros(self.num_classes, dtype=np.int64)

    def update(
        self,
        step_logits: Optional[torch.Tensor],
        local_attn: Optional[torch.Tensor],
        global_attn: Optional[torch.Tensor],
        boxes: Sequence[Sequence[Box]],
        orig_sizes: Optional[Sequence[Size]] = None,
        targets: Optional[torch.Tensor | np.ndarray] = None,
    ) -> None:
        """Add one batch.

        step_logits [B, T, C] (greedy decoding's masked step logits), local_attn [B, T, L] or None,
        global_attn [B, L] or None; boxes: per image, ``(class, x1, y1, x2, y2)`` in original pixels;
        orig_sizes: per image (W, H) or one side (default: already ``image_size``); targets [B, C]:
        when given, only classes with target 1 are trials (VOC boxes include difficult objects).
        """
        B = len(boxes)
        S, tol = self.image_size, float(self.tolerance)
        if orig_sizes is not None and len(orig_sizes) != B:
            raise ValueError(f"orig_sizes: expected {B} entries, got {len(orig_sizes)}")
        tg = None if targets is None else torch.as_tensor(targets).cpu().numpy()
        emitted = None
        if local_attn is not None:
            if step_logits is None:
                raise ValueError("step_logits: needed with local_attn (to know which step emitted a class)")
            if local_attn.shape[:2] != step_logits.shape[:2] or local_attn.shape[0] != B:
                raise ValueError(
                    f"local_attn {tuple(local_attn.shape)} and step_logits {tuple(step_logits.shape)} "
                    f"do not match each other or the {B} images"
                )
            emitted = greedy_emissions(step_logits.detach()).cpu().numpy()  # [B, T]
            local_xy = peak_xy(local_attn, S, self.map_hw)  # [B, T, 2]
            self.has_local = True
        if global_attn is not None:
            if global_attn.shape[0] != B:
                raise ValueError(f"global_attn: {tuple(global_attn.shape)} does not match the {B} images")
            global_xy = peak_xy(global_attn, S, self.map_hw)  # [B, 2]
            self.has_global = True
        for b in range(B):
            bx = scale_boxes(boxes[b], S if orig_sizes is None else orig_sizes[b], S)
            if tg is not None:
                bx = [box for box in bx if tg[b, box[0]] == 1]
            if not bx:
                continue
            if global_attn is not None:
                self.global_total += 1
                self.global_hits += int(_hit(*global_xy[b], bx, tol))
            if emitted is None:
                continue
            present = sorted({box[0] for box in bx})
            for c in present:
                self.local_total[c] += 1
                self.local_chance_sum += 1.0 / len(present)
                steps = np.flatnonzero(emitted[b] == c)
                if steps.size:
                    x, y = local_xy[b, steps[0]]
                    self.local_hits[c] += int(_hit(x, y, [box for box in bx if box[0] == c], tol))
                    self.local_any_hits += int(_hit(x, y, bx, tol))

    def merge(self, other: "PointingGame") -> None:
        """Add another game's counts (e.g. from another process)."""
        self.local_hits += other.local_hits
        self.local_total += other.local_total
        self.global_hits += other.global_hits
        self.global_total += other.global_total
        self.local_any_hits += other.local_any_hits
        self.local_chance_sum += other.local_chance_sum
        self.has_local |= other.has_local
        self.has_global |= other.has_global

    def result(self) -> PointingResult:
        return PointingResult(
            class_names=list(self.class_names),
            local_hits=self.local_hits.tolist(),
            local_total=self.local_total.tolist(),
            global_hits=int(self.global_hits),
            global_total=int(self.global_total),
            has_local=self.has_local,
            has_global=self.has_global,
            local_any_hits=int(self.local_any_hits),
            local_chance_sum=float(self.local_chance_sum),
        )


def pointing_game(
    step_logits: Optional[torch.Tensor],
    local_attn: Optional[torch.Tensor],
    global_attn: Optional[torch.Tensor],
    boxes: Sequence[Sequence[Box]],
    image_size: int,
    orig_sizes: Optional[Sequence[Size]] = None,
    targets: Optional[torch.Tensor | np.ndarray] = None,
    num_classes: Optional[int] = None,
    tolerance: Optional[float] = None,
    map_hw: Optional[tuple[int, int]] = None,
    class_names: Optional[list[str]] = None,
) -> PointingResult:
    """The pointing game on one set of outputs (see ``PointingGame.update`` for the arguments)."""
    if num_classes is None:
        if step_logits is None:
            raise ValueError("num_classes: needed when step_logits is None")
        num_classes = step_logits.shape[-1]
    game = PointingGame(num_classes, image_size, tolerance=tolerance, map_hw=map_hw, class_names=class_names)
    game.update(step_logits, local_attn, global_attn, boxes, orig_sizes, targets)
    return game.result()


__all__ = [
    "PointingGame",
    "PointingResult",
    "TOLERANCE_AT_224",
    "box_distance",
    "map_shape",
    "original_sizes",
    "peak_xy",
    "pointing_game",
    "scale_boxes",
    "tolerance_px",
]
