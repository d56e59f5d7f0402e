"""`Pipeline.generate`: checks the call on every rank, builds its circulation schedule (checked like any
schedule), and hands the lowered actions and the passes (`generation.passes`) to the pipeline's executor."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..generation.passes import PREFILL_CHUNK, RankPasses, checked_prompts
from ..generation.sampling import Sampling
from ..runtime.comm import fail_together, rank_name
from ..runtime.executor import Executor, RankStep
from ..schedule import Action, check, circulation


@dataclass(frozen=True)
class Generation:
    """One generate call on this rank: its new tokens (and log-probabilities) for every prompt, what it
    measured, and its groups (prompt indices, in circulation order)."""

    tokens: list[torch.Tensor]
    logprobs: list[torch.Tensor] | None
    step: RankStep
    groups: list[list[int]]


def generate(pipe, executor: Executor, prompts: Sequence[torch.Tensor], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, seed: int | None = None, num_groups: int | None = None,
             prefill_chunk: int = PREFILL_CHUNK, return_logprobs: bool = False) -> Generation:
    """`Pipeline.generate` (documented there) on `pipe`'s stages, run by `executor`."""
    prompts = checked_prompts(prompts, max_new_tokens)
    sampling = Sampling(temperature, top_k, top_p)
    world, num_stages = pipe.transport.world_size, pipe.schedule.num_stages
    if num_groups is None:
        num_groups = 1 if world == 1 else max(2 * world, num_stages)
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
    num_groups = min(num_groups, len(prompts))
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be an int >= 1 (prompt tokens per prefill pass), got {prefill_chunk!r}")
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs must be True or False, got {return_logprobs!r}")
    agree(pipe, prompts, max_new_tokens, (temperature, top_k, top_p, eos_token_id, seed, num_groups, return_logprobs))
    pipe.unshard()  # (shard="params": whole weights, gathered from the replicas)
    if seed is None:
        seed = int(torch.randint(2**31 - 1, ()))  # only the last stage's rank draws tokens
    modes = [(m, m.training) for stage in pipe.stages.values() for m in stage.module.modules()]
    for stage in pipe.stages.values():
        stage.module.eval()
    try:
        passes = RankPasses(pipe.stages, num_stages, prompts, max_new_tokens, sampling, eos_token_id, seed,
                            num_groups, prefill_chunk, pipe.device, return_logprobs)
        actions = circulation_actions(tuple(pipe.schedule.stage_to_rank), tuple(passes.prefill_rounds),
                                      tuple(passes.rounds))[pipe.rank]
        step = executor.run_passes(actions, passes, history=num_groups)
        tokens = _shared(pipe, passes.out, torch.int64, max_new_tokens)
        logprobs = None
        if passes.logprobs is not None:
            logprobs = [t.float() for t in _shared(pipe, passes.logprobs, torch.float64, max_new_tokens)]
        return Generation(tokens, logprobs, step, passes.groups)
    finally:
        for module, mode in modes:
            module.training = mode


@functools.lru_cache(maxsize=16)
def circulation_actions(stage_to_rank: tuple[int, ...], prefill_rounds: tuple[int, ...],
                        rounds: tuple[int, ...]) -> tuple[tuple[Action, ...], ...]:
    """Every rank's lowered actions of the circulation schedule, checked; built once per shape of call
    (repeated calls with prompts of the same lengths, as in RL, reuse it: lowering and checking take
    seconds at thousands of rounds)."""
    schedule = check(circulation(stage_to_rank, prefill_rounds=prefill_rounds, rounds=rounds))
    return tuple(tuple(acts) for acts in schedule.actions)


def _shared(pipe, rows: list[list], dtype: torch.dtype, width: int) -> list[torch.Tensor]:
    """`rows` as the last stage's rank has them, on every rank (one all-reduce of a padded table)."""
    n = len(rows)
    table = torch.zeros(n, width + 1, dtype=dtype, device=pipe.transport.device)
    if pipe.schedule.num_stages - 1 in pipe.stages:
        for i, row in enumerate(rows):
            table[i, 0] = len(row)
            table[i, 1:1 + len(row)] = torch.tensor(row, dtype=dtype)
    pipe.transport.all_reduce(table, pipe.timeout)
    table = table.cpu()
    return [table[i, 1:1 + int(table[i, 0])].clone() for i in range(n)]


def _differs_over(mesh, fingerprint: list, device) -> bool:
    """Whether the ranks of the 1-d `mesh` hold different fingerprints (an all-gather every rank of it makes
    before anything can raise, so none waits on another that has raised)."""
    mine = torch.tensor(fingerprint, dtype=torch.float64, device=device)  # (exact: every entry < 2**53)
    peers = torch.zeros(mesh.size() * len(mine), dtype=mine.dtype, device=device)
    dist.all_gather_into_tensor(peers, mine, group=mesh.get_group())
    return not all(torch.equal(row, mine) for row in peers.view(mesh.size(), -1))


def agree(pipe, prompts: list[torch.Tensor], max_new_tokens: int, settings: tuple) -> None:
    """Fail on every rank, before any generation traffic, if a rank's layers cannot generate or the ranks
    were given different prompts or settings (one all-reduce, `fail_together`)."""
    run = {i: layer for s, stage in pipe.stages.items()  # (the layers its passes run: not a vocabulary shard's)
           for i, layer in zip(pipe.layer_ranges[s], stage.layers, strict=True)}
    missing = [i for i, layer in run.items() if not callable(getattr(layer, "forward_cached", None))]
    error = None
    if missing:
        names = ", ".join(f"{i} ({type(run[i]).__name__})" for i in missing)
        error = TypeError(f"{rank_name(pipe.transport, pipe.rank)}: layers {names} have no forward_cached(x, cache): "
                          "every layer must implement the cache protocol to generate (pipetrain.generation.kv_cache; "
                          "the reference GPT and Llama and from_hf layers do)")
    tokens = zlib.crc32(b"".join(p.detach().to("cpu", torch.int64).numpy().tobytes() for p in prompts))
    fingerprint = [len(prompts), sum(len(p) for p in prompts), sum(int(p.sum()) % 1_000_003 for p in prompts),
                   max_new_tokens, zlib.crc32(repr(settings).encode()), tokens]
    ep_differs = pipe.ep_mesh is not None and _differs_over(pipe.ep_mesh, fingerprint, pipe.transport.device)
    world = pipe.transport.world_size
    table = torch.zeros(world, len(fingerprint), dtype=torch.float64)  # (exact: every entry < 2**53)
    table[pipe.rank] = torch.tensor(fingerprint, dtype=torch.float64)

    def sum_all(tensor: torch.Tensor) -> torch.Tensor:
        return pipe.transport.all_reduce(tensor.to(pipe.transport.device), pipe.timeout)

    table = fail_together(error, rank=pipe.rank, world_size=world, sum_all=sum_all, payload=table,
                          what="generate() (layers without forward_cached(x, cache), the cache protocol)",
                          name=lambda r: rank_name(pipe.transport, r))
    differ = [r for r in range(world) if not torch.equal(table[r], table[pipe.rank])]
    if differ:
        raise ValueError(f"generate() got different prompts or settings on {rank_name(pipe.transport, differ[0])} "
                         f"than on {rank_name(pipe.transport, pipe.rank)}: call it on every rank with the same "
                         "arguments")
    if ep_differs:  # its replicas route each other's tokens: every pass must be the same on each
        raise ValueError("generate() got different prompts or settings on the expert-parallel ranks (ep="
                             f"{pipe.ep_size}): they send each other their tokens, so give every replica in an ep "
                             "group the same prompts")
