"""The training engine on the CPU: config errors, a short run, resume after kill -9, damaged
checkpoints, a 2-process gloo DDP run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from c2f_fast import checkpoint as ckpt
from c2f_fast.cli import main
from c2f_fast.config import ConfigError, load_config
from c2f_fast.data import make_synthetic
from c2f_fast.train import lr_factor, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth") / "set", n_train=96, n_test=40, image_size=32)


def small_overrides(root, out, **extra):
    values = {
        "model.variant": "lstm_lg", "model.backbone": "tiny", "model.image_size": 32, "model.steps": 3,
        "model.hidden": 32, "model.embed": 16, "model.attn": 32,
        "data.format": "voc", "data.root": str(root), "data.train_split": "train", "data.test_split": "test",
        "data.batch_size": 16, "data.loader": "torch", "data.workers": 0, "data.crop_scale": "[0.8, 1.0]",
        "optim.lr": 3e-3, "optim.backbone_lr_mult": 1.0, "optim.epochs": 2, "optim.warmup_epochs": 0,
        "run.out": str(out), "run.progress": "false", "run.log_every": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("optimm.lr=1", "optimm.lr: unknown section"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("optim.lr=-1", "optim.lr: expected a value > 0"),
    ("data.batch_size=2.5", "data.batch_size: expected an integer"),
    ("data.loader=gpu", "data.loader: expected one of"),
    ("model.variant=big", "model.variant"),
    ("run.compile=maybe", "run.compile: expected true or false"),
    ("lr=1", "expected SECTION.KEY"),
    ("optim.lr", "expected SECTION.KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_yaml_config_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  warmup: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.warmup: unknown key"):
        load_config(bad)
    bad.write_text("optim: [1, 2]\n")
    with pytest.raises(ConfigError, match="optim: expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic_small.yaml", ["optim.lr=1e-4", "data.crop_scale=[0.5, 1]"])
    assert cfg.optim.lr == 1e-4 and cfg.data.crop_scale == (0.5, 1.0)
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_cli_reports_bad_flags_and_missing_paths(tmp_path, capsys):
    assert main(["train", "optim.nope=1"]) == 2
    assert "optim.nope: unknown key" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", f"data.format=voc", f"data.root={tmp_path / 'nowhere'}", f"run.out={tmp_path / 'r'}",
                 "run.progress=false"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "norun")]) == 2
    assert "norun" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bogus-flag"])
    assert exc.value.code == 2


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "constant", 0.1) == 1.0


# ----------------------------------------------------------------------------- a run
def test_short_run_lowers_the_loss_and_writes_its_outputs(synth_root, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, small_overrides(synth_root, out, **{"optim.epochs": 4}))
    summary = train(cfg)
    steps = [r for r in read_log(out) if r["kind"] == "step"]
    epochs = [r for r in read_log(out) if r["kind"] == "epoch"]
    assert summary["steps"] == 4 * (96 // 16) == steps[-1]["step"]
    assert len(epochs) == 4 and all("mAP" in e["eval"] for e in epochs)
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first, (first, last)
    assert summary["final"]["num_images"] == 40 and summary["final"]["duplicates"] == 0
    for name in ("config.yaml", "checkpoint.pt", "best.safetensors", "model.safetensors", "model.json",
                 "metrics.json", "log.jsonl"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_names"] and sorted(meta["class_order"]) == list(range(len(meta["class_names"])))
    # the saved config reproduces the run's config
    assert load_config(out / "config.yaml") == cfg
    # the weights load back into a model that gives the run's final metrics
    model, _ = ckpt.load_model(out, which="final")
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_free_running_feed_trains(synth_root, tmp_path):
    cfg = load_config(None, small_overrides(synth_root, tmp_path / "fr", **{"optim.feed": "greedy", "optim.epochs": 1}))
    summary = train(cfg)
    assert summary["steps"] == 96 // 16
    assert all(r["loss"] == r["loss"] for r in read_log(tmp_path / "fr") if r["kind"] == "step")  # finite


def test_nonfinite_losses_stop_the_run_with_a_checkpoint(synth_root, tmp_path):
    from c2f_fast.train import NonFiniteLoss

    cfg = load_config(None, small_overrides(synth_root, tmp_path / "nan", **{"optim.lr": 1e30, "optim.grad_clip": 0,
                                                                              "run.max_nonfinite": 2}))
    with pytest.warns(RuntimeWarning, match="non-finite loss"), pytest.raises(NonFiniteLoss, match="in a row"):
        train(cfg)
    assert (tmp_path / "nan" / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------- checkpoints
def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "c2f_fast.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _checkpoint_step(path):
    try:
        return torch.load(path, weights_only=True)["run_state"]["step"]
    except Exception:
        return -1


def test_kill_9_then_resume_ends_with_the_same_number_of_steps(synth_root, tmp_path):
    out = tmp_path / "killed"
    args = ["train", *small_overrides(synth_root, out, **{"optim.epochs": 3, "run.checkpoint_every": 2})]
    proc = _cli(*args)
    try:
        _wait_for(lambda: _checkpoint_step(out / "checkpoint.pt") >= 8, proc)  # inside epoch 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    killed_at = _checkpoint_step(out / "checkpoint.pt")
    assert 8 <= killed_at < 18
    resumed = _cli("train", "--resume", str(out))
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text
    assert f"step {killed_at} of 18" in text
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 3 * (96 // 16)
    steps = [r["step"] for r in read_log(out) if r["kind"] == "step"]
    assert steps[-1] == 18 and set(range(killed_at + 1, 19)) <= set(steps)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synth_root, tmp_path):
    out = tmp_path / "term"
    proc = _cli("train", *small_overrides(synth_root, out, **{"optim.epochs": 20}))
    try:
        _wait_for(lambda: any(r["kind"] == "step" for r in read_log(out)) if (out / "log.jsonl").exists() else False,
                  proc)
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM" in text and "--resume" in text
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["tag"] == "signal" and state["run_state"]["step"] >= 1


def test_damaged_checkpoint_gives_a_clear_error_and_keeps_the_previous(synth_root, tmp_path, capsys):
    out = tmp_path / "damaged"
    train(load_config(None, small_overrides(synth_root, out, **{"optim.epochs": 1, "run.checkpoint_every": 2})))
    assert (out / "checkpoint.prev.pt").is_file()
    good = ckpt.load_checkpoint(out / "checkpoint.prev.pt")
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.pt: not a readable checkpoint.*checkpoint\.prev\.pt"):
        ckpt.load_checkpoint(out)
    assert main(["train", "--resume", str(out)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    (out / "checkpoint.pt").write_bytes(b"garbage" * 100)
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(out / "checkpoint.pt")
    assert ckpt.load_checkpoint(out / "checkpoint.prev.pt")["run_state"] == good["run_state"]


@pytest.mark.parametrize("links", [True, False], ids=["hard_link", "copy"])
def test_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, links):
    if not links:  # a file system without hard links: the previous one is copied instead
        def no_link(*args):
            raise OSError("hard links not supported")

        monkeypatch.setattr(os, "link", no_link)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, {"run_state": {"step": step}})
    assert ckpt.load_checkpoint(tmp_path)["run_state"] == {"step": 3}
    assert ckpt.load_checkpoint(tmp_path / ckpt.PREVIOUS)["run_state"] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.CHECKPOINT, ckpt.PREVIOUS])  # no leftovers
    (tmp_path / ckpt.CHECKPOINT).write_bytes(b"damaged in place")  # the previous one shares nothing
    assert ckpt.load_checkpoint(tmp_path / ckpt.PREVIOUS)["run_state"] == {"step": 2}


def test_checkpoint_loading_refuses_pickled_objects(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"  # an arbitrary class in the pickle: weights_only must refuse to build it
    torch.save({"format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "x": argparse.Namespace(a=1)}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.load_checkpoint(path)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ----------------------------------------------------------------------------- eval
def test_eval_command_on_a_run(synth_root, tmp_path, capsys):
    out = tmp_path / "ev"
    summary = train(load_config(None, small_overrides(synth_root, out, **{"optim.epochs": 1})))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--weights", "final", "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "mAP" in text
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 40
    assert metrics["mAP"] == pytest.approx(summary["final"]["mAP"], abs=1e-6)
    # a training checkpoint carries its config and the final weights
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)


# ----------------------------------------------------------------------------- DDP
def test_two_process_gloo_ddp_evaluates_every_image_once(synth_root, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # 40 test images over 2 ranks at eval batch 16: shards of 20, the last batch of each padded
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "c2f_fast.cli", "train", *small_overrides(synth_root, out, **{"optim.epochs": 1, "data.batch_size": 8,
                                                                             "data.eval_batch_size": 16})]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["final"]["num_images"] == 40 and summary["final"]["duplicates"] == 0
    # 96 images, 2 shards of 48, batch 8 per rank: 6 steps
    assert summary["steps"] == 6


def test_default_dali_loader_runs_the_engine(synth_root, tmp_path):
    """The engine's default loader (DALI, CPU operators here) through one short epoch."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    out = tmp_path / "dali"
    summary = train(load_config(None, small_overrides(synth_root, out, **{"data.loader": "dali", "data.workers": 2,
                                                                         "optim.epochs": 1})))
    assert summary["steps"] == 96 // 16
    assert summary["final"]["num_images"] == 40 and summary["final"]["duplicates"] == 0


def test_list_file_data_and_a_frozen_encoder(synth_root, tmp_path):
    """data.format=list (the test list may lack a class: the training list's classes are used) and
    optim.freeze_encoder=true (the encoder's weights do not move, the decoder's do)."""
    from c2f_fast.data import load_voc

    for split in ("train", "test"):
        ds = load_voc(synth_root, split=split)
        lines = [",".join([Path(p).name] + [ds.class_names[c] for c in range(ds.num_classes) if ds.targets[i, c] == 1])
                 for i, p in enumerate(ds.image_paths)]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "frozen"
    cfg = load_config(None, small_overrides(synth_root, out, **{
        "data.format": "list", "data.root": str(synth_root / "JPEGImages"), "data.train_split": str(tmp_path / "train.txt"),
        "data.test_split": str(tmp_path / "test.txt"), "optim.freeze_encoder": "true", "optim.epochs": 2}))
    summary = train(cfg)
    assert summary["final"]["num_images"] == 40
    # the end of epoch 1 (kept as checkpoint.prev.pt) against the end of epoch 2
    before = torch.load(out / "checkpoint.prev.pt", weights_only=True)
    after = torch.load(out / "checkpoint.pt", weights_only=True)
    assert before["run_state"]["step"] < after["run_state"]["step"]
    moved = {k for k, v in after["model"].items() if v.is_floating_point() and not torch.equal(v, before["model"][k])}
    assert any(k.startswith("lstm.") for k in moved)
    assert not any(k.startswith("encoder.") for k in moved), sorted(moved)
