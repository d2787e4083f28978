"""``c2f demo``: the built-in set learned in minutes on a CPU, through the training engine.

It builds the ``demo`` synthetic set once (cached, see :func:`c2f_fast.config.cache_dir`), trains
the full model (``lstm_lg`` with the joint max-margin loss) on the ``tiny`` backbone, evaluates it
every epoch (metrics and the pointing game), then writes the attention figure of a few test
images. Everything lands in ``runs/demo/``. On a GPU the same command uses the GPU.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from .config import load_config

#: The demo run. The data settings are those the ``demo`` preset was calibrated with.
DEMO_CONFIG = {
    "model": {"variant": "lstm_lg", "backbone": "tiny", "image_size": 128, "steps": 5,
              "hidden": 256, "embed": 64, "attn": 128},
    # flips only: a random crop can cut a small object away and leave its label wrong
    "data": {"format": "synthetic", "preset": "demo", "batch_size": 32, "workers": 2,
             "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0]},
    "optim": {"optimizer": "adamw", "lr": 2e-3, "backbone_lr_mult": 1.0, "weight_decay": 1e-4,
              "epochs": 8, "warmup_epochs": 0.8, "min_lr_ratio": 0.0,
              "lambda1": 0.05, "lambda2": 0.05, "feed": "teacher"},
    "run": {"out": "runs/demo", "log_every": 5},
}

#: ``c2f demo --aligned``: the demo with the decoder options that make each step's local attention
#: look at the class the step emits (docs/model.md, "Aligned local attention"): glimpse supervision
#: (weight 1), the fed token in the attention query, the glimpse's class logits added to the step's
#: prediction, and a vertical margin of 0.5 instead of 0.05 (the measured best). Its own run folder.
ALIGNED_OVERRIDES = ["model.glimpse_head=true", "model.query_token=true", "model.glimpse_in_prediction=true",
                     "optim.lambda3=1.0", "optim.lambda2=0.5", "run.out=runs/demo-aligned"]

ATTENTION_FILE = "attention.png"
NUM_FIGURE_IMAGES = 4


def run_demo(out: Optional[str | Path] = None, overrides: list[str] = (), figure_images: int = NUM_FIGURE_IMAGES,
             aligned: bool = False) -> dict:
    """Train and evaluate the demo; returns the training summary plus ``wall_seconds`` and the
    paths written. A previous demo run in ``out`` is replaced (a folder that is not a run is
    refused). ``aligned``: with ``ALIGNED_OVERRIDES`` (before ``overrides``, which win)."""
    from .runtime import CONFIG_FILE
    from .train import train

    t0 = time.perf_counter()
    cfg = load_config(DEMO_CONFIG, [*(ALIGNED_OVERRIDES if aligned else []),
                                    *([f"run.out={out}"] if out is not None else []), *overrides])
    run_dir = Path(cfg.run.out)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileExistsError(f"{run_dir}: not empty and not a c2f run; choose another --out")
        shutil.rmtree(run_dir)
    summary = train(cfg)
    figure = write_attention_figure(run_dir, figure_images)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["attention_figure"] = str(figure) if figure else None
    return summary


def write_attention_figure(run_dir: Path, num_images: int) -> Optional[Path]:
    """Fig. 3 for the first ``num_images`` test images of the run, with its best weights."""
    import torch

    from .checkpoint import load_model
    from .distributed import DistInfo
    from .runtime import CONFIG_FILE, load_datasets
    from .visualize import attention_figure

    cfg = load_config(run_dir / CONFIG_FILE)
    model, meta = load_model(run_dir)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    _, test_set = load_datasets(cfg, info, train=False)
    paths = test_set.image_paths[:num_images]
    out = run_dir / ATTENTION_FILE
    boxes = test_set.boxes[:num_images] if any(test_set.boxes[:num_images]) else None
    attention_figure(model, paths, meta["class_names"], out, boxes=boxes)
    return out


def summary_text(summary: dict) -> str:
    final = summary["final"]
    lines = [
        f"c2f demo finished in {summary['wall_seconds'] / 60:.1f} min "
        f"({summary['epochs']} epochs, {summary['steps']} steps)",
        f"  test mAP       {final.get('mAP', float('nan')):.4f}   (best {summary['best_mAP']:.4f} at epoch {summary['best_epoch']})",
    ]
    if final.get("pointing_local") is not None:
        lines.append(f"  pointing game  {final['pointing_local']:.3f} local attention, "
                     f"{final.get('pointing_global') or float('nan'):.3f} global attention")
        if final.get("pointing_local_any") is not None:
            lines.append(f"                 local peak on some present object {final['pointing_local_any']:.3f}; "
                         f"a random present class would score {final['pointing_local_chance']:.3f}")
    lines.append(f"  CF1 {final.get('CF1', float('nan')):.4f}   OF1 {final.get('OF1', float('nan')):.4f}")
    run = Path(summary["run"])
    lines.append("wrote:")
    for name in ("metrics.json", "curves.png", ATTENTION_FILE, "log.jsonl", "best.safetensors", "model.json"):
        if (run / name).exists():
            lines.append(f"  {run / name}")
    lines.append(f"next: c2f predict --checkpoint {run} IMAGE.jpg   |   c2f eval --checkpoint {run}")
    return "\n".join(lines)


__all__ = ["ALIGNED_OVERRIDES", "DEMO_CONFIG", "run_demo", "summary_text", "write_attention_figure"]
