"""Case 4: the data pipeline, images/s of 224×224 training batches (random-resized crop + flip +
normalise) from synthetic 500×375 JPEGs written once per session (``benchmarks/_data.py``).

Variants, all at the same thread/worker count (``profile.workers``; 2 on the CPU):

- ``data/torch``: ``build_loader(backend="torch")``, the torchvision DataLoader baseline
  (libjpeg-turbo in ``workers`` processes, whole-image decode then crop);
- ``data/dali``: ``build_loader(backend="dali")``, ``decoders.image_random_crop`` (decodes only the
  crop) on ``workers`` threads; on CUDA ``device="mixed"`` (nvJPEG) with resize/normalise on the GPU;
- ``data/tv_decode_jpeg``: ``torchvision.io.decode_jpeg`` on the device (nvJPEG, batched, on CUDA;
  libjpeg-turbo in ``workers`` threads on the CPU): the GPU decoder when DALI is absent;
- ``data/nvjpeg`` (CUDA only): ``build_loader(backend="nvjpeg")``, the engine's own loader without
  DALI (what ``data.loader=auto`` picks on a GPU image without DALI): bytes read in ``workers``
  processes, one batched ``decode_jpeg(device="cuda")`` per batch, crop/flip/resize on the GPU.

A timed call pulls ``data_batches_per_round`` batches from one endless stream (epochs chained),
so prefetching runs continuously for every variant; the loaders are built and started (workers
forked, pipelines built, first batches decoded) before timing. Each result says which decoder it
used (``extra_info["decoder"]``).
"""

from __future__ import annotations

import gc
import itertools

import pytest

from benchmarks._bench import measure, sizes_str
from benchmarks._data import random_targets


@pytest.fixture(scope="session")
def jpeg_set(tmp_path_factory, profile):
    from benchmarks._data import HEIGHT, WIDTH, write_jpegs
    from c2f_fast.data.records import MultiLabelSet

    paths = write_jpegs(tmp_path_factory.mktemp("jpegs"), profile.data_images)
    C = profile.C
    targets = random_targets(len(paths), C, "cpu").numpy()
    dataset = MultiLabelSet(paths, targets, [f"class{i}" for i in range(C)])
    size = sum(__import__("os").path.getsize(p) for p in paths) / len(paths)
    return dataset, dict(n=len(paths), width=WIDTH, height=HEIGHT, mean_kib=round(size / 1024, 1))


def _endless(loader):
    return itertools.chain.from_iterable(iter(loader) for _ in itertools.count())


@pytest.mark.parametrize("variant", ["torch", "dali", "tv_decode_jpeg", "nvjpeg"])
def test_data(benchmark, profile, jpeg_set, variant):
    dataset, info = jpeg_set
    B, W, S, dev = profile.data_batch, profile.workers, 224, profile.device
    closer = None
    if variant == "tv_decode_jpeg":
        from benchmarks._data import TvDecodeJpegLoader

        stream = TvDecodeJpegLoader(dataset.image_paths, B, S, dev, threads=W)
        decoder, closer = stream.decoder, stream.close
    else:
        if variant == "dali":
            pytest.importorskip("nvidia.dali", reason="DALI is not installed (the tv_decode_jpeg variant stands in)")
        if variant == "nvjpeg" and not profile.cuda:
            pytest.skip("the nvjpeg loader decodes on a GPU")
        from c2f_fast.data.loaders import build_loader

        loader = build_loader(dataset, B, train=True, image_size=S, backend=variant, device=dev, num_workers=W,
                              verify="none")
        stream = (images for images, _, _ in _endless(loader))
        if variant == "nvjpeg":
            decoder = f"nvJPEG (torchvision.io.decode_jpeg(device='cuda'), batched; bytes read in {W} workers)"
        elif variant == "dali":
            decoder = ("nvJPEG (DALI decoders.image_random_crop, device='mixed': ROI decode)" if profile.cuda
                       else f"libjpeg-turbo (DALI decoders.image_random_crop, device='cpu': ROI decode, {W} threads)")
        else:
            decoder = f"libjpeg-turbo (torchvision.io.decode_image in {W} DataLoader workers, full decode then crop)"
    n = profile.data_batches_per_round

    def call():
        for _ in range(n):
            images = next(stream)
        assert images.shape == (B, 3, S, S)

    baselines = ("data/torch",) if variant != "torch" else ()
    if profile.cuda:
        baselines += ("train/fast_bf16_compiled",)
    try:
        measure(benchmark, profile, call, case=f"data/{variant}", group="data pipeline",
                sizes=sizes_str(B=B, S=S, workers=W, jpeg=f"{info['width']}x{info['height']}",
                                kib=info["mean_kib"]),
                baselines=baselines, items=B * n, rounds=5, warmup=1, prewarm=1,
                extra={"decoder": decoder, "workers": W, "images_in_set": info["n"],
                       "mean_jpeg_kib": info["mean_kib"], "batches_per_call": n})
    finally:
        if closer is not None:
            closer()
        del stream
        gc.collect()  # stop this variant's workers/threads before the next one is timed
