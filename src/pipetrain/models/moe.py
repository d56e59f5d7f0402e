"""A mixture-of-experts feed-forward for the reference Llama: a top-k softmax router and E SwiGLU experts.

    router   logits = x @ W_r^T  (n, E);  probs = softmax(logits);  top-k of probs, renormalized
    experts  y_i = sum_j w_ij * down_e(silu(gate_e(x_i)) * up_e(x_i)),  e = chosen[i, j]

The experts are 3-d tensors (E, ...) with transformers' experts protocol, `forward(x (n, d), chosen (n, k),
weights (n, k)) -> (n, d)`, so expert parallelism (runtime/expert_parallel.py) splits them and theirs alike.
The router adds the Switch Transformer load-balancing loss of its layer, `aux_coef * E * sum_e f_e P_e`, with
`pt.add_aux_loss` (f_e: the fraction of top-k choices of expert e; P_e: its mean probability).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.aux_loss import add_aux_loss
from ..runtime.expert_parallel import dispatch_combine
from .load_balance import balance_loss, router_sums


class Experts(nn.Module):
    """E SwiGLU experts of hidden size `d_expert`: gate_up (E, 2 d_expert, d), down (E, d, d_expert)."""

    def __init__(self, num_experts: int, d_model: int, d_expert: int) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * d_expert, d_model))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, d_expert))

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (n, d), chosen (n, k) expert ids, weights (n, k) -> (n, d): each expert runs once, on its tokens
        (the pairs sorted by expert and combined back by `dispatch_combine`, as expert parallel does)."""
        return dispatch_combine(self.grouped, x, chosen, weights, num_experts=len(self.gate_up))

    def grouped(self, tokens: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """tokens (r, d) sorted by their expert (r,) -> each through its expert, (r, d)."""
        counts = torch.bincount(expert, minlength=len(self.gate_up)).tolist()
        outs = []
        gate_ups, downs = self.gate_up.unbind(0), self.down.unbind(0)  # (one gradient tensor each, not one per expert)
        for rows, gate_up, down in zip(tokens.split(counts), gate_ups, downs, strict=True):
            if not len(rows):  # (an expert without tokens: nothing to run)
                continue
            gate, up = F.linear(rows, gate_up).chunk(2, dim=-1)  # (r_e, d_expert) each
            outs.append(F.linear(F.silu(gate) * up, down))  # (r_e, d)
        return torch.cat(outs) if outs else tokens.new_zeros(0, tokens.shape[-1])


class MoEFeedForward(nn.Module):
    """x (b, t, d) -> (b, t, d): each token through its top-k experts, weighted by its router."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, d_expert: int, aux_coef: float) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts, {num_experts}")
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = Experts(num_experts, d_model, d_expert)
        self.top_k, self.aux_coef = top_k, aux_coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = x.reshape(-1, d)  # (n, d)
        logits = self.router(h)  # (n, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (n, k)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.aux_coef and self.training:
            add_aux_loss(self.aux_coef * balance_loss(router_sums(logits, self.top_k)))
        return self.experts(h, chosen, weights.to(x.dtype)).view(b, t, d)
