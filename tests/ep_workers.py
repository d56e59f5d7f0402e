"""What each gloo rank runs to compare expert parallel pipelines (pp x ep) with one process running all experts."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

import pipetrain as pt
from pipetrain.models import llama
from pipetrain.models.gpt import gpt_loss_sum
from pipetrain.runtime.aux_loss import collect_aux_losses
from pipetrain.runtime.expert_parallel import parallelize_experts
from pipetrain.runtime.tensor_parallel import whole

MOE = llama.LlamaConfig(vocab_size=64, seq_len=12, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, n_experts=4,
                        top_k=2, d_expert=16, aux_coef=0.05)
ROWS = 16  # HF models' global batch (the reference Llama's: 8): each of the replicas takes its share


def model(name: str) -> tuple[list, object]:
    """(layers, loss_fn) of "llama-moe" or an HF class name."""
    if name == "llama-moe":
        torch.manual_seed(0)
        return llama.build_llama(MOE), gpt_loss_sum
    import hf_models

    from pipetrain.models.hf import from_hf

    return from_hf(hf_models.build(name))


def named_parameters(index: int, layer):
    """(a name the same in every process, parameter) of layer `index`: HF's names for from_hf layers."""
    keys = getattr(layer, "hf_keys", {})
    for n, p in layer.named_parameters():
        yield (keys[n][0] if n in keys else f"{index}.{n}"), p


def batch(name: str) -> tuple:
    """(inputs, targets, token count) of the global batch."""
    if name == "llama-moe":
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, MOE.vocab_size, (ROWS // 2, MOE.seq_len + 1), generator=g)
        return ids[:, :-1], ids[:, 1:], ids[:, 1:].numel()
    import hf_models

    inputs, labels = hf_models.batch("left", rows=ROWS)
    return inputs, labels, int((labels[:, 1:] != -100).sum())


def rows(value, share: slice):
    return {k: v[share] for k, v in value.items()} if isinstance(value, dict) else value[share]


def reference(name: str, replicas: int, m: int, capacity: float | None = None) -> tuple[float, dict]:
    """One process, all experts: each replica's share in m microbatches, the token mean over the whole batch
    plus every microbatch's auxiliary losses / (m * replicas); (objective, gradient by name). With a
    capacity factor, each microbatch's experts drop what that factor drops of its tokens."""
    layers, loss_fn = model(name)
    if capacity is not None:
        parallelize_experts(dict(enumerate(layers)), layers, None, capacity)
    inputs, targets, count = batch(name)
    total = 0.0
    for r in range(replicas):
        for mb in torch.arange(len(targets)).tensor_split(replicas)[r].tensor_split(m):
            with collect_aux_losses() as aux:
                x = rows(inputs, mb)
                for layer in layers:
                    x = layer(x)
            loss_sum, _ = loss_fn(x, targets[mb])
            total = total + loss_sum / count + sum(aux) / (m * replicas)
    total.backward()
    grads = {n: p.grad for i, layer in enumerate(layers) for n, p in named_parameters(i, layer) if p.grad is not None}
    return float(total), grads


def exactness(rank: int, world: int, cases: list[tuple[str, str, float | None]], dims: tuple[int, int, int]) -> dict:
    """Each (model, schedule, capacity factor) on a (dp, ep, pp) mesh: (loss + aux, the reference's, relative
    error of each gradient this rank holds, by name (expert gradients gathered whole over ep), ep, dp)."""
    dp, ep, pp = dims
    mesh = init_device_mesh("cpu", dims, mesh_dim_names=("dp", "ep", "pp"))
    results = {}
    for name, schedule, capacity in cases:
        m = 2 * pp
        ref_loss, ref_grads = reference(name, dp * ep, m, capacity)
        layers, loss_fn = model(name)
        base, *options = schedule.split("+")  # +checkpoint: F's all-to-alls again in B; +overlap: paired F and B
        sched = pt.schedules.build(base, num_ranks=pp, num_microbatches=m)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, mesh=mesh, timeout=60, expert_capacity=capacity,
                           checkpoint="checkpoint" in options, overlap="overlap" in options)
        if "overlap" in options:
            pipe._lanes.exchange = _logged(pipe._lanes.exchange, order := [])
        inputs, targets, count = batch(name)
        share = torch.arange(len(targets)).tensor_split(pipe.dp_size)[pipe.dp_rank]
        loss = pipe.step(rows(inputs, share), targets[share], num_tokens=count) + pipe.last_step.aux_loss
        norm2 = float(pipe.all_reduce(torch.tensor([pipe.gradient_sum_of_squares()], dtype=torch.float64))[0])
        ref_norm2 = sum(float(g.double().pow(2).sum()) for g in ref_grads.values())
        errors = {"(global gradient norm)": abs(norm2 / ref_norm2 - 1)}  # what the trainer clips by
        for index, layer in sorted(pipe.layers.items()):
            for n, p in named_parameters(index, layer):
                g = whole(p.grad)  # (collective over ep for an expert weight: the same order on its ep peers)
                errors[n] = ((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30)).item()
        pairs = sum(a.paired for a in pipe.schedule.actions[pipe.rank])
        results[name, schedule, capacity] = (loss, ref_loss, errors, pipe.ep_size, pipe.dp_size,
                                             order if "overlap" in options else None, pairs)
    return results


def _logged(exchange, order: list):
    """`Lanes.exchange` that also records, in launch order, which lane launched what."""
    def logged(launch, what):
        order.append((exchange.__self__._turn, what))
        return exchange(launch, what)
    return logged


def bad_layout(rank: int, world: int, case: str) -> str:
    """What each rank raised building a Pipeline on a (1, world, 1) mesh with a model that does not fit ep."""
    import time

    mesh = init_device_mesh("cpu", (1, world, 1), mesh_dim_names=("dp", "ep", "pp"))
    cfg = MOE if case == "experts" else llama.LlamaConfig(vocab_size=64, seq_len=12, d_model=32, n_layers=2,
                                                           n_heads=4)
    start = time.monotonic()
    try:
        pt.Pipeline(llama.build_llama(cfg), schedule="1f1b", num_microbatches=2, loss_fn=gpt_loss_sum, mesh=mesh,
                    timeout=30)
    except ValueError as err:
        return f"{err} ({time.monotonic() - start:.1f} s)"
    return "no error"


def generate_on_ep(rank: int, world: int) -> dict:
    """Greedy generation on a (1, 2, 1) mesh (ep 2, one stage): with the same prompts on both ep ranks (the
    tokens), then with one prompt that differs (what was raised)."""
    mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("dp", "ep", "pp"))
    pipe = pt.Pipeline(model("llama-moe")[0], schedule="1f1b", num_microbatches=1, loss_fn=gpt_loss_sum, mesh=mesh,
                       timeout=30)
    out = {"tokens": [t.tolist() for t in pipe.generate([torch.arange(5), torch.arange(3) * 2], max_new_tokens=4)]}
    try:
        pipe.generate([torch.arange(5) + rank, torch.arange(3) * 2], max_new_tokens=4)
    except ValueError as err:
        out["error"] = str(err)
    return out


def generate_in_one_process() -> list[list[int]]:
    """The same greedy decoding as a plain loop over the whole model (all experts), without a cache."""
    layers = model("llama-moe")[0]
    out = []
    for prompt in (torch.arange(5), torch.arange(3) * 2):
        ids = prompt[None]
        for _ in range(4):
            x = ids
            with torch.no_grad():
                for layer in layers:
                    x = layer(x)
            ids = torch.cat([ids, x[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(ids[0, len(prompt):].tolist())
    return out
