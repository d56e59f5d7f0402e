"""Generation on the training pipeline: groups of sequences circulate through the stages, each stage keeping
its groups' KV caches, and the last stage sends each picked token back to the first.

    pass t of group g at stage s runs at virtual time  tau = t * L + g + s      (L = max(groups, stages))

Every rank runs its stages' items in the order of (tau, stage): each item's inputs come from items with a
smaller tau (the stage before, or for stage 0 its own or the last stage's previous pass), so the order
cannot deadlock, and with at least as many groups as stages every stage has an item at every tau (steady
state: every rank busy). A group's first passes prefill its left-padded prompts, `prefill_chunk` tokens at
a time (so that the first stage's next pieces overlap the later stages' work instead of one long prefill
holding the pipeline); each pass after the last piece decodes one token.
A sequence that picks `eos_token_id` leaves its group (every stage drops its cache rows); a group whose
sequences have all finished leaves the circulation.

Messages between ranks (gen_wire.py) carry their item, so a rank that receives one meant for a later item
keeps it until then.
"""

from __future__ import annotations

import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import torch

from ..runtime.comm import abort_others, fail_together, rank_name
from ..runtime.executor import RankStep
from ..schedule import Action, Op
from ..schedule.timeline import Event
from .kv_cache import GroupCache
from .sampling import Sampling, sequence_generators
from .wire import Message, Wire

ACT, TOKENS, RETIRE = range(3)
PREFILL_CHUNK = 16  # prompt tokens per prefill pass, by default


def circulation_order(stages: Sequence[int], num_stages: int, passes: Sequence[int]) -> Iterator[tuple]:
    """The (pass, group, stage) items of one rank's `stages`, in the order it runs them (module docstring);
    group g makes passes[g] passes."""
    period = max(len(passes), num_stages)
    last = max((n - 1) * period + g for g, n in enumerate(passes)) + num_stages - 1
    for tau in range(last + 1):
        for s in sorted(stages):
            t, g = divmod(tau - s, period)
            if tau >= s and g < len(passes) and t < passes[g]:
                yield t, g, s


def group_rows(lengths: Sequence[int], num_groups: int) -> list[list[int]]:
    """Prompt indices per group: sorted by length (less padding), then cut into `num_groups` near-equal runs."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    size, extra = divmod(len(order), num_groups)
    cuts = [g * size + min(g, extra) for g in range(num_groups + 1)]
    return [order[cuts[g]:cuts[g + 1]] for g in range(num_groups)]


class RankGenerator:
    """One rank's part of one `generate` call over `pipe`'s stages (see `Pipeline.generate`)."""

    def __init__(self, pipe, prompts: list[torch.Tensor], max_new_tokens: int, sampling: Sampling,
                 eos_token_id: int | None, seed: int, num_groups: int, prefill_chunk: int,
                 logprobs: bool = False) -> None:
        self.pipe, self.transport, self.timeout = pipe, pipe.transport, pipe.timeout
        self.rank, self.device = pipe.rank, pipe.device
        self.stage_to_rank = pipe.schedule.stage_to_rank
        self.num_stages = len(self.stage_to_rank)
        self.prompts, self.max_new, self.sampling, self.eos = prompts, max_new_tokens, sampling, eos_token_id
        self.groups = group_rows([len(p) for p in prompts], num_groups)
        self.width = [max(len(prompts[i]) for i in rows) for rows in self.groups]  # each group's padded prompt
        self.chunk = prefill_chunk
        self.pieces = [-(-w // prefill_chunk) for w in self.width]  # prefill passes per group
        self.passes_of = [n + max_new_tokens - 1 for n in self.pieces]
        self.live = [list(rows) for rows in self.groups]  # last stage: the prompt indices still decoding
        self.out: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] | None = [[] for _ in prompts] if logprobs else None
        self.generators = sequence_generators(seed, len(prompts)) if not sampling.greedy else []
        self.caches: dict[tuple[int, int], GroupCache] = {}
        self.padded: dict[int, torch.Tensor] = {}  # stage 0: each group's left-padded prompts, while prefilling
        self.retired: dict[int, set[int]] = defaultdict(set)  # group -> stages of this rank it has left
        self.local: dict[tuple[int, int, int], Message] = {}
        self.stash: dict[int, dict[tuple[int, int, int], Message]] = defaultdict(dict)
        self.events: list[Event] = []
        self.waits: list[Event] = []

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> RankStep:
        self.t0 = time.perf_counter()
        mine = self.pipe.schedule.stages_of(self.rank)
        last = self.num_stages - 1
        sources = {self.stage_to_rank[s - 1 if s else last] for s in mine} - {self.rank}
        targets = {self.stage_to_rank[s + 1 if s < last else 0] for s in mine} - {self.rank}
        self.wire = Wire(self.transport, self.timeout, sources, targets, len(self.groups), self.device)
        for t, g, s in circulation_order(mine, self.num_stages, self.passes_of):
            if s not in self.retired[g]:
                self._item(t, g, s)
        self.wire.close()
        return RankStep(self.rank, float("nan"), tuple(self.events), tuple(self.waits), self._now(), self.t0)

    def results(self) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every prompt's new tokens (and, if asked, their log-probabilities), on every rank (collective: the
        last stage's rank holds them)."""
        tokens = self._shared(self.out, torch.int64)
        if self.logprobs is None:
            return tokens
        return tokens, [t.float() for t in self._shared(self.logprobs, torch.float64)]

    def _shared(self, rows: list[list], dtype: torch.dtype) -> list[torch.Tensor]:
        """`rows` as the last stage's rank has them, on every rank (one all-reduce of a padded table)."""
        n, width = len(self.prompts), self.max_new
        table = torch.zeros(n, width + 1, dtype=dtype, device=self.transport.device)
        if self.num_stages - 1 in self.pipe.stages:
            for i, row in enumerate(rows):
                table[i, 0] = len(row)
                table[i, 1:1 + len(row)] = torch.tensor(row, dtype=dtype)
        self.transport.all_reduce(table, self.timeout)
        table = table.cpu()
        return [table[i, 1:1 + int(table[i, 0])].clone() for i in range(n)]

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _item(self, t: int, g: int, s: int) -> None:
        message = self._input(t, g, s)
        if message.kind == RETIRE:
            self.caches.pop((s, g), None)
            self.retired[g].add(s)
            if s < self.num_stages - 1:
                self._emit((t, g, s + 1), Message(RETIRE, None, None))
            return
        stage = self.pipe.stages[s]
        width, pieces = self.width[g], self.pieces[g]
        if t == 0:
            pad = torch.tensor([width - len(self.prompts[i]) for i in self.groups[g]], device=self.device)
            self.caches[(s, g)] = GroupCache(pad, width + self.max_new - 1, len(stage.layers))
        cache = self.caches[(s, g)]
        if message.keep is not None:
            cache.keep(message.keep)
        x = message.value[:, None] if s == 0 and t >= pieces else message.value  # picked tokens (b,) -> (b, 1)
        start = self._now()
        autocast = (torch.autocast(stage.device_type, dtype=stage.autocast) if stage.autocast is not None
                    else nullcontext())
        with torch.no_grad(), autocast:
            cache.begin_pass(min(self.chunk, width - t * self.chunk) if t < pieces else 1)
            for layer, layer_cache in zip(stage.layers, cache.layers, strict=True):
                x = layer.forward_cached(x, layer_cache)
        if s < self.num_stages - 1:
            self._emit((t, g, s + 1), Message(ACT, message.keep, x))
        elif t >= pieces - 1:  # the whole prompt is in: a token per pass
            self._pick(t, g, x)
        self.events.append(Event(self.rank, Action(s, Op.F, t * len(self.groups) + g), start, self._now()))

    def _pick(self, t: int, g: int, logits: torch.Tensor) -> None:
        """Last stage: each live sequence's next token; the survivors' go back to stage 0."""
        if logits.dim() == 3:
            logits = logits[:, -1]  # (b, vocab): the last position
        live = self.live[g]
        tokens = self.sampling.pick(logits, [self.generators[i] for i in live] if self.generators else [])
        if self.logprobs is not None:  # under the model's own distribution (temperature 1, nothing cut)
            picked = logits.float().log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
            for i, lp in zip(live, picked.tolist(), strict=True):
                self.logprobs[i].append(lp)
        finished = []
        for row, (i, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
            self.out[i].append(token)
            if token == self.eos or len(self.out[i]) == self.max_new:
                finished.append(row)
        if t == self.passes_of[g] - 1:
            return  # every rank knows the group ends here
        if len(finished) == len(live):
            self.live[g] = []
            self._emit((t + 1, g, 0), Message(RETIRE, None, None))
            return
        keep = None
        if finished:
            gone = set(finished)
            kept = [row for row in range(len(live)) if row not in gone]
            self.live[g] = [live[row] for row in kept]
            keep = torch.tensor(kept, dtype=torch.int64, device=self.device)
            tokens = tokens[keep]
        self._emit((t + 1, g, 0), Message(TOKENS, keep, tokens))

    # --- messages ------------------------------------------------------------------------------------
    def _input(self, t: int, g: int, s: int) -> Message:
        if s == 0 and t < self.pieces[g]:  # a piece of the prompts
            if t == 0:
                self.padded[g] = self._padded_prompts(g)
            piece = self.padded[g][:, t * self.chunk:(t + 1) * self.chunk]
            if t == self.pieces[g] - 1:
                del self.padded[g]
            return Message(ACT, None, piece)
        producer = s - 1 if s > 0 else self.num_stages - 1
        peer = self.stage_to_rank[producer]
        key = (t, g, s)
        if peer == self.rank:
            return self.local.pop(key)
        start = self._now()
        while key not in self.stash[peer]:
            got_key, message = self.wire.receive(peer, f"the generation value of pass {t}, group {g} for stage {s}")
            self.stash[peer][got_key] = message
        self.waits.append(Event(self.rank, Action(s, Op.F, t * len(self.groups) + g), start, self._now()))
        return self.stash[peer].pop(key)

    def _padded_prompts(self, g: int) -> torch.Tensor:
        rows = [self.prompts[i] for i in self.groups[g]]
        width = max(len(p) for p in rows)
        out = torch.zeros(len(rows), width, dtype=torch.int64)
        for r, p in enumerate(rows):
            out[r, width - len(p):] = p
        return out.to(self.device)  # (b, width), left-padded

    def _emit(self, key: tuple[int, int, int], message: Message) -> None:
        peer = self.stage_to_rank[key[2]]
        if peer == self.rank:
            self.local[key] = message
        else:
            self.wire.send(peer, key, message)


def checked_prompts(prompts: Sequence[torch.Tensor], max_new_tokens: int) -> list[torch.Tensor]:
    """The prompts as 1-D int64 CPU tensors, after checking them and `max_new_tokens`."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of 1-D token tensors (of any lengths), e.g. "
                        "[torch.tensor([1, 2, 3]), torch.tensor([4, 5])]")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 or p.is_floating_point():
            what = f"a tensor of shape {tuple(p.shape)} {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"prompts[{i}] is {what}; each prompt must be a non-empty 1-D tensor of token ids")
        out.append(p.detach().to("cpu", torch.int64))
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    return out


def agree(pipe, prompts: list[torch.Tensor], max_new_tokens: int, settings: tuple) -> None:
    """Fail on every rank, before any generation traffic, if a rank's layers cannot generate or the ranks
    were given different prompts or settings (one all-reduce, `fail_together`)."""
    missing = [i for i, layer in pipe.layers.items() if not callable(getattr(layer, "forward_cached", None))]
    error = None
    if missing:
        names = ", ".join(f"{i} ({type(pipe.layers[i]).__name__})" for i in missing)
        error = TypeError(f"{rank_name(pipe.transport, pipe.rank)}: layers {names} have no forward_cached(x, cache): "
                          "every layer must implement the cache protocol to generate (pipetrain.generation.kv_cache; "
                          "the reference GPT and Llama and from_hf layers do)")
    fingerprint = [len(prompts), sum(len(p) for p in prompts), sum(int(p.sum()) % 1_000_003 for p in prompts),
                   max_new_tokens, zlib.crc32(repr(settings).encode())]
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


def generate(pipe, prompts: Sequence[torch.Tensor], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             seed: int | None = None, num_groups: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
             return_logprobs: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`Pipeline.generate` (documented there)."""
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
    if seed is None:
        seed = int(torch.randint(2**31 - 1, ()))  # only the last stage's rank draws tokens
    modes = [(m, m.training) for stage in pipe.stages.values() for m in stage.module.modules()]
    for stage in pipe.stages.values():
        stage.module.eval()
    try:
        runner = RankGenerator(pipe, prompts, max_new_tokens, sampling, eos_token_id, seed, num_groups,
                               prefill_chunk, return_logprobs)
        try:
            pipe.last_generation, pipe.last_generation_groups = runner.run(), runner.groups
        except BaseException as err:
            abort_others(pipe.transport, pipe.rank, err)
            raise
        return runner.results()
    finally:
        for module, mode in modes:
            module.training = mode
