"""``c2f train`` on a machine without the optional packages (nvidia.dali, defusedxml, pycocotools),
as on a bare GPU image: each blocked in a fresh interpreter (``sys.modules[name] = None`` makes its
import raise ImportError), then the CLI runs.

- The synthetic set trains with the default loader (``auto``), which says which loader it chose.
- Reading VOC XML without defusedxml (other than the synthetic set's own), or COCO JSON without
  pycocotools, stops with an error naming the package; nothing else needs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("nvidia.dali", "defusedxml", "defusedxml.ElementTree", "pycocotools", "pycocotools.coco")

# A fresh interpreter without the optional packages. The synthetic preset is shrunk to a few dozen
# 32-px images (the engine writes the preset's set on first use; the real one has 2,500).
_RUNNER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
from c2f_fast.data import synthetic
synthetic.PRESETS["hard"].update(n_train=48, n_test=16, image_size=32)
from c2f_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""

TINY = ["model.variant=lstm_lg", "model.backbone=tiny", "model.image_size=32", "model.steps=3",
        "model.hidden=16", "model.embed=8", "model.attn=16", "data.batch_size=16", "data.preset=hard",
        "optim.epochs=1", "optim.warmup_epochs=0", "run.progress=false"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    code = _RUNNER.format(blocked=BLOCKED)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_synthetic_set_trains_without_the_optional_packages(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "run"
    proc = _cli("train", *TINY, f"run.device={device}", "run.compile=false", "data.format=synthetic",
                f"data.root={tmp_path / 'synth'}", f"run.out={out}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    expected = {"cpu": "loader: torch (auto: nvidia.dali not importable, " + ("CPU device" if torch.cuda.is_available() else "no CUDA"),
                "cuda": "loader: nvjpeg (auto: nvidia.dali not importable; CUDA: torchvision's nvJPEG decoding"}[device]
    assert expected in text, text
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 48 // 16 and summary["final"]["num_images"] == 16


def test_voc_and_coco_data_name_the_missing_package(tmp_path):
    synth = tmp_path / "synth"
    from c2f_fast.data import make_synthetic

    make_synthetic(synth, preset="hard", n_train=8, n_test=4, image_size=32)
    (synth / "synthetic.json").unlink()  # now just a VOC folder: its XML is foreign
    proc = _cli("train", *TINY, "run.device=cpu", "data.format=voc", f"data.root={synth}", f"run.out={tmp_path / 'voc'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "reading VOC annotation XML needs the package defusedxml" in proc.stderr
    assert "pip install defusedxml" in proc.stderr and "Traceback" not in proc.stderr

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train2014", "val2014"):
        (coco / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    proc = _cli("train", *TINY, "run.device=cpu", "data.format=coco", f"data.root={coco}", "data.train_split=train2014",
                "data.test_split=val2014", f"run.out={tmp_path / 'coco_run'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "reading COCO annotation JSON needs the package pycocotools" in proc.stderr

