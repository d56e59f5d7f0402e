"""Deferred weight gradients: a stage's I computes no linear weight product, W computes them all, and I + W
gives exactly the gradients of a full backward (bias, frozen bias, a tied linear, autocast, recomputation)."""

import copy

import pytest
import torch
from torch import nn

from pipetrain.runtime.deferred_linear import defer_linears
from pipetrain.runtime.stage import Stage
from pipetrain.runtime.values import Packet, Signature, flatten


class Block(nn.Module):
    def __init__(self, tie_to: nn.Embedding | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.a.bias.requires_grad_(False)  # frozen: no gradient, before or after
        self.emb = tie_to

    def forward(self, x):
        return self.norm(x + self.b(torch.tanh(self.a(x))))


def _stage(layers, **kwargs):
    return Stage(1, 3, layers, **kwargs)


def _run(stage, x, g, split):
    leaves, spec = flatten(x)
    stage.forward(0, Packet([x], Signature.of([x.requires_grad_(True)], spec)))
    if split:
        grads_in = stage.backward_input(0, [g])
        stage.backward_weight(0)
    else:
        grads_in = stage.backward(0, [g])
    return grads_in[0], {n: p.grad for n, p in stage.module.named_parameters()}


@pytest.mark.parametrize("checkpoint", [False, True])
def test_input_then_weight_gradients_equal_a_full_backward(checkpoint):
    torch.manual_seed(0)
    layers = [Block(), Block()]
    x, g = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    ref_in, ref = _run(_stage(copy.deepcopy(layers)), x.clone(), g, split=False)
    stage = _stage(layers, split_backward=True, checkpoint=checkpoint)
    leaves, spec = flatten(x)
    stage.forward(0, Packet([x.clone()], Signature.of([x.clone().requires_grad_(True)], spec)))
    grads_in = stage.backward_input(0, [g])
    weights = [n for n, p in stage.module.named_parameters() if n.endswith(("a.weight", "b.weight"))]
    assert all(dict(stage.module.named_parameters())[n].grad is None for n in weights), "I computed a weight"
    stage.backward_weight(0)
    torch.testing.assert_close(grads_in[0], ref_in, rtol=1e-6, atol=1e-7)
    for n, p in stage.module.named_parameters():
        if ref[n] is None:
            assert p.grad is None, n  # the frozen bias
        else:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)


def test_only_linears_whose_parameters_are_their_own_are_deferred():
    emb = nn.Embedding(8, 8)
    shared = nn.Linear(8, 8, bias=False)
    shared.weight = emb.weight  # tied: autograd keeps its path
    sub = nn.Sequential(nn.Linear(8, 8))  # found among a container's modules
    odd = type("MyLinear", (nn.Linear,), {})(8, 8)  # a subclass may compute differently
    own = nn.Linear(8, 8)
    deferral = defer_linears([emb, shared, odd, own, *sub.modules()])
    assert deferral is not None
    assert "forward" in own.__dict__ and "forward" in sub[0].__dict__
    assert "forward" not in shared.__dict__ and "forward" not in odd.__dict__
    assert defer_linears([emb, shared]) is None


def test_autocast_and_no_grad_take_the_plain_path():
    lin = nn.Linear(4, 4)
    deferral = defer_linears([lin])
    deferral.pending = []
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum().backward()
    with torch.no_grad():
        lin(x)
    assert deferral.pending == [] and lin.weight.grad is not None  # computed at once, by autograd
