"""Case 5: one training step through the engine's own ``c2f_fast.train.TrainStep``
(label sequences → model → c2f_loss → backward → clip → AdamW), lstm_lg + max-margin, teacher
forcing.

GPU (VGG-16, 224 px, batch 256): the eager fp32 reference (no compile, NCHW, reference decoder)
against the fast configuration (bf16 autocast, ``torch.compile``, channels_last, Triton decoder).
CPU (the ``tiny`` backbone, 128 px, batch 16): eager fp32 against compiled fp32 (the Triton fast
path is GPU-only) and against bf16 autocast + channels_last (``cpu_bf16_cl``, what
``run.precision=auto`` picks on a CPU with AMX-BF16 or AVX512-BF16).

MFU = FLOPs per image (``c2f_fast.train.training_flops_per_image``: torch's FLOP counter on the
reference path, forward + backward) × images/s ÷ the device's dense bf16 peak
(``c2f_fast.train.PEAK_BF16_FLOPS``, or ``C2F_PEAK_TFLOPS``). Without a known peak (the CPU) the
table shows GFLOP/s instead.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._bench import measure, sizes_str
from benchmarks._data import random_targets
from c2f_fast import train as engine
from c2f_fast.config import load_config
from c2f_fast.labels import class_frequency_order

VARIANTS = {
    # name: (precision, compile, channels_last, fast_kernels); fast ones only on CUDA
    "ref_fp32_eager": ("fp32", False, False, False),
    "ref_fp32_compiled": ("fp32", True, False, False),
    "fast_bf16_compiled": ("bf16", True, True, True),
    # the CPU's bf16 units (AMX-BF16 / AVX512-BF16): what run.precision=auto picks on such a CPU
    "cpu_bf16_cl": ("bf16", False, True, False),
}

_FLOPS_CACHE: dict = {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, profile, variant):
    precision, compiled, channels_last, fast = VARIANTS[variant]
    if profile.cuda and variant == "ref_fp32_compiled":
        pytest.skip("on the GPU the comparison is eager fp32 reference vs compiled bf16 fast")
    if profile.cuda and variant == "cpu_bf16_cl":
        pytest.skip("a CPU case: bf16 autocast + channels_last on the CPU's bf16 units")
    if not profile.cuda and variant == "fast_bf16_compiled":
        pytest.skip("the fast configuration (bf16, Triton decoder) is GPU-only; the CPU compares eager vs compiled fp32")
    B, S, C, dev = profile.train_batch, profile.image_size, profile.C, profile.device
    cfg = load_config(None, [
        "model.variant=lstm_lg", f"model.backbone={profile.backbone}", f"model.image_size={S}",
        f"model.steps={profile.T}", f"data.batch_size={B}", f"run.precision={precision}",
        f"run.compile={str(compiled).lower()}", f"run.channels_last={str(channels_last).lower()}",
        f"run.fast_kernels={str(fast).lower()}", f"run.device={dev.type}",
    ])
    settings = engine.resolve_settings(cfg, dev)
    torch.manual_seed(0)
    model = engine.build_model(cfg, C, settings).train()
    optimizer = engine.build_optimizer(model, cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=settings.precision == "fp16")
    targets = random_targets(B, C, dev)
    step = engine.TrainStep(model, model, optimizer, scaler, class_frequency_order(targets), cfg, settings)
    images = torch.randn(B, 3, S, S, device=dev)

    key = (profile.backbone, S, C, profile.T)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = engine.training_flops_per_image(model, S, dev, teacher=True)
    flops_per_image = _FLOPS_CACHE[key]
    peak = engine._peak_flops(dev)

    def call():
        loss, _, _ = step(images, targets)
        return loss

    baselines = ("train/ref_fp32_eager",) if variant != "ref_fp32_eager" else ()
    if profile.cuda:  # the eager fp32 reference is ~1 s a step at batch 256: fewer rounds
        rounds = dict(rounds=8, warmup=2, prewarm=3) if compiled else dict(rounds=5, warmup=1, prewarm=1)
    else:
        rounds = dict(rounds=5, warmup=1, prewarm=2)
    measure(benchmark, profile, call, case=f"train/{variant}", group="training step",
            sizes=sizes_str(backbone=profile.backbone, S=S, B=B, T=profile.T, C=C, prec=precision),
            baselines=baselines, items=B, flops=flops_per_image * B,
            extra={"peak_flops": peak, "flops_per_image": flops_per_image,
                   "settings": {"precision": settings.precision, "compile": settings.compile,
                                "channels_last": settings.channels_last, "fast_kernels": settings.fast_kernels},
                   "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32},
            **rounds)
