"""The training engine: build → compile → step → log → evaluate → checkpoint.

One training step, as it reads below::

    loader → images, targets → label_sequences → model(images, seq) → c2f_loss → backward → optimiser

The compiled step, the autocast context and the DDP wrapper are set up once, before the loop.
Shapes are static (training batches are full, evaluation pads its last batch), so a compiled model
never recompiles mid-run. Everything a run writes goes to ``run.out`` (see :func:`train`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, config_differences
from .distributed import (DistInfo, all_gather_objects, any_rank, barrier, broadcast_object, init_distributed,
                          shutdown)
from .evaluate import evaluate, pointing_for
from .labels import class_frequency_order, label_sequences
from .losses import c2f_loss
from .model import C2FNet, value_checks
from .runtime import (CONFIG_FILE, CURVES_FILE, LOG_FILE, METRICS_FILE, Settings, build_loaders,  # noqa: F401
                      load_datasets, resolve_settings, tune_allocator)

log = logging.getLogger(__name__)

#: Dense bf16 tensor-core peak (FLOP/s) by device name, for MFU; override with C2F_PEAK_TFLOPS.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved, the run can be resumed."""

    def __init__(self, signum: int, path: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved to {path} "
                         f"(continue with: c2f train --resume {path.parent})")
        self.signum = signum


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint was saved."""


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(model: C2FNet, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    groups = [{"params": head, "lr": o.lr, "name": "head"}]
    if encoder:
        groups.append({"params": encoder, "lr": o.lr * o.backbone_lr_mult, "name": "encoder"})
    # one fused kernel over all parameters instead of a loop of small ops per parameter (the CPU
    # has fused AdamW/SGD kernels too: 3x faster than the default loop for the VGG-16 decoder's
    # 3.8 M parameters on one core)
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, **fused)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine down to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainStep:
    """One optimisation step: ``label_sequences → model → c2f_loss → backward → clip → optimiser``.

    The forward and the loss are one function, compiled once when ``settings.compile``; autocast
    wraps it. ``net`` is the model, or its DDP wrapper. ``step(images, targets)`` returns
    ``(loss, parts, finite)``, the loss detached; a non-finite loss skips the update (the caller
    counts). ``finite`` is the one host sync of the step (tests/test_host_syncs.py counts them):
    asking the loss again after the update would wait for the whole backward and optimiser step.
    The benchmarks time this same object.
    """

    def __init__(self, net: nn.Module, model: C2FNet, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, class_order: torch.Tensor, cfg: TrainConfig, settings: Settings):
        self.net, self.model, self.optimizer, self.scaler = net, model, optimizer, scaler
        self.settings, self.grad_clip = settings, cfg.optim.grad_clip
        self.steps = model.cfg.steps
        # the order's check runs here, once: the step builds its sequences unchecked (no host sync)
        label_sequences(torch.zeros(1, len(class_order), dtype=torch.int8), class_order, self.steps)
        self.class_order = class_order.to(settings.device)
        o, teacher = cfg.optim, cfg.optim.feed == "teacher"

        def forward_loss(images, targets, seq):
            output = net(images, seq if teacher else None)
            return c2f_loss(output, targets, seq, o.lambda1, o.lambda2, o.eps, o.eps_v, o.lambda3, o.lambda4)

        self.forward_loss = torch.compile(forward_loss) if settings.compile else forward_loss

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict, bool]:
        if self.settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # The loader's targets were checked when the data set was read: no value checks (host syncs)
        # here, so the step's one sync is the finite-loss check below.
        seq = label_sequences(targets, self.class_order, self.steps, check=False)
        with self.settings.autocast(), value_checks(False):
            loss, parts = self.forward_loss(images, targets, seq)
        finite = bool(torch.isfinite(loss))
        if finite:
            self.scaler.scale(loss).backward()
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), parts, finite


def build_model(cfg: TrainConfig, num_classes: int, settings: Settings) -> C2FNet:
    """The model of ``cfg.model`` for ``num_classes`` classes, on the device, channels_last and
    with a frozen encoder as the config says."""
    model_cfg = replace(cfg.model, num_classes=num_classes, fast_kernels=settings.fast_kernels)
    model = C2FNet(model_cfg).to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.optim.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- bookkeeping
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _peak_flops(device: torch.device) -> Optional[float]:
    if "C2F_PEAK_TFLOPS" in os.environ:
        return float(os.environ["C2F_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def training_flops_per_image(model: C2FNet, image_size: int, device: torch.device, teacher: bool) -> float:
    """FLOPs of one training step per image (forward + backward), counted by torch's FLOP counter
    on a batch of 2 of the reference path."""
    from torch.utils.flop_counter import FlopCounterMode

    ref = C2FNet(replace(model.cfg, fast_kernels=False, pretrained=None)).to(device)
    images = torch.randn(2, 3, image_size, image_size, device=device)
    seq = torch.zeros(2, ref.cfg.steps, dtype=torch.long, device=device) if teacher else None
    counter = FlopCounterMode(display=False)
    with counter:
        out = ref(images, seq)
        out.logits.float().sum().backward()
    return counter.get_total_flops() / 2


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunLog:
    """Rank 0's JSONL records (``log.jsonl``): step and epoch records, appended and flushed."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = _jsonable(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class StopSignal:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second signal stops at once.
    Installed from the main thread only (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the run
@dataclass
class RunState:
    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    epoch_step: int = 0  # steps of that epoch already done
    step: int = 0  # global optimiser steps done (non-finite skips included)
    best_map: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)


def prepare_run_dir(cfg: TrainConfig, mode: str, info: DistInfo) -> tuple[Path, Optional[dict]]:
    """``(run folder, the checkpoint to continue or None)``, the same on every rank.

    Rank 0 decides (see :func:`find_checkpoint`) and writes ``config.yaml``; the other ranks load
    the same file when they can see it (a shared file system) and its hash is rank 0's, else rank 0
    sends them its copy: on several nodes without a shared ``run.out``, they all continue from rank
    0's newest valid checkpoint.
    """
    run_dir = Path(cfg.run.out)
    saved = source = None
    if info.is_main:
        source, saved = find_checkpoint(cfg, mode, run_dir, info)
        run_dir.mkdir(parents=True, exist_ok=True)
        if saved is None:
            (run_dir / LOG_FILE).unlink(missing_ok=True)
        else:
            _trim_log(run_dir / LOG_FILE, saved["run_state"]["step"])
        cfg.save(run_dir / CONFIG_FILE)
    if info.enabled:
        saved = _share_checkpoint(info, source, saved)
    return run_dir, saved


def find_checkpoint(cfg: TrainConfig, mode: str, run_dir: Path,
                    info: DistInfo) -> tuple[Optional[Path], Optional[dict]]:
    """``(path, state)`` of the checkpoint a start with ``run.resume=mode`` continues, or
    ``(None, None)`` for a fresh start. Refuses (raises) a folder that holds a checkpoint under
    "never", a missing or damaged one under "must", and under "auto"/"must" a checkpoint of another
    config (naming the keys) or of another number of processes. Under "auto" a damaged newest
    checkpoint is renamed aside with a warning naming it and the reason, and the previous one used."""
    newest = run_dir / ckpt.CHECKPOINT
    if mode == "never":
        if newest.exists():
            raise FileExistsError(
                f"run.out: {run_dir} already holds a checkpoint and run.resume=never; continue it with "
                f"run.resume=auto (or --resume), or choose another run.out=... (nothing was overwritten)")
        return None, None
    if mode == "must":
        if not newest.exists():
            raise FileNotFoundError(f"--resume / run.resume=must: no {ckpt.CHECKPOINT} in {run_dir}")
        path, saved = newest, ckpt.load_checkpoint(newest)
    else:
        path, saved, damaged = ckpt.newest_valid_checkpoint(run_dir)
        if saved is None and damaged:
            raise ckpt.CheckpointError(
                f"run.resume=auto: no readable checkpoint in {run_dir} (" + "; ".join(r for _, r in damaged)
                + "); nothing was renamed or overwritten: move the files away to start afresh")
        if saved is None:
            return None, None
        for bad, reason in damaged:
            aside = ckpt.set_aside(bad)
            warnings.warn(f"{reason}; continuing from {path.name} instead, the damaged file is kept as "
                          f"{aside.name}", RuntimeWarning, stacklevel=2)
    differ = config_differences(saved.get("config") or {}, cfg)
    if differ:
        old, new = saved.get("config") or {}, cfg.to_dict()
        show = lambda d, k: (d.get(k.split(".")[0]) or {}).get(k.split(".")[1], "(unset)")  # noqa: E731
        raise ConfigError(
            f"run.out: {run_dir} holds a checkpoint of another config; these keys differ: "
            + ", ".join(f"{k} ({show(old, k)!r} there, {show(new, k)!r} now)" for k in differ)
            + ". Put the values back to continue it, or choose another run.out=... (nothing was overwritten)")
    saved_world = saved.get("world_size", len(saved.get("rng", [None])))
    if saved_world != info.world_size:
        raise ValueError(
            f"run.out: {path} was written by {saved_world} process(es), this start has {info.world_size}: the global "
            f"batch, the steps per epoch and the sample order depend on it. Start {saved_world} process(es) "
            f"(torchrun --nnodes/--nproc_per_node), or choose another run.out=...")
    return path, saved


def _share_checkpoint(info: DistInfo, source: Optional[Path], saved: Optional[dict]) -> Optional[dict]:
    """Rank 0's checkpoint on every rank: read from ``source`` where that file is the same
    (same content hash), else sent by rank 0."""
    head = broadcast_object(info, None if saved is None else (str(source), saved.get(ckpt.HASH_KEY)))
    if head is None:
        return None
    if not info.is_main:
        try:
            local = ckpt.load_checkpoint(head[0])
            saved = local if local.get(ckpt.HASH_KEY) == head[1] else None
        except ckpt.CheckpointError:
            saved = None
    if any(all_gather_objects(info, saved is None)):
        received = broadcast_object(info, saved if info.is_main else None)
        saved = saved if saved is not None else received
    return saved


def _record_step(line: str) -> float:
    """A log line's step; infinite for a line cut short by the kill (dropped with the later ones)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _trim_log(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (done after the checkpoint, done again now)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = [line for line in lines if _record_step(line) <= step]
    if len(keep) != len(lines):
        ckpt.atomic_write(path, lambda f: f.write("".join(keep).encode("utf-8")))


def train(cfg: TrainConfig, resume: Optional[bool] = None) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns the final summary (also in ``metrics.json``).

    Writes to ``cfg.run.out``: ``config.yaml`` (resolved), ``log.jsonl`` (step and epoch
    records), ``checkpoint.pt`` (+ ``checkpoint.prev.pt``), ``best.safetensors``,
    ``model.safetensors``, ``model.json``, ``metrics.json`` and ``curves.png``.
    What happens to a checkpoint already in that folder is ``cfg.run.resume`` (default "auto":
    continue it); ``resume=True`` / ``False`` overrides it with "must" / "never".
    Under torchrun every (re)start of the group continues from rank 0's newest valid checkpoint.
    """
    mode = cfg.run.resume if resume is None else ("must" if resume else "never")
    info = init_distributed(cfg.run.device, cfg.run.dist_timeout)
    try:
        return _train(cfg, mode, info)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, mode: str, info: DistInfo) -> dict[str, Any]:
    t_start = time.perf_counter()
    allocator = tune_allocator()  # a training step frees and reallocates its activations: see there
    settings = resolve_settings(cfg, info.device)
    run_dir, saved = prepare_run_dir(cfg, mode, info)
    torch.manual_seed(cfg.run.seed + info.rank)
    random.seed(cfg.run.seed + info.rank)
    np.random.seed((cfg.run.seed + info.rank) % 2**32)
    out = _Console(info.is_main)

    # -- data and model
    train_set, test_set = load_datasets(cfg, info)
    class_order = class_frequency_order(train_set.targets)
    model = build_model(cfg, train_set.num_classes, settings)
    model_cfg = model.cfg
    net: nn.Module = model  # what the step and the evaluation call: the model, or its decoder on cached features
    if cfg.data.features:
        from .features import feature_run

        train_loader, test_loader, net, settings = feature_run(cfg, model, train_set, test_set, info, settings)
    else:
        train_loader, test_loader = build_loaders(cfg, train_set, test_set, info, settings)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    optimizer = build_optimizer(model, cfg, settings.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.optim.schedule, cfg.optim.min_lr_ratio))
    scaler = torch.amp.GradScaler(settings.device.type, enabled=settings.precision == "fp16")
    meta = {"model": model_cfg.to_dict(), "class_names": list(train_set.class_names),
            "class_order": class_order.tolist(), "image_size": model_cfg.image_size}
    state = RunState()

    if saved is not None:
        if saved["meta"]["model"] != meta["model"]:
            raise ValueError(f"run.out: the model of the checkpoint in {run_dir} differs from this config's "
                             f"(the data's classes changed?)")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"][info.rank])
        train_loader.resume(saved.get("loader", [{}] * info.world_size)[info.rank])
        state = RunState(**saved["run_state"])
        out.print(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step} of {total_steps} "
                  f"({saved.get('tag', '?')} checkpoint)")
        del saved  # the model and optimiser hold their own copies now

    # -- the compiled step, the autocast context and the DDP wrapper: set up once
    eval_model = torch.compile(net) if settings.compile else net
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[settings.device.index] if settings.device.type == "cuda" else None)
    train_step = TrainStep(net, model, optimizer, scaler, class_order, cfg, settings)
    peak = _peak_flops(settings.device)
    flops_per_image = (training_flops_per_image(model, model_cfg.image_size, settings.device,
                                                cfg.optim.feed == "teacher")
                       if peak and not cfg.data.features else None)  # a cached run computes no encoder: no MFU
    pointing = pointing_for(test_set, model_cfg.image_size)

    runlog = RunLog(run_dir / LOG_FILE, info.is_main)
    out.print(f"training {model_cfg.variant}/{model_cfg.backbone} on {len(train_set)} images "
              f"({train_set.num_classes} classes), testing on {len(test_set)}; "
              f"{info.world_size} process(es), {steps_per_epoch} steps/epoch")
    out.print(f"settings: {settings.describe()}")
    out.print(allocator)
    if cfg.data.features:
        out.print(f"loader: features (the encoder's cached outputs in {cfg.data.features})")
    else:
        out.print(f"loader: {train_loader.backend} ({train_loader.reason}), {train_loader.config.num_workers} "
                  f"{'thread' if train_loader.backend == 'dali' else 'worker'}(s)")

    def save(tag: str) -> Path:
        """Every rank calls it; rank 0 writes."""
        rngs = all_gather_objects(info, _rng_state())  # a collective: every rank calls save()
        loaders = all_gather_objects(info, train_loader.resume_state())  # each shard's reader position
        path = run_dir / ckpt.CHECKPOINT
        if info.is_main:
            ckpt.save_checkpoint(run_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": rngs, "loader": loaders, "world_size": info.world_size,
                "run_state": vars(state).copy(), "meta": meta, "config": cfg.to_dict(), "tag": tag,
            })
        barrier(info)
        return path

    nonfinite_run = 0
    last_logged = state.step
    with StopSignal() as stop:
        while state.epoch < cfg.optim.epochs:
            epoch = state.epoch
            if hasattr(train_loader, "set_epoch"):  # the torch loader: any epoch, from any batch
                train_loader.set_epoch(epoch, start_batch=state.epoch_step)
            model.train()
            if cfg.optim.freeze_encoder:
                model.encoder.eval()
            bar = _progress(cfg, info, steps_per_epoch, epoch, state.epoch_step)
            t_epoch = time.perf_counter()
            t_last = time.perf_counter()
            wait = 0.0
            losses = []
            # Resumed mid-epoch, the loader starts at batch state.epoch_step: the batches before it
            # were trained on and are not read again.
            batches = iter(train_loader)
            for i in range(state.epoch_step, steps_per_epoch):
                t_wait = time.perf_counter()
                images, targets, _ = next(batches)
                wait += time.perf_counter() - t_wait
                loss, parts, finite = train_step(images, targets)
                if finite:
                    nonfinite_run = 0
                    losses.append(loss)
                else:
                    nonfinite_run += 1
                    warnings.warn(f"step {state.step + 1}: non-finite loss ({loss.item()}); step skipped "
                                  f"({nonfinite_run} in a row)", RuntimeWarning, stacklevel=1)
                scheduler.step()
                state.step += 1
                state.epoch_step = i + 1
                if nonfinite_run >= cfg.run.max_nonfinite:
                    path = save("nonfinite")
                    raise NonFiniteLoss(f"{nonfinite_run} non-finite losses in a row at step {state.step}; "
                                        f"stopped (checkpoint: {path}). Lower optim.lr or use precision=fp32.")
                if state.step % cfg.run.log_every == 0 or i + 1 == steps_per_epoch:
                    now = time.perf_counter()
                    rate = (state.step - last_logged) * cfg.data.batch_size * info.world_size / max(now - t_last, 1e-9)
                    record = {"kind": "step", "epoch": epoch, "step": state.step, "time": time.time(),
                              "loss": loss.item(),
                              **{k: float(v) for k, v in parts.items()}, "lr": scheduler.get_last_lr()[0],
                              "images_per_s": rate, "data_wait": wait / max(now - t_last, 1e-9)}
                    if flops_per_image and peak:
                        record["mfu"] = flops_per_image * rate / (peak * info.world_size)
                    runlog.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{rate:.0f}",
                                    wait=f"{100 * record['data_wait']:.0f}%", lr=f"{record['lr']:.2e}",
                                    **({"mfu": f"{100 * record['mfu']:.1f}%"} if "mfu" in record else {}))
                    t_last, wait, last_logged = now, 0.0, state.step
                bar.update(1)
                if cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0:
                    save("step")
                if any_rank(info, stop.signum is not None):
                    path = save("signal")
                    bar.close()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, path)
            for _ in batches:  # finish the loader's epoch (DALI reads leftovers to stay aligned)
                pass
            bar.close()
            train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
            seconds = time.perf_counter() - t_epoch
            record = {"kind": "epoch", "epoch": epoch, "step": state.step, "train_loss": train_loss,
                      "seconds": seconds}
            if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
                if pointing is not None:
                    pointing.reset()
                metrics = evaluate(eval_model, test_loader, info, cfg.data.eval_batch_size or cfg.data.batch_size,
                                   settings.autocast, settings.channels_last, pointing)
                record["eval"] = {k: v for k, v in metrics.items() if k != "pointing"}
                if metrics["mAP"] > state.best_map:
                    state.best_map, state.best_epoch = metrics["mAP"], epoch
                    if info.is_main:
                        ckpt.save_weights(run_dir / ckpt.BEST_WEIGHTS, model)
                out.print(_epoch_line(epoch, cfg.optim.epochs, train_loss, seconds, metrics))
            runlog.write(record)
            state.history.append(_jsonable(record))
            state.epoch, state.epoch_step = epoch + 1, 0
            save("epoch")

    # -- the end: final weights, the metric table, curves
    summary = {"run": str(run_dir), "epochs": cfg.optim.epochs, "steps": state.step,
               "seconds": time.perf_counter() - t_start,
               "best_epoch": state.best_epoch + 1, "best_mAP": state.best_map,
               "final": state.history[-1].get("eval", {}) if state.history else {}}
    if info.is_main:
        ckpt.save_weights(run_dir / ckpt.FINAL_WEIGHTS, model)
        ckpt.write_model_json(run_dir, {**meta, "best_epoch": state.best_epoch + 1, "best_mAP": state.best_map})
        (run_dir / METRICS_FILE).write_text(json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8")
        _plot_curves(run_dir)
        out.print(format_table(summary["final"], title=f"test metrics after epoch {cfg.optim.epochs} "
                               f"(best mAP {state.best_map:.4f} at epoch {state.best_epoch + 1})"))
        out.print(f"wrote {run_dir}/{{{METRICS_FILE}, {LOG_FILE}, {CURVES_FILE}, {ckpt.BEST_WEIGHTS}, "
                  f"{ckpt.FINAL_WEIGHTS}, {ckpt.MODEL_JSON}, {ckpt.CHECKPOINT}}}")
    # The ranks leave the group together: a rank that exits while rank 0 still writes closes its
    # gloo connections under a peer that has not torn the group down yet (a crash at exit there
    # reads as a failed worker to torchrun, which restarts a finished run).
    barrier(info)
    return summary


def _plot_curves(run_dir: Path) -> None:
    try:
        from .visualize import training_curves

        training_curves(run_dir / LOG_FILE, run_dir / CURVES_FILE)
    except Exception as exc:  # a plot must never cost a finished run
        warnings.warn(f"could not draw {run_dir / CURVES_FILE}: {exc}", RuntimeWarning, stacklevel=1)


def _epoch_line(epoch, epochs, train_loss, seconds, metrics) -> str:
    line = (f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f} ({seconds:.1f} s), "
            f"test mAP {metrics['mAP']:.4f}, CF1 {metrics['CF1']:.4f}, OF1 {metrics['OF1']:.4f}")
    if metrics.get("pointing_local") is not None:
        line += f", pointing {metrics['pointing_local']:.3f}"
    return line


TABLE_KEYS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP@3", "CR@3", "CF1@3", "OP@3", "OR@3", "OF1@3",
              "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5", "one_error", "coverage", "ranking_loss",
              "pointing_local", "pointing_local_any", "pointing_local_chance", "pointing_global")


def format_table(metrics: dict, title: str = "test metrics") -> str:
    """The metric table printed at the end of a run and by ``c2f eval``."""
    rows = [(k, metrics[k]) for k in TABLE_KEYS if metrics.get(k) is not None]
    rows += [(k, v) for k, v in metrics.items() if k not in TABLE_KEYS and isinstance(v, (int, float))
             and k not in ("seconds", "num_images")]
    width = max((len(k) for k, _ in rows), default=4)
    lines = [title, "-" * max(len(title), width + 10)]
    lines += [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows]
    if "num_images" in metrics:
        lines.append(f"{'images':<{width}}  {metrics['num_images']}")
    return "\n".join(lines)


class _Console:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def print(self, text: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(text)


class _PlainProgress:
    """The progress bar for an output that is not a terminal (a log file, CI, ``nohup``): one plain
    line every ``every`` seconds (and one at the end of the epoch) instead of a redraw per step."""

    def __init__(self, desc: str, total: int, done: int, every: float, stream=None):
        self.desc, self.total, self.n, self.every = desc, total, done, every
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict = {}
        self.t0 = self.t_line = time.monotonic()
        self.start = done

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.t_line >= self.every:
            self._line()

    def _line(self) -> None:
        self.t_line = now = time.monotonic()
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%), "
              f"{rate:.2f} step/s{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.n > self.start:
            self._line()


def _progress(cfg: TrainConfig, info: DistInfo, total: int, epoch: int, done: int):
    """The epoch's progress: tqdm's redrawn bar on a terminal, plain timed lines otherwise."""
    from tqdm import tqdm

    desc = f"epoch {epoch + 1}/{cfg.optim.epochs}"
    enabled = cfg.run.progress and info.is_main
    if enabled and not _is_terminal(sys.stderr):  # tqdm draws on stderr
        return _PlainProgress(desc, total, done, cfg.run.progress_every)
    return tqdm(total=total, initial=done, desc=desc, unit="step", disable=not enabled, leave=False,
                dynamic_ncols=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


__all__ = ["train", "TrainStep", "build_model", "TrainingInterrupted", "NonFiniteLoss", "Settings", "resolve_settings", "format_table",
           "lr_factor", "build_optimizer", "load_datasets"]
