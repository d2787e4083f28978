"""The ``nvjpeg`` loader (torchvision's batched JPEG decoding and the transforms on the device) and
``backend="auto"``. No DALI needed.

On the CPU the nvjpeg loader runs its device code with ``device="cpu"`` (libjpeg-turbo decoding):
it must then yield exactly the ``torch`` loader's batches, crops included, since both draw every
view from (seed, epoch, index). With CUDA, the last tests decode with nvJPEG and compare with the
CPU loader within the decoders' rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from PIL import Image, ImageDraw

from c2f_fast.data import BadImageError, build_loader
from c2f_fast.data import loaders as loaders_module
from c2f_fast.data.loaders import IMAGENET_STD, choose_backend, default_workers
from c2f_fast.data.records import MultiLabelSet
from c2f_fast.data.torch_pipeline import draw_train_view, train_view_seed

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

N_CLASSES = 4
SIZE = 24


def _picture(rng: np.random.Generator) -> Image.Image:
    h, w = (int(v) for v in rng.integers(20, 45, size=2))  # odd sizes, landscape and portrait
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255.0 / w, yy * 255.0 / h, np.full((h, w), float(rng.integers(0, 256)))], axis=-1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        draw.ellipse([x0, y0, x0 + 6, y0 + 7], fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return image


def _write_set(root, n: int, seed: int = 0, kinds=("rgb",)) -> MultiLabelSet:
    """``n`` images cycling through ``kinds``: rgb (4:2:0 JPEG), rgb444 (no chroma subsampling),
    gray (1-channel JPEG), cmyk (4-channel JPEG), png (decoded in the workers)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        image = _picture(rng)
        path = root / f"img_{i:03d}.{'png' if kind == 'png' else 'jpg'}"
        if kind == "gray":
            image = image.convert("L")
        elif kind == "cmyk":
            image = image.convert("CMYK")
        options = {"png": {}, "rgb444": {"quality": 90, "subsampling": 0}}.get(kind, {"quality": 90})
        image.save(path, **options)
        paths.append(str(path))
    targets = rng.integers(-1, 2, size=(n, N_CLASSES)).astype(np.int8)
    return MultiLabelSet(paths, targets, [f"c{c}" for c in range(N_CLASSES)])


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory) -> MultiLabelSet:
    return _write_set(tmp_path_factory.mktemp("nvjpeg_mixed"), 13, kinds=("rgb", "gray", "rgb", "png", "cmyk"))


def _epochs(loader, epochs: int) -> list[list[tuple[torch.Tensor, ...]]]:
    return [[tuple(t.cpu().clone() for t in batch) for batch in loader] for _ in range(epochs)]


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for (xa, ta, ia), (xb, tb, ib) in zip(epoch_a, epoch_b):
            assert torch.equal(ia, ib)
            assert torch.equal(ta, tb)
            assert xa.dtype == xb.dtype and xa.shape == xb.shape
            assert torch.equal(xa, xb), (xa - xb).abs().max()


# ----------------------------------------------------------------------------- CPU: equal to torch
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch_size, shard_id, num_shards", [(4, 0, 1), (3, 1, 2), (2, 2, 3)])
def test_nvjpeg_on_cpu_yields_the_torch_loaders_batches(mixed_set, train, batch_size, shard_id, num_shards):
    """Same seed: same permutation, same crops and flips, same pixels (gray, CMYK and PNG included)."""
    common = dict(device="cpu", num_workers=0, seed=7, shard_id=shard_id, num_shards=num_shards,
                  crop_scale=(0.3, 1.0), crop_ratio=(0.6, 1.7))
    ours = build_loader(mixed_set, batch_size, train, SIZE, backend="nvjpeg", **common)
    theirs = build_loader(mixed_set, batch_size, train, SIZE, backend="torch", **common)
    assert ours.backend == "nvjpeg" and ours.reason == "requested"
    assert len(ours) == len(theirs)
    epochs = _epochs(ours, 2)
    _assert_same_batches(epochs, _epochs(theirs, 2))
    if train:  # the second epoch draws new views and a new order
        assert not all(torch.equal(a[0], b[0]) for a, b in zip(*epochs))
        assert all(batch[0].shape == (batch_size, 3, SIZE, SIZE) for batch in epochs[0])


def test_nvjpeg_with_worker_processes_and_bf16(mixed_set):
    """Worker processes read the files; the result does not depend on them."""
    common = dict(device="cpu", seed=3, dtype=torch.bfloat16)
    ours = build_loader(mixed_set, 4, True, SIZE, backend="nvjpeg", num_workers=2, **common)
    theirs = build_loader(mixed_set, 4, True, SIZE, backend="torch", num_workers=0, **common)
    _assert_same_batches(_epochs(ours, 1), _epochs(theirs, 1))


def test_train_views_are_a_function_of_seed_epoch_index():
    views = {(s, e, i): draw_train_view(train_view_seed(s, e, i), 30, 40, (0.25, 1.0), (0.75, 4 / 3))
             for s in (0, 1) for e in (0, 1) for i in (0, 1, 2)}
    again = {k: draw_train_view(train_view_seed(*k), 30, 40, (0.25, 1.0), (0.75, 4 / 3)) for k in views}
    assert views == again
    assert len(set(views.values())) == len(views)  # every key its own view
    for v in views.values():
        assert 0 <= v.top and v.top + v.height <= 30 and 0 <= v.left and v.left + v.width <= 40
        assert 0.25 * 1200 * 0.9 <= v.height * v.width <= 1200


@pytest.mark.parametrize("backend", ["nvjpeg", "torch"])
def test_start_batch_resumes_an_epoch_without_reading_the_skipped_batches(mixed_set, backend, monkeypatch):
    common = dict(backend=backend, device="cpu", num_workers=0, seed=5)
    full = _epochs(build_loader(mixed_set, 3, True, SIZE, **common), 2)[1]  # epoch 1, uninterrupted
    loader = build_loader(mixed_set, 3, True, SIZE, **common)
    dataset_type = type(loader.dataloader.dataset)
    read = []
    original = dataset_type.__getitem__
    monkeypatch.setattr(dataset_type, "__getitem__", lambda self, key: read.append(key[0]) or original(self, key))
    loader.set_epoch(1, start_batch=2)
    tail = _epochs(loader, 1)[0]
    _assert_same_batches([tail], [full[2:]])
    assert sorted(read) == sorted(int(i) for _, _, idx in full[2:] for i in idx)  # nothing else was read
    nxt = _epochs(loader, 1)[0]  # the next iter() is epoch 2 from its start
    assert len(nxt) == len(full)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(loader) + 1)


def test_a_corrupt_jpeg_names_the_file(tmp_path):
    ds = _write_set(tmp_path, 6)
    bad = ds.image_paths[4]
    data = bytearray(Path(bad).read_bytes())
    start = data.index(b"\xff\xda")  # the start of scan: keep the headers and the end marker
    data[start + 20 : -2] = b"\x00" * (len(data) - start - 22)
    data[start + 2 : start + 4] = b"\xff\xff"  # an impossible scan header length
    Path(bad).write_bytes(bytes(data))
    loader = build_loader(ds, 3, False, SIZE, backend="nvjpeg", device="cpu", num_workers=0)  # header scan passes
    with pytest.raises(BadImageError, match="img_004.jpg") as err:
        _epochs(loader, 1)
    assert err.value.path == bad


def test_a_file_gone_after_the_scan_names_the_file(tmp_path):
    ds = _write_set(tmp_path, 4)
    loader = build_loader(ds, 2, True, SIZE, backend="nvjpeg", device="cpu", num_workers=0)
    (tmp_path / "img_002.jpg").unlink()
    with pytest.raises(BadImageError, match=r"img_002\.jpg.*missing file"):
        _epochs(loader, 1)


def test_bad_images_are_skipped_up_front(tmp_path):
    ds = _write_set(tmp_path, 7)
    (tmp_path / "img_001.jpg").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="img_001.jpg"):
        build_loader(ds, 2, False, SIZE, backend="nvjpeg", device="cpu", num_workers=0)
    loader = build_loader(ds, 2, False, SIZE, backend="nvjpeg", device="cpu", num_workers=0, on_bad_image="skip")
    assert loader.report.count == 1
    seen = sorted(int(i) for _, _, idx in loader for i in idx)
    assert seen == [0, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- auto
def test_auto_without_dali_on_the_cpu_is_torch(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now raises ImportError
    where = "CPU device" if torch.cuda.is_available() else "no CUDA"
    assert choose_backend("auto", torch.device("cpu")) == ("torch", f"auto: nvidia.dali not importable, {where}")
    loader = build_loader(_write_set(tmp_path, 4), 2, False, SIZE, device="cpu", num_workers=0)  # the default
    assert loader.backend == "torch" and "nvidia.dali not importable" in loader.reason


def test_auto_with_dali_is_dali():
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    backend, reason = choose_backend("auto", torch.device("cpu"))
    assert backend == "dali" and "nvidia.dali imports" in reason


def test_explicit_backends_are_kept():
    for backend in ("dali", "nvjpeg", "torch"):
        assert choose_backend(backend, torch.device("cpu")) == (backend, "requested")


def test_default_workers_follow_the_cores_per_process(monkeypatch):
    monkeypatch.setattr(loaders_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert (default_workers("dali"), default_workers("nvjpeg"), default_workers("torch")) == (8, 4, 12)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 2 cores per process
    assert (default_workers("dali"), default_workers("nvjpeg"), default_workers("torch")) == (2, 1, 1)
    monkeypatch.setattr(loaders_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert (default_workers("dali"), default_workers("nvjpeg"), default_workers("torch")) == (1, 0, 0)


# ----------------------------------------------------------------------------- CUDA
@requires_cuda
def test_auto_without_dali_on_cuda_is_nvjpeg(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    backend, reason = choose_backend("auto", torch.device("cuda", torch.cuda.current_device()))
    assert backend == "nvjpeg", reason


def _grey_level_differences(a: MultiLabelSet, train: bool, **kw) -> torch.Tensor:
    """|nvjpeg on CUDA - nvjpeg on the CPU| in grey levels (0-255) over one epoch, after checking
    that both yield the same indices and targets."""
    common = dict(seed=11, num_workers=1, **kw)
    gpu = build_loader(a, 4, train, SIZE, backend="nvjpeg", device="cuda", **common)
    cpu = build_loader(a, 4, train, SIZE, backend="nvjpeg", device="cpu", **common)
    diffs = []
    for (xg, tg, ig), (xc, tc, ic) in zip(*(_epochs(x, 1)[0] for x in (gpu, cpu))):
        assert torch.equal(ig, ic) and torch.equal(tg, tc)
        diffs.append((xg - xc).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
    return torch.cat(diffs)


@requires_cuda
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nvjpeg_on_cuda_matches_the_cpu_loader(tmp_path, mixed_set, train):
    """nvJPEG and the GPU resize against libjpeg-turbo and the CPU resize: same indices, targets and
    crops. Without chroma subsampling the decoders differ by IDCT rounding only, and the resizes by
    uint8 rounding: a few grey levels. With 4:2:0 (and gray, CMYK, PNG files) nvJPEG's chroma
    upsampling differs from libjpeg-turbo's at colour edges; a different crop would differ by tens
    of levels everywhere."""
    plain = _grey_level_differences(_write_set(tmp_path, 9, kinds=("rgb444",)), train)
    assert plain.mean() < 1.5 and plain.max() < 12, (plain.mean(), plain.max())
    mixed = _grey_level_differences(mixed_set, train)
    assert mixed.mean() < 4, mixed.mean()
