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


def train_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (2 * world, 8), generator=torch.Generator().manual_seed(1))
    return x, x.roll(-1, dims=1)


def reference_loss(kind: str, world: int) -> float:
    """The first training step's loss in one process (what a step after generate must still give)."""
    x, y = train_batch(world)
    return gpt_loss(nn.Sequential(*model(kind))(x), y).item()


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



@torch.no_grad()
def reference_logprobs(layers: list[nn.Module], prompt_list: list[torch.Tensor],
                       new_tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each new token's log-probability, from one forward of the prompt and its new tokens, no cache."""
    net = nn.Sequential(*layers).eval()
    out = []
    for p, new in zip(prompt_list, new_tokens, strict=True):
        logits = net(torch.cat([p, new])[None])[0, len(p) - 1:-1]  # the positions that predicted `new`
        out.append(logits.log_softmax(dim=-1).gather(-1, new[:, None])[:, 0])
    return out

def generate(rank: int, world: int, kind: str, schedule: str, settings: list[dict], transport=None) -> dict:
    """Build the pipeline, generate with each of `settings` in turn, then check training still works."""
    layers = model(kind)
    sched = pt.schedules.build(schedule, num_ranks=world, num_microbatches=2 * world)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=gpt_loss, transport=transport, timeout=60)
    before = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    out = [pipe.generate(prompts(), **s) for s in settings]
    unchanged = all(torch.equal(before[n], p) for n, p in pipe.named_parameters())
    no_grads = all(p.grad is None for p in pipe.parameters())
    loss = pipe.step(*train_batch(world))
    timeline = pipe.gather_timeline(of="generate")
    return {"out": out, "unchanged": unchanged, "no_grads": no_grads, "loss": loss,
            "idle": [s.bubble_fraction for s in timeline.per_rank()] if timeline is not None else None,
            "training": all(m.training for layer in pipe.layers.values() for m in layer.modules())}


def hf_generate(rank: int, world: int, family: str, schedule: str, settings: dict, transport=None) -> list:
    import hf_models

    from pipetrain.models.hf import from_hf

    with _RNG_LOCK:
        layers, loss_fn = from_hf(hf_models.build(family))
    sched = pt.schedules.build(schedule, num_ranks=world, num_microbatches=2 * world)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport, timeout=60)
    return pipe.generate(hf_prompts(), **settings)


def hf_prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(0, 96, (n,), generator=gen) for n in (5, 1, 9, 3, 12)]


def hf_reference(family: str, max_new_tokens: int, eos: int | None) -> list[torch.Tensor]:
    """HF's own `generate`, greedy, one prompt at a time."""
    import hf_models

    with _RNG_LOCK:
        model = hf_models.build(family).eval()
    out = []
    for p in hf_prompts():
        full = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
        out.append(full[0, len(p):])
    return out


def generate_bad(rank: int, world: int, case: str, transport=None):
    """Each of these fails on every rank with a clear error, never a hang."""
    layers = model("gpt")
    if case == "no protocol":
        layers[3] = nn.Sequential(layers[3])  # a layer without forward_cached, on rank 0
    sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=2)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=gpt_loss, transport=transport, timeout=60)
    if case == "different prompts":
        return pipe.generate(prompts(4 + rank), max_new_tokens=3)
    if case == "too long":  # the GPT has 40 positions
        return pipe.generate(prompts(), max_new_tokens=35)
    if case == "logprobs on one rank":  # (the other rank would wait for a second gather of results)
        return pipe.generate(prompts(), max_new_tokens=3, return_logprobs=rank == 0)
    if case == "logprobs not a bool":
        return pipe.generate(prompts(), max_new_tokens=3, return_logprobs="yes")
    if case == "2-d prompt":
        return pipe.generate([torch.zeros(2, 3, dtype=torch.long)], max_new_tokens=3)
    return pipe.generate(prompts(), max_new_tokens=3)
