"""PASCAL VOC reader (devkit layout) → :class:`MultiLabelSet`.

Layout read (one dataset directory, e.g. ``VOCdevkit/VOC2007``)::

    Annotations/<id>.xml          one file per image, parsed with defusedxml (see below)
    ImageSets/Main/<split>.txt    image ids, one per line (first token of the line)
    JPEGImages/<id>.jpg           recorded as the image path; not opened here
    classes.txt                   optional: class names, one per line, in index order

``classes.txt`` is not part of the VOC devkit: datasets in VOC layout with another class list (the
built-in synthetic set, see :mod:`c2f_fast.data.synthetic`) write it, and its list then replaces
:data:`VOC_CLASSES`.

Boxes are converted from VOC's 1-based inclusive pixel indices to 0-based continuous pixel
coordinates, ``(xmin - 1, ymin - 1, xmax, ymax)``, the convention COCO's ``[x, y, w, h]`` uses, so
that the boxes of both readers mean the same thing (pixel ``i`` covers ``[i, i + 1)``).

XML parsing: annotation files are untrusted input, read with ``defusedxml`` (imported when the
first file is parsed; without it, :class:`~c2f_fast.deps.MissingPackageError` says so). One
exception: the built-in synthetic set, whose XML this package writes itself (``own_xml``; by default,
a dataset folder holding the generator's manifest ``synthetic.json``). Without defusedxml its files
are read with the standard library's expat, after a first expat pass that refuses any document type
declaration (DTD). Without a DTD an XML file cannot declare entities, so neither entity expansion
(billion laughs) nor external entities can happen: the same refusal as defusedxml's
``forbid_dtd``, and the only one the synthetic set's files need. (A manifest copied into a foreign
folder only buys that same DTD refusal.) With defusedxml installed, every file goes through it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
import xml.etree.ElementTree as StdET
import xml.parsers.expat
from xml.etree.ElementTree import Element, ParseError

import numpy as np

from ..deps import MissingPackageError, require
from .records import Box, MultiLabelSet

_NEEDED_FOR = "reading VOC annotation XML"

#: The 20 VOC classes in the devkit's order (index = position).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

#: Name of the optional class-list file in the dataset directory (one class name per line).
CLASSES_FILE = "classes.txt"
#: The synthetic set's manifest (``synthetic.MANIFEST``): its folder holds XML this package wrote.
SYNTHETIC_MANIFEST = "synthetic.json"

DifficultMode = Literal["ignore", "positive", "negative"]
#: Target value of a class present only through difficult objects, per ``difficult`` mode.
_DIFFICULT_VALUE = {"ignore": -1, "positive": 1, "negative": 0}


def resolve_voc_dir(root: str | os.PathLike, year: str = "2007") -> Path:
    """The dataset directory (the one holding ``Annotations/`` and ``ImageSets/``).

    ``root`` is accepted in two forms: the dataset directory itself (``.../VOC2007``, or any directory
    in VOC layout such as a synthetic set; ``year`` is then not used), or the ``VOCdevkit``
    directory that contains ``VOC{year}/``. The first form wins when both could apply.
    """
    root = Path(root)
    if (root / "Annotations").is_dir() and (root / "ImageSets").is_dir():
        return root
    sub = root / f"VOC{year}"
    if (sub / "Annotations").is_dir() and (sub / "ImageSets").is_dir():
        return sub
    raise FileNotFoundError(
        f"root: no VOC dataset found: neither {root} nor {sub} holds Annotations/ and ImageSets/ "
        "(pass the VOCdevkit directory or the VOC<year> directory itself)"
    )


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line; blank lines and ``#`` comment lines skipped."""
    path = Path(path)
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.strip()
        if name and not name.startswith("#"):
            names.append(name.lower())
    if not names:
        raise ValueError(f"{path}: class list is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate class names {dup}")
    return names


def _child_text(elem: Element, tag: str, path: Path) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{path}: <{elem.tag}> has no <{tag}> value")
    return child.text.strip()


def _parse_number(text: str, tag: str, path: Path) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: <{tag}> is not a number: {text!r}") from None


def parse_voc_xml(
    path: str | os.PathLike, class_index: dict[str, int], own_xml: bool = False
) -> list[tuple[int, bool, Box]]:
    """The objects of one VOC annotation file: ``(class index, difficult, box)`` per ``<object>``.

    The file is parsed with defusedxml, which refuses entity declarations (billion laughs), external
    entities and DTDs; a refused or malformed file raises :class:`ValueError` naming it.
    ``own_xml``: the file was written by this package (the synthetic set); without defusedxml it is
    read with the standard library instead, DTDs refused (module docstring).
    """
    path = Path(path)
    try:
        tree = _parse_xml(path, own_xml)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file missing: {path}") from None
    except ParseError as exc:
        raise ValueError(f"{path}: malformed XML ({exc})") from None

    objects: list[tuple[int, bool, Box]] = []
    for obj in tree.getroot().iter("object"):
        name = _child_text(obj, "name", path).lower()
        if name not in class_index:
            raise ValueError(f"{path}: unknown class name {name!r} (known: {sorted(class_index)})")
        diff_elem = obj.find("difficult")  # some VOC2012 objects have no <difficult>: not difficult
        difficult = False
        if diff_elem is not None and diff_elem.text is not None and diff_elem.text.strip():
            difficult = _parse_number(diff_elem.text.strip(), "difficult", path) != 0
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{path}: <object> {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (
            _parse_number(_child_text(bb, t, path), t, path) for t in ("xmin", "ymin", "xmax", "ymax")
        )
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"{path}: <bndbox> of {name!r} has max < min: {(xmin, ymin, xmax, ymax)}")
        # 1-based inclusive pixel indices -> 0-based continuous coordinates (see module docstring).
        objects.append((class_index[name], difficult, (class_index[name], xmin - 1.0, ymin - 1.0, xmax, ymax)))
    return objects


def _parse_xml(path: Path, own_xml: bool) -> StdET.ElementTree:
    try:
        safe = require("defusedxml.ElementTree", "defusedxml", _NEEDED_FOR)
    except MissingPackageError:
        if not own_xml:
            raise
        return _parse_own_xml(path)
    from defusedxml import DefusedXmlException

    try:
        return safe.parse(path, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise ValueError(f"{path}: unsafe XML refused ({exc})") from None


def _refuse_dtd(*args) -> None:
    raise ValueError("a document type declaration (DTD)")


def _parse_own_xml(path: Path) -> StdET.ElementTree:
    """Our own XML (the synthetic set's) with the standard library: refused when it holds a DTD
    (checked by a first expat pass that stops at the declaration, before any entity is read)."""
    data = path.read_bytes()
    check = xml.parsers.expat.ParserCreate()
    check.StartDoctypeDeclHandler = _refuse_dtd
    check.EntityDeclHandler = _refuse_dtd
    try:
        check.Parse(data, True)
    except ValueError as exc:
        raise ValueError(f"{path}: unsafe XML refused (it holds {exc}; the synthetic set's files hold none)") from None
    except xml.parsers.expat.ExpatError as exc:
        raise ValueError(f"{path}: malformed XML ({exc})") from None
    return StdET.ElementTree(StdET.fromstring(data))


def read_split_ids(split_file: Path) -> list[str]:
    """Image ids of a split file: first token of each non-blank line, in file order."""
    if not split_file.is_file():
        raise FileNotFoundError(f"split file missing: {split_file}")
    ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{split_file}: split file lists no image ids")
    return ids


def load_voc(
    root: str | os.PathLike,
    year: str = "2007",
    split: str = "trainval",
    difficult: DifficultMode = "ignore",
    own_xml: bool | None = None,
) -> MultiLabelSet:
    """Read a VOC-layout split into a :class:`MultiLabelSet`.

    Args:
        root: the ``VOCdevkit`` directory containing ``VOC{year}/``, or the dataset directory itself
            (see :func:`resolve_voc_dir`).
        year: used only when ``root`` is the devkit directory.
        split: name of ``ImageSets/Main/{split}.txt`` (train, val, trainval, test, ...).
        difficult: target of a class present in an image *only* through ``<difficult>1</difficult>``
            objects: ``"ignore"`` → -1 (the VOC evaluation convention), ``"positive"`` → 1,
            ``"negative"`` → 0. A class with at least one non-difficult object is always 1.
        own_xml: the annotations were written by this package (the synthetic set): readable without
            defusedxml (see the module docstring). None: when the folder holds ``synthetic.json``.

    Returns:
        images in split-file order; ``image_paths`` = ``JPEGImages/<id>.jpg`` (not checked here);
        classes from ``classes.txt`` in the dataset directory when present, else :data:`VOC_CLASSES`;
        ``boxes`` holds every object, difficult ones included, as ``(class, x1, y1, x2, y2)`` in
        0-based continuous pixel coordinates.

    Raises:
        FileNotFoundError: dataset directory, split file or an annotation file missing (names the path).
        ValueError: bad ``difficult`` mode; malformed or unsafe XML, unknown class name, bad box
            (names the file).
        MissingPackageError: defusedxml is not installed (and the XML is not the synthetic set's).
    """
    if difficult not in _DIFFICULT_VALUE:
        raise ValueError(f"difficult: expected one of {sorted(_DIFFICULT_VALUE)}, got {difficult!r}")
    data_dir = resolve_voc_dir(root, year)
    class_file = data_dir / CLASSES_FILE
    class_names = read_class_file(class_file) if class_file.is_file() else list(VOC_CLASSES)
    class_index = {n: i for i, n in enumerate(class_names)}
    if own_xml is None:
        own_xml = (data_dir / SYNTHETIC_MANIFEST).is_file()

    ids = read_split_ids(data_dir / "ImageSets" / "Main" / f"{split}.txt")
    targets = np.zeros((len(ids), len(class_names)), dtype=np.int8)
    boxes: list[list[Box]] = []
    image_paths: list[str] = []
    diff_value = _DIFFICULT_VALUE[difficult]
    for i, image_id in enumerate(ids):
        objects = parse_voc_xml(data_dir / "Annotations" / f"{image_id}.xml", class_index, own_xml)
        easy = {c for c, is_difficult, _ in objects if not is_difficult}
        hard_only = {c for c, is_difficult, _ in objects if is_difficult} - easy
        targets[i, list(easy)] = 1
        targets[i, list(hard_only)] = diff_value
        boxes.append([box for _, _, box in objects])
        image_paths.append(str(data_dir / "JPEGImages" / f"{image_id}.jpg"))
    return MultiLabelSet(image_paths=image_paths, targets=targets, class_names=class_names, boxes=boxes)
