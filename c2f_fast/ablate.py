"""``c2f ablate``: the rows of the paper's Table II trained under one budget, one table.

Rows: VGG (fc7 → linear), VGG+LSTM, VGG+LSTM+L, VGG+LSTM+L/G (all with the plain BCE), and
VGG+LSTM+L/G+MM (with the joint max-margin loss). Each row is a normal ``c2f train`` run in
``OUT/<row>/`` from the same config, with only the variant and the loss weights changed. The
table has the paper's columns (top-3/top-5 P, R, F1, Hamming loss, example accuracy, one-error,
coverage, ranking loss, mAP) plus the pointing game, and is written as JSON and Markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .checkpoint import CHECKPOINT
from .config import load_config
from .runtime import METRICS_FILE
from .train import train

#: (row name, folder, overrides): the rows of Table II.
ROWS = (
    ("VGG", "vgg", {"model.variant": "vgg", "optim.lambda1": 0, "optim.lambda2": 0}),
    ("VGG+LSTM", "lstm", {"model.variant": "lstm", "optim.lambda1": 0, "optim.lambda2": 0}),
    ("VGG+LSTM+L", "lstm_l", {"model.variant": "lstm_l", "optim.lambda1": 0, "optim.lambda2": 0}),
    ("VGG+LSTM+L/G", "lstm_lg", {"model.variant": "lstm_lg", "optim.lambda1": 0, "optim.lambda2": 0}),
    ("VGG+LSTM+L/G+MM", "lstm_lg_mm", {"model.variant": "lstm_lg", "optim.lambda1": 0.05, "optim.lambda2": 0.05}),
)

#: Table II's columns (percent where the paper gives percent), then the pointing game.
COLUMNS = (
    ("P@3/5 (%)", ("P@3", "P@5"), 100), ("R@3/5 (%)", ("R@3", "R@5"), 100),
    ("F1@3/5 (%)", ("F1@3", "F1@5"), 100), ("H@3/5", ("H@3", "H@5"), 1),
    ("A@3/5 (%)", ("A@3", "A@5"), 100), ("1-err (%)", ("one_error",), 100), ("C", ("coverage",), 1),
    ("rloss", ("ranking_loss",), 1), ("mAP (%)", ("mAP",), 100), ("point. L/G", ("pointing_local", "pointing_global"), 1),
)

#: The default ablation: the hard synthetic set, the tiny backbone, the demo's optimiser settings;
#: about 5 minutes a row on 2 CPU cores.
DEFAULT_CONFIG = {
    "model": {"backbone": "tiny", "image_size": 128, "steps": 5, "hidden": 256, "embed": 64, "attn": 128},
    "data": {"format": "synthetic", "preset": "hard", "batch_size": 32, "workers": 2,
             "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0]},
    "optim": {"optimizer": "adamw", "lr": 2e-3, "backbone_lr_mult": 1.0, "weight_decay": 1e-4, "epochs": 10,
              "warmup_epochs": 1.0, "min_lr_ratio": 0.0},
    "run": {"out": "runs/ablate", "log_every": 10},
}


def _cell(metrics: dict, keys: tuple[str, ...], scale: float) -> str:
    values = [metrics.get(k) for k in keys]
    if all(v is None for v in values):
        return "—"
    digits = 3 if scale == 1 else 2
    return "/".join("—" if v is None else f"{v * scale:.{digits}f}" for v in values)


def ablation_markdown(rows: list[dict]) -> str:
    head = "| Method | " + " | ".join(name for name, _, _ in COLUMNS) + " | train s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in rows:
        cells = [_cell(row["metrics"], keys, scale) for _, keys, scale in COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    return "\n".join(lines)


def run_ablation(config: Optional[str | Path] = None, overrides: list[str] = (),
                 rows: Optional[list[str]] = None, features: Optional[str | Path] = None) -> list[dict]:
    """Train every row (or those named in ``rows``, by folder name) and write
    ``run.out/ablation.{json,md}``. Returns one dict per row: method, metrics, seconds, run.
    ``features``: every row trains on this feature cache, its encoder frozen (``data.features``)."""
    if features is not None:
        overrides = [*overrides, f"data.features={features}", "optim.freeze_encoder=true"]
    base = load_config(config if config is not None else DEFAULT_CONFIG, overrides)
    out = Path(base.run.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for method, folder, row_overrides in ROWS:
        if rows and folder not in rows:
            continue
        run_dir = out / folder
        if (run_dir / METRICS_FILE).is_file():  # a finished row: reuse it (delete the folder to redo it)
            summary = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
        else:  # a row cut short earlier resumes from its checkpoint
            cfg = load_config(base.to_dict(), [f"{k}={v}" for k, v in row_overrides.items()]
                              + [f"run.out={run_dir}"])
            summary = train(cfg, resume=(run_dir / CHECKPOINT).is_file())
        results.append({"method": method, "run": str(run_dir), "metrics": summary["final"],
                        "seconds": summary.get("seconds", 0.0)})
        (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = ablation_markdown(results)
    (out / "ablation.md").write_text(
        f"# Ablation (Table II layout)\n\nConfig: `{out / 'config.yaml'}`\n\n{table}\n", encoding="utf-8")
    base.save(out / "config.yaml")
    return results


__all__ = ["ROWS", "COLUMNS", "DEFAULT_CONFIG", "ablation_markdown", "run_ablation"]
