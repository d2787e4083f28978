"""The built-in synthetic set: VOC round trip, determinism, label structure, safe (re)writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from c2f_fast.data import load_voc, make_synthetic
from c2f_fast.data import synthetic as syn
from c2f_fast.data.synthetic import SyntheticSpec

SMALL = dict(n_train=40, n_test=10, image_size=128, num_classes=20)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "set", seed=0, **SMALL)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_through_load_voc(small_set: Path) -> None:
    spec = SyntheticSpec(seed=0, **SMALL)
    for split, n in (("train", 40), ("test", 10)):
        ds = load_voc(small_set, split=split)
        assert len(ds) == n and ds.class_names == spec.class_names
        assert set(np.unique(ds.targets)) <= {0, 1}  # no difficult objects in the synthetic set
        positives = (ds.targets == 1).sum(1)
        assert positives.min() >= 1 and positives.max() <= 4
        for i in range(n):
            items = [it for it in spec.layout(split, i) if it.cls >= 0]
            assert set(np.flatnonzero(ds.targets[i])) == {it.cls for it in items}
            # loaded boxes are 0-based continuous: exactly the drawn pixel extent
            expected = sorted((it.cls, it.x0, it.y0, it.x0 + it.w, it.y0 + it.h) for it in items)
            assert sorted(ds.boxes[i]) == [tuple(float(v) if k else v for k, v in enumerate(b)) for b in expected]
            for _, x1, y1, x2, y2 in ds.boxes[i]:
                assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
                assert 6 <= x2 - x1 <= 20
        for p in ds.image_paths[:3]:
            with Image.open(p) as im:
                assert im.format == "JPEG" and im.size == (128, 128) and im.mode == "RGB"


def test_rendered_objects_are_in_the_image(small_set: Path) -> None:
    """The pixels inside a class box carry the class colour (the box really marks the object)."""
    spec = SyntheticSpec(seed=0, **SMALL)
    img, items = spec.render("train", 0)
    arr = np.asarray(img, dtype=np.float32)
    for it in items:
        if it.cls < 0:
            continue
        patch = arr[it.y0 : it.y0 + it.h, it.x0 : it.x0 + it.w].reshape(-1, 3)
        target = np.array(syn.CLASS_COLOURS[spec.class_defs[it.cls][1]], dtype=np.float32)
        dist = np.abs(patch / patch.mean(1, keepdims=True).clip(1) - target / target.mean()).sum(1)
        assert (dist < 0.6).mean() > 0.15, f"class {it.cls} colour not found in its box"


def test_deterministic_and_seed_dependent(small_set: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", seed=0, **SMALL)
    assert _tree(again) == _tree(small_set)
    other = make_synthetic(tmp_path / "other", seed=1, **{**SMALL, "n_train": 5, "n_test": 2})
    a, b = _tree(small_set), _tree(other)
    assert a["JPEGImages/train_000000.jpg"] != b["JPEGImages/train_000000.jpg"]
    assert a["Annotations/train_000000.xml"] != b["Annotations/train_000000.xml"]


def test_class_grid_shape_and_colour_both_needed() -> None:
    for k, grid in ((20, (5, 4)), (10, (5, 2)), (3, (2, 2)), (30, (5, 6))):
        assert syn.class_grid(k) == grid
        defs = SyntheticSpec(num_classes=k).class_defs
        assert len(set(defs)) == k
    defs = SyntheticSpec().class_defs
    for shape in {s for s, _ in defs}:
        assert sum(s == shape for s, _ in defs) >= 2
    for colour in {c for _, c in defs}:
        assert sum(c == colour for _, c in defs) >= 2
    with pytest.raises(ValueError, match="num_classes"):
        syn.class_grid(31)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSpec(image_size=16)


def test_cooccurrence_structure() -> None:
    spec = SyntheticSpec()
    n = 600
    y = np.zeros((n, spec.num_classes))
    for i in range(n):
        labels = spec.sample_labels(spec.rng("train", i))
        assert 1 <= len(labels) <= 4 and len(set(labels)) == len(labels)
        y[i, labels] = 1
    p = y.mean(0)
    lift = (y.T @ y / n) / np.outer(p, p).clip(1e-9)
    paired = [lift[a, b] for a, b in spec.pairs]
    paired_set = {frozenset(pr) for pr in spec.pairs}
    unpaired = [lift[a, b] for a in range(20) for b in range(a + 1, 20) if frozenset((a, b)) not in paired_set]
    assert np.mean(paired) > 3.0  # pairs co-occur far more often than independence predicts
    assert min(paired) > 1.5
    assert np.mean(unpaired) < 1.2


@pytest.mark.parametrize("num_classes,image_size", [(10, 64), (3, 96)])
def test_other_class_counts_and_sizes(tmp_path: Path, num_classes: int, image_size: int) -> None:
    out = make_synthetic(tmp_path / "s", n_train=6, n_test=2, image_size=image_size, num_classes=num_classes, seed=3)
    ds = load_voc(out, split="test")
    assert ds.num_classes == num_classes and len(ds) == 2
    assert len(load_voc(out)) == 6  # default split trainval = train
    for boxes in ds.boxes:
        for _, x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size
    with Image.open(ds.image_paths[0]) as im:
        assert im.size == (image_size, image_size)


def test_reuse_replace_and_refuse(tmp_path: Path) -> None:
    out = tmp_path / "s"
    params = dict(n_train=4, n_test=2, num_classes=4, seed=0)
    make_synthetic(out, **params)
    manifest = json.loads((out / syn.MANIFEST).read_text())
    assert manifest["params"]["n_train"] == 4 and manifest["version"] == syn.GENERATOR_VERSION
    marker = out / "JPEGImages" / "train_000000.jpg"
    marker.write_bytes(b"touched")  # a reuse must not rewrite anything
    make_synthetic(out, **params)
    assert marker.read_bytes() == b"touched"
    make_synthetic(out, **{**params, "n_train": 5})  # other parameters: replaced
    assert marker.read_bytes() != b"touched" and len(load_voc(out, split="train")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no build/old directories left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        make_synthetic(foreign, **params)
    assert (foreign / "mine.txt").read_text() == "keep"
    empty = tmp_path / "empty"  # an existing empty directory is fine
    empty.mkdir()
    make_synthetic(empty, **params)
    assert (empty / syn.MANIFEST).is_file()


def test_interrupted_run_is_not_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "s"
    params = dict(n_train=4, n_test=2, num_classes=4, seed=0)
    real_write = syn._write_set

    def crash(spec, root):
        (root / "JPEGImages").mkdir()
        (root / "JPEGImages" / "train_000000.jpg").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(syn, "_write_set", crash)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(out, **params)
    assert not out.exists()
    monkeypatch.setattr(syn, "_write_set", real_write)
    make_synthetic(out, **params)
    assert len(load_voc(out, split="train")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_stale_partial_of_dead_process_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".s.partial-999999999-abc"  # no such pid
    stale.mkdir()
    make_synthetic(tmp_path / "s", n_train=2, n_test=1, num_classes=4)
    assert not stale.exists()


# ------------------------------------------------------------------------------------------ presets
DEMO_SMALL = dict(n_train=12, n_test=4)


def test_hard_preset_is_the_default_set() -> None:
    assert syn.preset_spec("hard") == SyntheticSpec()
    assert syn.preset_spec("hard", n_train=40, n_test=10, seed=0) == SyntheticSpec(seed=0, **SMALL)
    spec = syn.preset_spec("demo")
    assert spec.preset == "demo" and spec.n_train > 2000 and spec.object_size[0] > 6
    assert spec.distractors[1] < SyntheticSpec().distractors[1]


def test_legacy_positional_call_and_none_overrides(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a", 4, 2, 64, 4, 0)  # the old positional form: preset "hard"
    b = make_synthetic(tmp_path / "b", "hard", n_train=4, n_test=2, image_size=64, num_classes=4, seed=None)
    assert _tree(a) == _tree(b)
    with pytest.raises(ValueError, match="unknown synthetic-set parameter"):
        make_synthetic(tmp_path / "c", "demo", n_images=3)
    with pytest.raises(ValueError, match="preset"):
        make_synthetic(tmp_path / "c", "easy")
    with pytest.raises(TypeError, match="twice"):
        make_synthetic(tmp_path / "c", 4, n_train=5)


def test_demo_preset_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a", "demo", seed=0, **DEMO_SMALL)
    b = make_synthetic(tmp_path / "b", "demo", seed=0, **DEMO_SMALL)
    c = make_synthetic(tmp_path / "c", "demo", seed=1, **DEMO_SMALL)
    ta, tb, tc = _tree(a), _tree(b), _tree(c)
    assert ta == tb
    assert all(ta[k] != tc[k] for k in ("JPEGImages/train_000000.jpg", "Annotations/train_000000.xml"))
    da, dc = load_voc(a, split="train"), load_voc(c, split="train")
    assert not np.array_equal(da.targets, dc.targets)
    assert np.array_equal(da.targets, load_voc(b, split="train").targets) and da.boxes == load_voc(b, split="train").boxes
    # larger objects than the hard set
    sizes = [x2 - x1 for boxes in da.boxes for _, x1, _, x2, _ in boxes]
    lo, hi = syn.PRESETS["demo"]["object_size"]
    assert min(sizes) >= round(lo) and max(sizes) <= round(hi)


def test_manifest_records_the_preset_and_other_presets_are_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "s"
    make_synthetic(out, "demo", **DEMO_SMALL)
    manifest = json.loads((out / syn.MANIFEST).read_text())
    assert manifest["preset"] == "demo" and manifest["params"]["preset"] == "demo"
    marker = out / "JPEGImages" / "train_000000.jpg"
    marker.write_bytes(b"touched")
    make_synthetic(out, "demo", **DEMO_SMALL)  # same preset and parameters: reused
    assert marker.read_bytes() == b"touched"
    make_synthetic(out, "hard", **DEMO_SMALL)  # same counts, other preset: rebuilt
    assert marker.read_bytes() != b"touched"
    assert json.loads((out / syn.MANIFEST).read_text())["preset"] == "hard"
    hard = make_synthetic(tmp_path / "h", "hard", **DEMO_SMALL)
    assert _tree(out) == _tree(hard)
