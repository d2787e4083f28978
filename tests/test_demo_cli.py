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
