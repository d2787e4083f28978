"""Bad image files: found up front by ``check_image`` (and raised or skipped by ``build_loader``),
or raised with the file's name when a decoder fails during iteration. Grayscale and CMYK JPEGs are
not bad: both backends decode them to RGB."""

from __future__ import annotations

import logging
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (nvidia-dali-cuda130)")

from c2f_fast.data import BadImageError, build_loader, check_image  # noqa: E402
from c2f_fast.data.images import scan_images  # noqa: E402
from c2f_fast.data.loaders import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from c2f_fast.data.records import MultiLabelSet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

SIZE = 32
BACKENDS = ["dali", "torch"]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

#: kind of bad file -> a word its problem description must contain
BAD_KINDS = {
    "truncated": "truncated JPEG",
    "zero_byte": "zero-byte",
    "png_as_jpg": "content is PNG",
    "missing": "missing file",
    "garbage": "cannot parse the header",
    "text": "unrecognised image data",
}


def _smooth_rgb(rng: np.random.Generator, h: int = 36, w: int = 44) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / w, yy * 255.0 / h, np.full((h, w), float(rng.integers(0, 256)))], axis=-1)
    return np.clip(base + rng.normal(0, 8, size=base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Good JPEGs (RGB, grayscale, CMYK, one with padding after EOI) and one file of each bad kind."""
    root = tmp_path_factory.mktemp("bad_images")
    rng = np.random.default_rng(0)
    out: dict[str, str] = {}
    for i in range(4):
        out[f"good{i}"] = str(root / f"good{i}.jpg")
        Image.fromarray(_smooth_rgb(rng)).save(out[f"good{i}"], quality=90)
    out["gray"] = str(root / "gray.jpg")
    Image.fromarray(_smooth_rgb(rng)[..., 0], "L").save(out["gray"], quality=90)
    out["cmyk"] = str(root / "cmyk.jpg")
    Image.fromarray(_smooth_rgb(rng)).convert("CMYK").save(out["cmyk"], quality=90)
    out["padded"] = str(root / "padded.jpg")  # valid: some encoders append bytes after EOI
    Image.fromarray(_smooth_rgb(rng)).save(out["padded"], quality=90)
    with open(out["padded"], "ab") as fh:
        fh.write(b"\x00" * 100)

    good_bytes = open(out["good0"], "rb").read()
    out["truncated"] = str(root / "truncated.jpg")
    open(out["truncated"], "wb").write(good_bytes[: len(good_bytes) // 2])
    out["zero_byte"] = str(root / "zero_byte.jpg")
    open(out["zero_byte"], "wb").close()
    out["png_as_jpg"] = str(root / "png_as_jpg.jpg")
    Image.fromarray(_smooth_rgb(rng)).save(out["png_as_jpg"], format="PNG")
    out["missing"] = str(root / "missing.jpg")  # listed, never written
    out["garbage"] = str(root / "garbage.jpg")  # JPEG magic, then noise
    noise = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    open(out["garbage"], "wb").write(b"\xff\xd8\xff" + noise + b"\xff\xd9")
    out["text"] = str(root / "text.jpg")
    open(out["text"], "w").write("this is not an image\n")
    # Valid header and end marker, broken entropy-coded data: only a full decode notices.
    corrupt = bytearray(good_bytes)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 2] = b"\xff\xa1"  # an undefined marker mid-scan
    out["corrupt"] = str(root / "corrupt.jpg")
    open(out["corrupt"], "wb").write(bytes(corrupt))
    return out


def _dataset(paths: list[str]) -> MultiLabelSet:
    targets = np.eye(len(paths), 3, dtype=np.int8)
    return MultiLabelSet(paths, targets, ["a", "b", "c"])


def _workers(backend: str) -> int:
    return 1 if backend == "dali" else 0  # DALI: one thread; torch: in-process (no worker start-up)


def _good(files) -> list[str]:
    return [files[k] for k in ("good0", "good1", "good2", "good3", "gray", "cmyk", "padded")]


def test_check_image_accepts_good_gray_cmyk_and_padded(files):
    for path in _good(files):
        assert check_image(path) is None, path
        assert check_image(path, decode=True) is None, path


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_check_image_names_the_problem(kind, files):
    problem = check_image(files[kind])
    assert problem is not None and BAD_KINDS[kind] in problem, problem


def test_full_decode_check_finds_corrupt_scan_data(files):
    assert check_image(files["corrupt"]) is None  # the cheap check cannot see inside the data
    assert "cannot decode" in check_image(files["corrupt"], decode=True)


def test_bad_image_error_carries_path_and_survives_pickling():
    err = BadImageError("/data/x.jpg", "zero-byte file", others=[("/data/y.jpg", "missing file")])
    assert isinstance(err, ValueError) and err.path == "/data/x.jpg" and err.problem == "zero-byte file"
    assert "/data/x.jpg" in str(err) and "/data/y.jpg" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.problem, copy.others) == (err.path, err.problem, err.others)


def test_header_scan_cost_per_image(files):
    """Reported, not asserted (no timing thresholds): the cheap scan reads no pixel data."""
    paths = _good(files) * 50
    bad, seconds = scan_images(paths, num_threads=1)
    assert bad == []
    print(f"\nheader scan: {1e6 * seconds / len(paths):.0f} us per image ({len(paths)} files)")
    start = time.perf_counter()
    for path in paths[:40]:
        check_image(path, decode=True)
    print(f"full PIL decode check: {1e6 * (time.perf_counter() - start) / 40:.0f} us per image (tiny images)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_loader_raises_naming_the_file(kind, backend, files):
    paths = _good(files)[:3] + [files[kind]]
    with pytest.raises(BadImageError) as info:
        build_loader(
            _dataset(paths), 2, False, SIZE, backend=backend, num_workers=_workers(backend), on_bad_image="error"
        )
    assert info.value.path == files[kind] and BAD_KINDS[kind] in info.value.problem
    assert files[kind] in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_skips_and_reports_bad_images(backend, files, caplog):
    good = _good(files)
    bad = [files[k] for k in sorted(BAD_KINDS)]
    paths = [p for pair in zip(good, bad) for p in pair] + good[len(bad) :]  # interleaved
    dataset = _dataset(paths)
    with caplog.at_level(logging.WARNING, logger="c2f_fast.data.loaders"):
        loader = build_loader(
            dataset, 3, False, SIZE, backend=backend, num_workers=_workers(backend), on_bad_image="skip"
        )
    assert loader.report.count == len(bad)
    assert sorted(p for p, _ in loader.report.problems) == sorted(bad)
    for path, problem in loader.report.problems:
        kind = next(k for k in BAD_KINDS if files[k] == path)
        assert BAD_KINDS[kind] in problem
    assert any(f"skipping {len(bad)} bad image" in r.getMessage() for r in caplog.records)

    indices = [int(i) for _, t, ii in loader for i in ii]
    expected = [i for i, p in enumerate(paths) if p not in bad]
    assert indices == expected  # every good image exactly once, under its dataset index
    assert len(loader) == -(-len(expected) // 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gray_and_cmyk_decode_to_rgb(backend, files):
    paths = [files["good0"], files["gray"], files["cmyk"]]
    loader = build_loader(_dataset(paths), 3, False, SIZE, backend=backend, num_workers=_workers(backend))
    images = torch.cat([x for x, _, _ in loader])
    assert images.shape == (3, 3, SIZE, SIZE)
    rgb = images * STD + MEAN  # back to [0, 1]
    gray = rgb[1]
    assert (gray[0] - gray[1]).abs().max() < 1e-3 and (gray[1] - gray[2]).abs().max() < 1e-3
    # CMYK: the same colours as PIL's conversion (then resized by PIL): not inverted, not black.
    with Image.open(files["cmyk"]) as im:
        assert im.mode == "CMYK"
        ref = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0
    diff = (rgb[2] - torch.from_numpy(ref).permute(2, 0, 1)).abs().mean().item()
    print(f"\n{backend}: CMYK JPEG vs PIL's RGB conversion: mean |diff| = {diff:.4f}")
    assert diff < 0.02


def test_dali_decode_error_during_iteration_names_the_file(files):
    """With the up-front scan off, DALI's decoder error is re-raised as BadImageError(path)."""
    paths = _good(files)[:3] + [files["truncated"]]
    loader = build_loader(_dataset(paths), 2, False, SIZE, backend="dali", num_workers=1, verify="none")
    with pytest.raises(BadImageError) as info:
        for _ in loader:
            pass
    assert info.value.path == files["truncated"]
    assert "truncated" in info.value.problem


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_decode_error_during_iteration_names_the_file(num_workers, files):
    """corrupt.jpg passes the cheap scan; torchvision's decoder rejects it: raised with its name."""
    paths = _good(files)[:3] + [files["corrupt"]]
    loader = build_loader(_dataset(paths), 2, False, SIZE, backend="torch", num_workers=num_workers)
    with pytest.raises(BadImageError) as info:
        for _ in loader:
            pass
    assert info.value.path == files["corrupt"] and "cannot decode" in info.value.problem
    # The full-decode scan catches it before any batch.
    with pytest.raises(BadImageError, match="corrupt.jpg"):
        build_loader(_dataset(paths), 2, False, SIZE, backend="torch", num_workers=0, verify="decode")
