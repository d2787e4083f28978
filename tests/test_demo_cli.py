"""c2f demo, c2f visualize and c2f ablate end to end on a tiny set (the real budgets are minutes)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from c2f_fast.ablate import COLUMNS, ablation_markdown, run_ablation
from c2f_fast.cli import main
from c2f_fast.data import make_synthetic
from c2f_fast.demo import run_demo, summary_text
from c2f_fast.visualize import CELL_H, CELL_W

TINY = ["model.image_size=32", "model.hidden=32", "model.embed=16", "model.attn=32", "model.steps=3",
        "data.format=voc", "data.loader=torch", "data.workers=0", "data.batch_size=16", "optim.epochs=1",
        "run.progress=false"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("set") / "s", preset="demo", n_train=64, n_test=16, image_size=32)


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "runs/demo" in capsys.readouterr().out


def test_demo_runs_through_the_engine_and_writes_its_figures(tiny_set, tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, [f"data.root={tiny_set}", *TINY], figure_images=2)
    for name in ("metrics.json", "curves.png", "attention.png", "best.safetensors", "model.json", "log.jsonl"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 64 // 16
    assert 0 <= summary["final"]["mAP"] <= 1
    assert summary["final"]["pointing_local"] is not None  # the set has boxes
    text = summary_text(summary)
    assert "test mAP" in text and str(out / "attention.png") in text
    # a second demo replaces the first run instead of refusing its checkpoint
    run_demo(out, [f"data.root={tiny_set}", *TINY], figure_images=1)
    with Image.open(out / "attention.png") as im:
        assert im.size[1] == CELL_H  # one image row


def test_demo_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a c2f run"):
        run_demo(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_visualize_writes_a_png_of_the_expected_size(tiny_set, tmp_path, capsys):
    run = tmp_path / "run"
    run_demo(run, [f"data.root={tiny_set}", *TINY], figure_images=1)
    images = [str(tiny_set / "JPEGImages" / f"test_00000{i}.jpg") for i in range(3)]
    out = tmp_path / "fig.png"
    assert main(["visualize", "--checkpoint", str(run), *images, "--out", str(out)]) == 0
    with Image.open(out) as im:
        # columns: the image, the global attention, one per decoder step (3)
        assert im.size == (CELL_W * (2 + 3), CELL_H * 3)
    assert main(["visualize", "--checkpoint", str(run), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def test_ablation_table_has_the_paper_columns(tiny_set, tmp_path):
    rows = run_ablation(None, [f"data.root={tiny_set}", *TINY, f"run.out={tmp_path / 'abl'}"], rows=["vgg", "lstm_lg_mm"])
    assert [r["method"] for r in rows] == ["VGG", "VGG+LSTM+L/G+MM"]
    table = (tmp_path / "abl" / "ablation.md").read_text()
    for name, _, _ in COLUMNS:
        assert name in table
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())[1]["metrics"]["mAP"] == rows[1]["metrics"]["mAP"]
    # a finished row is reused, not retrained
    again = run_ablation(None, [f"data.root={tiny_set}", *TINY, f"run.out={tmp_path / 'abl'}"], rows=["vgg"])
    assert again[0]["metrics"] == rows[0]["metrics"]
    # VGG has no attention: its pointing cells are empty, the MM row's are numbers
    line_vgg, line_mm = [l for l in ablation_markdown(rows).splitlines() if l.startswith("| VGG")]
    assert "—" in line_vgg.split("|")[-3] and "—" not in line_mm.split("|")[-3]


def test_demo_aligned_trains_the_aligned_options(tiny_set, tmp_path):
    import yaml

    out = tmp_path / "aligned"
    summary = run_demo(out, [f"data.root={tiny_set}", *TINY], figure_images=1, aligned=True)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["glimpse_head"] and saved["model"]["query_token"] and saved["model"]["glimpse_in_prediction"]
    assert saved["optim"]["lambda3"] == 1.0 and saved["optim"]["lambda2"] == 0.5
    assert saved["run"]["out"] == str(out)  # --out wins over the aligned default folder
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("glimpse" in r for r in steps if r.get("kind") == "step")  # the loss term is logged
    assert summary["final"]["pointing_local"] is not None


def test_visualize_outlines_the_emitted_class_box(tiny_set, tmp_path):
    import numpy as np
    import torch

    from c2f_fast.checkpoint import load_model
    from c2f_fast.visualize import attention_figure, boxes_from_run

    run = tmp_path / "run"
    run_demo(run, [f"data.root={tiny_set}", *TINY], figure_images=1)
    images = [str(tiny_set / "JPEGImages" / f"test_00000{i}.jpg") for i in range(2)]
    boxes = boxes_from_run(run, images + [str(tmp_path / "elsewhere.jpg")])
    assert boxes is not None and all(boxes[:2]) and boxes[2] == []
    assert boxes_from_run(tmp_path, images) is None  # not a run folder
    model, meta = load_model(run)
    # a model that emits class c at step 1 whatever it sees: the panel must show c's box
    c = boxes[0][0][0]
    with torch.no_grad():
        model.predict.weight.zero_()
        model.predict.bias.fill_(-5.0)
        model.predict.bias[c] = 5.0
    plain = attention_figure(model, images[:1], meta["class_names"], tmp_path / "plain.png")
    boxed = attention_figure(model, images[:1], meta["class_names"], tmp_path / "boxed.png", boxes=boxes[:1])
    with Image.open(plain) as a, Image.open(boxed) as b:
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).sum(axis=2) > 0
    # only the first step's panel (column 2: after the image and the global map) changes
    cols = np.nonzero(diff.any(axis=0))[0]
    assert len(cols) and cols.min() >= 2 * CELL_W and cols.max() < 3 * CELL_W
    with pytest.raises(ValueError, match="boxes: expected one list per image"):
        attention_figure(model, images[:1], meta["class_names"], tmp_path / "x.png", boxes=boxes)
