"""Generation scenarios run on every rank (threads or spawned gloo processes), and their single-process
references: a plain loop over the same layers, no cache, one prompt at a time."""

from __future__ import annotations

import torch
from torch import nn
from workers import _RNG_LOCK

import pipetrain as pt
from pipetrain.models.gpt import GPTConfig, build_gpt, gpt_loss
from pipetrain.models.llama import LlamaConfig, build_llama

VOCAB = 48
EOS = 34  # stops some of `prompts()` early in both models, not all


def model(kind: str) -> list[nn.Module]:
    with _RNG_LOCK:
        torch.manual_seed(0)
        if kind == "gpt":
            return build_gpt(GPTConfig(vocab_size=VOCAB, seq_len=40, d_model=32, n_layers=6, n_heads=4))
        return build_llama(LlamaConfig(vocab_size=VOCAB, seq_len=40, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2))


def prompts(n: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen) for _ in range(n)]


@torch.no_grad()
def reference_greedy(layers: list[nn.Module], prompt_list: list[torch.Tensor], max_new_tokens: int,
                     eos: int | None) -> list[torch.Tensor]:
    """Each prompt alone, the whole sequence through `forward` at every step, argmax of the last logits."""
    net = nn.Sequential(*layers).eval()
    out = []
    for p in prompt_list:
        seq, new = p[None], []
        for _ in range(max_new_tokens):
            token = int(net(seq)[0, -1].argmax())
            new.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
        out.append(torch.tensor(new, dtype=torch.int64))
    return out


def generate(rank: int, world: int, kind: str, schedule: str, settings: dict, transport=None) -> dict:
    """Build the pipeline, generate with `settings`, then check training still works (one step)."""
    layers = model(kind)
    sched = pt.schedules.build(schedule, num_ranks=world, num_microbatches=2 * world)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=gpt_loss, transport=transport, timeout=60)
    before = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    out = pipe.generate(prompts(), **settings)
    unchanged = all(torch.equal(before[n], p) for n, p in pipe.named_parameters())
    no_grads = all(p.grad is None for p in pipe.parameters())
    x = torch.randint(0, VOCAB, (2 * world, 8), generator=torch.Generator().manual_seed(1))
    loss = pipe.step(x, x)
    timeline = pipe.gather_timeline(of="generate")
    return {"out": out, "unchanged": unchanged, "no_grads": no_grads, "loss": loss,
            "idle": [s.bubble_fraction for s in timeline.per_rank()] if timeline is not None else None,
            "training": all(m.training for layer in pipe.layers.values() for m in layer.modules())}
