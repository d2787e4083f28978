"""A training step reads the device on the host once: the finite-loss check.

On the CPU every Python-level way of reading a tensor's value on the host (``.item()``, ``.cpu()``,
``.tolist()``, ``.numpy()``, ``bool()``, ``int()``, ``float()``, ``torch.equal``) is counted during
``TrainStep.__call__``; with CUDA, torch's sync debug mode counts the real synchronisations.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import requires_cuda

from c2f_fast.config import load_config
from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.runtime import Settings
from c2f_fast.train import TrainStep, build_model

N_CLASSES, BATCH = 6, 4
_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _step(device: str, variant: str = "lstm_lg", feed: str = "teacher", compile_: bool = False):
    cfg = load_config(None, ["model.backbone=tiny", f"model.variant={variant}", "model.image_size=32",
                             "model.steps=3", "model.hidden=16", "model.embed=8", "model.attn=16",
                             f"optim.feed={feed}", "optim.grad_clip=1.0"])
    settings = Settings(torch.device(device), "fp32", compile_, False, False)
    model = build_model(cfg, N_CLASSES, settings)
    # fused AdamW, as the engine builds it on CUDA (the CPU's unfused one reads its step counter
    # with .item(), a read of host memory there, but it would be counted below)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device, enabled=False)
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(-1, 2, (BATCH, N_CLASSES), generator=gen, dtype=torch.int8)
    order = class_frequency_order(targets)
    step = TrainStep(model, model, optimizer, scaler, order, cfg, settings)
    images = torch.randn(BATCH, 3, 32, 32, generator=gen)
    return step, images.to(device), targets.to(device)


class _HostReads:
    """Counts the host reads of tensor values while active (by name of the method used)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in _READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        original_equal = torch.equal
        monkeypatch.setattr(torch, "equal", lambda *a, **k: self.calls.append("torch.equal") or original_equal(*a, **k))

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return counted


@pytest.mark.parametrize("variant, feed", [("lstm_lg", "teacher"), ("lstm_l", "greedy"), ("vgg", "teacher")])
def test_a_training_step_reads_the_device_once(monkeypatch, variant, feed):
    step, images, targets = _step("cpu", variant, feed)
    step(images, targets)  # a first step (lazy optimiser state) outside the count
    reads = _HostReads(monkeypatch)
    _, _, finite = step(images, targets)
    assert finite
    assert reads.calls == ["__bool__"], reads.calls  # bool(torch.isfinite(loss))


def test_the_checks_still_run_outside_the_step():
    """Label validation left the hot path, not the package: the checked entry points still refuse."""
    order = torch.arange(N_CLASSES)
    with pytest.raises(ValueError, match="values must be 1"):
        label_sequences(torch.full((2, N_CLASSES), 3), order, 3)
    with pytest.raises(ValueError, match="permutation"):
        label_sequences(torch.zeros(2, N_CLASSES), torch.zeros(N_CLASSES, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="permutation"):  # TrainStep checks its class order once
        step, _, _ = _step("cpu")
        TrainStep(step.net, step.model, step.optimizer, step.scaler, torch.zeros(N_CLASSES, dtype=torch.long),
                  load_config(None, ["model.steps=3"]), step.settings)
    unchecked = label_sequences(torch.tensor([[1, 0, 1, -1, 0, 1]]), order.flip(0), 4, check=False)
    assert unchecked.tolist() == [[5, 2, 0, -1]]


@requires_cuda
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_a_cuda_training_step_synchronises_once(compile_):
    step, images, targets = _step("cuda", compile_=compile_)
    for _ in range(2):  # warm-up: compilation, lazy optimiser state, cuBLAS handles
        step(images, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(images, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, syncs

