"""Figures: the attention figure and the training curves are PNGs of the predictable size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2f_fast.model import C2FNet, ModelConfig
from c2f_fast.visualize import CELL_H, CELL_W, CURVES_SIZE, attention_figure, training_curves, upsample_attention

SMALL = dict(backbone="tiny", num_classes=4, steps=3, hidden=16, embed=8, attn=12, image_size=48)
NAMES = ["red_circle", "green_square", "blue_triangle", "yellow_cross"]


def _images(tmp_path: Path) -> list:
    rng = np.random.default_rng(0)
    path = tmp_path / "a.jpg"
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    return [str(path), torch.from_numpy(rng.integers(0, 256, (3, 50, 40), dtype=np.uint8))]


@pytest.mark.parametrize("variant,ncols", [("lstm_lg", 1 + 1 + 3), ("lstm_l", 1 + 3), ("lstm", 1), ("vgg", 1)])
def test_attention_figure_size(tmp_path: Path, variant: str, ncols: int) -> None:
    torch.manual_seed(0)
    model = C2FNet(ModelConfig(variant=variant, **SMALL))
    model.train()
    out = attention_figure(model, _images(tmp_path), NAMES, tmp_path / "fig" / "attn.png")
    assert out == tmp_path / "fig" / "attn.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (CELL_W * ncols, CELL_H * 2)
    assert model.training  # mode restored


def test_attention_figure_checks(tmp_path: Path) -> None:
    model = C2FNet(ModelConfig(variant="lstm_lg", **SMALL))
    with pytest.raises(ValueError, match="class_names"):
        attention_figure(model, _images(tmp_path), NAMES[:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        attention_figure(model, [torch.zeros(3, 8, 8)], NAMES, tmp_path / "x.png")
    # another input size than the model's config
    out = attention_figure(model, _images(tmp_path)[:1], NAMES, tmp_path / "y.png", image_size=64)
    with Image.open(out) as im:
        assert im.size == (CELL_W * 5, CELL_H)


def test_upsample_attention_peaks_where_the_map_does() -> None:
    a = torch.zeros(2, 16)
    a[0, 5] = 1.0  # cell (1, 1) of 4x4
    a[1, 15] = 1.0  # cell (3, 3)
    up = upsample_attention(a, 32)
    assert up.shape == (2, 32, 32) and up.min() >= 0 and np.isclose(up.max(), 1.0)
    i, j = np.unravel_index(up[0].argmax(), (32, 32))
    assert 8 <= i < 16 and 8 <= j < 16
    i, j = np.unravel_index(up[1].argmax(), (32, 32))
    assert i >= 24 and j >= 24


def _records() -> list[dict]:
    recs = []
    for epoch in range(1, 4):
        for k in range(10):
            step = (epoch - 1) * 10 + k + 1
            recs.append({"kind": "step", "epoch": epoch, "step": step, "loss": 6.0 / step + 0.1 * (k % 3),
                         "bce": 5.0 / step, "r1": 0.1, "r2": 0.2, "lr": 1e-3 * (1 - step / 40),
                         "images_per_s": 100.0, "data_wait": 0.01})
        ev = {"mAP": 0.3 * epoch, "CF1": 0.2, "OF1": 0.25, "pointing_local": 0.2 * epoch,
              "pointing_global": None if epoch == 1 else 0.25 * epoch}
        recs.append({"kind": "epoch", "epoch": epoch, "step": epoch * 10, "train_loss": 1.0 / epoch,
                     "seconds": 1.5, "eval": ev})
    return recs


def test_training_curves_from_list_and_file(tmp_path: Path) -> None:
    recs = _records()
    out = training_curves(recs, tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == CURVES_SIZE
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"kind\": \"step\", \"ste", encoding="utf-8")  # torn tail
    out2 = training_curves(path, tmp_path / "sub" / "curves2.png")
    with Image.open(out2) as im:
        assert im.size == CURVES_SIZE
    # early in a run: steps only, no evaluation; and an empty record list
    training_curves([r for r in recs if r["kind"] == "step"][:3], tmp_path / "early.png")
    training_curves([], tmp_path / "empty.png")
    assert (tmp_path / "early.png").is_file() and (tmp_path / "empty.png").is_file()
