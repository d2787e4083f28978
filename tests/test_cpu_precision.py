"""The CPU's bf16 units as a real device (issue 23): the "auto" settings follow the CPU's flags
(both branches, detection mocked), explicit settings win, a bf16 + channels_last CPU training step
learns, and a bf16 evaluation of a trained checkpoint agrees with fp32."""

from __future__ import annotations

import pytest
import torch

from c2f_fast import runtime
from c2f_fast.config import load_config
from c2f_fast.evaluate import evaluate_checkpoint
from c2f_fast.labels import class_frequency_order
from c2f_fast.train import TrainStep, build_model, build_optimizer, train
from test_train import read_log, small_overrides, synth_root  # noqa: F401 -- the shared small synthetic set

CPU = torch.device("cpu")


def _settings(monkeypatch, flags, *overrides, device=CPU):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: set(flags))
    return runtime.resolve_settings(load_config(None, list(overrides)), device)


@pytest.mark.parametrize("flag, name", [("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")])
def test_auto_picks_bf16_and_channels_last_on_a_cpu_with_bf16_units(monkeypatch, flag, name):
    s = _settings(monkeypatch, {"avx2", "avx512f", flag})
    assert (s.precision, s.channels_last, s.compile, s.fast_kernels) == ("bf16", True, False, False)
    assert s.amp_dtype is torch.bfloat16
    assert name in s.reason and "auto: bf16 because" in s.reason and "auto: channels_last on" in s.reason
    assert s.describe().startswith("cpu: bf16, channels_last=on, compile=off")


def test_auto_stays_fp32_without_bf16_units_in_channels_last(monkeypatch):
    s = _settings(monkeypatch, {"avx2", "avx512f", "avx512bw"})  # AVX-512 without its BF16 extension
    assert (s.precision, s.channels_last) == ("fp32", True)
    assert s.amp_dtype is None
    assert "auto: fp32 because no AMX-BF16 or AVX512-BF16" in s.reason and "auto: channels_last on" in s.reason


def test_unreadable_cpuinfo_means_no_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "Path", lambda *_: tmp_path / "no-cpuinfo")
    assert runtime._cpu_flags() == set()
    assert runtime.cpu_bf16_support()[0] is False


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, set()], ids=["bf16-cpu", "plain-cpu"])
def test_explicit_settings_win(monkeypatch, flags):
    s = _settings(monkeypatch, flags, "run.precision=fp32", "run.channels_last=true", "run.compile=true")
    assert (s.precision, s.channels_last, s.compile) == ("fp32", True, True)
    assert "set: precision=fp32, channels_last=True, compile=True" in s.reason
    assert "auto:" not in s.reason  # nothing left to decide on the CPU side
    s = _settings(monkeypatch, flags, "run.precision=bf16", "run.channels_last=false")
    assert (s.precision, s.channels_last) == ("bf16", False)


def test_cuda_is_not_decided_by_the_cpu_flags(monkeypatch):
    s = _settings(monkeypatch, set(), device=torch.device("cuda"))
    assert (s.precision, s.channels_last, s.compile, s.fast_kernels) == ("bf16", True, True, True)


def test_fp16_on_the_cpu_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="fp16"):
        _settings(monkeypatch, {"avx512_bf16"}, "run.precision=fp16")


def test_bf16_channels_last_cpu_training_step_lowers_the_loss():
    cfg = load_config(None, ["model.variant=lstm_lg", "model.backbone=tiny", "model.image_size=32", "model.steps=3",
                             "model.hidden=32", "model.embed=16", "model.attn=32", "optim.lr=3e-3",
                             "optim.backbone_lr_mult=1.0", "run.precision=bf16", "run.channels_last=true",
                             "run.compile=false"])  # fmt: skip
    settings = runtime.resolve_settings(cfg, CPU)
    assert settings.amp_dtype is torch.bfloat16 and settings.channels_last
    torch.manual_seed(0)
    model = build_model(cfg, 6, settings).train()
    optimizer = build_optimizer(model, cfg, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    targets = (torch.rand(8, 6) < 0.3).long()
    targets[:, 0] = 1
    images = torch.randn(8, 3, 32, 32)
    step = TrainStep(model, model, optimizer, scaler, class_frequency_order(targets), cfg, settings)
    losses = []
    for _ in range(12):
        loss, _, finite = step(images, targets)
        assert finite and loss.dtype == torch.float32  # the loss is computed from fp32 logits
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_bf16_evaluation_agrees_with_fp32_on_a_trained_checkpoint(synth_root, tmp_path, capfd):  # noqa: F811
    """Stated tolerance: mAP, F1, precision, recall and top-3 accuracy within 0.03 (absolute) of fp32's. bf16
    keeps 8 bits of mantissa, so scores move by ~1e-2 relative; on 40 test images one swapped
    pair of near-equal scores moves an AP by at most a few hundredths."""
    run = tmp_path / "run"
    train(load_config(None, small_overrides(synth_root, run, **{"optim.epochs": 3, "run.precision": "fp32",
                                                                 "run.channels_last": "false"})))
    fp32 = evaluate_checkpoint(run, ["run.precision=fp32", "run.channels_last=false"])
    capfd.readouterr()
    bf16 = evaluate_checkpoint(run, ["run.precision=bf16", "run.channels_last=true"])
    assert "settings: cpu: bf16, channels_last=on" in capfd.readouterr().err  # it did run in bf16
    losses = [row["loss"] for row in read_log(run) if "loss" in row]
    assert losses[-1] < 0.8 * losses[0], losses  # trained, not a random initialisation
    for key in ("mAP", "CF1", "OF1", "OP", "OR", "A@3"):
        assert abs(bf16[key] - fp32[key]) <= 0.03, (key, bf16[key], fp32[key])
