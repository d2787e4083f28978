"""c2f_fast.export: each format round-trips within tolerance; failures leave no file; `c2f export`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from c2f_fast import export as export_mod
from c2f_fast.export import (DEFAULT_TOLERANCE, REFERENCE_OPTIONS, ExportError, add_export_arguments, export_command,
                             export_model)
from c2f_fast.infer import C2FClassifier, weights_hash

from test_infer import make_image, write_run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

_missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(_missing), reason=f"ONNX export/check needs {', '.join(_missing)} "
                                                       "(pip install -e .[dev])")
FORMATS = [pytest.param("onnx", marks=needs_onnx), "torchscript", "exported"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run_dir = root / "run"
    run_dir.mkdir()
    write_run(run_dir)
    paths = []
    for i, (h, w) in enumerate([(48, 80), (70, 64), (33, 41)]):
        path = root / f"img{i}.jpg"
        make_image(i, h, w).save(path, quality=90)
        paths.append(path)
    clf = C2FClassifier.from_checkpoint(run_dir, device="cpu", dtype="fp32", **REFERENCE_OPTIONS)
    return {"run_dir": run_dir, "paths": paths, "clf": clf}


def load_and_run(fmt: str, path: Path, images: torch.Tensor):
    """Run the saved file the way a user would, independently of export.py; also its metadata."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        scores, emissions = session.run(["scores", "emissions"], {"images": images.numpy()})
        meta = session.get_modelmeta().custom_metadata_map["c2f_fast"]
        return torch.from_numpy(scores), torch.from_numpy(emissions), json.loads(meta)
    extra = {"model.json": ""}
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), _extra_files=extra)
    else:
        module = torch.export.load(path, extra_files=extra).module()
    scores, emissions = module(images)
    return scores, emissions, json.loads(extra["model.json"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_within_tolerance(run, tmp_path, fmt):
    clf = run["clf"]
    out = tmp_path / "sub" / f"model.{fmt}"
    report = export_model(run["run_dir"], fmt, out, images=run["paths"])
    assert report.passed and report.emissions_equal
    assert report.max_abs_diff <= DEFAULT_TOLERANCE
    assert report.path == out and out.is_file()
    assert "3 given image(s)" in report.inputs
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left
    # an independent load, another batch size (dynamic batch), real images
    images = clf.preprocess([make_image(i, 50 + 9 * i, 64) for i in range(5)])
    scores, emissions, meta = load_and_run(fmt, out, images)
    ref_scores, ref_emissions = clf.decode(images)
    assert (scores - ref_scores).abs().max().item() <= DEFAULT_TOLERANCE
    assert torch.equal(emissions.long(), ref_emissions)
    assert (ref_emissions >= 0).any()  # the check exercises emitted classes, not only stops
    assert meta["class_names"] == clf.class_names and meta["image_size"] == 64
    assert meta["model"]["fast_kernels"] is False


def test_synthetic_images_when_none_given(run, tmp_path):
    report = export_model(run["run_dir"], "exported", tmp_path / "m.pt2", num_synthetic=3)
    assert report.passed
    assert "3 synthetic random 64x64 images" in report.inputs and "no images given" in report.inputs


def test_unexportable_model_leaves_no_file(run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        Path(args[3]).write_bytes(b"half a file")  # a partial write before the failure
        raise RuntimeError("this format cannot express aten::something")

    monkeypatch.setattr(export_mod, "_export", fail)
    out = tmp_path / "model.pt"
    with pytest.raises(ExportError, match="torchscript: cannot export the model: RuntimeError: this format cannot"):
        export_model(run["run_dir"], "torchscript", out)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_no_file(run, tmp_path, monkeypatch):
    real = export_mod._runner

    def perturbed(fmt, path):
        inner = real(fmt, path)
        return lambda images: ((lambda s, e: (s + 1e-3, e))(*inner(images)))

    monkeypatch.setattr(export_mod, "_runner", perturbed)
    out = tmp_path / "model.pt2"
    with pytest.raises(ExportError, match="check FAILED") as info:
        export_model(run["run_dir"], "exported", out)
    assert info.value.report is not None and not info.value.report.passed
    assert info.value.report.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert list(tmp_path.iterdir()) == []


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="c2f export")
    add_export_arguments(parser)
    code = export_command(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_command(run, tmp_path, capsys, monkeypatch):
    run_dir = str(run["run_dir"])
    out = tmp_path / "m.pt"
    code, stdout, err = run_cli(["--checkpoint", run_dir, "--format", "torchscript", "--out", str(out),
                                 "--num-images", "2"], capsys)
    assert code == 0, err
    assert f"exported TorchScript to {out}" in stdout
    assert "check OK" in stdout and "max |score diff| = " in stdout and "synthetic random" in stdout
    assert out.is_file()

    code, _, err = run_cli(["--checkpoint", str(tmp_path / "nope"), "--format", "onnx", "--out",
                            str(tmp_path / "x.onnx")], capsys)
    assert code == 2 and "--checkpoint" in err and "nope" in err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code, _, err = run_cli(["--checkpoint", run_dir, "--format", "exported", "--out", str(tmp_path / "y.pt2"),
                            "--images", str(bad)], capsys)
    assert code == 2 and "--images" in err and "bad.jpg" in err
    assert not (tmp_path / "y.pt2").exists()

    monkeypatch.setattr(export_mod, "_export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no op for X")))
    code, stdout, err = run_cli(["--checkpoint", run_dir, "--format", "exported", "--out", str(tmp_path / "z.pt2")],
                                capsys)
    assert code == 1 and "cannot export the model" in err and "no op for X" in err
    assert not (tmp_path / "z.pt2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg", "m.pt"]


# ---------------------------------------------------------------- the ONNX Runtime backend's cache


@needs_onnx
def test_cached_onnx_is_reused_and_rebuilt_when_the_weights_change(tmp_path):
    """from_checkpoint(backend="onnxruntime") exports beside the weights, keyed by their hash;
    the same weights reuse the file, new weights get a new file (the old one removed) that
    predicts what the new weights predict."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run(run_dir, seed=0)
    images = C2FClassifier.from_checkpoint(run_dir, device="cpu", backend="torch").preprocess(
        [make_image(i, 40 + 7 * i, 64) for i in range(3)])

    first = C2FClassifier.from_checkpoint(run_dir, device="cpu", backend="onnxruntime")
    path = first.onnx_path
    assert path.parent == run_dir and path.name.startswith("best.") and path.suffix == ".onnx"
    assert path.name == f"best.{weights_hash(first.model, first.class_names)}.onnx"
    stamp = path.stat().st_mtime_ns
    again = C2FClassifier.from_checkpoint(run_dir, device="cpu", backend="onnxruntime")
    assert again.onnx_path == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert torch.equal(again(images), first(images))

    write_run(run_dir, seed=1)  # new weights under the same name
    changed = C2FClassifier.from_checkpoint(run_dir, device="cpu", backend="onnxruntime")
    assert changed.onnx_path != path and changed.onnx_path.is_file()
    assert not path.exists()  # the stale export is gone
    assert sorted(p.name for p in run_dir.glob("*.onnx")) == [changed.onnx_path.name]
    torch_ref = C2FClassifier.from_checkpoint(run_dir, device="cpu", dtype="fp32", **REFERENCE_OPTIONS)
    assert (changed(images) - torch_ref(images)).abs().max().item() <= DEFAULT_TOLERANCE
    assert (changed(images) - first(images)).abs().max().item() > 1e-3  # it is the new model


@needs_onnx
def test_given_onnx_file_is_loaded_and_checked(run, tmp_path):
    out = tmp_path / "given.onnx"
    export_model(run["run_dir"], "onnx", out)
    clf = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="onnxruntime", onnx=out)
    assert clf.onnx_path == out and not list(Path(run["run_dir"]).glob("*.onnx"))  # nothing cached
    images = run["clf"].preprocess([make_image(i, 64, 64) for i in range(2)])
    assert (clf(images) - run["clf"](images)).abs().max().item() <= DEFAULT_TOLERANCE
    other = tmp_path / "other"
    other.mkdir()
    model = write_run(other)
    checkpoint_json = json.loads((other / "model.json").read_text())
    checkpoint_json["class_names"] = ["a", "b", "c", "d", "e"]
    (other / "model.json").write_text(json.dumps(checkpoint_json))
    del model
    with pytest.raises(ValueError, match=r"given\.onnx: exported for another model"):
        C2FClassifier.from_checkpoint(other, device="cpu", backend="onnxruntime", onnx=out)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="onnxruntime", onnx=tmp_path / "nope.onnx")


# ---------------------------------------------------------------- ONNX graph tuning


@needs_onnx
def test_matvec_rewrite_computes_the_same_function():
    """MatMul(X, v) with a 1-D weight becomes Squeeze(MatMul(X, v[K, 1]), -1): same outputs on a
    hand-built graph (a shared weight, and a MatMul with a 2-D weight that stays)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    v, w = rng.standard_normal(7).astype(np.float32), rng.standard_normal((7, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "v"], ["s1"]), helper.make_node("Tanh", ["x"], ["t"]),
         helper.make_node("MatMul", ["t", "v"], ["s2"]), helper.make_node("MatMul", ["x", "w"], ["m"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 7])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
         for n, shape in (("s1", ["b", 5]), ("s2", ["b", 5]), ("m", ["b", 5, 3]))],
        [numpy_helper.from_array(v, "v"), numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, 5, 7)).astype(np.float32)

    def run(model):
        onnx.checker.check_model(model)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    before = run(proto)
    assert export_mod.matvec_as_matmul(proto) == 2
    assert [n.op_type for n in proto.graph.node].count("Squeeze") == 2
    assert sorted(i.name for i in proto.graph.initializer) == ["c2f_fast_squeeze_last_axis", "v.as_column", "w"]
    after = run(proto)
    assert [a.shape for a in after] == [(2, 5), (2, 5), (2, 5, 3)]
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert export_mod.matvec_as_matmul(proto) == 0  # nothing left to rewrite


@needs_onnx
def test_einsum_as_matmul_keeps_the_function():
    """The attention-pooling einsum (any letters, spaces) becomes Unsqueeze-MatMul-Squeeze with the
    same outputs; other equations stay; a second pass finds nothing."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["w", "x"], ["p1"], equation="bl,bld->bd"),
         helper.make_node("Einsum", ["w", "x"], ["p2"], equation="n k , n k c -> n c"),
         helper.make_node("Einsum", ["x", "x"], ["g"], equation="bld,ble->bde")],
        "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["b", 5]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 7])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
         for n, shape in (("p1", ["b", 7]), ("p2", ["b", 7]), ("g", ["b", 7, 7]))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feed = {"w": rng.standard_normal((3, 5)).astype(np.float32), "x": rng.standard_normal((3, 5, 7)).astype(np.float32)}

    def run(model):
        onnx.checker.check_model(model)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)

    before = run(proto)
    assert export_mod.einsum_as_matmul(proto) == 2
    assert [n.op_type for n in proto.graph.node].count("Einsum") == 1  # the Gram product stays
    after = run(proto)
    for a, b in zip(after, before):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after[0], np.einsum("bl,bld->bd", feed["w"], feed["x"]), rtol=1e-5, atol=1e-6)
    assert export_mod.einsum_as_matmul(proto) == 0


@needs_onnx
def test_exported_onnx_has_no_matvec_and_batch_one_session_agrees(run, tmp_path):
    """The export carries the rewrites (the local attention's score is a [K, 1] MatMul, no Einsum
    is left); the ONNX Runtime backend's batch-1 session (batch fixed to 1) gives the dynamic
    session's results."""
    import onnx

    out = tmp_path / "model.onnx"
    export_model(run["run_dir"], "onnx", out)
    proto = onnx.load(str(out))
    one_d = {i.name for i in proto.graph.initializer if len(i.dims) == 1}
    assert not [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in one_d]
    assert any(n.name.endswith(".squeeze") for n in proto.graph.node)
    assert not [n for n in proto.graph.node if n.op_type == "Einsum"]
    clf = C2FClassifier.from_checkpoint(run["run_dir"], device="cpu", backend="onnxruntime", onnx=out)
    runner = clf._ort
    assert set(runner.sessions) == {1} and runner.sessions[1].get_inputs()[0].shape == [1, 3, 64, 64]
    images = run["clf"].preprocess([make_image(i, 60, 64) for i in range(3)])
    for i in range(3):
        x = images[i : i + 1].numpy()
        single = runner.sessions[1].run(None, {"images": x})
        dynamic = runner.session.run(None, {"images": x})
        assert abs(single[0] - dynamic[0]).max() <= 1e-6 and (single[1] == dynamic[1]).all()
    assert (clf(images[:1]) - run["clf"](images[:1])).abs().max().item() <= DEFAULT_TOLERANCE
