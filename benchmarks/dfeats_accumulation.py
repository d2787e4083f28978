"""What the T per-step feature-map gradients of the decoder cost, against one batched product.

    python -m benchmarks.dfeats_accumulation [--B 32] [--L 196] [--D 512] [--T 5] [--reps 5]

Each decoder step t pools the feature map with coefficients ``coef_t = w_t · prior`` ([B, L]), so
the context path contributes ``Σ_t coef_t ⊗ dctx_t`` to ``dfeats``. Today each step's attention
backward writes its own dense ``[B, L, D]`` term (rank one per batch row) and autograd adds the T
terms into one buffer. The same sum is one batched product, ``coef^T [B, L, T] @ dctx [B, T, D]``.

This script measures both on the CPU at a small size, and prints the bytes each moves at the
benchmark size (B = 256, L = 784, D = 512, T = 5, bf16) under a simple traffic model: the per-step
path writes T dense terms and autograd's in-place accumulation reads two and writes one for each of
the T - 1 additions; the batched path writes one [B, L, D] tensor and reads only the small factors.

Why the decoder does not use the batched product (issue 12): the sum can be formed only after the
last step's backward, but autograd hands each step's context gradient to that step's backward as
soon as it is known, and ``dfeats`` must leave every step node (autograd then adds it). Deferring it
needs either one autograd node spanning all T steps (the attention, the LSTM and the prediction of
every step fused into one ``autograd.Function``: the reference and fast paths would no longer share
the model code) or a side channel in which each step's backward deposits ``dctx_t`` for a later
node to read (state mutated behind autograd's back, which ``torch.compile`` / AOTAutograd do not
trace). Neither is clean, and the saving is small against a training step: see the numbers below
and ``benchmarks/KERNELS.md``. The per-step term is at least written by the kernel that already
streams ``feats`` (16-byte stores, no extra launch), and no step copies ``feats`` itself.
"""

from __future__ import annotations

import argparse
import time

import torch


def per_step(coef: torch.Tensor, dctx: torch.Tensor) -> torch.Tensor:
    """What autograd does today: T dense rank-one terms, accumulated in place."""
    total = None
    for t in range(coef.shape[1]):
        term = coef[:, t, :, None] * dctx[:, t, None, :]  # [B, L, D], what step t's backward writes
        total = term if total is None else total.add_(term)
    return total


def batched(coef: torch.Tensor, dctx: torch.Tensor) -> torch.Tensor:
    """The same sum as one batched matrix product: [B, L, T] @ [B, T, D]."""
    return torch.bmm(coef.transpose(1, 2), dctx)


def traffic_bytes(B: int, L: int, D: int, T: int, elem: int) -> tuple[int, int]:
    dense = B * L * D * elem
    per_step_bytes = T * dense + (T - 1) * 3 * dense
    batched_bytes = dense + (B * T * (L + D)) * elem
    return per_step_bytes, batched_bytes


def _time(fn, *args, reps: int) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dfeats_accumulation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=32)
    parser.add_argument("--L", type=int, default=196)
    parser.add_argument("--D", type=int, default=512)
    parser.add_argument("--T", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    coef = torch.rand(args.B, args.T, args.L)
    dctx = torch.randn(args.B, args.T, args.D)
    a, b = per_step(coef, dctx), batched(coef, dctx)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    t_step = _time(per_step, coef, dctx, reps=args.reps)
    t_bmm = _time(batched, coef, dctx, reps=args.reps)
    print(f"CPU fp32, B={args.B} L={args.L} D={args.D} T={args.T}, {torch.get_num_threads()} threads: "
          f"per-step {t_step * 1e3:.2f} ms, batched {t_bmm * 1e3:.2f} ms ({t_step / t_bmm:.1f}x)")
    for L in (196, 784):
        step_b, bmm_b = traffic_bytes(256, L, 512, 5, 2)
        print(f"benchmark size B=256 L={L} D=512 T=5 bf16: per-step {step_b / 1e9:.2f} GB, "
              f"batched {bmm_b / 1e9:.2f} GB, saving {(step_b - bmm_b) / 1e9:.2f} GB per iteration "
              f"(~{(step_b - bmm_b) / 4.0e12 * 1e3:.2f} ms at 4 TB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
