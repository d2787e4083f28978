"""Case 6: inference through ``c2f_fast.infer.C2FClassifier`` from decoded, normalised tensors
(``classifier(images) -> scores``): batch-1 latency and batch-256 throughput (CPU: batch 64),
eager against compiled.

The checkpoint (random weights of the profile's model on the GPU: VGG-16 at 224 px; on the CPU the
demo model, ``c2f_fast.demo.DEMO_CONFIG``: ``tiny`` at 128 px, H=256, E=64, A=128, T=5, 20 classes) is written once per session with ``save_weights`` + ``write_model_json``, as
training writes it, and loaded with ``C2FClassifier.from_checkpoint(dir, device, dtype=None,
compile=...)``: on CUDA bf16 autocast and the Triton decoder, on the CPU fp32 and the reference
decoder. ``model_batch`` (images per model call) is set to the benchmark's batch, so batch 1
runs a batch of 1 rather than a zero-padded default batch.
Greedy decoding over all T steps (the stop rule does not shorten the static loop).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._bench import measure, sizes_str
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


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("batch", ["b1", "bN"])
def test_infer(benchmark, profile, checkpoint_dir, batch, compiled):
    B = 1 if batch == "b1" else profile.infer_batch
    clf = C2FClassifier.from_checkpoint(checkpoint_dir, device=profile.device, dtype=None, compile=compiled,
                                        model_batch=B)
    S = clf.image_size
    images = torch.randn(B, 3, S, S, device=profile.device)

    def call():
        with torch.inference_mode():
            return clf(images)

    name = f"infer/b{B}/{'compiled' if compiled else 'eager'}"
    baselines = (f"infer/b{B}/eager",) if compiled else ()
    rounds = dict(rounds=20 if B == 1 else 8, warmup=3, prewarm=3) if profile.cuda else \
        dict(rounds=15 if B == 1 else 5, warmup=1, prewarm=2)
    measure(benchmark, profile, call, case=name, group=f"inference batch {B}",
            sizes=sizes_str(backbone=profile.backbone, S=S, B=B, T=profile.T, C=profile.C, H=clf.model.cfg.hidden,
                            dtype=str(clf.dtype).replace("torch.", "")),
            baselines=baselines, items=B,
            extra={"model_batch": clf.model_batch, "fast_kernels": clf.model.cfg.fast_kernels},
            **rounds)
