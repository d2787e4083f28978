"""Evaluation over a loader: greedy decoding, the full metric set, the pointing game.

Every test image counts exactly once: each process evaluates its shard of the test set (the
loaders partition it), the outputs are gathered from all processes and de-duplicated by dataset
index. The last batch of a shard is padded to the full batch size (and the padding dropped), so a
compiled model sees one batch shape and never recompiles mid-run.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from .distributed import DistInfo, all_gather_objects
from .metrics import multilabel_metrics


@dataclass
class EvalOutput:
    """The gathered predictions: ``scores`` [N, C] (p-hat), ``targets`` [N, C], ``indices`` [N],
    all on the CPU, sorted by dataset index, each index once."""

    scores: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    duplicates: int = 0  # rows seen more than once across processes (dropped); 0 when shards are right


def pad_batch(images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """``images`` padded with zeros to ``batch_size`` rows; returns it and the real row count.
    A tuple (a feature cache's ``(a, f_fc)``) has each of its tensors padded."""
    if isinstance(images, tuple):
        padded = tuple(pad_batch(t, batch_size)[0] for t in images)
        return padded, images[0].shape[0]
    n = images.shape[0]
    if n >= batch_size:
        return images, n
    pad = images.new_zeros((batch_size - n, *images.shape[1:]))
    return torch.cat([images, pad]), n


@torch.no_grad()
def run_eval(
    model: torch.nn.Module,
    loader,
    info: DistInfo,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
    on_batch: Optional[Callable[[Any, torch.Tensor, torch.Tensor], None]] = None,
) -> EvalOutput:
    """Greedy-decode every image of ``loader`` on this process, then gather from all processes.

    ``on_batch(output, indices, targets)`` (e.g. the pointing game) sees each batch's model output,
    padding removed, on this process only.
    """
    was_training = model.training
    model.eval()
    scores, targets, indices = [], [], []
    try:
        for images, batch_targets, batch_indices in loader:
            images, n = pad_batch(images, batch_size)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = model(images)
            out = type(out)(*(None if t is None else t[:n].float() for t in out))
            if on_batch is not None:
                on_batch(out, batch_indices, batch_targets)
            scores.append(out.scores.cpu())
            targets.append(batch_targets.cpu())
            indices.append(batch_indices.cpu())
    finally:
        model.train(was_training)
    local = (
        torch.cat(scores) if scores else torch.empty(0),
        torch.cat(targets) if targets else torch.empty(0, dtype=torch.int8),
        torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
    )
    parts = all_gather_objects(info, local)
    all_scores = torch.cat([p[0] for p in parts if p[0].numel()])
    all_targets = torch.cat([p[1] for p in parts if p[1].numel()])
    all_indices = torch.cat([p[2] for p in parts if p[2].numel()])
    # one row per dataset index (shards are disjoint; this also guards against any overlap)
    uniq, first = np.unique(all_indices.numpy(), return_index=True)
    keep = torch.from_numpy(first)
    return EvalOutput(all_scores[keep], all_targets[keep], torch.from_numpy(uniq),
                      duplicates=int(all_indices.numel() - uniq.size))


class DatasetPointing:
    """The pointing game over a data set's test images, for :func:`evaluate`: each batch's output
    is scored against the images' boxes (scaled from their original sizes to the input size), and
    the counts of all processes are summed at the end."""

    def __init__(self, dataset, image_size: int):
        from .pointing import original_sizes

        self.dataset, self.image_size = dataset, image_size
        self.sizes = original_sizes(dataset.image_paths)  # headers only, once
        self.reset()

    def reset(self) -> None:
        from .pointing import PointingGame

        self.game = PointingGame(self.dataset.num_classes, self.image_size,
                                 class_names=list(self.dataset.class_names))

    def update(self, out, indices: torch.Tensor, targets: torch.Tensor) -> None:
        idx = indices.cpu().tolist()
        self.game.update(out.step_logits, out.local_attn, out.global_attn,
                         [self.dataset.boxes[i] for i in idx], [self.sizes[i] for i in idx], targets.cpu())

    def result(self, info: DistInfo):
        games = all_gather_objects(info, self.game)
        total = games[0]
        for other in games[1:]:
            total.merge(other)
        return total.result()


def pointing_for(dataset, image_size: int) -> Optional[DatasetPointing]:
    """A pointing-game accumulator when the data set has boxes, else None."""
    return DatasetPointing(dataset, image_size) if any(dataset.boxes) else None


def evaluate(
    model: torch.nn.Module,
    loader,
    info: DistInfo,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
    pointing=None,
) -> dict[str, Any]:
    """The full metric set (see :func:`c2f_fast.metrics.multilabel_metrics`) on the test loader,
    plus ``pointing_local`` / ``pointing_global`` / ``pointing_local_any`` / ``pointing_local_chance``
    (and the details under ``"pointing"``) when a pointing-game accumulator is given, and
    ``num_images`` / ``seconds``."""
    t0 = time.perf_counter()
    on_batch = pointing.update if pointing is not None else None
    out = run_eval(model, loader, info, batch_size, autocast, channels_last, on_batch)
    metrics = {k: v.item() if isinstance(v, torch.Tensor) else v
               for k, v in multilabel_metrics(out.scores, out.targets).items()}
    metrics["num_images"] = int(out.indices.numel())
    metrics["duplicates"] = out.duplicates
    if pointing is not None:
        result = pointing.result(info).to_dict()
        # the rates, and the reference figures for reading the local one (docs/metrics_conventions.md)
        for key in ("local", "global", "local_any", "local_chance"):
            metrics[f"pointing_{key}"] = result[key]
        metrics["pointing"] = result
    metrics["seconds"] = time.perf_counter() - t0
    return metrics


__all__ = ["DatasetPointing", "EvalOutput", "evaluate", "evaluate_checkpoint", "pad_batch", "pointing_for", "run_eval"]


def evaluate_checkpoint(path, overrides=(), which: str = "best") -> dict[str, Any]:
    """``c2f eval``: the metrics of what training wrote at ``path`` on the test split of the run's
    data config (``config.yaml`` beside the weights) with dotted ``overrides`` applied."""
    from pathlib import Path

    from .checkpoint import load_checkpoint, load_model, model_from_state, resolve_weights
    from .config import load_config
    from .distributed import init_distributed, shutdown
    from .runtime import CONFIG_FILE, build_loaders, load_datasets, resolve_settings

    weights, meta_path = resolve_weights(path, which)
    state = None
    if meta_path is None:  # a training checkpoint carries its config (read once, used twice)
        state = load_checkpoint(weights)
        cfg = load_config(state["config"], list(overrides))
    else:
        config_file = weights.parent / CONFIG_FILE
        cfg = load_config(config_file if config_file.is_file() else None, list(overrides))
    info = init_distributed(cfg.run.device)
    try:
        settings = resolve_settings(cfg, info.device)
        if state is not None:
            meta = state["meta"]
            model = model_from_state(meta, state["model"], weights, settings.fast_kernels)
        else:
            model, meta = load_model(path, which=which, fast_kernels=settings.fast_kernels)
        model = model.to(settings.device)
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if info.is_main:
            print(f"settings: {settings.describe()}", file=sys.stderr, flush=True)
        _, test_set = load_datasets(cfg, info, train=False)
        if list(test_set.class_names) != list(meta["class_names"]):
            raise ValueError(f"{Path(path)}: the model's {len(meta['class_names'])} classes differ from the "
                             f"data's {len(test_set.class_names)} ({cfg.data.root})")
        cfg.model.image_size = meta["model"]["image_size"]
        _, test_loader = build_loaders(cfg, None, test_set, info, settings)
        pointing = pointing_for(test_set, model.cfg.image_size)
        batch = cfg.data.eval_batch_size or cfg.data.batch_size
        return evaluate(model, test_loader, info, batch, settings.autocast, settings.channels_last, pointing)
    finally:
        shutdown(info)
