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


# ----------------------------------------------------------------------------- frozen encoder
#: The frozen-encoder comparison: a decoder step from the feature cache against the same step from
#: decoded images with the encoder frozen, and against the full (fine-tuning) step. name:
#: (backbone, image size, batch, decoder-size overrides) on the CPU; on the GPU one net, the
#: profile's (VGG-16, 224 px, B=256: L=196, D=512, bf16 compiled with the Triton decoder).
FROZEN_NETS_CPU = {"vgg16": ("vgg16", 224, 8, []),
                   "tiny": ("tiny", 128, 16, ["model.hidden=256", "model.embed=64", "model.attn=128"])}  # c2f ablate's
FROZEN_MODES = ("features", "frozen_images", "full")


@pytest.mark.parametrize("net", list(FROZEN_NETS_CPU))
@pytest.mark.parametrize("mode", FROZEN_MODES)
def test_train_frozen(benchmark, profile, tmp_path_factory, mode, net):
    from benchmarks._data import random_feature_cache
    from c2f_fast.encoders import feature_map_size
    from c2f_fast.features import CachedEncoderNet, FeatureLoader

    if profile.cuda:
        if net != "vgg16":
            pytest.skip("the GPU compares the profile's net only (VGG-16, 224 px, B=256)")
        backbone, S, B, sizes = profile.backbone, profile.image_size, profile.train_batch, []
        precision, compiled, channels_last, fast = VARIANTS["fast_bf16_compiled"]
    else:
        backbone, S, B, sizes = FROZEN_NETS_CPU[net]
        precision, compiled, channels_last, fast = VARIANTS["ref_fp32_eager"]
    C, dev = profile.C, profile.device
    cfg = load_config(None, [
        "model.variant=lstm_lg", f"model.backbone={backbone}", f"model.image_size={S}", f"model.steps={profile.T}",
        f"data.batch_size={B}", f"run.precision={precision}", f"run.compile={str(compiled).lower()}",
        f"run.channels_last={str(channels_last and mode != 'features').lower()}",
        f"run.fast_kernels={str(fast).lower()}", f"run.device={dev.type}",
        f"optim.freeze_encoder={str(mode != 'full').lower()}", *sizes,
    ])
    settings = engine.resolve_settings(cfg, dev)
    torch.manual_seed(0)
    model = engine.build_model(cfg, C, settings).train()
    if mode != "full":
        model.encoder.eval()
    optimizer = engine.build_optimizer(model, cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=settings.precision == "fp16")
    side = feature_map_size(backbone, S)
    L, D, F = side * side, model.feat_dim, model.fc_dim
    if mode == "features":
        cache = tmp_path_factory.mktemp(f"features-{net}")
        store, dataset = random_feature_cache(cache, 8 * B, L, D, F, C, dtype="bf16" if profile.cuda else "fp16")
        loader = FeatureLoader(store, "train", dataset, B, True, dev, settings.amp_dtype or torch.float32)
        step = engine.TrainStep(CachedEncoderNet(model), model, optimizer, scaler,
                                class_frequency_order(torch.from_numpy(dataset.targets)), cfg, settings)

        def batches():
            while True:
                yield from loader

        stream = batches()

        def call():
            inputs, targets, _ = next(stream)  # the cache's read is part of the step
            return step(inputs, targets)[0]
    else:
        targets = random_targets(B, C, dev)
        step = engine.TrainStep(model, model, optimizer, scaler, class_frequency_order(targets), cfg, settings)
        images = torch.randn(B, 3, S, S, device=dev)

        def call():
            return step(images, targets)[0]

    case = f"train/{mode}/{net}"
    baselines = {"features": (f"train/frozen_images/{net}", f"train/full/{net}"),
                 "frozen_images": (f"train/full/{net}",), "full": ()}[mode]
    slow = mode != "features" and (backbone.startswith("vgg") or profile.cuda)
    rounds = dict(rounds=3, warmup=0, prewarm=1) if slow and not profile.cuda else dict(rounds=8, warmup=1, prewarm=3)
    measure(benchmark, profile, call, case=case, group="frozen encoder: training step",
            sizes=sizes_str(backbone=backbone, S=S, B=B, L=L, D=D, F=F, T=profile.T, C=C, prec=precision),
            baselines=baselines, items=B,
            extra={"mode": mode, "settings": {"precision": settings.precision, "compile": settings.compile,
                                              "channels_last": settings.channels_last,
                                              "fast_kernels": settings.fast_kernels}},
            **rounds)
