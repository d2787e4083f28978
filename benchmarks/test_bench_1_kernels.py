"""Cases 1–2: the Triton ops against their references (eager and ``torch.compile``), and the
device's copy bandwidth that the attention ops' GB/s is a share of.

Bytes moved (the least an implementation must read and write; scratch the kernels keep, such as
their fp32 softmax statistics, is not counted), ``e`` = element size:

- ``attention_pool`` forward: reads feats ``B·L·D·e`` + scores ``B·L·e``; writes context
  ``B·D·e`` + weights ``B·L·e``. Forward+backward adds: reads feats again, dcontext ``B·D·e``,
  dweights ``B·L·e``; writes dfeats ``B·L·D·e`` + dscores ``B·L·e``.
- ``additive_attention`` forward: reads feats ``B·L·D·e``, feats_proj ``B·L·A·e``, query_proj
  ``B·A·e``, v ``A·e``, prior ``B·L·e``; writes context ``B·D·e`` + weights ``B·L·e``.
  Forward+backward adds: reads all five inputs again, dcontext and dweights; writes a gradient of
  each input's size.
- ``copy``: ``y.copy_(x)`` moves ``2·x.nbytes``.

The LSTM cell is compute-light and counted in FLOPs: ``2·B·(X+H)·4H`` forward (the input and the
recurrent products), three times that forward+backward. Every variant runs one model step:
``x → (h, c)`` with the input projection included (``nn.LSTMCell`` cannot skip it).

On CUDA every variant is timed as ``inner`` calls captured in one CUDA graph (GPU time, no launch
overhead, the same for all); on the CPU as a plain loop. The fast (Triton) variants run only on
CUDA: on the CPU the ops fall back to their references.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import kernels
from benchmarks._bench import COPY_CASE, measure, sizes_str

PASSES = ("fwd", "fwdbwd")


def _variant_fn(profile, variant: str, fast, ref):
    if variant == "fast":
        if not profile.cuda:
            pytest.skip("the Triton fast path runs on CUDA only (on the CPU the op is its reference)")
        return fast
    if variant == "eager":
        return ref
    if variant == "eager_lowp":
        if profile.dtype == torch.float32:
            pytest.skip("the low-precision eager reference differs from 'eager' only in bf16/fp16")
        return functools.partial(ref, upcast=False)
    if variant == "compiled":
        return torch.compile(ref, dynamic=False)
    raise AssertionError(variant)


def _timed_call(op, args: tuple, cotangents: tuple | None = None, wrt: tuple | None = None):
    """What a case times: ``op(*args)`` under ``no_grad`` (``cotangents`` None), or forward and
    backward to the tensors ``wrt`` (default ``args``) with the output gradients ``cotangents``."""
    if cotangents is None:

        def call():
            with torch.no_grad():
                return op(*args)

        return call
    wrt = args if wrt is None else wrt
    return lambda: torch.autograd.grad(op(*args), wrt, cotangents)


def _attention_baselines(prefix: str, variant: str) -> tuple[str, ...]:
    """The fast op against every reference variant; the compiled reference against eager."""
    if variant == "fast":
        return (f"{prefix}/eager", f"{prefix}/compiled", f"{prefix}/eager_lowp")
    return (f"{prefix}/eager",) if variant == "compiled" else ()


def _rounds(profile) -> dict:
    return dict(rounds=10, warmup=2, prewarm=2, inner=profile.inner, graph=True) if profile.cuda else dict(
        rounds=5, warmup=1, prewarm=2, inner=profile.inner)


def test_copy(benchmark, profile):
    """Device copy bandwidth, y.copy_(x), 2·bytes/time: what the attention ops' GB/s is compared to."""
    n = (1 << 28) if profile.cuda else (1 << 24)  # 1 GiB on the GPU, 64 MiB on the CPU (fp32)
    x = torch.randn(n, device=profile.device)
    y = torch.empty_like(x)
    measure(benchmark, profile, lambda: y.copy_(x), case=COPY_CASE, group="copy",
            sizes=sizes_str(MiB=x.nbytes >> 20), bytes_moved=2 * x.nbytes,
            **{**_rounds(profile), "inner": 10 if profile.cuda else 3})


@pytest.mark.parametrize("variant", ["fast", "eager", "eager_lowp", "compiled"])
@pytest.mark.parametrize("li", [0, 1], ids=["L1", "L2"])
@pytest.mark.parametrize("pass_", PASSES)
def test_attention_pool(benchmark, profile, pass_, li, variant):
    B, L, D, dt = profile.B, profile.Ls[li], profile.D, profile.dtype
    fn = _variant_fn(profile, variant, kernels.attention_pool, kernels.attention_pool_ref)
    e = torch.finfo(dt).bits // 8
    grad = pass_ == "fwdbwd"
    feats = torch.randn(B, L, D, device=profile.device, dtype=dt, requires_grad=grad)
    scores = torch.randn(B, L, device=profile.device, dtype=dt, requires_grad=grad)
    fwd_bytes = e * (B * L * D + B * L + B * D + B * L)
    if grad:
        cotangents = (torch.randn(B, D, device=profile.device, dtype=dt),
                      torch.randn(B, L, device=profile.device, dtype=dt))
        nbytes = fwd_bytes + e * (B * L * D + B * D + B * L) + e * (B * L * D + B * L)
    else:
        cotangents, nbytes = None, fwd_bytes
    call = _timed_call(fn, (feats, scores), cotangents)
    prefix = f"attention_pool/{pass_}/L{L}"
    baselines = _attention_baselines(prefix, variant)
    measure(benchmark, profile, call, case=f"{prefix}/{variant}", group=f"attention_pool {pass_} L={L}",
            sizes=sizes_str(B=B, L=L, D=D, dtype=str(dt).replace("torch.", "")), baselines=baselines,
            bytes_moved=nbytes, **_rounds(profile))


@pytest.mark.parametrize("variant", ["fast", "eager", "eager_lowp", "compiled"])
@pytest.mark.parametrize("li", [0, 1], ids=["L1", "L2"])
@pytest.mark.parametrize("pass_", PASSES)
def test_additive_attention(benchmark, profile, pass_, li, variant):
    B, L, D, A, dt = profile.B, profile.Ls[li], profile.D, profile.A, profile.dtype
    fn = _variant_fn(profile, variant, kernels.additive_attention, kernels.additive_attention_ref)
    e = torch.finfo(dt).bits // 8
    grad = pass_ == "fwdbwd"
    dev = profile.device
    feats = torch.randn(B, L, D, device=dev, dtype=dt, requires_grad=grad)
    feats_proj = (0.5 * torch.randn(B, L, A, device=dev, dtype=dt)).requires_grad_(grad)
    query_proj = (0.5 * torch.randn(B, A, device=dev, dtype=dt)).requires_grad_(grad)
    v = (A**-0.5 * torch.randn(A, device=dev, dtype=dt)).requires_grad_(grad)
    prior = torch.softmax(torch.randn(B, L, device=dev), dim=1).to(dt).requires_grad_(grad)
    inputs = (feats, feats_proj, query_proj, v, prior)
    in_bytes = e * (B * L * D + B * L * A + B * A + A + B * L)
    fwd_bytes = in_bytes + e * (B * D + B * L)
    if grad:
        cotangents = (torch.randn(B, D, device=dev, dtype=dt), torch.randn(B, L, device=dev, dtype=dt))
        nbytes = fwd_bytes + in_bytes + e * (B * D + B * L) + in_bytes
    else:
        cotangents, nbytes = None, fwd_bytes
    call = _timed_call(fn, inputs, cotangents)
    prefix = f"additive_attention/{pass_}/L{L}"
    baselines = _attention_baselines(prefix, variant)
    measure(benchmark, profile, call, case=f"{prefix}/{variant}", group=f"additive_attention {pass_} L={L}",
            sizes=sizes_str(B=B, L=L, D=D, A=A, dtype=str(dt).replace("torch.", "")), baselines=baselines,
            bytes_moved=nbytes, **_rounds(profile))


@pytest.mark.parametrize("variant", ["fast", "nn.LSTMCell", "eager", "compiled"])
@pytest.mark.parametrize("pass_", PASSES)
def test_lstm_cell(benchmark, profile, pass_, variant):
    """One decoder LSTM step x [B, E+D] → (h, c) [B, H], the input projection included."""
    B, H, X, dt, dev = profile.B, profile.H, profile.E + profile.D, profile.dtype, profile.device
    if variant == "fast" and not profile.cuda:
        pytest.skip("the Triton fast path runs on CUDA only (on the CPU the op is its reference)")
    cell = torch.nn.LSTMCell(X, H).to(dev, dt)
    grad = pass_ == "fwdbwd"
    cell.requires_grad_(grad)
    x = torch.randn(B, X, device=dev, dtype=dt, requires_grad=grad)
    h = (0.5 * torch.randn(B, H, device=dev, dtype=dt)).requires_grad_(grad)
    c = torch.randn(B, H, device=dev, dtype=dt, requires_grad=grad)
    w_ih, w_hh, b_ih, b_hh = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh

    def fast(x, h, c):
        return kernels.lstm_cell(F.linear(x, w_ih, b_ih), h, c, w_hh, b_hh)

    def ref(x, h, c):
        return kernels.lstm_cell_ref(F.linear(x, w_ih, b_ih), h, c, w_hh, b_hh)

    step = {"fast": fast, "nn.LSTMCell": lambda x, h, c: cell(x, (h, c)), "eager": ref,
            "compiled": torch.compile(ref, dynamic=False)}[variant]
    flops = 2 * B * (X + H) * 4 * H
    cotangents = None
    if grad:
        cotangents = (torch.randn(B, H, device=dev, dtype=dt), torch.randn(B, H, device=dev, dtype=dt))
        flops *= 3
    call = _timed_call(step, (x, h, c), cotangents, wrt=(x, h, c, w_ih, w_hh, b_ih, b_hh))
    prefix = f"lstm_cell/{pass_}"
    baselines = {"fast": (f"{prefix}/nn.LSTMCell", f"{prefix}/compiled", f"{prefix}/eager"),
                 "compiled": (f"{prefix}/nn.LSTMCell", f"{prefix}/eager"),
                 "eager": (f"{prefix}/nn.LSTMCell",)}.get(variant, ())
    measure(benchmark, profile, call, case=f"{prefix}/{variant}", group=f"lstm_cell {pass_}",
            sizes=sizes_str(B=B, X=X, H=H, dtype=str(dt).replace("torch.", "")), baselines=baselines,
            flops=flops, **_rounds(profile))
