"""Case 3: the whole decoder, ``C2FNet.decode`` over T steps, forward + the training loss +
backward (teacher forcing, lstm_lg: global attention, local attention, LSTM, max-margin loss).

Variants: the reference path (``fast_kernels=False``) eager and compiled, the fast path (Triton
ops) eager and compiled. On the GPU in bf16 autocast with bf16 feature maps (what the encoder hands
the decoder in training); on the CPU fp32, reference only. Compiled = ``torch.compile`` of
forward + loss (as ``TrainStep`` does); the backward runs through the compiled graph's autograd.
FLOPs: counted once with ``torch.utils.flop_counter`` on the eager reference path.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks._bench import measure, sizes_str
from benchmarks._data import random_targets
from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss
from c2f_fast.model import C2FNet, ModelConfig

VARIANTS = ("fast_eager", "fast_compiled", "ref_eager", "ref_compiled")


def _autocast(profile):
    if profile.cuda and profile.dtype != torch.float32:
        return torch.autocast("cuda", dtype=profile.dtype)
    return contextlib.nullcontext()


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder(benchmark, profile, variant):
    fast, compiled = variant.startswith("fast"), variant.endswith("compiled")
    if fast and not profile.cuda:
        pytest.skip("the Triton fast path runs on CUDA only")
    B, L, T, C, dev = profile.B, profile.L, profile.T, profile.C, profile.device
    cfg = ModelConfig(variant="lstm_lg", backbone=profile.backbone, num_classes=C, steps=T, hidden=profile.H,
                      embed=profile.E, attn=profile.A, image_size=profile.image_size, fast_kernels=fast)
    torch.manual_seed(0)
    model = C2FNet(cfg)
    model.encoder = torch.nn.Identity()  # decode() alone: the encoder is never run
    model = model.to(dev).train()
    D, Fdim = model.feat_dim, model.fc_dim
    feat_dtype = profile.dtype if profile.cuda else torch.float32
    feats = torch.randn(B, L, D, device=dev, dtype=feat_dtype).relu_().requires_grad_()
    f_fc = torch.randn(B, Fdim, device=dev, dtype=feat_dtype).relu_().requires_grad_()
    targets = random_targets(B, C, dev)
    seq = label_sequences(targets, class_frequency_order(targets), T)

    def forward_loss(feats, f_fc, targets, seq):
        return c2f_loss(model.decode(feats, f_fc, seq), targets, seq)[0]

    run = torch.compile(forward_loss, dynamic=False) if compiled else forward_loss

    def call():
        with _autocast(profile):
            loss = run(feats, f_fc, targets, seq)
        loss.backward()
        model.zero_grad(set_to_none=True)
        feats.grad = f_fc.grad = None

    flops = None
    if variant == "ref_eager":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            call()
        flops = counter.get_total_flops()
    baselines = {"fast_compiled": ("decoder/fwdbwd/ref_eager", "decoder/fwdbwd/ref_compiled", "decoder/fwdbwd/fast_eager"),
                 "fast_eager": ("decoder/fwdbwd/ref_eager", "decoder/fwdbwd/ref_compiled"),
                 "ref_compiled": ("decoder/fwdbwd/ref_eager",)}.get(variant, ())
    rounds = dict(rounds=10, warmup=2, prewarm=3) if profile.cuda else dict(rounds=7, warmup=1, prewarm=2)
    measure(benchmark, profile, call, case=f"decoder/fwdbwd/{variant}", group="decoder fwd+bwd",
            sizes=sizes_str(B=B, L=L, D=D, A=profile.A, H=profile.H, T=T, C=C,
                            dtype=str(profile.dtype).replace("torch.", "")),
            baselines=baselines, items=B, flops=flops, **rounds)
