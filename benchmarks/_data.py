"""Benchmark inputs: random multi-label targets, synthetic JPEGs for the data-pipeline case, and the
torchvision ``decode_jpeg`` loader variant.

The images are 500×375 (the common VOC size), random but structured like photographs: a smooth
two-colour gradient, a dozen filled shapes with soft edges, a mid-frequency texture and a fine grain, saved at quality 90
with 4:2:0 chroma subsampling (what cameras and VOC/COCO use). 60–80 KiB each (VOC's 500×375 JPEGs: ~90 KiB on average).
"""

from __future__ import annotations

import io
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from c2f_fast.data.base import DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE, normalize

WIDTH, HEIGHT = 500, 375


def make_jpeg(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT, quality: int = 90) -> bytes:
    from PIL import Image, ImageDraw, ImageFilter

    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, width)[None, :, None] * rng.uniform(0.3, 1.0) + \
        np.linspace(0.0, 1.0, height)[:, None, None] * rng.uniform(0.0, 0.7)
    t = np.clip(t, 0, 1)
    base = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 16))):
        x0, y0 = int(rng.integers(-50, width)), int(rng.integers(-50, height))
        w, h = int(rng.integers(20, 250)), int(rng.integers(20, 200))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            pts = [(int(x0 + rng.integers(0, w)), int(y0 + rng.integers(0, h))) for _ in range(5)]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    # mid-frequency texture (foliage, fabric...) that survives the quantisation, plus fine grain
    small = rng.normal(128.0, rng.uniform(10.0, 25.0), (height // 2 + 1, width // 2 + 1, 3)).clip(0, 255)
    texture = np.asarray(Image.fromarray(small.astype(np.uint8), "RGB").resize((width, height), Image.BILINEAR),
                         dtype=np.float32) - 128.0
    grain = rng.normal(0.0, rng.uniform(4.0, 8.0), (height, width, 1))
    arr = np.clip(np.asarray(img, dtype=np.float32) + texture + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def random_targets(B: int, C: int, device, generator=None) -> torch.Tensor:
    """int8 {0, 1} targets with 1–3 positives per image (VOC-like)."""
    t = torch.zeros(B, C, dtype=torch.int8)
    k = torch.randint(1, 4, (B,), generator=generator)
    for i in range(B):
        t[i, torch.randperm(C, generator=generator)[: int(k[i])]] = 1
    return t.to(device)


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        path.write_bytes(make_jpeg(rng))
        paths.append(str(path))
    return paths


class TvDecodeJpegLoader:
    """Training batches with ``torchvision.io.decode_jpeg``: file bytes read by ``threads`` threads
    (one batch ahead), the batch decoded in one call on ``device`` (nvJPEG on CUDA, libjpeg-turbo
    on the CPU), then per image a random-resized crop (the loaders' algorithm and ranges), a resize
    to S×S (bilinear, antialias), a random flip; stacked and normalised. Same output as
    ``build_loader(train=True)`` (float32 [B, 3, S, S]); an endless stream of batches.
    """

    def __init__(self, paths: list[str], batch_size: int, image_size: int, device: torch.device, threads: int,
                 seed: int = 0, crop_scale=DEFAULT_CROP_SCALE, crop_ratio=DEFAULT_CROP_RATIO):
        self.paths, self.batch_size, self.size, self.device = paths, batch_size, image_size, device
        self.scale, self.ratio = crop_scale, crop_ratio
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self.threads = max(1, threads)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    @property
    def decoder(self) -> str:
        if self.device.type == "cuda":
            return "nvJPEG (torchvision.io.decode_jpeg(device='cuda'), batched)"
        return f"libjpeg-turbo (torchvision.io.decode_jpeg on the CPU, {self.threads} threads)"

    def _read(self, path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

    def _read_loop(self) -> None:
        rng = np.random.default_rng(0)
        order: list[int] = []
        while not self._stop:
            if len(order) < self.batch_size:
                order += rng.permutation(len(self.paths)).tolist()
            batch, order = order[: self.batch_size], order[self.batch_size:]
            datas = list(self.pool.map(self._read, [self.paths[i] for i in batch]))
            self._queue.put(datas)

    def close(self) -> None:
        self._stop = True
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        return list(self.pool.map(lambda d: decode_jpeg(d, mode=ImageReadMode.RGB), datas))

    def _params(self, img: torch.Tensor) -> tuple[int, int, int, int, bool]:
        """Crop box and flip, drawn in the calling thread (the generator is not thread-safe)."""
        from c2f_fast.data.torch_pipeline import random_resized_crop_params

        top, left, h, w = random_resized_crop_params(img.shape[-2], img.shape[-1], self.scale, self.ratio,
                                                     self.generator)
        return top, left, h, w, bool(torch.rand((), generator=self.generator) < 0.5)

    def _augment(self, img: torch.Tensor, params: tuple[int, int, int, int, bool]) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w, flip = params
        out = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.horizontal_flip(out) if flip else out

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        datas = self._queue.get()
        images = self._decode(datas)
        params = [self._params(img) for img in images]
        if self.device.type == "cuda":
            crops = [self._augment(img, p) for img, p in zip(images, params)]
        else:
            crops = list(self.pool.map(self._augment, images, params))
        return normalize(torch.stack(crops).to(self.device, non_blocking=True))


def random_feature_cache(folder: Path, num_images: int, L: int, D: int, F: int, num_classes: int,
                         dtype: str = "fp16", shard_size: int = 1024, seed: int = 0):
    """A feature cache (``c2f_fast.features``' layout and manifest) of random ReLU-like features for
    ``num_images`` training images, without an encoder: ``(FeatureStore, MultiLabelSet)``. The
    timed path (memory-mapped shards → rows → device) is the one a real cache takes."""
    import json

    from c2f_fast import features as feat
    from c2f_fast.data import MultiLabelSet

    rng = np.random.default_rng(seed)
    file_dtype, torch_dtype = feat.DTYPES[dtype]
    manifest = {"format": feat.FORMAT, "version": feat.FORMAT_VERSION, "dtype": dtype, "views": 0,
                "shapes": {"L": L, "D": D, "F": F}, "shard_size": shard_size,
                "splits": {"train": {"num_images": num_images, "views": 1}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train").mkdir(exist_ok=True)
    for c, start in enumerate(range(0, num_images, shard_size)):
        rows = min(num_images, start + shard_size) - start
        for path, shape in zip(feat.shard_paths(folder, "train", c), ((1, rows, L, D), (1, rows, F))):
            values = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).relu_().to(torch_dtype)
            array = values.view(torch.int16).numpy().view(np.uint16) if dtype == "bf16" else values.numpy()
            np.save(path, array.astype(file_dtype, copy=False))
    (folder / feat.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    targets = (rng.random((num_images, num_classes)) < 0.15).astype(np.int8)
    dataset = MultiLabelSet([f"image_{i}.jpg" for i in range(num_images)], targets,
                            [f"class_{c}" for c in range(num_classes)])
    return feat.FeatureStore(folder), dataset
