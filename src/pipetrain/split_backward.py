"""Split backward: I computes the input gradient now, W the weight gradients later, exactly once each.

I runs autograd toward the stage input only. Where a weight-only branch leaves the input's path (an
"intermediate" node such as a Linear's addmm), a pre-hook captures the gradient arriving there. W later
restarts autograd from those nodes with the captured gradients, toward the parameters only, so the weight
matmuls run once, in W. Parameters are grouped by the intermediates they hang off; each group is one
autograd call, so no gradient is propagated twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass
class _Group:
    intermediates: list  # autograd nodes on the input path with a weight-only branch
    params: list[torch.nn.Parameter]
    grads: dict[int, tuple] = field(default_factory=dict)  # id(node) -> captured grad_outputs


@dataclass
class PendingWeightGrad:
    """What W needs after I: the retained graph's output and the captured intermediate gradients."""

    groups: list[_Group]
    keep_alive: tuple  # the stage output (keeps the graph) and its input


def backward_input(output: torch.Tensor, grad_output: torch.Tensor | None, inp: torch.Tensor | None,
                   params: list[torch.nn.Parameter]) -> tuple[torch.Tensor | None, PendingWeightGrad | None]:
    """I: the gradient of `inp`; returns it and what `backward_weight` needs (None if W has nothing to do)."""
    if output.grad_fn is None:
        return (torch.zeros_like(inp) if inp is not None and inp.requires_grad else None), None
    input_node = get_gradient_edge(inp).node if inp is not None and inp.requires_grad else None
    groups = _param_groups(output.grad_fn, input_node, params) if input_node is not None else None
    trainable = [p for p in params if p.requires_grad]
    if groups is None:
        # no input path (first stage): all of the backward is weight work, and W runs it later.
        if input_node is None:
            return None, PendingWeightGrad([_Group([], trainable)], (output, grad_output))
        # a graph we cannot split safely: input and weight gradients both now, W has nothing left
        (grad_in,) = torch.autograd.grad(output, [inp], grad_output, retain_graph=bool(trainable))
        if trainable:
            torch.autograd.backward(output, grad_output, inputs=trainable)
        return grad_in, None
    handles = []
    for group in groups:
        for node in group.intermediates:
            handles.append(node.register_prehook(_capture(group, node)))
    try:
        (grad_in,) = torch.autograd.grad(output, [inp], grad_output, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if grad_in is None:
        grad_in = torch.zeros_like(inp)
    return grad_in, PendingWeightGrad(groups, (output, inp))


def backward_weight(pending: PendingWeightGrad | None) -> None:
    """W: accumulate the weight gradients into `.grad`, then release the graph."""
    if pending is None:
        return
    groups = [g for g in pending.groups if g.params]
    for i, group in enumerate(groups):
        retain = i < len(groups) - 1
        if not group.intermediates:  # first stage: the whole backward is weight work
            output, grad_output = pending.keep_alive
            torch.autograd.backward(output, grad_output, retain_graph=retain, inputs=group.params)
            continue
        edges, grads = [], []
        for node in group.intermediates:
            for nr, g in enumerate(group.grads.get(id(node), ())):
                if g is not None:
                    edges.append(GradientEdge(node, nr))
                    grads.append(g)
        if not edges:
            continue
        # the engine accumulates into .grad itself, as AccumulateGrad does in a full backward
        torch.autograd.backward(edges, grads, retain_graph=retain, inputs=group.params)


def _capture(group: _Group, node):
    def hook(grad_outputs):
        group.grads[id(node)] = tuple(grad_outputs)

    return hook


def _param_groups(root, input_node, params: list[torch.nn.Parameter]) -> list[_Group] | None:
    """Group parameters by the input-path nodes their branches leave from; None if unsafe to split."""
    param_of = {}
    for p in params:
        if p.requires_grad:
            param_of[get_gradient_edge(p).node] = p
    # every node of the graph, children listed
    children, order, stack, seen = {}, [], [root], {root}
    while stack:
        node = stack.pop()
        order.append(node)
        kids = [c for c, _ in node.next_functions if c is not None]
        children[node] = kids
        if "CheckpointFunction" in type(node).__name__:  # reentrant checkpoint runs its own backward
            return None
        for c in kids:
            if c not in seen:
                seen.add(c)
                stack.append(c)
    reaches_input: dict = {}
    reaches_params: dict = {}
    for node in _post_order(root, children):
        reaches_input[node] = node is input_node or any(reaches_input[c] for c in children[node])
        found = {param_of[node]} if node in param_of else set()
        for c in children[node]:
            found |= reaches_params[c]
        reaches_params[node] = frozenset(found) if found else frozenset()
    if not reaches_input[root]:
        return None
    by_node = {}  # intermediate -> params hanging off its weight-only children
    for node in order:
        if not reaches_input[node]:
            continue
        hanging = set()
        for c in children[node]:
            if not reaches_input[c]:
                hanging |= reaches_params[c]
        if hanging:
            by_node[node] = hanging
    # union intermediates that share a parameter
    groups: list[tuple[list, set]] = []
    for node, ps in by_node.items():
        merged_nodes, merged_params = [node], set(ps)
        rest = []
        for nodes, gps in groups:
            if gps & merged_params:
                merged_nodes += nodes
                merged_params |= gps
            else:
                rest.append((nodes, gps))
        groups = rest + [(merged_nodes, merged_params)]
    for nodes, _ in groups:
        if len(nodes) > 1 and _one_reaches_another(nodes, children):
            return None  # a shared parameter on two levels of the input path: W would count it twice
    ordered = {id(p): i for i, p in enumerate(params)}
    return [_Group(nodes, sorted(ps, key=lambda p: ordered[id(p)])) for nodes, ps in groups]


def _post_order(root, children) -> list:
    out, stack, done = [], [(root, False)], set()
    while stack:
        node, expanded = stack.pop()
        if node in done:
            continue
        if expanded:
            done.add(node)
            out.append(node)
            continue
        stack.append((node, True))
        for c in children[node]:
            if c not in done:
                stack.append((c, False))
    return out


def _one_reaches_another(nodes: list, children) -> bool:
    targets = set(nodes)
    for start in nodes:
        stack, seen = list(children[start]), set()
        while stack:
            node = stack.pop()
            if node in targets:
                return True
            if node in seen:
                continue
            seen.add(node)
            stack.extend(children[node])
    return False
