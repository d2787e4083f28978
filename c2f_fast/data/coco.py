"""COCO instances-JSON reader → :class:`MultiLabelSet`.

The JSON is read and its structure checked here first, so that a broken file gives a
:class:`ValueError` naming the file and the missing key instead of a bare ``KeyError`` / assertion
from inside pycocotools; pycocotools then builds the image → annotation index. pycocotools is imported
when a file is read; without it, :class:`~c2f_fast.deps.MissingPackageError` names the package.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..deps import require
from .records import Box, MultiLabelSet


def _require(obj: Any, key: str, where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: missing key {key!r} in {where}")
    return obj[key]


def _validate(data: Any, path: Path) -> None:
    """Check every key this reader and pycocotools' index use, naming the file and the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(_require(data, key, "the top-level object", path), list):
            raise ValueError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise ValueError(f"{path}: 'categories' is empty")
    for k, cat in enumerate(data["categories"]):
        for key in ("id", "name"):
            _require(cat, key, f"categories[{k}]", path)
    for k, img in enumerate(data["images"]):
        for key in ("id", "file_name"):
            _require(img, key, f"images[{k}]", path)
    cat_ids = {c["id"] for c in data["categories"]}
    if len(cat_ids) != len(data["categories"]):
        raise ValueError(f"{path}: duplicate category ids in 'categories'")
    img_ids = {im["id"] for im in data["images"]}
    if len(img_ids) != len(data["images"]):
        raise ValueError(f"{path}: duplicate image ids in 'images'")
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        for key in ("id", "image_id", "category_id", "bbox"):
            _require(ann, key, where, path)
        if ann["image_id"] not in img_ids:
            raise ValueError(f"{path}: {where} refers to unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{path}: {where} refers to unknown category_id {ann['category_id']!r}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{path}: {where} 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")


def load_coco(
    annotation_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    drop_empty: bool = False,
) -> MultiLabelSet:
    """Read a COCO ``instances_*.json`` into a :class:`MultiLabelSet`.

    Args:
        annotation_json: path of the instances JSON (``images``, ``annotations``, ``categories``).
        image_dir: directory the images' ``file_name`` is relative to; paths are not checked here.
        drop_empty: drop images without any annotation (default: keep them, all-zero target).

    Returns:
        images in ascending image id; classes = the JSON's categories in ascending category id,
        mapped to contiguous indices 0..C-1 (80 for COCO, whose ids 1..90 have gaps), named by the
        category ``name``; targets 1/0 only (COCO has no "difficult"); crowd annotations count as
        labels and their boxes are kept too; boxes converted from ``[x, y, w, h]`` to
        ``(class, x, y, x + w, y + h)`` in pixels.

    Raises:
        FileNotFoundError: the JSON file is missing.
        ValueError: not JSON, or a missing key / dangling id / bad bbox (names the file and the key).
        MissingPackageError: pycocotools is not installed.
    """
    COCO = require("pycocotools.coco", "pycocotools", "reading COCO annotation JSON").COCO
    path = Path(annotation_json)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file missing: {path}")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    _validate(data, path)

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()

    cat_ids = sorted(coco.getCatIds())
    cat_to_index = {cid: i for i, cid in enumerate(cat_ids)}
    class_names = [str(coco.cats[cid]["name"]) for cid in cat_ids]

    img_ids = sorted(coco.getImgIds())
    if drop_empty:
        img_ids = [iid for iid in img_ids if coco.imgToAnns.get(iid)]
    image_dir = Path(image_dir)
    targets = np.zeros((len(img_ids), len(cat_ids)), dtype=np.int8)
    boxes: list[list[Box]] = []
    image_paths: list[str] = []
    for i, iid in enumerate(img_ids):
        image_boxes: list[Box] = []
        for ann in coco.imgToAnns.get(iid, []):
            c = cat_to_index[ann["category_id"]]
            targets[i, c] = 1
            x, y, w, h = (float(v) for v in ann["bbox"])
            image_boxes.append((c, x, y, x + w, y + h))
        boxes.append(image_boxes)
        image_paths.append(str(image_dir / coco.imgs[iid]["file_name"]))
    return MultiLabelSet(image_paths=image_paths, targets=targets, class_names=class_names, boxes=boxes)
