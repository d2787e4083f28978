"""Plain list-file reader (one image per line with its label names) → :class:`MultiLabelSet`.

Format (UTF-8 text, no header line)::

    # comment lines (first non-space character '#') and blank lines are skipped
    img001.jpg,cat,dog          comma separated (CSV quoting allowed: "my image.jpg",cat)
    img002.jpg  person  horse   or whitespace separated, when the line has no comma
    img003.jpg                  an image with no label: all-zero target

The first field is the image path, relative to ``image_dir`` (an absolute path stays as is); the
other fields are class names (case-sensitive, surrounding spaces stripped, empty fields ignored, a
name repeated on one line counts once). An image listed twice is an error.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .records import MultiLabelSet


def _split_line(line: str) -> list[str]:
    if "," in line:
        fields = next(csv.reader([line], skipinitialspace=True))
    else:
        fields = line.split()
    return [f.strip() for f in fields if f.strip()]


def load_list(
    path: str | os.PathLike,
    image_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
) -> MultiLabelSet:
    """Read a list file (format in the module docstring) into a :class:`MultiLabelSet`.

    Args:
        path: the list file.
        image_dir: directory the image fields are relative to; images are not opened here.
        class_names: the class list in index order. ``None``: the sorted union of the names seen.

    Returns:
        images in file order, targets 1/0, no boxes.

    Raises:
        FileNotFoundError: ``path`` missing.
        ValueError: a name not in ``class_names`` (names the file, the line number and the name),
            an image listed twice, no image at all, or a bad ``class_names``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file missing: {path}")
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if not class_names:
            raise ValueError("class_names: empty list")
        if len(set(class_names)) != len(class_names):
            dup = sorted({n for n in class_names if class_names.count(n) > 1})
            raise ValueError(f"class_names: duplicate names {dup}")
        known = set(class_names)

    entries: list[tuple[str, set[str]]] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            fields = _split_line(line)
        except csv.Error as exc:
            raise ValueError(f"{path}:{lineno}: cannot parse line ({exc})") from None
        if not fields:
            continue
        image, labels = fields[0], set(fields[1:])
        if class_names is not None:
            unknown = sorted(labels - known)
            if unknown:
                raise ValueError(f"{path}:{lineno}: unknown class name {unknown[0]!r} (known: {class_names})")
        if image in first_line:
            raise ValueError(f"{path}:{lineno}: image {image!r} already listed on line {first_line[image]}")
        first_line[image] = lineno
        entries.append((image, labels))
    if not entries:
        raise ValueError(f"{path}: lists no images")

    names = list(class_names) if class_names is not None else sorted(set().union(*(lb for _, lb in entries)))
    if not names:
        raise ValueError(f"{path}: no class names on any line and class_names not given")
    index = {n: i for i, n in enumerate(names)}
    targets = np.zeros((len(entries), len(names)), dtype=np.int8)
    for i, (_, labels) in enumerate(entries):
        targets[i, [index[n] for n in labels]] = 1
    image_dir = Path(image_dir)
    image_paths = [str(image_dir / image) for image, _ in entries]
    return MultiLabelSet(image_paths=image_paths, targets=targets, class_names=names)
