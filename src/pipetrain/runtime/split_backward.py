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
    """What W needs after I: the retained graph's outputs and the captured intermediate gradients."""

    groups: list[_Group]
    keep_alive: tuple  # the stage outputs (they keep the graph) and their gradients or the inputs


def backward_input(outputs: list[torch.Tensor], grad_outputs: list[torch.Tensor | None],
                   inputs: list[torch.Tensor], params: list[torch.nn.Parameter]
                   ) -> tuple[list[torch.Tensor], PendingWeightGrad | None]:
    """I: the gradients of `inputs` (leaves that require grad) from the gradients of `outputs` (tensors
    that require grad; None for a scalar seeded with 1); returns them and what `backward_weight` needs
    (None if W has nothing left to do)."""
    trainable = [p for p in params if p.requires_grad]
    if not outputs:
        return [torch.zeros_like(i) for i in inputs], None
    if not inputs:  # no input path (first stage): all of the backward is weight work, and W runs it later
        return [], PendingWeightGrad([_Group([], trainable)], (outputs, grad_outputs))
    roots = [get_gradient_edge(o).node for o in outputs]
    groups = _param_groups(roots, {get_gradient_edge(i).node for i in inputs}, params)
    if groups is None:
        # a graph we cannot split safely: input and weight gradients both now, W has nothing left
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=bool(trainable), allow_unused=True)
        if trainable:
            torch.autograd.backward(outputs, grad_outputs, inputs=trainable)
        return _zeros_for_unused(grads, inputs), None
    handles = []
    for group in groups:
        for node in group.intermediates:
            handles.append(node.register_prehook(_capture(group, node)))
    try:
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return _zeros_for_unused(grads, inputs), PendingWeightGrad(groups, (outputs, inputs))


def _zeros_for_unused(grads, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(i) for g, i in zip(grads, inputs, strict=True)]


def backward_weight(pending: PendingWeightGrad | None) -> None:
    """W: accumulate the weight gradients into `.grad`, then release the graph."""
    if pending is None:
        return
    groups = [g for g in pending.groups if g.params]
    for i, group in enumerate(groups):
        retain = i < len(groups) - 1
        if not group.intermediates:  # first stage: the whole backward is weight work
            outputs, grad_outputs = pending.keep_alive
            torch.autograd.backward(outputs, grad_outputs, retain_graph=retain, inputs=group.params)
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


def _param_groups(roots: list, input_nodes: set, params: list[torch.nn.Parameter]) -> list[_Group] | None:
    """Group parameters by the input-path nodes their branches leave from; None if unsafe to split (or if
    an output does not depend on any input: its whole backward is weight work)."""
    param_of = {}
    for p in params:
        if p.requires_grad:
            param_of[get_gradient_edge(p).node] = p
    # every node of the graph, children listed
    children, order, stack, seen = {}, [], list(dict.fromkeys(roots)), set(roots)
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
    for node in _post_order(roots, children):
        reaches_input[node] = node in input_nodes or any(reaches_input[c] for c in children[node])
        found = {param_of[node]} if node in param_of else set()
        for c in children[node]:
            found |= reaches_params[c]
        reaches_params[node] = frozenset(found) if found else frozenset()
    if not all(reaches_input[r] for r in roots):
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


def _post_order(roots: list, children) -> list:
    out, stack, done = [], [(r, False) for r in roots], set()
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
