"""The DALI and torchvision loaders: labels, shapes, normalisation, backend agreement, sharding, augmentation.

On a machine without a GPU the DALI pipelines run on the CPU (libjpeg-turbo); the last test runs the
same pipeline with nvJPEG ("mixed" decoding) when CUDA is available.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (nvidia-dali-cuda130)")

from c2f_fast.data import build_loader  # noqa: E402
from c2f_fast.data.loaders import IMAGENET_MEAN, IMAGENET_STD, shard_bounds  # noqa: E402
from c2f_fast.data.records import MultiLabelSet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N_IMAGES = 11  # not divisible by the batch size (4) nor by 2 or 3 shards
N_CLASSES = 5
SIZE = 32
BACKENDS = ["dali", "torch"]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _write_image(path, rng: np.random.Generator) -> None:
    """A 24-48 px JPEG with colour gradients and a few filled ellipses (JPEG-friendly, not noise)."""
    h, w = (int(v) for v in rng.integers(24, 49, size=2))
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255.0 / w, yy * 255.0 / h, np.full((h, w), float(rng.integers(0, 256)))], axis=-1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        dx, dy = (int(v) for v in rng.integers(4, 12, size=2))
        draw.ellipse([x0, y0, x0 + dx, y0 + dy], fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    image.save(path, quality=90)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> MultiLabelSet:
    root = tmp_path_factory.mktemp("loader_images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        path = root / f"img_{i:03d}.jpg"
        _write_image(path, rng)
        paths.append(str(path))
    targets = rng.integers(-1, 2, size=(N_IMAGES, N_CLASSES)).astype(np.int8)
    return MultiLabelSet(paths, targets, [f"class{c}" for c in range(N_CLASSES)])


def _workers(backend: str) -> int:
    return 2 if backend == "dali" else 0  # DALI: threads; torch: in-process (no worker start-up)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x.clone(), t.clone(), i.clone()) for x, t, i in loader]


@pytest.fixture(scope="module")
def eval_epochs(dataset) -> dict[str, list]:
    """One evaluation epoch per backend (one pipeline build each, shared by several tests)."""
    return {
        b: _epoch(build_loader(dataset, 4, False, SIZE, backend=b, num_workers=_workers(b)))
        for b in BACKENDS
    }


def _reference(dataset: MultiLabelSet) -> torch.Tensor:
    """PIL's own bilinear (antialiased) resize to S x S, normalised: an independent reference."""
    out = []
    for path in dataset.image_paths:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32)
        out.append(torch.from_numpy(rgb).permute(2, 0, 1))
    return (torch.stack(out) / 255.0 - MEAN) / STD


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_batches_rows_shapes_and_normalisation(backend, dataset, eval_epochs):
    batches = eval_epochs[backend]
    assert [x.shape[0] for x, _, _ in batches] == [4, 4, 3]  # partial last batch kept
    for images, targets, indices in batches:
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
        assert targets.dtype == torch.int8 and targets.shape == (images.shape[0], N_CLASSES)
        assert indices.dtype == torch.int64 and images.device.type == "cpu"
        np.testing.assert_array_equal(targets.numpy(), dataset.targets[indices.numpy()])
    indices = torch.cat([i for _, _, i in batches])
    assert indices.tolist() == list(range(N_IMAGES))  # evaluation keeps dataset order
    images = torch.cat([x for x, _, _ in batches])
    # Normalised RGB (not BGR, not [0, 255]): close to PIL's resize of the same files. PIL's
    # bilinear filter is also a widened triangle; the bound allows rounding and edge handling.
    diff = (images - _reference(dataset)).abs().mean().item()
    print(f"\n{backend}: mean |loader - PIL reference| = {diff:.4f} (normalised units)")
    assert diff < 0.05
    unnormalised = images * STD + MEAN
    assert unnormalised.min() >= -1e-4 and unnormalised.max() <= 1 + 1e-4


def test_eval_preprocessing_agrees_between_backends(eval_epochs):
    dali = torch.cat([x for x, _, _ in eval_epochs["dali"]])
    torch_ = torch.cat([x for x, _, _ in eval_epochs["torch"]])
    diff = (dali - torch_).abs()
    print(f"\nDALI vs torchvision eval: mean |diff| = {diff.mean():.5f}, max {diff.max():.4f} (normalised units)")
    # Both decode with libjpeg-turbo (bit-identical here) and resize with an antialiased linear
    # filter to uint8; each resize rounds by at most half a grey level, so two roundings differ by
    # at most 1/255 / std ~ 0.017 per pixel, plus tiny filter differences. Measured: ~0.003.
    assert diff.mean() < 0.02
    for (_, ta, ia), (_, tb, ib) in zip(eval_epochs["dali"], eval_epochs["torch"]):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


@pytest.mark.parametrize("backend", BACKENDS)
# 11 images: shard sizes (5, 6) and (3, 4, 4); with these batch sizes the shards need different
# numbers of batches (1 and 2), the case where DALI's padded reader hands a shard an empty batch.
@pytest.mark.parametrize("num_shards, batch_size", [(2, 5), (3, 3)])
def test_sharded_eval_covers_every_index_once(backend, num_shards, batch_size, dataset):
    seen: list[int] = []
    for shard in range(num_shards):
        loader = build_loader(
            dataset, batch_size, False, SIZE, backend=backend, num_workers=_workers(backend),
            shard_id=shard, num_shards=num_shards,
        )
        start, end = shard_bounds(N_IMAGES, shard, num_shards)
        assert len(loader) == math.ceil((end - start) / batch_size)
        for epoch in range(2):  # the second epoch checks that DALI's padding does not leak over
            batches = [(t, i) for _, t, i in loader]
            assert len(batches) == len(loader), f"epoch {epoch}"
            indices = torch.cat([i for _, i in batches]).tolist()
            assert indices == list(range(start, end)), f"shard {shard} epoch {epoch}"
            for targets, idx in batches:
                np.testing.assert_array_equal(targets.numpy(), dataset.targets[idx.numpy()])
        seen += indices
    assert sorted(seen) == list(range(N_IMAGES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_random_crops_deterministic_and_sharded(backend, dataset):
    def run(seed: int, shard: int = 0, shards: int = 1, epochs: int = 2):
        loader = build_loader(
            dataset, 2, True, SIZE, backend=backend, num_workers=_workers(backend),
            seed=seed, shard_id=shard, num_shards=shards,
        )  # fmt: skip
        return loader, [_epoch(loader) for _ in range(epochs)]

    loader, (first, second) = run(seed=0)
    assert len(loader) == N_IMAGES // 2 and len(first) == len(second) == len(loader)
    for images, targets, indices in first + second:
        assert images.shape == (2, 3, SIZE, SIZE)  # training batches are all full
        np.testing.assert_array_equal(targets.numpy(), dataset.targets[indices.numpy()])
    for epoch in (first, second):
        idx = torch.cat([i for _, _, i in epoch]).tolist()
        assert len(set(idx)) == len(idx) == 10  # 11 // 2 * 2: one image left out per epoch

    def by_index(epoch):
        return {int(i): x[k] for x, _, ii in epoch for k, i in enumerate(ii)}

    a, b = by_index(first), by_index(second)
    common = sorted(set(a) & set(b))
    assert common and any(not torch.equal(a[i], b[i]) for i in common), "two epochs gave the same crops"
    order = [torch.cat([i for _, _, i in epoch]).tolist() for epoch in (first, second)]
    assert order[0] != order[1], "two epochs gave the same order"

    _, (again, _) = run(seed=0)  # same seed: same order, same crops
    for (xa, _, ia), (xb, _, ib) in zip(first, again):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    _, (other, _) = run(seed=1)
    assert any(not torch.equal(xa, xb) for (xa, _, _), (xb, _, _) in zip(first, other))

    # Training shards: the same number of full batches each, disjoint within an epoch.
    per_shard = [run(seed=3, shard=s, shards=2, epochs=2) for s in range(2)]
    assert len({len(ld) for ld, _ in per_shard}) == 1 and len(per_shard[0][0]) == (N_IMAGES // 2) // 2
    for epoch in range(2):
        idx = [int(i) for _, epochs in per_shard for _, _, ii in epochs[epoch] for i in ii]
        assert len(idx) == len(set(idx)) == 2 * len(per_shard[0][0]) * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs(backend, dtype, dataset, eval_epochs):
    loader = build_loader(dataset, 4, False, SIZE, backend=backend, num_workers=_workers(backend), dtype=dtype)
    half = torch.cat([x for x, _, _ in loader])
    assert half.dtype == dtype
    full = torch.cat([x for x, _, _ in eval_epochs[backend]])
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # relative rounding of the format
    assert torch.allclose(half.float(), full, rtol=tol, atol=tol)


def test_torch_workers_give_the_same_batches(dataset):
    """Augmentation seeds travel with the samples: worker processes change nothing."""
    kwargs = dict(batch_size=3, train=True, image_size=SIZE, backend="torch", seed=5)
    inline = _epoch(build_loader(dataset, num_workers=0, **kwargs))
    workers = _epoch(build_loader(dataset, num_workers=2, **kwargs))
    for (xa, ta, ia), (xb, tb, ib) in zip(inline, workers, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta, tb) and torch.equal(xa, xb)


def test_torch_workers_take_the_parents_allocator_setting(dataset, monkeypatch):
    """Workers get the parent's allocator setting (c2f_fast.runtime.tune_allocator): a worker
    started by the fork server is a fresh process and would otherwise run glibc's defaults."""
    import functools

    from c2f_fast.data import torch_pipeline

    for tuned in (False, True):
        monkeypatch.setattr(torch_pipeline, "_allocator_tuned", lambda: tuned)
        init = build_loader(dataset, batch_size=3, train=False, image_size=SIZE, backend="torch",
                            num_workers=1).dataloader.worker_init_fn
        assert isinstance(init, functools.partial) and init.func is torch_pipeline._init_worker
        assert init.keywords == {"tune_allocator": tuned}
    assert build_loader(dataset, batch_size=3, train=False, image_size=SIZE, backend="torch",
                        num_workers=0).dataloader.worker_init_fn is None


def test_abandoned_dali_epoch_restarts_cleanly(dataset):
    loader = build_loader(dataset, 4, False, SIZE, backend="dali", num_workers=1)
    next(iter(loader))  # read one batch, then start over
    assert torch.cat([i for _, _, i in loader]).tolist() == list(range(N_IMAGES))


def test_exif_orientation_ignored_and_16bit_png_agree(tmp_path):
    """Both backends decode the stored pixels (no EXIF rotation: boxes refer to them) and 16-bit
    PNGs to 8 bits; a rotated decode of a 24x48 image would differ completely."""
    rng = np.random.default_rng(7)
    rotated = tmp_path / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    base = np.zeros((24, 48, 3), np.uint8)
    base[:, :24] = (220, 30, 30)  # red left half, blue right half
    base[:, 24:] = (30, 30, 220)
    Image.fromarray(base).save(rotated, quality=95, exif=exif)
    png16 = tmp_path / "gray16.png"
    Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16)).save(png16)
    data = MultiLabelSet([str(rotated), str(png16)], np.ones((2, 1), np.int8), ["x"])
    outputs = {
        b: torch.cat([x for x, _, _ in build_loader(data, 2, False, SIZE, backend=b, num_workers=_workers(b))])
        for b in BACKENDS
    }
    diff = (outputs["dali"] - outputs["torch"]).abs().mean().item()
    assert diff < 0.02, diff
    rgb = outputs["dali"][0] * STD[0] + MEAN[0]
    left, right = rgb[:, :, : SIZE // 2 - 2].mean((1, 2)), rgb[:, :, SIZE // 2 + 2 :].mean((1, 2))
    assert left[0] > 0.7 and left[2] < 0.3 and right[2] > 0.7 and right[0] < 0.3  # not rotated


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="opencv"), "backend"),
        (dict(shard_id=2, num_shards=2), "shard_id"),
        (dict(dtype=torch.int8), "dtype"),
        (dict(on_bad_image="ignore"), "on_bad_image"),
        (dict(verify="full"), "verify"),
        (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=6, num_shards=2, train=True), "batch_size"),  # 11 // 2 = 5 < 6
        (dict(num_shards=12), "num_shards"),
    ],
)
def test_invalid_arguments_are_named(kwargs, match, dataset):
    args = dict(dataset=dataset, batch_size=4, train=False, image_size=SIZE, backend="torch", num_workers=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_loader(**args)


@requires_cuda
@pytest.mark.gpu
def test_dali_mixed_decoding_on_cuda(dataset, eval_epochs):
    """nvJPEG ("mixed") decoding + GPU resize/normalise: same outputs as the CPU pipeline, on the GPU."""
    device = torch.device("cuda", torch.cuda.current_device())
    batches = _epoch(build_loader(dataset, 4, False, SIZE, backend="dali", device=device, num_workers=2))
    for images, targets, indices in batches:
        assert images.device == device and targets.device == device and indices.device == device
        np.testing.assert_array_equal(targets.cpu().numpy(), dataset.targets[indices.cpu().numpy()])
    images = torch.cat([x for x, _, _ in batches]).cpu()
    cpu = torch.cat([x for x, _, _ in eval_epochs["dali"]])
    diff = (images - cpu).abs().mean().item()
    print(f"\nDALI mixed (nvJPEG) vs CPU: mean |diff| = {diff:.5f} (normalised units)")
    assert diff < 0.02  # nvJPEG's IDCT differs from libjpeg-turbo's by rounding only

    train = build_loader(dataset, 2, True, SIZE, backend="dali", device=device, dtype=torch.bfloat16, num_workers=2)
    for images, targets, indices in train:
        assert images.device == device and images.dtype == torch.bfloat16 and images.shape == (2, 3, SIZE, SIZE)
        np.testing.assert_array_equal(targets.cpu().numpy(), dataset.targets[indices.cpu().numpy()])
    # The torch backend normalises on the device: the same numbers as on the CPU.
    torch_loader = build_loader(dataset, 4, False, SIZE, backend="torch", device=device, num_workers=0)
    torch_gpu = torch.cat([x for x, _, _ in torch_loader])
    torch_cpu = torch.cat([x for x, _, _ in eval_epochs["torch"]])
    assert torch_gpu.device == device and torch.allclose(torch_gpu.cpu(), torch_cpu, atol=1e-5)
