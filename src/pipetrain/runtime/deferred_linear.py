"""Weight gradients of nn.Linear as deferred matrix products, for split-backward (I/W) schedules.

In a stage that splits its backward, each `nn.Linear` runs through `_DeferrableLinear`: during I its
backward computes only the input gradient and keeps (input, output gradient); W then computes the weight
and bias gradients with two explicit products, as the zero-bubble paper's runtime does. Outside I (a full
B, or a stage without input gradients) the same function returns the weight gradients at once, so the
gradients are those of `F.linear` either way.

    I:  grad_x = grad_out @ weight                          (b*t, out) @ (out, in)
    W:  weight.grad += grad_out^T @ x ; bias.grad += grad_out.sum(0)   (out, b*t) @ (b*t, in)
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_parallel import is_dtensor


class Deferral:
    """One stage's switch: while `pending` is a list (during I), linears append their W work to it."""

    def __init__(self) -> None:
        self.pending: list[tuple] | None = None


def defer_linears(modules: Iterable[nn.Module]) -> Deferral | None:
    """Route every `nn.Linear` among `modules` whose weight and bias belong to it alone through a deferrable
    product (by giving the instance its own `forward`). Returns the stage's Deferral (None if no linear
    qualifies)."""
    modules = list(modules)
    owners: dict[int, int] = {}
    for module in modules:
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    deferral, deferred = Deferral(), False
    for module in modules:
        if type(module) is not nn.Linear:  # subclasses may compute differently
            continue
        if is_dtensor(module.weight):  # tensor parallel: DTensor's hooks redistribute around the product, and
            continue  # autograd's own I / W split (split_backward.py) keeps them in the graph
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(owners[id(p)] > 1 for p in params):  # shared (tied) weights keep autograd's path
            continue
        module.forward = partial(_linear_forward, module, deferral)
        deferred = True
    return deferral if deferred else None


def undefer_linears(modules: Iterable[nn.Module]) -> None:
    """Give back the class's own `forward` to the linears `defer_linears` routed."""
    for module in modules:
        routed = module.__dict__.get("forward")
        if isinstance(routed, partial) and routed.func is _linear_forward:
            del module.__dict__["forward"]


def apply_weight_grads(pending: list[tuple]) -> None:
    """W: accumulate the deferred weight (and bias) gradients into `.grad`, as autograd would."""
    for x, grad_out, weight, bias in reversed(pending):  # the most recent (still in cache) first
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (b*t, out)
        _accumulate(weight, g2.t() @ x.reshape(-1, x.shape[-1]))  # (out, in)
        if bias is not None:
            _accumulate(bias, g2.sum(0))


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def _linear_forward(module: nn.Linear, deferral: Deferral, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or not module.weight.requires_grad:
        return F.linear(x, module.weight, module.bias)  # (autocast: the casts' own backward keeps it exact)
    return _DeferrableLinear.apply(x, module.weight, module.bias, deferral)


class _DeferrableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, deferral):
        ctx.save_for_backward(x)  # (recomputed under activation checkpointing)
        ctx.weight, ctx.bias, ctx.deferral = weight, bias, deferral  # the parameters themselves, to accumulate into
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None  # (..., in)
        pending = ctx.deferral.pending
        if pending is not None:
            pending.append((x.detach(), grad_out.detach(), weight, ctx.bias if ctx.needs_input_grad[2] else None))
            return grad_x, None, None, None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
        grad_b = g2.sum(0) if ctx.bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None
