"""The feature cache (c2f_fast.features): cache-features, training from it (same losses and
gradients as a frozen-encoder image run), refusals naming the field or file, resuming a cut-short
cache, predict on the result, ablate on one cache, and 2-process gloo DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from c2f_fast import features as feat
from c2f_fast.cli import main
from c2f_fast.config import ConfigError, load_config
from c2f_fast.data import build_loader, make_synthetic
from c2f_fast.distributed import init_distributed
from c2f_fast.encoders import TinyEncoder, build_encoder
from c2f_fast.features import FeatureCacheError, FeatureLoader, FeatureStore, cache_features, weights_digest
from c2f_fast.labels import class_frequency_order, label_sequences
from c2f_fast.losses import c2f_loss
from c2f_fast.runtime import load_datasets, resolve_settings
from c2f_fast.train import TrainStep, build_model, build_optimizer, train

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small synthetic set and a (random, saved) tiny encoder to freeze: ``(root, encoder file)``."""
    base = tmp_path_factory.mktemp("features")
    root = make_synthetic(base / "set", n_train=96, n_test=40, image_size=SIZE)
    torch.manual_seed(123)
    weights = base / "tiny.pt"
    torch.save(TinyEncoder().state_dict(), weights)
    return root, weights


def overrides(root, weights, out="unused", **extra):
    values = {
        "model.variant": "lstm_lg", "model.backbone": "tiny", "model.image_size": SIZE, "model.steps": 3,
        "model.hidden": 32, "model.embed": 16, "model.attn": 32, "model.pretrained": str(weights),
        "data.format": "voc", "data.root": str(root), "data.batch_size": 16, "data.loader": "torch",
        "data.workers": 0, "optim.freeze_encoder": "true", "optim.lr": 3e-3, "optim.epochs": 1,
        "optim.warmup_epochs": 0, "run.out": str(out), "run.progress": "false", "run.log_every": 1,
        # fp32 on every CPU: the equivalence below is stated in fp32 (auto picks bf16 on a bf16 CPU)
        "run.precision": "fp32", "run.channels_last": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def caches(setup, tmp_path_factory):
    """One cache per storage dtype (shards of 32 images: 3 train + 2 test shards)."""
    root, weights = setup
    base = tmp_path_factory.mktemp("caches")
    cfg = load_config(None, overrides(root, weights))
    return {dtype: Path(cache_features(cfg, base / dtype, dtype=dtype, shard_size=32, progress=False)["out"])
            for dtype in ("fp32", "fp16", "bf16")}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cached_steps_match_frozen_encoder_steps_on_images(setup, caches, dtype):
    """With no augmentation (the evaluation view), training steps from the cache give the losses,
    decoder gradients and updated weights of the same steps from images with the encoder frozen.
    fp32: <= 1e-5 relative. 16-bit: the cache differs from the images only by the rounding of
    the stored features, so the image run is given features rounded the same way (fp16/bf16 and
    back); the plain fp32 image run is also compared and its difference stated."""
    root, weights = setup
    cfg = load_config(None, overrides(root, weights))
    info = init_distributed("cpu")
    settings = resolve_settings(cfg, info.device)
    train_set, _ = load_datasets(cfg, info)
    order = class_frequency_order(train_set.targets)
    # every training image's evaluation view, by dataset index
    eval_loader = build_loader(train_set, 96, train=False, image_size=SIZE, backend="torch", num_workers=0)
    images = torch.empty(len(train_set), 3, SIZE, SIZE)
    for batch, _, idx in eval_loader:
        images[idx] = batch

    store = FeatureStore(caches[dtype])
    loader = FeatureLoader(store, "train", train_set, 16, True, torch.device("cpu"), torch.float32, seed=cfg.run.seed)
    # the cache's batches are the torch image loader's (same permutation for a seed)
    torch_loader = build_loader(train_set, 16, train=True, image_size=SIZE, backend="torch", num_workers=0,
                                seed=cfg.run.seed)
    assert [idx.tolist() for _, _, idx in loader] == [idx.tolist() for _, _, idx in torch_loader]

    def make():
        torch.manual_seed(0)
        model = build_model(cfg, train_set.num_classes, settings).train()
        model.encoder.eval()
        opt = build_optimizer(model, cfg, settings.device)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        return model, opt, scaler

    rounding = feat.DTYPES[dtype][1]
    img_model, img_opt, img_scaler = make()
    raw_model, raw_opt, raw_scaler = make()
    encode = img_model.encoder.forward
    img_model.encoder.forward = lambda x: tuple(t.to(rounding).float() for t in encode(x))
    cache_model, cache_opt, cache_scaler = make()
    net = feat.CachedEncoderNet(cache_model)
    assert weights_digest(cache_model.encoder) == store.manifest["weights"]["sha256"]

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    # the decoder's gradients of one batch
    (a, fc), targets, idx = next(iter(loader))
    seq = label_sequences(targets, order, cfg.model.steps)
    o = cfg.optim
    for model_in, x in ((img_model, images[idx]), (net, (a, fc))):
        loss, _ = c2f_loss(model_in(x, seq), targets, seq, o.lambda1, o.lambda2, o.eps, o.eps_v)
        loss.backward()
    decoder = [n for n, p in cache_model.named_parameters() if not n.startswith("encoder.")]
    grads_img = dict(img_model.named_parameters())
    for name, p in cache_model.named_parameters():
        if name.startswith("encoder."):
            assert p.grad is None
        else:
            assert rel(p.grad, grads_img[name].grad) <= 1e-5, name
    assert len(decoder) > 5
    for m in (img_model, cache_model):
        m.zero_grad(set_to_none=True)

    # three optimiser steps
    steps = {name: TrainStep(m, mm, opt, sc, order, cfg, settings) for name, m, mm, opt, sc in (
        ("images", img_model, img_model, img_opt, img_scaler), ("raw", raw_model, raw_model, raw_opt, raw_scaler),
        ("cache", net, cache_model, cache_opt, cache_scaler))}
    raw_diff = 0.0
    for k, ((a, fc), targets, idx) in enumerate(loader):
        if k == 3:
            break
        loss_img, _, _ = steps["images"](images[idx], targets)
        loss_raw, _, _ = steps["raw"](images[idx], targets)
        loss_cache, _, _ = steps["cache"]((a, fc), targets)
        assert rel(loss_cache, loss_img) <= 1e-5, (k, loss_cache.item(), loss_img.item())
        raw_diff = max(raw_diff, rel(loss_cache, loss_raw))
    params_img = dict(img_model.named_parameters())
    for name in decoder:
        assert rel(dict(cache_model.named_parameters())[name], params_img[name]) <= 1e-5, name
    if dtype == "fp32":
        assert raw_diff <= 1e-5
    else:  # the rounding of 16-bit features: a relative change of the loss below the format's epsilon
        print(f"{dtype} cache vs fp32 images: max relative loss difference {raw_diff:.2e}")
        assert raw_diff <= 2 * torch.finfo(rounding).eps


# ----------------------------------------------------------------------------- refusals
def test_a_mismatched_cache_is_refused_naming_the_field(setup, caches, tmp_path):
    root, weights = setup
    store = FeatureStore(caches["fp32"])
    info = init_distributed("cpu")
    good = load_config(None, overrides(root, weights))
    train_set, test_set = load_datasets(good, info)
    digest = store.manifest["weights"]["sha256"]
    store.check(good, train_set, test_set, digest)  # the matching run passes

    def refused(field, cfg, digest=digest, sets=(train_set, test_set)):
        with pytest.raises(FeatureCacheError, match=rf"manifest\.json: {field}:"):
            store.check(cfg, *sets, digest)

    refused("backbone", load_config(None, overrides(root, weights, **{"model.backbone": "vgg16"})))
    torch.manual_seed(7)
    other = tmp_path / "other.pt"
    torch.save(TinyEncoder().state_dict(), other)
    refused("weights", good, digest=weights_digest(build_encoder("tiny", other)))
    refused("image_size", load_config(None, overrides(root, weights, **{"model.image_size": 64})))
    fewer = load_config(None, overrides(root, weights, **{"data.limit_train": 64}))
    refused("dataset", fewer, sets=load_datasets(fewer, info))
    # preprocessing: a cache of augmented views refuses a run with another crop
    views = cache_features(good, tmp_path / "views", views=2, shard_size=32, progress=False)
    store = FeatureStore(views["out"])
    assert store.manifest["splits"]["train"]["views"] == 2
    store.check(good, train_set, test_set, digest)
    refused("preprocessing", load_config(None, overrides(root, weights, **{"data.crop_scale": "[0.5, 1.0]"})))
    # end to end: c2f train names the field, exit status 2; no frozen encoder: refused too
    args = overrides(root, weights, tmp_path / "r1", **{"data.features": caches["fp32"], "model.image_size": 64})
    assert main(["train", *args]) == 2
    args = overrides(root, weights, tmp_path / "r2",
                     **{"data.features": caches["fp32"], "optim.freeze_encoder": "false"})
    with pytest.raises(ConfigError, match="optim.freeze_encoder=true"):
        train(load_config(None, args))


def test_a_truncated_or_missing_shard_names_the_file(caches, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(caches["fp16"], cache)
    shard = cache / "train" / "00001.a.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FeatureCacheError, match=r"train/00001\.a\.npy: damaged or truncated"):
        FeatureStore(cache).open_split("train")
    shard.unlink()
    with pytest.raises(FeatureCacheError, match=r"train/00001\.a\.npy: missing shard"):
        FeatureStore(cache).open_split("train")
    (cache / "manifest.json").unlink()
    with pytest.raises(FeatureCacheError, match="not a feature cache"):
        FeatureStore(cache)


# ----------------------------------------------------------------------------- writing
def test_an_interrupted_cache_is_finished_with_identical_shards(setup, caches, tmp_path, monkeypatch, capsys):
    root, weights = setup
    cfg = load_config(None, overrides(root, weights))
    out = tmp_path / "cut"
    assert cache_features(cfg, out, dtype="fp16", shard_size=32, progress=False, stop_after=2)["shards_written"] == 2
    (out / "test" / ".00000.a.npy.999.tmp").write_bytes(b"left by a killed run")
    damaged = out / "train" / "00001.fc.npy"
    damaged.write_bytes(damaged.read_bytes()[:50])
    capsys.readouterr()
    summary = cache_features(cfg, out, dtype="fp16", shard_size=32, progress=False)
    assert "still to write" in capsys.readouterr().out
    assert summary["shards_written"] == 4  # the damaged shard, the third train shard and the 2 test shards
    assert files(out) == files(caches["fp16"])
    assert not list(out.rglob("*.tmp"))
    assert cache_features(cfg, out, dtype="fp16", shard_size=32, progress=False)["shards_written"] == 0
    # another config in the same folder is refused, naming the field
    with pytest.raises(FeatureCacheError, match="another config \\(dtype"):
        cache_features(cfg, out, dtype="fp32", shard_size=32, progress=False)
    # not enough disk space: refused before anything is written
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(feat.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(FeatureCacheError, match="free on that disk"):
        cache_features(cfg, tmp_path / "full", shard_size=32, progress=False)
    assert not list((tmp_path / "full").rglob("*.npy"))


# ----------------------------------------------------------------------------- the trained model
def test_predict_and_eval_on_a_model_trained_from_a_cache(setup, caches, tmp_path, capsys):
    """The run folder holds a complete C2FNet (the frozen encoder's weights included): c2f eval on
    the images gives the cache run's test mAP, c2f predict works, and model.pretrained=RUN_DIR
    takes that encoder back."""
    root, weights = setup
    out = tmp_path / "run"
    summary = train(load_config(None, overrides(root, weights, out, **{"data.features": caches["fp32"],
                                                                      "optim.epochs": 2})))
    assert summary["steps"] == 2 * (96 // 16)
    assert summary["final"]["num_images"] == 40 and summary["final"]["pointing_local"] is not None
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--weights", "final",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["mAP"] == pytest.approx(summary["final"]["mAP"], abs=1e-4)
    image = root / "JPEGImages" / "test_000000.jpg"
    assert main(["predict", str(image), "--checkpoint", str(out), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["source"] == str(image) and line["error"] is None and len(line["scores"]) == 20
    assert weights_digest(build_encoder("tiny", out)) == weights_digest(build_encoder("tiny", weights))
    with pytest.raises(ValueError, match="'tiny' backbone, not 'vgg16'"):
        build_encoder("vgg16", out)


def test_views_train_and_ablate_on_one_cache(setup, tmp_path):
    """--views 3: three augmented views per training image; each epoch draws one of them per image.
    c2f ablate --features trains its rows on that one cache."""
    from c2f_fast.ablate import run_ablation
    from c2f_fast.data.base import DEFAULT_CROP_RATIO, DEFAULT_CROP_SCALE

    root, weights = setup
    crops = {"data.crop_scale": list(DEFAULT_CROP_SCALE), "data.crop_ratio": list(DEFAULT_CROP_RATIO)}
    cfg = load_config(None, overrides(root, weights, **crops))
    cache = cache_features(cfg, tmp_path / "views", views=3, shard_size=32, progress=False)["out"]
    store = FeatureStore(cache)
    a, _ = store.open_split("train")
    assert a[0].shape[:2] == (3, 32)
    train_set, _ = load_datasets(cfg, init_distributed("cpu"))
    loader = FeatureLoader(store, "train", train_set, 16, True, torch.device("cpu"), torch.float32)
    drawn = set()
    for epoch in range(4):
        (feats, _), _, idx = next(iter(loader))
        for row, i in zip(feats, idx.tolist()):
            c, r = divmod(i, 32)
            match = [v for v in range(3) if torch.equal(row, torch.from_numpy(np.array(a[c][v, r])).float())]
            assert match, f"epoch {epoch}: image {i} is none of its stored views"
            drawn.update(match if len(match) == 1 else ())
    assert drawn == {0, 1, 2}
    rows = run_ablation(None, overrides(root, weights, tmp_path / "abl", **crops), rows=["vgg", "lstm_lg"],
                        features=cache)
    assert [r["method"] for r in rows] == ["VGG", "VGG+LSTM+L/G"]
    assert all(r["metrics"]["num_images"] == 40 for r in rows)
    assert (tmp_path / "abl" / "ablation.md").is_file()


# ----------------------------------------------------------------------------- DDP
def test_two_process_gloo_writes_and_reads_the_shards(setup, caches, tmp_path):
    root, weights = setup
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "c2f_fast.cli"]
    out = tmp_path / "cache"
    proc = subprocess.run([*run, "cache-features", "--out", str(out), "--shard-size", "32", "--dtype", "fp16",
                           *overrides(root, weights)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert files(out) == files(caches["fp16"])  # rank 0 wrote shards 0, 2, ..., rank 1 the others
    proc = subprocess.run([*run, "train", *overrides(root, weights, tmp_path / "run", **{
        "data.features": out, "data.batch_size": 8, "data.eval_batch_size": 16})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["steps"] == 96 // 2 // 8
    assert summary["final"]["num_images"] == 40 and summary["final"]["duplicates"] == 0


def test_the_dali_loader_writes_the_evaluation_view(setup, caches, tmp_path):
    """data.loader=dali (the default; CPU operators here, nvJPEG on a GPU) reads the evaluation view:
    the same images up to the two resizers' rounding, so features close to the torch cache's."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    root, weights = setup
    cfg = load_config(None, overrides(root, weights, **{"data.loader": "dali", "data.workers": 2}))
    out = tmp_path / "dali"
    assert cache_features(cfg, out, dtype="fp32", shard_size=32, progress=False)["shards_written"] == 5
    assert json.loads((out / "manifest.json").read_text())["compute"]["loader"] == "dali"
    dali, ref = FeatureStore(out).open_split("test"), FeatureStore(caches["fp32"]).open_split("test")
    for got, want in zip(dali[0] + dali[1], ref[0] + ref[1]):
        assert np.abs(got - want).mean() <= 0.05 * np.abs(want).mean()
    assert cache_features(cfg, out, dtype="fp32", shard_size=32, progress=False)["shards_written"] == 0


def test_a_run_from_a_cache_resumes(setup, caches, tmp_path):
    """A cached run continues from its end-of-epoch-1 checkpoint (the loader's epochs follow the
    run's) and ends with the uninterrupted run's steps and weights."""
    import shutil

    from safetensors.torch import load_file

    root, weights = setup
    out = tmp_path / "run"
    args = overrides(root, weights, out, **{"data.features": caches["fp16"], "optim.epochs": 2})
    whole = train(load_config(None, args))
    assert whole["steps"] == 2 * (96 // 16)
    final = load_file(out / "model.safetensors")
    # back to the state after epoch 1: its checkpoint is the previous one
    shutil.copy(out / "checkpoint.prev.pt", out / "checkpoint.pt")
    (out / "metrics.json").unlink()
    summary = train(load_config(None, args), resume=True)
    assert summary["steps"] == 2 * (96 // 16) and summary["epochs"] == 2
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [0, 1]
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)
