"""The first minutes on a GPU: one compiled bf16 training step of the fast model through the
engine's own ``TrainStep``, and one compiled inference call through ``C2FClassifier``.

    python -m benchmarks.gpu_smoke [--device cuda] [--backbone tiny] [--batch 64] [--size 128]

Each part prints one line: what ran, the first call (compilation and autotuning included), the
median of the next calls, and ``ok`` or the error. Exit status 1 when a part fails. On a machine
without CUDA ``--device cpu`` runs the same code on the reference path, uncompiled unless
``--compile`` is given (the Triton kernels cannot be compiled by Inductor under the CPU
interpreter): that is how the tests check this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch


def _timed(fn: Callable[[], object], device: torch.device, calls: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next ``calls - 1``)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]) if len(times) > 1 else float("nan")


def train_step(device: torch.device, backbone: str, batch: int, size: int, compile: bool, calls: int) -> str:
    from c2f_fast import train as engine
    from c2f_fast.config import load_config
    from c2f_fast.labels import class_frequency_order

    cuda = device.type == "cuda"
    cfg = load_config(None, [
        "model.variant=lstm_lg", f"model.backbone={backbone}", f"model.image_size={size}", "model.steps=5",
        f"data.batch_size={batch}", f"run.device={device.type}", f"run.compile={str(compile).lower()}",
        f"run.precision={'bf16' if cuda else 'fp32'}", f"run.channels_last={str(cuda).lower()}",
        f"run.fast_kernels={str(cuda).lower()}",
    ])  # fmt: skip
    settings = engine.resolve_settings(cfg, device)
    torch.manual_seed(0)
    num_classes = 20
    model = engine.build_model(cfg, num_classes, settings).train()
    optimizer = engine.build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    targets = (torch.rand(batch, num_classes, device=device) < 0.15).long()
    targets[:, 0] = 1  # every image has a label
    step = engine.TrainStep(model, model, optimizer, scaler, class_frequency_order(targets), cfg, settings)
    images = torch.randn(batch, 3, size, size, device=device)
    losses = []
    first, median = _timed(lambda: losses.append(step(images, targets)[0]), device, calls)
    if not all(torch.isfinite(loss).item() for loss in losses):
        raise RuntimeError(f"non-finite training loss: {[loss.item() for loss in losses]}")
    what = (f"{settings.precision}, compile={settings.compile}, fast_kernels={settings.fast_kernels}, "
            f"{backbone} {size}px B={batch}")
    return (f"first call {first:.1f} s, then {median * 1e3:.1f} ms/step "
            f"({batch / median:.0f} img/s); loss {losses[0].item():.3f} -> {losses[-1].item():.3f}; {what}")


def inference(device: torch.device, backbone: str, batch: int, size: int, compile: bool, calls: int) -> str:
    from c2f_fast.checkpoint import save_weights, write_model_json
    from c2f_fast.infer import C2FClassifier
    from c2f_fast.model import C2FNet, ModelConfig

    cfg = ModelConfig(variant="lstm_lg", backbone=backbone, image_size=size, steps=5, num_classes=20)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="c2f_gpu_smoke_") as tmp:
        folder = Path(tmp)
        save_weights(folder / "best.safetensors", C2FNet(cfg))
        write_model_json(folder, {"model": cfg.to_dict(), "class_names": [f"class{i}" for i in range(20)],
                                  "class_order": list(range(20))})
        clf = C2FClassifier.from_checkpoint(folder, device=device, compile=compile, model_batch=batch)
    images = torch.randn(batch, 3, clf.image_size, clf.image_size, device=device)

    def call():
        with torch.inference_mode():
            return clf(images)

    first, median = _timed(call, device, calls)
    return (f"first call {first:.1f} s, then {median * 1e3:.1f} ms/batch ({batch / median:.0f} img/s); "
            f"{str(clf.dtype).replace('torch.', '')}, compile={compile}, {backbone} {size}px B={batch}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=4, help="calls per part (the first one compiles)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: on CUDA only)")
    parser.add_argument("--only", choices=("train", "infer"), help="run one part")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    compile = device.type == "cuda" if args.compile is None else args.compile
    failed = False
    for name, part in (("train", train_step), ("infer", inference)):
        if args.only and name != args.only:
            continue
        try:
            print(f"smoke {name}: ok: " + part(device, args.backbone, args.batch, args.size, compile, args.calls),
                  flush=True)
        except Exception as exc:  # noqa: BLE001 -- report every part, then fail
            failed = True
            traceback.print_exc()
            print(f"smoke {name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
