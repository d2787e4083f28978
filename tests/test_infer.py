"""c2f_fast.infer: C2FClassifier (inputs, errors, batch-size independence, threads) and `c2f predict`."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2f_fast import checkpoint
from c2f_fast.data.images import BadImageError
from c2f_fast.data.loaders import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig
from c2f_fast.data.torch_pipeline import ImageFileDataset, decode_rgb
from c2f_fast.infer import (BUCKET_TOLERANCE, C2FClassifier, Prediction, add_predict_arguments, bucket_sizes,
                             predict_command)
from c2f_fast.runtime import cpu_bf16_support
from c2f_fast.model import C2FNet, ModelConfig, greedy_emissions
from conftest import requires_cuda

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CLASSES = ["cat", "dog", "car", "tree", "boat"]

#: The classifier most tests use: fp32 torch, fixed model batches (bit-identical whatever the batch).
STRICT = {"backend": "torch", "dtype": "fp32", "batching": "strict", "model_batch": 16}
BUCKET_SIZES = (1, 2, 4, 8, 16, 32)

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or
                               importlib.util.find_spec("onnxscript") is None,
                               reason="the ONNX Runtime backend needs onnxruntime and onnxscript "
                                      "(pip install -e .[dev])")


def tiny_config() -> ModelConfig:
    return ModelConfig(variant="lstm_lg", backbone="tiny", num_classes=5, steps=3, hidden=32, embed=16,
                       attn=32, image_size=64)


def write_run(run_dir: Path, seed: int = 0) -> C2FNet:
    """A small trained-looking run folder: best.safetensors + model.json. The prediction bias makes
    some classes pass 0.5 so that labels and greedy steps are not empty."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = C2FNet(cfg).eval()
    with torch.no_grad():
        model.predict.bias.copy_(torch.tensor([2.0, 0.8, 0.05, -0.5, -3.0]))
    checkpoint.save_weights(run_dir / "best.safetensors", model)
    checkpoint.write_model_json(run_dir, {"model": cfg.to_dict(), "class_names": CLASSES,
                                          "class_order": [0, 1, 2, 3, 4]})
    return model


def make_image(i: int, h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(100 + i)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (3 + i)) % 256, (y * (5 + 2 * i)) % 256, ((x + y) * (1 + i)) % 256], axis=-1)
    noise = rng.integers(0, 60, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    run_dir = root / "run"
    run_dir.mkdir()
    model = write_run(run_dir)
    sizes = [(48, 80), (64, 64), (97, 51), (30, 40), (64, 64), (120, 90)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        ext = ".png" if i == 3 else ".jpg"  # one PNG among the JPEGs
        path = root / f"img{i}{ext}"
        make_image(i, h, w).save(path, **({"quality": 90} if ext == ".jpg" else {}))
        paths.append(path)
    clf = C2FClassifier.from_checkpoint(run_dir, device="cpu", **STRICT)
    return {"root": root, "run_dir": run_dir, "model": model, "paths": paths, "clf": clf}


def same(a: list[Prediction], b: list[Prediction], sources: bool = False) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.error is None and q.error is None, (p.error, q.error)
        assert p.labels == q.labels
        assert p.step_labels == q.step_labels
        assert p.scores == q.scores  # exact: the same pixels, the same fixed model batch
        if sources:
            assert p.source == q.source


# ---------------------------------------------------------------- the classifier


def test_defaults_and_attributes(run):
    clf = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu")
    assert clf.class_names == CLASSES
    assert clf.image_size == 64
    assert clf.device == torch.device("cpu")
    assert clf.dtype == (torch.bfloat16 if cpu_bf16_support()[0] else torch.float32)
    assert not clf.compiled and clf.optimize
    assert not clf.model.cfg.fast_kernels
    assert clf.batching == "buckets" and clf.buckets == [1, 2, 4, 8, 16, 32] and clf.model_batch == 32
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None:
        assert clf.backend == "auto"
        assert clf.onnx_path.parent == run["run_dir"] and clf.onnx_path.is_file()
        assert clf.onnx_path.with_suffix(".timings.json").is_file()
        assert set(clf.bucket_backends) == set(clf.buckets)
        assert set(clf.bucket_backends.values()) <= {"torch", "onnxruntime"}
    else:
        assert clf.backend == "torch"
    assert isinstance(clf, torch.nn.Module)
    # the runner (a channels_last copy, batch norm folded) is not a registered submodule: one
    # copy of the weights in the state dict, the plain model's
    assert set(clf.state_dict()) == {f"model.{k}" for k in run["model"].state_dict()}
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in clf.model.modules())
    assert run["clf"].backend == "torch" and run["clf"].buckets == [16]


@pytest.mark.parametrize("options", [{}, {"glimpse_head": True, "query_token": True, "glimpse_in_prediction": True}],
                         ids=["paper", "aligned"])
def test_cpu_runner_rewrites_compute_the_reference_function(options):
    """The CPU runner's copy (batch norm folded, pool before ReLU, sigmoid-form attention scores
    with the factors folded into W_a, b, W_h, W_y and v) against the plain model, fp32: the same
    scores within the fp32 bucket bound and the same greedy steps; the plain model is untouched."""
    import dataclasses

    from c2f_fast.infer import _SigmoidScoreAttention

    torch.manual_seed(0)
    model = C2FNet(dataclasses.replace(tiny_config(), **options)).eval()
    with torch.no_grad():
        model.predict.bias.copy_(torch.tensor([2.0, 0.8, 0.05, -0.5, -3.0]))
        for m in model.encoder.modules():  # batch norms with statistics worth folding
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = C2FClassifier(model, CLASSES, device="cpu", backend="torch", dtype="fp32", model_batch=4)
    plain = C2FClassifier(model, CLASSES, device="cpu", backend="torch", dtype="fp32", model_batch=4, optimize=False)
    assert isinstance(fast._runner.local_attn, _SigmoidScoreAttention)
    assert type(plain._runner.local_attn) is not _SigmoidScoreAttention
    pools = [type(m).__name__ for m in fast._runner.encoder.modules() if "Pool" in type(m).__name__]
    assert pools == ["_MaxPool2x2"] * 3, pools
    images = torch.randn(4, 3, 64, 64)
    (s_fast, e_fast), (s_plain, e_plain) = fast.decode(images), plain.decode(images)
    assert (s_fast - s_plain).abs().max().item() <= BUCKET_TOLERANCE["fp32"]
    assert torch.equal(e_fast, e_plain) and (e_plain >= 0).any()
    with torch.inference_mode():  # the attention maps themselves (the scores barely see them here)
        got, ref = fast._runner(images.contiguous(memory_format=torch.channels_last)), model(images)
    torch.testing.assert_close(got.local_attn, ref.local_attn, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.step_logits, ref.step_logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant, options", [("lstm_lg", {}), ("lstm_lg", {"scaled_prior": True}),
                                              ("lstm_l", {}), ("lstm", {})],
                         ids=["lstm_lg", "scaled_prior", "lstm_l", "lstm"])
@pytest.mark.parametrize("batch", [1, 3, 4, 5])
def test_greedy_decoder_computes_the_models_greedy_decoding(variant, options, batch, monkeypatch):
    """_GreedyDecoder (the CPU runner's rearranged greedy loop) against C2FNet.decode, fp32, on
    L = 49, D = 24, F = 40, H = 20, A = 36 (not powers of two): the same step logits within fp32
    rounding, -inf at the same places (no copying), the same emissions, stops included."""
    from c2f_fast import model as model_module
    from c2f_fast.encoders import TinyEncoder
    from c2f_fast.infer import _GreedyDecoder

    monkeypatch.setattr(model_module, "build_encoder", lambda *a: TinyEncoder(feat_dim=24, fc_dim=40))
    torch.manual_seed(1)
    cfg = ModelConfig(variant=variant, backbone="tiny", num_classes=5, steps=4, hidden=20, embed=12, attn=36,
                      image_size=56, **options)
    model = C2FNet(cfg).eval()
    with torch.no_grad():  # some classes above 0.5, some below: steps emit, then stop
        model.predict.bias.copy_(torch.tensor([2.0, 0.8, 0.3, -0.5, -3.0]))
    assert _GreedyDecoder.supports(model) and (model.feat_dim, model.fc_dim) == (24, 40)
    decoder = _GreedyDecoder(model)
    feats, f_fc = torch.randn(batch, 49, 24).relu(), torch.randn(batch, 40).relu()
    with torch.inference_mode():
        ref = model.decode(feats, f_fc)
        logits, step_logits = decoder(feats, f_fc)
    finite = torch.isfinite(ref.step_logits)
    assert torch.equal(finite, torch.isfinite(step_logits))
    torch.testing.assert_close(step_logits[finite], ref.step_logits[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy_emissions(step_logits), greedy_emissions(ref.step_logits))
    if batch > 1:
        emitted = greedy_emissions(ref.step_logits)
        assert (emitted >= 0).any() and (emitted < 0).any()  # both emitting and stopped steps
        assert not finite.all()  # the no-copy mask was exercised
    if batch in BUCKET_SIZES:  # a bucket: bit-identical at every position (5 classes, L = 49: shapes
        # whose rows MKL computed differently by their index before the columns were padded and
        # the scores ran per image; a batch that is no bucket may finish on a tail kernel)
        with torch.inference_mode():
            for pos in range(1, batch):
                order = [(j - pos) % batch for j in range(batch)]  # image 0 lands at position pos
                moved = decoder(feats[order], f_fc[order])[1]
                assert torch.equal(moved[pos], step_logits[0]), pos


def test_runner_uses_the_greedy_decoder_for_small_buckets_only():
    """float32 runner: every bucket; bf16 runner: up to GREEDY_DECODER_MAX_BF16 images; the
    aligned options, compile or optimize=False: the model's own loop. Scores within the bounds."""
    import dataclasses

    from c2f_fast.infer import GREEDY_DECODER_MAX_BF16, _GreedyDecoder

    torch.manual_seed(0)
    model = C2FNet(tiny_config()).eval()
    plain = C2FClassifier(model, CLASSES, device="cpu", backend="torch", dtype="fp32", batching="strict",
                          model_batch=32, optimize=False)
    assert plain._greedy is None
    images = torch.randn(32, 3, 64, 64)
    reference = plain(images)
    for dtype, greedy_max in (("fp32", 32), ("bf16", GREEDY_DECODER_MAX_BF16)):
        clf = C2FClassifier(model, CLASSES, device="cpu", backend="torch", dtype=dtype, model_batch=32)
        assert isinstance(clf._greedy, _GreedyDecoder)
        used = []
        greedy = clf._greedy
        clf.__dict__["_greedy"] = lambda feats, f_fc: used.append(feats.shape[0]) or greedy(feats, f_fc)
        for n in (1, 9, 32):
            scores = clf(images[:n])
            bound = BUCKET_TOLERANCE["fp32" if dtype == "fp32" else "bf16"]
            assert (scores - reference[:n]).abs().max().item() <= bound
        assert used == [b for b in (1, 16, 32) if b <= greedy_max], (dtype, used)
    aligned = C2FNet(dataclasses.replace(tiny_config(), glimpse_head=True, query_token=True)).eval()
    assert C2FClassifier(aligned, CLASSES, device="cpu", backend="torch")._greedy is None


@pytest.mark.parametrize("options", [{}, {"glimpse_head": True, "query_token": True, "glimpse_in_prediction": True}],
                         ids=["paper", "aligned"])
def test_bf16_runner_stores_the_weights_autocast_would_cast(options):
    """The bf16 CPU runner keeps its convolution, linear, LSTM and attention weights in bf16 (no
    per-call casts): under autocast that is the same computation, bit for bit, as the float32
    weights autocast casts at each call; embeddings and the reference model stay float32."""
    import copy
    import dataclasses

    from c2f_fast.infer import _cast_matmul_weights

    torch.manual_seed(0)
    model = C2FNet(dataclasses.replace(tiny_config(), **options)).eval()
    clf = C2FClassifier(model, CLASSES, device="cpu", backend="torch", dtype="bf16", model_batch=4)
    runner = clf._runner
    assert runner.lstm.weight_ih.dtype == runner.predict.weight.dtype == runner.local_attn.v.dtype == torch.bfloat16
    assert runner.embedding.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cast_per_call = copy.deepcopy(runner)
    for module in cast_per_call.modules():  # float32 again: autocast casts them at every call
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.LSTMCell)):
            module.float()
    cast_per_call.local_attn.v.data = cast_per_call.local_attn.v.data.float()
    images = torch.randn(3, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = runner(images), cast_per_call(images)
    assert torch.equal(got.step_logits, ref.step_logits) and torch.equal(got.local_attn, ref.local_attn)
    _cast_matmul_weights(runner, torch.float32)  # a no-op for float32: nothing is cast back
    assert runner.lstm.weight_ih.dtype == runner.predict.weight.dtype == runner.local_attn.v.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, c_in, c_out, size, stride", [(1, 3, 16, (13, 9), 1), (3, 5, 7, (8, 8), 2),
                                                              (2, 24, 40, (5, 7), 1)])
def test_packed_convolution_computes_conv_and_relu(dtype, batch, c_in, c_out, size, stride):
    """_PackedConv2d (oneDNN, packed weight, fused ReLU) against Conv2d + ReLU: bit-identical in
    bf16, within fp32 rounding in fp32; a changed weight is packed again; autocast with another
    dtype, gradients and copies go the plain module's way."""
    import copy

    from c2f_fast.infer import _packed_convolutions_work, _PackedConv2d

    if not _packed_convolutions_work(dtype):
        pytest.skip("this torch build has no oneDNN packed convolutions")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1).to(dtype)
    packed = _PackedConv2d(conv, relu=True)
    x = torch.randn(batch, c_in, *size).to(dtype).contiguous(memory_format=torch.channels_last)

    def check(got, want):
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        check(packed(x), torch.relu(conv(x)))
        check(_PackedConv2d(conv, relu=False)(x), conv(x))
        conv.weight.mul_(-1)  # changed in place: packed again
        check(packed(x), torch.relu(conv(x)))
        twin = copy.deepcopy(packed)
        assert twin.conv is not conv and torch.equal(twin(x), packed(x))
    if dtype == torch.float32:  # under bf16 autocast the plain module runs (in bf16), as it would
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(packed(x), torch.relu(conv(x))) and packed(x).dtype == torch.bfloat16
    y = packed(x.detach().requires_grad_())  # gradients: the plain module
    assert y.requires_grad


def test_packed_convolution_packs_for_each_input_shape():
    """The weight is packed for each input shape it meets (oneDNN's layout for an unknown shape
    suits large batches only), each shape computes conv + ReLU, at most PACKED_SHAPES are kept,
    and a changed weight drops them all."""
    from c2f_fast.infer import PACKED_SHAPES, _packed_convolutions_work, _PackedConv2d

    if not _packed_convolutions_work(torch.float32):
        pytest.skip("this torch build has no oneDNN packed convolutions")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, 3, padding=1)
    packed = _PackedConv2d(conv, relu=True)
    with torch.inference_mode():
        for batch in (1, 3, 1, 2):
            x = torch.randn(batch, 6, 7, 5).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(packed(x), torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
        assert sorted(shape[0] for shape in packed._packed) == [1, 2, 3]
        conv.weight.mul_(-1)
        x = torch.randn(4, 6, 7, 5).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(packed(x), torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
        assert list(packed._packed) == [x.shape]  # the old packings went with the old weight
        for batch in range(5, 5 + PACKED_SHAPES):
            y = torch.randn(batch, 6, 7, 5).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(packed(y), torch.relu(conv(y)), rtol=1e-5, atol=1e-5)
            assert 1 <= len(packed._packed) <= PACKED_SHAPES


def test_pack_convolutions_fuses_a_relu_only_across_identities_and_pools():
    import copy

    from c2f_fast.infer import _MaxPool2x2, _pack_convolutions, _packed_convolutions_work

    if not _packed_convolutions_work(torch.float32):
        pytest.skip("this torch build has no oneDNN packed convolutions")
    conv = lambda: torch.nn.Conv2d(4, 4, 3, padding=1)  # noqa: E731
    net = torch.nn.Sequential(conv(), torch.nn.Identity(), _MaxPool2x2(), torch.nn.ReLU(),  # fused
                              conv(), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),  # a norm in between: not fused
                              conv(), torch.nn.ReLU(),  # fused
                              conv()).eval()  # no ReLU after it
    reference = copy.deepcopy(net)
    _pack_convolutions(net, torch.float32)
    kinds = [(type(m).__name__, getattr(m, "relu", None)) for m in net]
    assert kinds == [("_PackedConv2d", True), ("Identity", None), ("_MaxPool2x2", None), ("Identity", None),
                     ("_PackedConv2d", False), ("BatchNorm2d", None), ("ReLU", None),
                     ("_PackedConv2d", True), ("Identity", None), ("_PackedConv2d", False)]
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)
    assert type(reference[0]) is torch.nn.Conv2d  # the copy taken before is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 8, 6), (3, 5, 7, 9), (1, 3, 2, 2)])
def test_pool_2x2_equals_max_pool2d(shape, dtype):
    """Both of _MaxPool2x2's paths (channels_last halves; strided phases for NCHW or odd sizes)
    give max_pool2d(x, 2) exactly, NaN and -inf included."""
    from c2f_fast.infer import _MaxPool2x2

    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    x.view(-1)[::7] = float("-inf")
    x.view(-1)[3] = float("nan")
    expected = torch.nn.functional.max_pool2d(x, 2)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = _MaxPool2x2()(x.contiguous(memory_format=layout))
        assert got.shape == expected.shape and got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(24) == [1, 2, 4, 8, 16, 24]
    for bad in (dict(backend="tensorrt"), dict(batching="dynamic")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            C2FClassifier(C2FNet(tiny_config()), CLASSES, device="cpu", **bad)


def test_predict_matches_the_model_and_the_eval_preprocessing(run):
    """Scores are C2FNet's greedy p-hat on the evaluation loader's preprocessing; step labels are
    greedy_emissions; labels are the classes with score >= 0.5, best first."""
    clf, paths = run["clf"], run["paths"]
    preds = clf.predict(paths)
    config = LoaderConfig(batch_size=1, train=False, image_size=64, device=torch.device("cpu"), num_workers=0,
                          shard_id=0, num_shards=1, seed=0, dtype=torch.float32, crop_scale=(0.25, 1.0),
                          crop_ratio=(0.75, 4 / 3), prefetch=2)
    dataset = ImageFileDataset([str(p) for p in paths], config)
    uint8 = torch.stack([dataset[(i, 0)][0] for i in range(len(paths))])
    mean = torch.tensor([255.0 * m for m in IMAGENET_MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([255.0 * s for s in IMAGENET_STD]).view(1, 3, 1, 1)
    images = uint8.float().sub_(mean).div_(std)
    assert torch.equal(clf.preprocess(list(uint8)), images)
    with torch.no_grad():
        out = run["model"](images)
    emitted = greedy_emissions(out.step_logits)
    got = torch.tensor([[p.scores[c] for c in CLASSES] for p in preds])
    # the reference runs batch 6, the classifier a padded batch of 16: the last bits may differ
    torch.testing.assert_close(got, out.scores, rtol=0, atol=1e-6)
    for p, row, em in zip(preds, out.scores, emitted):
        assert p.step_labels == [CLASSES[e] if e >= 0 else None for e in em.tolist()]
        expected = sorted((c for c in range(5) if row[c] >= 0.5), key=lambda c: -row[c].item())
        assert p.labels == [CLASSES[c] for c in expected]
        assert p.source.startswith(str(run["root"]))
    assert any(p.labels for p in preds) and any(None in p.step_labels or len(p.labels) < 5 for p in preds)
    # forward() gives the same scores as predict()
    assert torch.equal(clf(images), got)


def test_paths_bytes_pil_and_tensors_agree(run):
    clf, paths = run["clf"], run["paths"]
    by_path = clf.predict([str(p) for p in paths])
    same(by_path, clf.predict(paths))  # Path objects
    same(by_path, clf.predict([p.read_bytes() for p in paths]))
    same(by_path, clf.predict([Image.open(p) for p in paths]))
    tensors = [decode_rgb(str(p)) for p in paths]
    same(by_path, clf.predict(tensors))
    # images 1 and 4 are both 64x64: one batched tensor [2, 3, 64, 64]
    batched = clf.predict(torch.stack([tensors[1], tensors[4]]))
    same([by_path[1], by_path[4]], batched)
    assert [p.source for p in batched] == ["tensor[0]", "tensor[1]"]
    # a mix in one list
    mixed = clf.predict([str(paths[0]), paths[1].read_bytes(), Image.open(paths[2]), tensors[3],
                         torch.stack([tensors[4]]), paths[5]])
    same(by_path, mixed)
    assert mixed[1].source == f"bytes[1] ({paths[1].stat().st_size} bytes)"
    assert mixed[2].source.startswith("PIL[2] RGB")
    assert mixed[3].source == "tensor[3] 3x30x40"
    assert mixed[4].source == "tensor[4][0]"
    # a single item (not in a list)
    same(by_path[:1], clf.predict(str(paths[0])))
    # preprocess() of a uint8 batch and of PIL images gives the same batch
    assert torch.equal(clf.preprocess([Image.open(p) for p in paths]), clf.preprocess(tensors))


def test_bad_items_get_errors_and_the_rest_is_predicted(run, tmp_path):
    clf, paths = run["clf"], run["paths"]
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 20)
    truncated = tmp_path / "truncated.jpg"
    data = paths[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    corrupt_png = tmp_path / "corrupt.png"
    png = paths[3].read_bytes()
    corrupt_png.write_bytes(png[:40] + b"\x00" * (len(png) - 52) + png[-12:])  # IDAT zeroed, IEND kept
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    inputs = [paths[0], garbage, paths[1], truncated, corrupt_png, empty, missing, tmp_path, 42,
              torch.zeros(3, 8, 8), b"\x89PNG\r\n\x1a\nbroken", paths[2]]
    preds = clf.predict(inputs)
    assert len(preds) == len(inputs)
    good = clf.predict([paths[0], paths[1], paths[2]])
    same([preds[0], preds[2], preds[11]], good)
    expect = {
        1: "garbage.jpg", 3: "truncated", 4: "corrupt.png", 5: "zero bytes", 6: "missing file", 7: "not a regular file",
        8: "unsupported input type int", 9: "uint8", 10: "bytes[10]",
    }
    for k, what in expect.items():
        p = preds[k]
        assert p.error, (k, p)
        assert p.labels == [] and p.scores == {} and p.step_labels == []
        assert what in f"{p.source}: {p.error}", (k, p.source, p.error)
    assert preds[6].source == str(missing)
    assert preds[3].error.startswith("truncated JPEG")

    with pytest.raises(BadImageError, match="garbage.jpg") as info:
        clf.predict([paths[0], garbage, paths[1]], errors="raise")
    assert info.value.path == str(garbage)
    with pytest.raises(BadImageError, match="missing.jpg"):
        clf.predict([missing], errors="raise")
    with pytest.raises(ValueError, match=r"item\[1\] \(int\).*unsupported input type"):
        clf.predict([paths[0], 42], errors="raise")


def test_strict_batching_does_not_change_results(run):
    """Bit-identical: strict mode always runs fixed batches of model_batch (16) images, padded,
    so an image's row is computed the same way wherever it sits (see the infer module docstring).
    19 inputs: more than one model batch, images at different positions in each run."""
    clf, paths = run["clf"], run["paths"]
    inputs = [paths[(3 * i) % len(paths)] for i in range(19)]
    one = clf.predict(inputs, batch_size=1)
    seven = clf.predict(inputs, batch_size=7)
    same(one, seven, sources=True)
    same(one, clf.predict(inputs, batch_size=64), sources=True)
    for p in one:  # the same file at other positions: the same prediction
        same([p], [one[inputs.index(Path(p.source))]])
    # forward on batches of 1 and 7 as well
    images = clf.preprocess([decode_rgb(str(p)) for p in inputs])
    assert torch.equal(torch.cat([clf(images[i:i + 1]) for i in range(19)]),
                       torch.cat([clf(images[i:i + 7]) for i in range(0, 19, 7)]))
    # model_batch=1 (for latency): every image runs alone, so again independent of batch_size
    alone = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", **{**STRICT, "model_batch": 1})
    same(alone.predict(inputs[:8], batch_size=1), alone.predict(inputs[:8], batch_size=7), sources=True)


def test_concurrent_predict_from_threads(run):
    clf, paths = run["clf"], run["paths"]
    inputs = [paths[i % len(paths)] for i in range(11)]
    expected = clf.predict(inputs)
    results: dict[int, list[Prediction]] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            start.wait()
            results[k] = clf.predict(inputs, batch_size=[1, 3, 5, 64][k])
        except BaseException as err:  # noqa: BLE001 -- reported below
            failures.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for k in range(4):
        same(expected, results[k], sources=True)


def test_threshold_and_top_k(run):
    clf, paths = run["clf"], run["paths"]
    base = clf.predict(paths[:2])
    for p in base:
        ranked = sorted(CLASSES, key=lambda c: (-p.scores[c], CLASSES.index(c)))
        for q in clf.predict([p.source], top_k=2):
            assert q.labels == ranked[:2]
        assert clf.predict([p.source], top_k=99)[0].labels == ranked  # top_k > C: every class
        assert clf.predict([p.source], threshold=0.0)[0].labels == ranked
        assert clf.predict([p.source], threshold=1.0)[0].labels == [c for c in ranked if p.scores[c] >= 1.0]
        assert list(p.scores) == CLASSES
    for bad in ({"threshold": 1.5}, {"top_k": 0}, {"batch_size": 0}, {"errors": "ignore"}):
        with pytest.raises(ValueError):
            clf.predict(paths[:1], **bad)


def test_forward_checks_its_input(run):
    clf = run["clf"]
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        clf(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="preprocess"):
        clf(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert clf(torch.zeros(0, 3, 64, 64)).shape == (0, 5)
    assert clf.predict([]) == []


def test_checkpoint_layouts_give_the_same_model(run, tmp_path):
    """A run folder, a .safetensors file (model.json beside it) and a training checkpoint.pt."""
    run_dir, paths = run["run_dir"], run["paths"]
    expected = run["clf"].predict(paths[:3])
    from_file = C2FClassifier.from_checkpoint(run_dir / "best.safetensors", device="cpu", **STRICT)
    same(expected, from_file.predict(paths[:3]))
    meta = json.loads((run_dir / "model.json").read_text())
    checkpoint.save_checkpoint(tmp_path, {"meta": meta, "model": run["model"].state_dict()})
    from_pt = C2FClassifier.from_checkpoint(tmp_path / "checkpoint.pt", device="cpu", **STRICT)
    same(expected, from_pt.predict(paths[:3]))
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        C2FClassifier.from_checkpoint(tmp_path / "nope", device="cpu")


def test_lazy_package_export():
    import c2f_fast

    assert c2f_fast.C2FClassifier is C2FClassifier
    assert c2f_fast.Prediction is Prediction
    from c2f_fast.runtime import tune_allocator

    assert c2f_fast.tune_allocator is tune_allocator
    with pytest.raises(AttributeError):
        c2f_fast.does_not_exist  # noqa: B018


def distinct_images(clf: C2FClassifier, n: int = 16) -> torch.Tensor:
    return clf.preprocess([make_image(i, 40 + 3 * i, 70 - 2 * i) for i in range(n)])


@pytest.mark.parametrize("backend, dtype", [("torch", "fp32"), ("torch", "bf16"),
                                            pytest.param("onnxruntime", "fp32", marks=needs_ort)])
def test_bucket_results_depend_only_on_the_bucket(run, backend, dtype):
    """The guarantee of the module docstring: within a bucket bit-identical at every position,
    with any neighbours, for any count that falls in that bucket; between a bucket and strict mode
    (fp32 torch, one call of 16) within BUCKET_TOLERANCE."""
    clf = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend=backend, dtype=dtype, model_batch=16)
    assert clf.buckets == [1, 2, 4, 8, 16] and set(clf.bucket_backends.values()) == {backend}
    images = distinct_images(clf)
    strict = run["clf"](images)
    tolerance = BUCKET_TOLERANCE["bf16" if dtype == "bf16" else "onnxruntime" if backend == "onnxruntime" else "fp32"]
    worst = 0.0
    for bucket in clf.buckets:
        for target in (0, 5, 11):
            rows = []
            for pos in range(bucket):  # the target at each position, the neighbours rotating
                batch = images[[(target + j - pos) % 16 for j in range(bucket)]]
                rows.append(clf(batch)[pos])
            for row in rows[1:]:
                assert torch.equal(row, rows[0]), (bucket, target)
            worst = max(worst, (rows[0] - strict[target]).abs().max().item())
    assert worst <= tolerance, (worst, tolerance)
    # 3..4 images share the bucket of 4 (zero-padded): the same rows whatever the count
    assert torch.equal(clf(images[2:5]), clf(images[1:5])[1:])
    # predict: the batch_size only changes results through the bucket (19 = 16 + a bucket of 4)
    paths = run["paths"]
    inputs = [paths[(3 * i) % len(paths)] for i in range(19)]
    by_one = clf.predict(inputs, batch_size=1)  # every image alone: bucket 1
    for p in by_one:
        same([p], clf.predict([p.source]))
    by_19 = clf.predict(inputs, batch_size=19)
    for p, q in zip(by_one, by_19):
        assert max(abs(p.scores[c] - q.scores[c]) for c in CLASSES) <= tolerance


@needs_ort
def test_onnxruntime_backend_predicts_what_torch_does(run, tmp_path):
    """Same predict API, same per-item errors, scores within the export check's tolerance."""
    paths = run["paths"]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(paths[0].read_bytes()[:200] + b"\x00" * 300 + b"\xff\xd9")
    inputs = [paths[0], corrupt, paths[1], 42, paths[2], paths[3], paths[4], paths[5]]
    ort_clf = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="onnxruntime", batching="strict")
    assert ort_clf.backend == "onnxruntime" and ort_clf.dtype == torch.float32
    got, expected = ort_clf.predict(inputs), run["clf"].predict(inputs)
    assert [p.source for p in got] == [p.source for p in expected]
    assert [p.error for p in got] == [p.error for p in expected]
    assert got[1].error and got[3].error and "unsupported input type int" in got[3].error
    for p, q in zip(got, expected):
        if p.error is None:
            assert p.labels == q.labels and p.step_labels == q.step_labels
            assert max(abs(p.scores[c] - q.scores[c]) for c in CLASSES) <= BUCKET_TOLERANCE["onnxruntime"]
    assert any(p.labels for p in got if p.ok)
    with pytest.raises(BadImageError, match="corrupt.jpg"):
        ort_clf.predict(inputs, errors="raise")
    images = distinct_images(ort_clf, 5)
    assert ort_clf(images).dtype == torch.float32 and ort_clf.decode(images)[1].dtype == torch.long
    for bad in (dict(dtype="bf16"), dict(compile=True)):
        with pytest.raises(ValueError, match="backend='onnxruntime'"):
            C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="onnxruntime", **bad)
    with pytest.raises(ValueError, match="onnx="):
        C2FClassifier(C2FNet(tiny_config()), CLASSES, device="cpu", backend="onnxruntime")


@needs_ort
def test_one_image_goes_straight_to_the_batch_one_session(run, monkeypatch):
    """One contiguous float32 image on an ONNX Runtime bucket 1 takes the short path; its result
    is the general path's (a non-contiguous view of the same image goes the general way)."""
    clf = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="onnxruntime")
    images = distinct_images(clf, 2)
    one = images[1:]
    calls = []
    run_one = clf._ort.run_one
    monkeypatch.setattr(clf._ort, "run_one", lambda x: calls.append(x.shape) or run_one(x))
    scores, emissions = clf.decode(one)
    assert calls == [(1, 3, clf.image_size, clf.image_size)]
    strided = torch.empty(1, 3, clf.image_size, 2 * clf.image_size)[..., ::2].copy_(one)
    assert not strided.is_contiguous()
    general = clf.decode(strided)
    assert len(calls) == 1  # the general path runs the same session through the runner's __call__
    assert torch.equal(scores, general[0]) and torch.equal(emissions, general[1])
    assert emissions.dtype == torch.long and scores.shape == (1, clf.num_classes)
    assert torch.equal(clf(one), scores) and len(calls) == 2
    clf.bucket_backends[1] = "torch"  # a bucket moved to torch is honoured
    clf.decode(one)
    assert len(calls) == 2


@needs_ort
def test_auto_runs_each_bucket_on_its_measured_faster_backend(tmp_path):
    """auto: timings measured once and stored beside the .onnx; each bucket on the faster backend;
    a call mixing buckets of both backends stays within tolerance of strict fp32 torch."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run(run_dir)
    clf = C2FClassifier.from_checkpoint(run_dir, device="cpu", dtype="fp32", model_batch=16)
    store = clf.onnx_path.with_suffix(".timings.json")
    entries = json.loads(store.read_text())["entries"]
    assert len(entries) == 1 and entries[0] == clf.timings
    assert entries[0]["key"]["threads"] == torch.get_num_threads() and entries[0]["key"]["dtype"] == "float32"
    ms = entries[0]["ms"]
    assert clf.bucket_backends == {b: "onnxruntime" if ms["onnxruntime"][str(b)] <= ms["torch"][str(b)] else "torch"
                                   for b in clf.buckets}
    # stored timings decide (here: made up, ONNX Runtime faster for 1 and 2 images only)
    entries[0]["ms"] = {"torch": {str(b): 10.0 for b in clf.buckets},
                        "onnxruntime": {str(b): 5.0 if b <= 2 else 20.0 for b in clf.buckets}}
    store.write_text(json.dumps({"entries": entries}))
    mixed = C2FClassifier.from_checkpoint(run_dir, device="cpu", dtype="fp32", model_batch=16)
    assert mixed.bucket_backends == {1: "onnxruntime", 2: "onnxruntime", 4: "torch", 8: "torch", 16: "torch"}
    assert "onnxruntime for 1-2 images" in mixed.describe_backend()
    one = {**mixed.bucket_backends, 2: "torch"}
    mixed.bucket_backends, kept = one, mixed.bucket_backends
    assert mixed.describe_backend() == "auto (onnxruntime for 1 image, torch fp32 for 2-16 images)"
    mixed.bucket_backends = kept
    images = distinct_images(mixed, 18)  # a call of 16 (torch) and one of 2 (onnxruntime)
    strict = C2FClassifier.from_checkpoint(run_dir, device="cpu", **STRICT)
    assert (mixed(images) - strict(images)).abs().max().item() <= BUCKET_TOLERANCE["onnxruntime"]
    # another dtype is another key: measured and added
    C2FClassifier.from_checkpoint(run_dir, device="cpu", dtype="bf16", model_batch=16)
    keys = [e["key"]["dtype"] for e in json.loads(store.read_text())["entries"]]
    assert sorted(keys) == ["bfloat16", "float32"]
    # auto without a run folder or an .onnx: plain torch
    assert C2FClassifier(C2FNet(tiny_config()), CLASSES, device="cpu").backend == "torch"


@needs_ort
def test_auto_times_each_backend_in_blocks_of_calls(tmp_path, monkeypatch):
    """The timing that decides auto's choice calls each backend in alternating blocks (the first
    call of a block not counted), never one call of each in turn: with several threads, a call
    right after the other runtime's competes with its still-spinning worker threads."""
    from c2f_fast import infer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run(run_dir)
    calls = []
    run_torch, run_ort = C2FClassifier._run_torch, infer._OrtRunner.__call__
    monkeypatch.setattr(C2FClassifier, "_run_torch", lambda self, x: calls.append(("torch", len(x))) or run_torch(self, x))
    monkeypatch.setattr(infer._OrtRunner, "__call__", lambda self, x: calls.append(("ort", len(x))) or run_ort(self, x))
    clf = C2FClassifier.from_checkpoint(run_dir, device="cpu", dtype="fp32", model_batch=2)
    block = lambda name, b: [(name, b)] * 4  # noqa: E731 -- one untimed call, three timed
    expected = [c for b in (1, 2) for _ in range(3) for c in block("torch", b) + block("ort", b)]
    assert calls[-len(expected):] == expected  # (before them: the export's own check)
    assert all(len(clf.timings["ms"][name]) == 2 for name in ("torch", "onnxruntime"))


@pytest.mark.slow
def test_compiled_cpu_matches_eager(run):
    """compile=True on the CPU (Inductor, freezing: folded and prepacked weights): one small bucket."""
    compiled = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="torch", dtype="fp32",
                                             compile=True, model_batch=2)
    eager = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="torch", dtype="fp32", model_batch=2)
    images = distinct_images(eager, 2)
    got = compiled(images)
    assert compiled.compiled and (got - eager(images)).abs().max().item() <= BUCKET_TOLERANCE["fp32"] * 10
    assert torch.equal(compiled.decode(images)[1], eager.decode(images)[1])


@requires_cuda
@pytest.mark.gpu
def test_cuda_graph_buckets_match_eager(run):
    """compile="reduce-overhead": one CUDA graph per bucket; each replay equals eager within bf16
    noise, repeated replays are bit-identical, and a later replay does not overwrite the tensors an
    earlier call returned."""
    graphs = C2FClassifier.from_checkpoint(run["run_dir"], compile="reduce-overhead", model_batch=8)
    eager = C2FClassifier.from_checkpoint(run["run_dir"], compile=False, model_batch=8)
    assert graphs.buckets == [1, 2, 4, 8] and graphs.backend == "torch"
    images = distinct_images(eager, 8).cuda()
    kept = {}
    for bucket in graphs.buckets:
        first = graphs(images[:bucket])
        kept[bucket] = (first, first.clone())
        for _ in range(2):
            assert torch.equal(graphs(images[:bucket]), first)
        assert (first - eager(images[:bucket])).abs().max().item() <= BUCKET_TOLERANCE["bf16"]
    for first, copy in kept.values():
        assert torch.equal(first, copy)


@requires_cuda
@pytest.mark.gpu
def test_cuda_defaults_and_agreement_with_the_cpu(run):
    """CUDA defaults: bf16 autocast, torch.compile, the Triton kernels; JPEGs decoded by nvJPEG.
    Scores within bf16 accuracy of the fp32 CPU reference; batch-size independent in strict mode
    (one fixed shape)."""
    default = C2FClassifier.from_checkpoint(run["run_dir"])
    assert default.backend == "torch" and default.buckets == [1, 2, 4, 8, 16, 32]
    clf = C2FClassifier.from_checkpoint(run["run_dir"], batching="strict")
    assert clf.device.type == "cuda" and clf.dtype == torch.bfloat16 and clf.compiled
    assert clf.model.cfg.fast_kernels and clf.model_batch == 32
    paths = run["paths"]
    inputs = [paths[(3 * i) % len(paths)] for i in range(19)]
    cpu = run["clf"].predict(inputs)
    one, seven = clf.predict(inputs, batch_size=1), clf.predict(inputs, batch_size=7)
    same(one, seven, sources=True)
    # tensors (resized on the GPU) and bytes (nvJPEG) agree with the CPU within bf16 + decoder noise
    by_tensor = clf.predict([decode_rgb(str(p)).cuda() for p in inputs])
    for p, q, r in zip(one, cpu, by_tensor):
        assert max(abs(p.scores[c] - q.scores[c]) for c in CLASSES) < 0.03, (p.scores, q.scores)
        assert max(abs(r.scores[c] - q.scores[c]) for c in CLASSES) < 0.03
    x = clf.preprocess([decode_rgb(str(p)) for p in paths]).cuda()
    assert clf(x).device.type == "cuda" and clf(x).dtype == torch.float32


# ---------------------------------------------------------------- c2f predict


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="c2f predict")
    add_predict_arguments(parser)
    code = predict_command(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_command(run, capsys, tmp_path):
    run_dir, paths = run["run_dir"], run["paths"]
    # what the command runs with --backend torch --dtype fp32 --batching strict (CPU model batch 32)
    expected = C2FClassifier.from_checkpoint(run_dir, device="cpu", **{**STRICT, "model_batch": 32}).predict(paths[:2])

    strict = ["--backend", "torch", "--dtype", "fp32", "--batching", "strict"]
    code, out, err = run_cli(["--checkpoint", str(run_dir), "--device", "cpu", *strict, str(paths[0]), str(paths[1])],
                             capsys)
    assert code == 0, err
    assert "2 images in" in err and "images/s" in err and "backend torch fp32" in err
    lines = out.splitlines()
    assert len(lines) == 2
    for line, p in zip(lines, expected):
        assert line.startswith(f"{p.source}: ")
        for name in p.labels:
            assert f"{name} {p.scores[name]:.3f}" in line

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    code, out, err = run_cli(["--checkpoint", str(run_dir), "--device", "cpu", *strict, "--json", "--top-k", "2",
                              str(paths[0]), str(bad), str(paths[1])], capsys)
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["source"] for r in rows] == [str(paths[0]), str(bad), str(paths[1])]
    assert rows[1]["error"] and rows[1]["labels"] == []
    assert rows[0]["error"] is None and rows[0]["labels"] == sorted(
        CLASSES, key=lambda c: -expected[0].scores[c])[:2]
    assert rows[0]["scores"] == pytest.approx(expected[0].scores, abs=0)
    assert rows[2]["step_labels"] == expected[1].step_labels
    assert "1 of 3 image(s) could not be read" in err

    code, out, err = run_cli(["--checkpoint", str(run_dir), "--device", "cpu", str(bad)], capsys)
    assert code == 1 and out == ""
    assert f"{bad}: error: " in err and "images/s" not in err  # one image: no rate
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None:
        code, out, err = run_cli(["--checkpoint", str(run_dir), "--device", "cpu", "--backend", "onnxruntime",
                                  str(paths[0]), str(paths[1])], capsys)
        assert code == 0 and out.splitlines()[0].startswith(f"{paths[0]}: ") and "backend onnxruntime" in err

    code, out, err = run_cli(["--checkpoint", str(tmp_path / "no_such_run"), str(paths[0])], capsys)
    assert code == 2 and "--checkpoint" in err and "no_such_run" in err and out == ""
    code, _, err = run_cli(["--checkpoint", str(run_dir), "--top-k", "0", str(paths[0])], capsys)
    assert code == 2 and "--top-k" in err
    code, _, err = run_cli(["--checkpoint", str(run_dir), "--threshold", "2", str(paths[0])], capsys)
    assert code == 2 and "--threshold" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(["--checkpoint", str(run_dir), "--device", "cuda", str(paths[0])], capsys)
        assert code == 2 and "CUDA is not available" in err
