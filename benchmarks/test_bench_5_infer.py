"""Case 6: inference through ``c2f_fast.infer.C2FClassifier`` from decoded, normalised tensors
(``classifier(images) -> scores``): batch-1 latency and batch-256 throughput (CPU: batch 64).

The checkpoint (random weights of the profile's model on the GPU: VGG-16 at 224 px; on the CPU the
demo model, ``c2f_fast.demo.DEMO_CONFIG``: ``tiny`` at 128 px, H=256, E=64, A=128, T=5, 20 classes)
is written once per session with ``save_weights`` + ``write_model_json``, as training writes it.
Greedy decoding over all T steps (the stop rule does not shorten the static loop).

CPU (``test_infer_vs_onnxruntime``): ONNX Runtime is the baseline, the runtime a user would pick
instead: the ``.onnx`` that ``C2FClassifier`` exports and caches beside the weights (the same file
``c2f export --format onnx`` writes), run by a plain ``onnxruntime.InferenceSession`` (CPU
provider, ``intra_op_num_threads`` = torch's thread count, default graph optimisations). Against
it, timed round-robin in the same process (:func:`benchmarks._bench.measure_interleaved`):

- ``default``: ``C2FClassifier.from_checkpoint(dir, device="cpu")`` with every default (backend
  ``auto``: each bucket on the backend its stored timing found faster, one image on ONNX Runtime's
  batch-1 session; bf16 where the CPU has it; buckets; model_batch 32);
- ``torch``: the torch backend with its defaults (channels_last, batch norm folded, pool before
  ReLU, sigmoid-form attention scores, bf16 where the CPU has it, buckets);
- ``torch_fp32_plain``: the earlier default (fp32, the plain model, fixed batches of the
  benchmark's batch size);
- ``torch_fp32_compiled``: ``compile=True`` (Inductor with freezing), fp32, ``model_batch`` = the
  benchmark's batch: not a default (about a minute of compilation per bucket), for reference.

GPU (``test_infer``): eager, compiled and CUDA graphs (``compile="reduce-overhead"``), bf16 autocast
and the Triton decoder, ``model_batch`` = the benchmark's batch (one bucket of that size).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._bench import measure, measure_interleaved, sizes_str
from c2f_fast.infer import C2FClassifier


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, profile):
    from c2f_fast.checkpoint import save_weights, write_model_json
    from c2f_fast.model import C2FNet, ModelConfig

    if profile.cuda:
        cfg = ModelConfig(variant="lstm_lg", backbone=profile.backbone, num_classes=profile.C, steps=profile.T,
                          hidden=profile.H, embed=profile.E, attn=profile.A, image_size=profile.image_size)
    else:  # the model `c2f demo` trains
        from c2f_fast.demo import DEMO_CONFIG

        cfg = ModelConfig(**DEMO_CONFIG["model"], num_classes=profile.C)
    torch.manual_seed(0)
    model = C2FNet(cfg)
    folder = tmp_path_factory.mktemp("checkpoint")
    save_weights(folder / "best.safetensors", model)
    names = [f"class{i}" for i in range(profile.C)]
    write_model_json(folder, {"model": cfg.to_dict(), "class_names": names, "class_order": list(range(profile.C))})
    return folder


@pytest.mark.parametrize("batch", ["b1", "bN"])
def test_infer_vs_onnxruntime(benchmark, profile, checkpoint_dir, batch):
    if profile.cuda:
        pytest.skip("CPU case: ONNX Runtime's CPU provider against the CPU classifier")
    ort = pytest.importorskip("onnxruntime")
    B = 1 if batch == "b1" else profile.infer_batch
    default = C2FClassifier.from_checkpoint(checkpoint_dir, device="cpu")
    if default.onnx_path is None:
        pytest.skip(f"no ONNX export for the baseline (backend {default.backend})")
    torch_backend = C2FClassifier.from_checkpoint(checkpoint_dir, device="cpu", backend="torch")
    plain = C2FClassifier.from_checkpoint(checkpoint_dir, device="cpu", backend="torch", dtype="fp32",
                                          batching="strict", optimize=False, model_batch=B)
    compiled = C2FClassifier.from_checkpoint(checkpoint_dir, device="cpu", backend="torch", dtype="fp32",
                                             compile=True, model_batch=B)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(default.onnx_path), options, providers=["CPUExecutionProvider"])
    S = default.image_size
    images = torch.randn(B, 3, S, S)
    array = images.numpy()

    def call(clf):
        def run():
            with torch.inference_mode():
                return clf(images)
        return run

    prefix = f"infer/b{B}"
    cases = {
        f"{prefix}/onnxruntime": lambda: session.run(["scores", "emissions"], {"images": array}),
        f"{prefix}/default": call(default),
        f"{prefix}/torch": call(torch_backend),
        f"{prefix}/torch_fp32_plain": call(plain),
        f"{prefix}/torch_fp32_compiled": call(compiled),
    }
    base = (f"{prefix}/onnxruntime",)
    dtype = lambda clf: str(clf.dtype).replace("torch.", "")  # noqa: E731
    measure_interleaved(
        benchmark, profile, cases, group=f"inference batch {B} vs ONNX Runtime",
        sizes=sizes_str(backbone=profile.backbone, S=S, B=B, T=profile.T, C=profile.C, H=default.model.cfg.hidden,
                        threads=torch.get_num_threads()),
        baselines={name: base for name in cases if name != base[0]}, items=B,
        rounds=200 if B == 1 else 16, prewarm=3 if B == 1 else 1,
        extra={f"{prefix}/default": {"backend": default.describe_backend(), "buckets": default.buckets},
               f"{prefix}/torch": {"backend": torch_backend.describe_backend(), "dtype": dtype(torch_backend)},
               f"{prefix}/torch_fp32_plain": {"model_batch": plain.model_batch},
               f"{prefix}/torch_fp32_compiled": {"model_batch": compiled.model_batch, "freezing": True},
               f"{prefix}/onnxruntime": {"intra_op_num_threads": options.intra_op_num_threads}},
    )


@pytest.mark.parametrize("compiled", [False, True, "reduce-overhead"], ids=["eager", "compiled", "cudagraphs"])
@pytest.mark.parametrize("batch", ["b1", "bN"])
def test_infer(benchmark, profile, checkpoint_dir, batch, compiled):
    if not profile.cuda:
        pytest.skip("GPU case (the CPU runs test_infer_vs_onnxruntime)")
    B = 1 if batch == "b1" else profile.infer_batch
    clf = C2FClassifier.from_checkpoint(checkpoint_dir, device=profile.device, dtype=None, compile=compiled,
                                        model_batch=B, backend="torch")
    S = clf.image_size
    images = torch.randn(B, 3, S, S, device=profile.device)

    def call():
        with torch.inference_mode():
            return clf(images)

    variant = {False: "eager", True: "compiled", "reduce-overhead": "cudagraphs"}[compiled]
    name = f"infer/b{B}/{variant}"
    baselines = (f"infer/b{B}/eager",) if compiled else ()
    measure(benchmark, profile, call, case=name, group=f"inference batch {B}",
            sizes=sizes_str(backbone=profile.backbone, S=S, B=B, T=profile.T, C=profile.C, H=clf.model.cfg.hidden,
                            dtype=str(clf.dtype).replace("torch.", "")),
            baselines=baselines, items=B,
            extra={"model_batch": clf.model_batch, "fast_kernels": clf.model.cfg.fast_kernels},
            rounds=20 if B == 1 else 8, warmup=3, prewarm=3)
