"""Linear layers applied at every decoder step, with one weight-gradient product for all steps.

The decoder applies the same weights (the LSTM's W_ih and W_hh) at each of its T steps. Autograd
gives every use its own weight gradient, dW_t = G_tᵀ X_t, and adds the T of them up: with a small
batch each product has an inner dimension of B (8 rows against a [2048, 768] weight on the CPU
benchmark) and runs far below the core's GEMM rate, and the T − 1 additions each read and write the
whole gradient. Here each step's backward only keeps its (X_t, G_t); the weight's own node, which
autograd runs after every step's, computes dW = [G_1; …; G_T]ᵀ [X_1; …; X_T] as one product with an
inner dimension of T·B. The function is the same; only the order of the summation over steps moves
(fp32: differences at the rounding level; tests/test_step_linear.py).

``StepLinears`` is made once per forward pass. Where deferring cannot apply (no gradient wanted,
inside ``torch.compile``'s tracing, a weight that does not require a gradient) ``linear`` is plain
``F.linear``, the same function.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable


class _Stash:
    """The (input, output gradient) pairs of one weight's uses, filled during the backward."""

    __slots__ = ("inputs", "grads")

    def __init__(self):
        self.inputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []


class _SharedWeight(torch.autograd.Function):
    """The weight as its steps see it: forward an alias; backward the one deferred product (plus
    any gradient that reached the alias by ordinary uses)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, stash: _Stash, dtype: torch.dtype):
        ctx.stash, ctx.dtype = stash, weight.dtype
        ctx.set_materialize_grads(False)  # no zero gradient for the alias when only the steps use it
        # Under autocast, cast once for all steps (as autocast's own weight cache does)
        return weight.to(dtype) if dtype != weight.dtype else weight.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Optional[torch.Tensor]):
        stash = ctx.stash
        if stash.grads:
            g = torch.cat(stash.grads) if len(stash.grads) > 1 else stash.grads[0]
            x = torch.cat(stash.inputs) if len(stash.inputs) > 1 else stash.inputs[0]
            total = g.t() @ x
            grad = total if grad is None else grad + total
        stash.inputs.clear()
        stash.grads.clear()
        return (None if grad is None else grad.to(ctx.dtype)), None, None


class _StepLinear(torch.autograd.Function):
    """y = b + x Wᵀ for one step; the backward gives x and b their gradients now and leaves W's to
    the shared node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stash: _Stash):
        # In the weight's dtype (autocast's, when the shared node cast it), as autocast would run
        # F.linear; the input is saved cast, as autocast's own copy would be.
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight)
        ctx.stash = stash
        with torch.autocast(x.device.type, enabled=False):
            if bias is None:
                return x @ weight.t()
            return torch.addmm(bias.to(weight.dtype), x, weight.t())  # as F.linear: bias in the GEMM

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype).contiguous()  # .sum() hands a stride-0 gradient: made dense once
        if ctx.needs_input_grad[1]:
            ctx.stash.inputs.append(x)
            ctx.stash.grads.append(grad)
        grad_x = (grad @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


class StepLinears:
    """Per forward pass: ``linear(x, W, b)`` for weights used at every step, their gradients
    deferred to one product each (see the module's docstring)."""

    def __init__(self):
        # (id(weight), dtype) -> (weight, its alias, its stash); holding the weight keeps its id unique
        self._shared: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor, _Stash]] = {}

    @staticmethod
    def defers(weight: torch.Tensor) -> bool:
        return weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.defers(weight):
            return torch.nn.functional.linear(x, weight, bias)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        key = (id(weight), dtype)
        entry = self._shared.get(key)
        if entry is None:
            stash = _Stash()
            entry = (weight, _SharedWeight.apply(weight, stash, dtype), stash)
            self._shared[key] = entry
        _, alias, stash = entry
        return _StepLinear.apply(x, alias, bias, stash)


__all__ = ["StepLinears"]
