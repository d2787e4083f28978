"""Dataset readers (VOC XML, COCO JSON, list files) on small fixtures written in the real formats."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from c2f_fast.data import VOC_CLASSES, load_coco, load_list, load_voc
from c2f_fast.data.voc import parse_voc_xml
from c2f_fast.deps import MissingPackageError


def _needs(package: str):
    """Skip when ``package`` (optional: only its reader needs it) is not installed."""
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(missing, reason=f"needs {package} (optional: pip install {package})")


needs_defusedxml, needs_pycocotools = _needs("defusedxml"), _needs("pycocotools")

# ------------------------------------------------------------------------------------------ VOC


def _obj(name: str, box: tuple[int, int, int, int], difficult: int | None = 0) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    x1, y1, x2, y2 = box
    return (
        f"<object><name> {name} </name><pose>Left</pose><truncated>0</truncated>{diff}"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def _xml(filename: str, objects: list[str]) -> str:
    return (
        f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
        f"<size><width>500</width><height>375</height><depth>3</depth></size>{''.join(objects)}</annotation>"
    )


def _write_voc(
    root: Path, annotations: dict[str, str], splits: dict[str, list[str]], classes: list[str] | None = None
) -> Path:
    """A VOCdevkit dir holding VOC2007/; returns the devkit dir."""
    data = root / "VOCdevkit" / "VOC2007"
    (data / "Annotations").mkdir(parents=True)
    (data / "ImageSets" / "Main").mkdir(parents=True)
    (data / "JPEGImages").mkdir()
    for image_id, text in annotations.items():
        (data / "Annotations" / f"{image_id}.xml").write_text(text)
    for split, ids in splits.items():
        (data / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids) + "\n")
    if classes is not None:
        (data / "classes.txt").write_text("\n".join(classes) + "\n")
    return root / "VOCdevkit"


DOG, CAT, PERSON, CAR, BUS = (VOC_CLASSES.index(n) for n in ("dog", "cat", "person", "car", "bus"))


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    annotations = {
        # two dogs (one difficult), a cat, a person present only as difficult
        "000001": _xml(
            "000001.jpg",
            [_obj("dog", (10, 20, 110, 120)), _obj("dog", (200, 30, 260, 90), 1), _obj("Cat", (1, 1, 50, 60)),
             _obj("person", (300, 100, 350, 300), 1)],
        ),
        # car only through two difficult instances; bus has no <difficult> tag (VOC2012 style)
        "000002": _xml(
            "000002.jpg",
            [_obj("car", (5, 5, 25, 15), 1), _obj("car", (30, 5, 55, 15), 1), _obj("bus", (1, 2, 3, 4), None)],
        ),
        "000003": _xml("000003.jpg", []),  # no object at all
    }
    return _write_voc(tmp_path, annotations, {"trainval": ["000001", "000002", "000003"], "test": ["000002"]})


def _expected_targets(hard_value: int) -> np.ndarray:
    t = np.zeros((3, 20), dtype=np.int8)
    t[0, [DOG, CAT]] = 1
    t[0, PERSON] = hard_value
    t[1, CAR] = hard_value
    t[1, BUS] = 1
    return t


@pytest.mark.parametrize("mode,hard_value", [("ignore", -1), ("positive", 1), ("negative", 0)])
@needs_defusedxml
def test_voc_difficult_modes(voc_root: Path, mode: str, hard_value: int) -> None:
    ds = load_voc(voc_root, split="trainval", difficult=mode)
    assert ds.class_names == list(VOC_CLASSES)
    np.testing.assert_array_equal(ds.targets, _expected_targets(hard_value))
    assert ds.targets.dtype == np.int8


@needs_defusedxml
def test_voc_boxes_and_paths(voc_root: Path) -> None:
    ds = load_voc(voc_root)
    # every object kept, difficult ones too; 1-based inclusive -> 0-based continuous coordinates
    assert ds.boxes[0] == [
        (DOG, 9.0, 19.0, 110.0, 120.0), (DOG, 199.0, 29.0, 260.0, 90.0),
        (CAT, 0.0, 0.0, 50.0, 60.0), (PERSON, 299.0, 99.0, 350.0, 300.0),
    ]  # fmt: skip
    assert ds.boxes[1] == [(CAR, 4.0, 4.0, 25.0, 15.0), (CAR, 29.0, 4.0, 55.0, 15.0), (BUS, 0.0, 1.0, 3.0, 4.0)]
    assert ds.boxes[2] == []
    assert [Path(p).name for p in ds.image_paths] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert all(Path(p).parent.name == "JPEGImages" for p in ds.image_paths)


@needs_defusedxml
def test_voc_root_forms(voc_root: Path) -> None:
    via_devkit = load_voc(voc_root, year="2007", split="test")
    via_dataset_dir = load_voc(voc_root / "VOC2007", year="2012", split="test")  # year unused here
    assert via_devkit.image_paths == via_dataset_dir.image_paths
    np.testing.assert_array_equal(via_devkit.targets, via_dataset_dir.targets)
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        load_voc(voc_root, year="2012")


@needs_defusedxml
def test_voc_custom_class_file(tmp_path: Path) -> None:
    root = _write_voc(
        tmp_path,
        {
            "a": _xml("a.jpg", [_obj("blue_square", (1, 1, 5, 5))]),
            "b": _xml("b.jpg", [_obj("red_circle", (2, 2, 4, 4), 1)]),
        },
        {"train": ["a", "b"]},
        classes=["red_circle", "blue_square", "green_cross"],
    )
    ds = load_voc(root, split="train")
    assert ds.class_names == ["red_circle", "blue_square", "green_cross"]
    np.testing.assert_array_equal(ds.targets, [[0, 1, 0], [-1, 0, 0]])


@needs_defusedxml
def test_voc_unknown_class_names_file_and_name(tmp_path: Path) -> None:
    root = _write_voc(tmp_path, {"a": _xml("a.jpg", [_obj("unicorn", (1, 1, 5, 5))])}, {"train": ["a"]})
    with pytest.raises(ValueError, match=r"a\.xml.*unicorn"):
        load_voc(root, split="train")


@needs_defusedxml
def test_voc_malformed_xml(tmp_path: Path) -> None:
    root = _write_voc(tmp_path, {"bad": "<annotation><object><name>dog</name></annotation>"}, {"train": ["bad"]})
    with pytest.raises(ValueError, match=r"bad\.xml.*malformed"):
        load_voc(root, split="train")


@needs_defusedxml
def test_voc_missing_bndbox_field(tmp_path: Path) -> None:
    text = _xml("a.jpg", [_obj("dog", (1, 1, 5, 5))]).replace("<xmax>5</xmax>", "")
    root = _write_voc(tmp_path, {"a": text}, {"train": ["a"]})
    with pytest.raises(ValueError, match=r"a\.xml.*xmax"):
        load_voc(root, split="train")


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<annotation><object><name>&lol4;</name></object></annotation>
"""


@needs_defusedxml
def test_voc_entity_expansion_refused(tmp_path: Path) -> None:
    root = _write_voc(tmp_path, {"lolz": BILLION_LAUGHS}, {"train": ["lolz"]})
    with pytest.raises(ValueError, match=r"lolz\.xml.*unsafe XML"):
        load_voc(root, split="train")


@needs_defusedxml
def test_voc_missing_files(voc_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Main[/\\]val\.txt"):
        load_voc(voc_root, split="val")
    (voc_root / "VOC2007" / "Annotations" / "000002.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"000002\.xml"):
        load_voc(voc_root, split="test")


@needs_defusedxml
def test_voc_bad_difficult_mode(voc_root: Path) -> None:
    with pytest.raises(ValueError, match="difficult"):
        load_voc(voc_root, difficult="drop")  # type: ignore[arg-type]


def _block(monkeypatch, *modules: str) -> None:
    """Make ``import module`` raise ImportError for each of ``modules`` (as if not installed)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_voc_without_defusedxml_names_the_package(voc_root: Path, monkeypatch) -> None:
    _block(monkeypatch, "defusedxml", "defusedxml.ElementTree")
    with pytest.raises(MissingPackageError, match="reading VOC annotation XML needs the package defusedxml.*"
                                                  "pip install defusedxml"):
        load_voc(voc_root)


def test_own_xml_without_defusedxml_reads_it_with_the_standard_library(voc_root: Path, monkeypatch) -> None:
    """The synthetic set's own XML (own_xml=True) needs no defusedxml: same targets and boxes."""
    _block(monkeypatch, "defusedxml", "defusedxml.ElementTree")
    ds = load_voc(voc_root, split="trainval", difficult="ignore", own_xml=True)
    np.testing.assert_array_equal(ds.targets, _expected_targets(-1))
    assert ds.boxes[0][0] == (DOG, 9.0, 19.0, 110.0, 120.0) and ds.boxes[2] == []


def test_a_synthetic_set_folder_is_own_xml(voc_root: Path, monkeypatch) -> None:
    """By default the folder's synthetic.json (the generator's manifest) marks the XML as our own."""
    _block(monkeypatch, "defusedxml", "defusedxml.ElementTree")
    (voc_root / "VOC2007" / "synthetic.json").write_text("{}")
    np.testing.assert_array_equal(load_voc(voc_root).targets, _expected_targets(-1))
    with pytest.raises(MissingPackageError, match="defusedxml"):
        load_voc(voc_root, own_xml=False)


EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<annotation><object><name>&secret;</name></object></annotation>
"""


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "unsafe XML"), (EXTERNAL_ENTITY, "unsafe XML"),
    ('<!DOCTYPE annotation SYSTEM "http://example.com/a.dtd"><annotation/>', "unsafe XML"),
    ("<annotation><object><name>dog</name></annotation>", "malformed"),
    ("<annotation><object><name>&lol;</name></object></annotation>", "malformed"),  # undeclared entity
], ids=["billion_laughs", "external_entity", "external_dtd", "malformed", "undeclared_entity"])
def test_own_xml_without_defusedxml_refuses_dtds(tmp_path: Path, monkeypatch, text: str, message: str) -> None:
    _block(monkeypatch, "defusedxml", "defusedxml.ElementTree")
    path = tmp_path / "a.xml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"a\.xml: {message}"):
        parse_voc_xml(path, {"dog": 0}, own_xml=True)


def test_coco_without_pycocotools_names_the_package(tmp_path: Path, monkeypatch) -> None:
    _block(monkeypatch, "pycocotools", "pycocotools.coco")
    with pytest.raises(MissingPackageError, match="reading COCO annotation JSON needs the package pycocotools"):
        load_coco(_write_json(tmp_path / "instances.json", _coco_json()), tmp_path / "imgs")


# ----------------------------------------------------------------------------------------- COCO


def _coco_json() -> dict:
    return {
        "info": {"description": "fixture"},
        # ids with gaps, listed out of order: contiguous mapping must follow ascending id (1, 3, 7)
        "categories": [
            {"id": 7, "name": "kite", "supercategory": "x"},
            {"id": 1, "name": "person", "supercategory": "x"},
            {"id": 3, "name": "car", "supercategory": "x"},
        ],
        "images": [
            {"id": 5, "file_name": "b.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 9, "file_name": "empty.jpg", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 10, "image_id": 2, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "iscrowd": 0, "area": 12.0},
            {"id": 11, "image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 20], "iscrowd": 1, "area": 200.0},
            {"id": 12, "image_id": 5, "category_id": 1, "bbox": [5, 5, 2.5, 2.5], "iscrowd": 0, "area": 6.25},
            {"id": 13, "image_id": 5, "category_id": 1, "bbox": [6, 7, 8, 9], "iscrowd": 0, "area": 72.0},
        ],
    }


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@needs_pycocotools
def test_coco_labels_boxes_order(tmp_path: Path) -> None:
    ds = load_coco(_write_json(tmp_path / "instances.json", _coco_json()), tmp_path / "imgs")
    assert ds.class_names == ["person", "car", "kite"]
    assert [Path(p).name for p in ds.image_paths] == ["a.jpg", "b.jpg", "empty.jpg"]  # ascending image id
    assert ds.image_paths[0] == str(tmp_path / "imgs" / "a.jpg")
    np.testing.assert_array_equal(ds.targets, [[0, 1, 1], [1, 0, 0], [0, 0, 0]])  # crowd counts as a label
    assert ds.boxes == [
        [(1, 1.0, 2.0, 4.0, 6.0), (2, 0.0, 0.0, 10.0, 20.0)],
        [(0, 5.0, 5.0, 7.5, 7.5), (0, 6.0, 7.0, 14.0, 16.0)],
        [],
    ]


@needs_pycocotools
def test_coco_drop_empty(tmp_path: Path) -> None:
    ds = load_coco(_write_json(tmp_path / "instances.json", _coco_json()), tmp_path, drop_empty=True)
    assert [Path(p).name for p in ds.image_paths] == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(ds.targets, [[0, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "mutate,key",
    [
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d["annotations"][1].pop("category_id"), "category_id"),
        (lambda d: d["images"][0].pop("file_name"), "file_name"),
        (lambda d: d["annotations"][0].pop("bbox"), "bbox"),
    ],
)
@needs_pycocotools
def test_coco_missing_key(tmp_path: Path, mutate, key: str) -> None:
    data = _coco_json()
    mutate(data)
    path = _write_json(tmp_path / "broken.json", data)
    with pytest.raises(ValueError, match=rf"broken\.json.*{key}"):
        load_coco(path, tmp_path)


@needs_pycocotools
def test_coco_dangling_ids_and_bad_json(tmp_path: Path) -> None:
    data = _coco_json()
    data["annotations"][0]["category_id"] = 2  # no such category
    with pytest.raises(ValueError, match=r"dangling\.json.*category_id"):
        load_coco(_write_json(tmp_path / "dangling.json", data), tmp_path)
    (tmp_path / "text.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"text\.json.*JSON"):
        load_coco(tmp_path / "text.json", tmp_path)
    with pytest.raises(ValueError, match=r"list\.json.*top level"):
        load_coco(_write_json(tmp_path / "list.json", [1, 2]), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_coco(tmp_path / "nope.json", tmp_path)


# ------------------------------------------------------------------------------------ list file

LIST_TEXT = """# image, labels
img001.jpg,cat,dog
  img002.jpg   dog   person

"img 003.jpg", person ,
img004.jpg
img005.jpg dog dog
"""


def test_list_file_inferred_classes(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text(LIST_TEXT)
    ds = load_list(tmp_path / "list.txt", tmp_path / "images")
    assert ds.class_names == ["cat", "dog", "person"]
    names = ("img001.jpg", "img002.jpg", "img 003.jpg", "img004.jpg", "img005.jpg")
    assert ds.image_paths == [str(tmp_path / "images" / n) for n in names]
    np.testing.assert_array_equal(ds.targets, [[1, 1, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 0]])
    assert ds.boxes == [[]] * 5


def test_list_file_given_classes(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text(LIST_TEXT)
    ds = load_list(tmp_path / "list.csv", tmp_path, class_names=["person", "dog", "cat", "bird"])
    assert ds.class_names == ["person", "dog", "cat", "bird"]
    np.testing.assert_array_equal(ds.targets[:, :3], [[0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    assert not ds.targets[:, 3].any()


def test_list_file_unknown_class_names_line(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text(LIST_TEXT)
    with pytest.raises(ValueError, match=r"list\.txt:3: unknown class name 'person'"):
        load_list(tmp_path / "list.txt", tmp_path, class_names=["cat", "dog"])


def test_list_file_errors(tmp_path: Path) -> None:
    (tmp_path / "dup.txt").write_text("a.jpg cat\nb.jpg\na.jpg dog\n")
    with pytest.raises(ValueError, match=r"dup\.txt:3: image 'a\.jpg' already listed on line 1"):
        load_list(tmp_path / "dup.txt", tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt: lists no images"):
        load_list(tmp_path / "empty.txt", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_list(tmp_path / "missing.txt", tmp_path)
