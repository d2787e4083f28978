"""Export a trained model, greedy decoding included, and check the export: ``c2f export``.

:func:`export_model` writes the whole model as one graph, ``images -> (scores, emissions)``:

- input ``images``: float32 ``[B, 3, S, S]``, RGB, normalised with the ImageNet mean/std after the
  whole image is resized to ``S x S`` (what :meth:`c2f_fast.infer.C2FClassifier.preprocess` does);
  the batch size B is dynamic;
- output ``scores``: float32 ``[B, C]``, p̂ = sigmoid of the max over the decoder steps of the step
  logits (the greedy decoding of docs/model.md "Decoder", with the no-copy rule and the stop rule);
- output ``emissions``: int64 ``[B, T]``, the class each greedy step emits, -1 once decoding has
  stopped (:func:`c2f_fast.model.greedy_emissions`).

Formats: ``onnx`` (``torch.onnx.export`` with the dynamo exporter; checked with onnxruntime),
``torchscript`` (``torch.jit.trace``; checked with ``torch.jit.load``) and ``exported``
(``torch.export``, a ``.pt2`` file; checked with ``torch.export.load``). The export always uses the
reference path (``fast_kernels=False``: the same function; the Triton ops have no ONNX form) in
float32 on the CPU. The model config and class names travel with the file: ONNX metadata entry
``c2f_fast``, a ``model.json`` extra file in TorchScript and ``.pt2`` archives.

The check: the export is loaded back and run on real images (``images``) or, when none are given,
on seeded random images; its scores must match :class:`~c2f_fast.infer.C2FClassifier` (fp32, CPU)
within ``tolerance`` (max abs difference, default 1e-4) and its greedy emissions must be identical.
It runs the whole check batch and its first image alone (the batch size is dynamic). The file is
written to a temporary name beside ``out`` and renamed only after the check passes: a format that
cannot express the model, or a failed check, leaves nothing at ``out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import add_checkpoint_arguments
from .model import C2FNet, greedy_emissions

FORMATS = ("onnx", "torchscript", "exported")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
NAMES = {"onnx": "ONNX", "torchscript": "TorchScript", "exported": "torch.export (.pt2)"}
#: Default bound on the max abs score difference between the export and the module (fp32).
DEFAULT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export failed (the format cannot express the model) or its check failed (``report``)."""

    def __init__(self, message: str, report: Optional["ExportReport"] = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how the check went."""

    path: Path
    format: str
    max_abs_diff: float  # max |scores(export) - scores(module)| over the check runs
    tolerance: float
    emissions_equal: bool
    inputs: str  # what the check ran on
    passed: bool

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        sign = "<=" if self.max_abs_diff <= self.tolerance else ">"
        steps = "identical" if self.emissions_equal else "DIFFERENT"
        return (f"check {verdict}: {NAMES[self.format]} export vs C2FClassifier (fp32, CPU) on {self.inputs}: "
                f"max |score diff| = {self.max_abs_diff:.3g} {sign} tolerance {self.tolerance:.3g}; "
                f"greedy steps {steps}")


class GreedyExport(nn.Module):
    """``images -> (scores, emissions)``: C2FNet's greedy decoding as one exportable graph.

    ``emissions`` is :func:`c2f_fast.model.greedy_emissions`: the class each step emitted, -1 after
    the stop."""

    def __init__(self, model: C2FNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return torch.sigmoid(out.logits), greedy_emissions(out.step_logits)


def _metadata(clf) -> dict[str, Any]:
    from .data.base import IMAGENET_MEAN, IMAGENET_STD

    return {
        "model": clf.model.cfg.to_dict(), "class_names": clf.class_names,
        "class_order": clf.meta.get("class_order"), "image_size": clf.image_size,
        "input": "images: float32 [B, 3, S, S], RGB, (x / 255 - mean) / std after resizing the whole image to S x S",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "outputs": {"scores": "float32 [B, C], p-hat in [0, 1]",
                    "emissions": "int64 [B, T], class emitted at each greedy step, -1 after the stop"},
    }


def _export(wrapper: GreedyExport, fmt: str, example: torch.Tensor, path: Path, meta: dict) -> None:
    text = json.dumps(meta)
    if fmt == "exported":
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(wrapper, (example,), dynamic_shapes={"images": {0: batch}})
        torch.export.save(program, path, extra_files={"model.json": text})
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            # the tracer warns about the model's shape checks (static channels/size): harmless
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"model.json": text})
    elif fmt == "onnx":
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, verbose=False, input_names=["images"],
            output_names=["scores", "emissions"], dynamic_shapes={"images": {0: batch}},
        )
        program.model.metadata_props["c2f_fast"] = text
        import onnx

        proto = program.model_proto  # tuned before the one write
        tune_onnx_graph(proto)
        onnx.save(proto, str(path))  # one self-contained file (no external data)
    else:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")


def tune_onnx_graph(proto) -> int:
    """The graph rewrites ``c2f export`` applies to its ONNX file (and the ONNX Runtime backend to
    files written before them), in place: :func:`matvec_as_matmul` and
    :func:`einsum_as_matmul`. The same function; returns the number of nodes rewritten."""
    return matvec_as_matmul(proto) + einsum_as_matmul(proto)


def einsum_as_matmul(proto) -> int:
    """Rewrite, in place, each ONNX ``Einsum`` of the attention pooling form ``"bl,bld->bd"`` (any
    three distinct letters: a weighted sum over the middle axis) as
    ``Squeeze(MatMul(Unsqueeze(w, 1), x), 1)``: the same function, one batched [1, L] @ [L, D]
    product per row. Why: ONNX Runtime's CPU ``Einsum`` goes through its generic contraction
    path (transposes and a reshape around the product); the six such nodes of the demo model
    (the global attention's and each decoder step's context) cost about 3 % of a batch-1 call
    there. Returns the number of nodes rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    nodes, rewritten = [], 0
    axis = "c2f_fast_axis_1"
    for node in graph.node:
        equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        if node.op_type != "Einsum" or len(node.input) != 2 or not _is_pooling_equation(equation):
            nodes.append(node)
            continue
        weights, values = node.input
        out = node.output[0]
        nodes += [helper.make_node("Unsqueeze", [weights, axis], [f"{out}.row"], name=f"{out}.unsqueeze"),
                  helper.make_node("MatMul", [f"{out}.row", values], [f"{out}.product"], name=f"{out}.matmul"),
                  helper.make_node("Squeeze", [f"{out}.product", axis], [out], name=f"{out}.squeeze")]
        rewritten += 1
    if rewritten:
        import numpy as np

        if axis not in {init.name for init in graph.initializer}:
            graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axis))
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _is_pooling_equation(equation: str) -> bool:
    """Whether an einsum equation is ``"bl,bld->bd"`` up to the letters and spaces."""
    text = equation.replace(" ", "")
    inputs, _, output = text.partition("->")
    first, _, second = inputs.partition(",")
    if len(first) != 2 or len(second) != 3 or len(set(second)) != 3:
        return False
    b, l, d = second
    return first == b + l and output == b + d


def matvec_as_matmul(proto) -> int:
    """Rewrite, in place, each ONNX ``MatMul(X, v)`` with a 1-D weight ``v`` [K] as
    ``Squeeze(MatMul(X, v[K, 1]), -1)``: the same function. Why: ONNX Runtime's CPU MatMul runs a
    1-D right operand through a slow generic path (about 100 us for the local attention's
    [1, 256, 128] @ [128] score at batch 1, 5 of them per image: 15 % of the demo model's batch-1
    latency); as a [K, 1] matrix it is a plain GEMM. Returns the number of nodes rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    columns: dict[str, str] = {}
    nodes, rewritten = [], 0
    axes = "c2f_fast_squeeze_last_axis"
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight not in initializers or len(initializers[weight].dims) != 1:
            nodes.append(node)
            continue
        if weight not in columns:
            column = numpy_helper.to_array(initializers[weight]).reshape(-1, 1)
            columns[weight] = f"{weight}.as_column"
            graph.initializer.append(numpy_helper.from_array(column, columns[weight]))
        output = node.output[0]
        node.input[1], node.output[0] = columns[weight], f"{output}.as_column"
        nodes += [node, helper.make_node("Squeeze", [node.output[0], axes], [output], name=f"{output}.squeeze")]
        rewritten += 1
    if rewritten:
        import numpy as np

        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
        used = {name for node in nodes for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _runner(fmt: str, path: Path):
    """A function ``images -> (scores, emissions)`` (torch tensors) running the saved export."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(images: torch.Tensor):
            scores, emissions = session.run(["scores", "emissions"], {"images": images.numpy()})
            return torch.from_numpy(scores), torch.from_numpy(emissions)

        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        return lambda images: module(images)
    module = torch.export.load(path).module()
    return lambda images: module(images)


def _check_images(clf, images: Any, num_synthetic: int, seed: int) -> tuple[torch.Tensor, str]:
    from .data.base import normalize
    from .infer import _ItemError, _expand

    S = clf.image_size
    if images is not None:
        loaded = clf._load(_expand(images))
        if not loaded:
            raise ValueError("--images: no images given")
        for source, image in loaded:
            if isinstance(image, _ItemError):
                raise ValueError(f"--images: {source}: {image.problem}")
        batch = normalize(torch.stack([image for _, image in loaded]))
        return batch, f"{len(loaded)} given image(s) resized to {S}x{S}"
    generator = torch.Generator().manual_seed(seed)
    uint8 = torch.randint(0, 256, (num_synthetic, 3, S, S), dtype=torch.uint8, generator=generator)
    return normalize(uint8), f"{num_synthetic} synthetic random {S}x{S} images (seed {seed}; no images given)"


def export_model(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    images: Any = None,
    num_synthetic: int = 4,
    tolerance: float = DEFAULT_TOLERANCE,
    which: str = "best",
    seed: int = 0,
) -> ExportReport:
    """Export the model at ``checkpoint`` (anything :meth:`C2FClassifier.from_checkpoint` reads) in
    format ``fmt`` ("onnx", "torchscript" or "exported") to ``out``, then check it (see the module
    docstring). ``images``: inputs for the check (one or a list of paths, bytes, PIL images, uint8
    tensors, as :meth:`C2FClassifier.predict` takes); None →
    ``num_synthetic`` seeded random images. Returns the :class:`ExportReport` of a passed check.

    Raises ValueError for bad arguments or unreadable check images, ``CheckpointError`` for an
    unreadable checkpoint, and :class:`ExportError` when the format cannot express the model or
    the check fails (``err.report``); in every failure nothing is left at ``out``.
    """
    from .infer import C2FClassifier

    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    clf = C2FClassifier.from_checkpoint(checkpoint, device="cpu", dtype=torch.float32, compile=False,
                                        which=which, fast_kernels=False, **REFERENCE_OPTIONS)
    return export_classifier(clf, fmt, out, images=images, num_synthetic=num_synthetic, tolerance=tolerance,
                             seed=seed)


#: The C2FClassifier options of the check's reference: the plain PyTorch path (no layout changes,
#: no batch-norm folding), fixed model batches.
REFERENCE_OPTIONS = {"backend": "torch", "batching": "strict", "optimize": False}


def export_classifier(
    clf,
    fmt: str,
    out: str | os.PathLike,
    *,
    images: Any = None,
    num_synthetic: int = 4,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> ExportReport:
    """:func:`export_model` for a model already loaded: ``clf`` is a CPU, float32
    :class:`~c2f_fast.infer.C2FClassifier` on the torch backend (built with
    :data:`REFERENCE_OPTIONS`); its ``decode`` is the check's reference."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    if clf.device.type != "cpu" or clf.dtype != torch.float32 or clf.backend != "torch":
        raise ValueError(f"clf: expected a CPU float32 classifier on the torch backend, got {clf.device} "
                         f"{clf.dtype} {clf.backend}")
    if not tolerance > 0:
        raise ValueError(f"tolerance: expected a positive number, got {tolerance!r}")
    if num_synthetic < 1:
        raise ValueError(f"num_synthetic: expected a positive integer, got {num_synthetic!r}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name (e.g. model{SUFFIXES[fmt]})")
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401 -- needed for the check
        except ImportError:
            raise ExportError("onnx: onnxruntime is needed to check the export (pip install onnxruntime)") from None

    batch, described = _check_images(clf, images, num_synthetic, seed)
    runs = [batch, batch[:1]] if batch.shape[0] > 1 else [batch]
    described += f", as a batch of {batch.shape[0]}" + (" and the first alone" if len(runs) > 1 else "")
    with torch.inference_mode():
        expected = [clf.decode(x) for x in runs]

    wrapper = GreedyExport(clf.model).eval()
    example = torch.zeros(2, 3, clf.image_size, clf.image_size)  # batch 2: not specialised to 1
    out.parent.mkdir(parents=True, exist_ok=True)
    # a fresh hidden name beside ``out`` (same file system: the rename is atomic)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp{SUFFIXES[fmt]}"
    try:
        try:
            with torch.no_grad():
                _export(wrapper, fmt, example, tmp, _metadata(clf))
        except Exception as err:  # noqa: BLE001 -- the format cannot express the model
            raise ExportError(f"{fmt}: cannot export the model: {type(err).__name__}: "
                              f"{(str(err).strip().splitlines() or [''])[0][:500]}") from err
        try:
            run = _runner(fmt, tmp)
            diff, emissions_equal = 0.0, True
            with torch.no_grad():
                for x, (scores_ref, emissions_ref) in zip(runs, expected):
                    scores, emissions = run(x)
                    diff = max(diff, (scores.float() - scores_ref).abs().max().item())
                    emissions_equal &= torch.equal(emissions.long(), emissions_ref)
        except Exception as err:  # noqa: BLE001 -- the saved file does not load or run
            raise ExportError(f"{fmt}: the exported file does not load or run: {type(err).__name__}: "
                              f"{(str(err).strip().splitlines() or [''])[0][:500]}") from err
        passed = diff <= tolerance and emissions_equal  # NaN fails too
        report = ExportReport(path=out, format=fmt, max_abs_diff=diff, tolerance=tolerance,
                              emissions_equal=emissions_equal, inputs=described, passed=passed)
        if not passed:
            raise ExportError(f"{report.summary()}; nothing written to {out}", report)
        os.replace(tmp, out)
        return report
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------- c2f export


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``c2f export``; also sets ``func=export_command`` as the parser default."""
    add_checkpoint_arguments(parser)
    parser.add_argument("--format", required=True, choices=FORMATS, dest="format",
                        help="onnx (onnxruntime), torchscript (torch.jit), exported (torch.export .pt2)")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="output file")
    parser.add_argument("--images", nargs="+", default=None, metavar="IMAGE",
                        help="images to check the export on (default: synthetic random images)")
    parser.add_argument("--num-images", type=int, default=4, metavar="N",
                        help="synthetic images for the check when --images is not given (default 4)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="TOL",
                        help=f"max abs score difference allowed (default {DEFAULT_TOLERANCE:g}, fp32)")
    parser.set_defaults(func=export_command)
    return parser


def export_command(args: argparse.Namespace) -> int:
    """``c2f export``: 0 when the export passed its check, 1 when the export or the check failed
    (nothing written), 2 for a usage error (missing checkpoint, unreadable --images, bad value)."""
    from .checkpoint import CheckpointError

    try:
        report = export_model(args.checkpoint, args.format, args.out, images=args.images,
                              num_synthetic=args.num_images, tolerance=args.tolerance, which=args.weights)
    except CheckpointError as err:
        print(f"c2f export: error: --checkpoint: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"c2f export: error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"c2f export: {err}", file=sys.stderr)
        return 1
    size = report.path.stat().st_size / 2**20
    print(f"exported {NAMES[report.format]} to {report.path} ({size:.1f} MiB)")
    print(report.summary())
    return 0


__all__ = ["DEFAULT_TOLERANCE", "ExportError", "ExportReport", "FORMATS", "GreedyExport", "REFERENCE_OPTIONS",
           "add_export_arguments", "export_classifier", "export_command", "export_model"]
