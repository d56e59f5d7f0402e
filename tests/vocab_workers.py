"""Vocabulary-parallel scenarios run on every spawned gloo rank: loss and gradients against one process."""

from __future__ import annotations

import torch
from torch import nn

import pipetrain as pt
from pipetrain.models.gpt import GPTConfig, build_gpt, gpt_loss, gpt_loss_sum
from pipetrain.models.llama import LlamaConfig, build_llama

VOCAB = 37  # (uneven shards over 2 and 4 ranks)


def tiny_hf(family: str, **overrides):
    """A random 6-layer model from transformers (Llama or Qwen2) as (layers, loss_fn): from_hf's layers and its
    shifted, token-mean cross-entropy."""
    import transformers

    from pipetrain.models.hf import from_hf

    size = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False) | overrides
    config, model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    return from_hf(model(config(**size)))


def build(model: str):
    """(layers, loss_fn), the same on every rank after seeding."""
    torch.manual_seed(0)
    if model.startswith("hf-"):
        family, _, tied = model.removeprefix("hf-").partition("-")
        return tiny_hf(family, tie_word_embeddings=tied == "tied")
    if model.startswith("gpt"):
        tied = model == "gpt-tied"
        return build_gpt(GPTConfig(vocab_size=VOCAB, seq_len=8, d_model=16, n_layers=6, n_heads=2,
                                   tie_embeddings=tied)), gpt_loss
    cfg = LlamaConfig(vocab_size=VOCAB, seq_len=8, d_model=16, n_layers=6, n_heads=4, n_kv_heads=2)
    return build_llama(cfg), gpt_loss_sum


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def vocabulary_scenario(rank: int, world: int, cases: list[tuple[str, str, int]], tp: int = 1) -> dict:
    """Each case (model, schedule, microbatches): one step on a vocabulary-parallel pipeline and on one process;
    returns per case the two losses, every gradient this rank holds (whole) and the single process's, an
    evaluation's loss, and the placed schedule's text. With `tp`, a (pp, tp) mesh: the tables split over all."""
    out = {}
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("pp", "tp"))
    for model, schedule, m in cases:
        layers, loss_fn = build(model)
        reference, _ = build(model)
        torch.manual_seed(1)
        x, y = torch.randint(0, VOCAB, (2 * m, 8)), torch.randint(0, VOCAB, (2 * m, 8))
        y[::3, 2] = -100  # ignored tokens: the token mean counts the rest
        sample = x[: len(x) // m] if schedule == "auto" else None  # (auto: one microbatch to time the layers on)
        pipe = pt.Pipeline(layers, schedule=schedule, num_microbatches=m, loss_fn=loss_fn, vocab_parallel=True,
                           mesh=mesh, sample=sample)
        inputs = (lambda ids: {"input_ids": ids}) if model.startswith("hf-") else (lambda ids: ids)
        x = inputs(x)
        loss = pipe.step(x, y)
        grads = {(i, n): whole(p.grad).clone() for i, layer in pipe.layers.items() for n, p in layer.named_parameters()}
        evaluated = pipe.evaluate(x, y)
        ref = nn.Sequential(*reference)
        generated = reference_generated = None
        if not model.startswith("hf-"):  # greedy decoding through the split tables, against one process's
            prompts = [x[0, :3], x[1, :2]]
            generated = [t.tolist() for t in pipe.generate(prompts, 4)]
            reference_generated = [greedy(ref, prompt, 4) for prompt in prompts]
        if model.startswith("gpt"):  # a mean over microbatches of each one's token mean
            want = sum(loss_fn(ref(xs), ys) for xs, ys in zip(x.chunk(m), y.chunk(m), strict=True)) / m
        else:
            total, count = loss_fn(ref(x), y)
            want = total / count
        want.backward()
        ref_grads = {(i, n): p.grad.clone() for i, layer in enumerate(reference) for n, p in layer.named_parameters()}
        rows = local_rows(pipe)
        out[(model, schedule)] = dict(loss=loss, want=want.item(), evaluated=evaluated, grads=grads, rows=rows,
                                      ref_grads=ref_grads, schedule=str(pipe.schedule), generated=generated,
                                      reference_generated=reference_generated)
    return out


def local_rows(pipe) -> int:
    """The rows of the head's projection this rank holds."""
    return pipe._vocabulary.projection.weight.to_local().shape[0]


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, new: int) -> list[int]:
    """One process's greedy continuation: the whole sequence through the model, the last position's argmax."""
    ids = prompt.tolist()
    for _ in range(new):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def vocabulary_dp_scenario(rank: int, world: int, schedule: str) -> dict:
    """dp 2 x pp 2, vocabulary parallel over each pipeline, each replica its half of the batch, against one process
    on the whole batch: one step's token mean and gradients (summed over the replicas); then with ZeRO-2
    (shard="gradients"), the weights after one SGD step (the tables' rows updated from their reduced pieces)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "pp"))
    torch.manual_seed(1)
    x, y = torch.randint(0, VOCAB, (8, 8)), torch.randint(0, VOCAB, (8, 8))
    y[::3, 2] = -100
    mine = slice(4 * mesh["dp"].get_local_rank(), 4 * mesh["dp"].get_local_rank() + 4)
    out = {}
    for shard in ("none", "gradients"):
        layers, loss_fn = build("llama")
        reference, _ = build("llama")
        pipe = pt.Pipeline(layers, schedule=schedule, num_microbatches=2, loss_fn=loss_fn, mesh=mesh,
                           vocab_parallel=True, shard=shard)
        optimizer = pipe.optimizer(lambda groups: torch.optim.SGD(groups, lr=0.5)) if shard != "none" else None
        loss = pipe.step(x[mine], y[mine])
        evaluated = pipe.evaluate(x[mine], y[mine])
        total, count = loss_fn(nn.Sequential(*reference)(x), y)
        (total / count).backward()
        if optimizer is None:
            got = {(i, n): whole(p.grad).clone() for i, layer in pipe.layers.items()
                   for n, p in layer.named_parameters()}
            want = {(i, n): p.grad.clone() for i, layer in enumerate(reference) for n, p in layer.named_parameters()}
        else:  # (compared as the gradients are)
            optimizer.step()
            got = {(i, n): whole(p.detach()).clone() for i, layer in pipe.layers.items()
                   for n, p in layer.named_parameters()}
            want = {(i, n): (p - 0.5 * p.grad).detach() for i, layer in enumerate(reference)
                    for n, p in layer.named_parameters()}
        out[("llama", schedule, shard)] = dict(loss=loss, want=(total / count).item(), evaluated=evaluated, grads=got,
                                               ref_grads=want, generated=None, reference_generated=None)
    return out
