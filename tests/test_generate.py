"""Generation on the pipeline: token-for-token equal to single-process decoding, seeded sampling equal at
any rank count, groups that shrink and retire, clear errors; training unchanged afterwards."""

import re
import time

import gen_workers as gw
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from workers import run_processes, run_threads

import pipetrain as pt

GREEDY = dict(max_new_tokens=9, eos_token_id=gw.EOS)
SAMPLED = [dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=5),
           dict(max_new_tokens=6, temperature=1.3, seed=11, eos_token_id=gw.EOS)]


def _tokens(out):
    return [t.tolist() for t in out]


@pytest.mark.parametrize("kind,schedule,world,chunk", [("gpt", "1f1b", 2, 16), ("gpt", "1f1b", 2, 1),
                                                        ("llama", "zbv", 2, 3), ("llama", "1f1b", 4, 5)])
def test_greedy_equals_a_plain_loop_in_process(kind, schedule, world, chunk):
    """With the prompts (1-11 tokens) prefilled whole or `chunk` tokens per pass, and one new token (the
    prefill's: no decode round). Then training is as if generate had not run: same parameters, no gradients,
    train mode, the loss of single-process training."""
    calls = [{**GREEDY, "prefill_chunk": chunk}, {"max_new_tokens": 1, "prefill_chunk": chunk}]
    results = run_threads(world, gw.generate, kind, schedule, calls)
    want = gw.reference_greedy(gw.model(kind), gw.prompts(), 9, gw.EOS)
    assert any(len(t) < 9 and t[-1] == gw.EOS for t in want) and any(gw.EOS not in t for t in want)
    for r in results:
        assert _tokens(r["out"][0]) == _tokens(want)
        assert _tokens(r["out"][1]) == [t[:1] for t in _tokens(want)]
        assert r["unchanged"] and r["no_grads"] and r["training"]
        assert r["loss"] == pytest.approx(gw.reference_loss(kind, world), rel=1e-5)


def test_greedy_and_seeded_sampling_at_1_2_and_4_ranks():
    """4 gloo processes (interleaved, 8 stages) give the reference's greedy tokens and the same samples as 1
    and 2 in-process ranks."""
    four = run_processes(4, gw.generate, "gpt", "interleaved-1f1b", [GREEDY, *SAMPLED])
    one = run_threads(1, gw.generate, "gpt", "1f1b", SAMPLED)[0]
    two = run_threads(2, gw.generate, "gpt", "zbv", SAMPLED)
    want = gw.reference_greedy(gw.model("gpt"), gw.prompts(), 9, gw.EOS)
    for r in [*four.values(), *two]:
        assert [_tokens(o) for o in r["out"][-2:]] == [_tokens(o) for o in one["out"]]
    for r in four.values():
        assert _tokens(r["out"][0]) == _tokens(want)
        assert r["unchanged"] and r["no_grads"] and r["training"]
    assert len(four[0]["idle"]) == 4 and all(0 <= i < 1 for i in four[0]["idle"])  # gathered on rank 0
    lengths = [len(t) for t in one["out"][1]]
    assert min(lengths) < 6 == max(lengths)  # some samples hit EOS, others ran to max_new_tokens
    assert _tokens(one["out"][0]) != _tokens(want)[:8]  # sampling is not greedy


def test_log_probabilities_are_those_of_a_plain_forward():
    """return_logprobs: each new token's log-probability under the model (temperature 1, nothing cut), the
    same on every rank, whether the tokens were picked greedily or sampled with top-k and an EOS."""
    settings = [{**GREEDY, "return_logprobs": True}, {**SAMPLED[0], "eos_token_id": gw.EOS, "return_logprobs": True}]
    results = run_threads(2, gw.generate, "llama", "zbv", settings)
    for tokens, logprobs in results[0]["out"]:
        want = gw.reference_logprobs(gw.model("llama"), gw.prompts(), tokens)
        assert [len(lp) for lp in logprobs] == [len(t) for t in tokens]
        for got, ref in zip(logprobs, want, strict=True):
            assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-4), (got, ref)
    assert [_tokens(t) for t, _ in results[0]["out"]] == [_tokens(t) for t, _ in results[1]["out"]]
    assert all(torch.equal(a, b) for (_, x), (_, y) in zip(results[0]["out"], results[1]["out"], strict=True)
               for a, b in zip(x, y, strict=True))
    greedy_tokens = results[0]["out"][0][0]
    assert _tokens(greedy_tokens) == _tokens(gw.reference_greedy(gw.model("llama"), gw.prompts(), 9, gw.EOS))

@pytest.mark.parametrize("family,schedule,world,eos,chunk", [("llama", "1f1b", 4, 73, 16), ("mistral", "zbv", 2, 73, 3),
                                                              ("qwen2-tied", "1f1b", 2, 66, 16),
                                                              ("qwen3", "interleaved-1f1b", 2, 56, 16),
                                                              ("GPT2LMHeadModel", "1f1b", 2, 72, 16),
                                                              ("Gemma3ForCausalLM", "zbv", 2, 33, 3),
                                                              ("MixtralForCausalLM", "1f1b", 2, 15, 16)])
def test_hf_models_generate_what_hf_generate_does(family, schedule, world, eos, chunk):
    """HF's generate, greedy, one prompt at a time, stopping at `eos` (which some prompts reach); tied
    models in 2 gloo processes (embedding and head on different ranks: a tie across ranks needs
    processes), the others on in-process ranks; Mistral's and Gemma 3's windows of 4 prefilled 3 tokens per
    pass; GPT-2's learned positions, Gemma 3's soft-capped logits, Mixtral's experts."""
    want = gw.hf_reference(family, 10, eos)
    assert any(t[-1] == eos for t in want) and any(eos not in t for t in want)
    import hf_models

    run = run_processes if hf_models.build(family, meta=True).config.tie_word_embeddings else run_threads
    results = run(world, gw.hf_generate, family, schedule, dict(max_new_tokens=10, eos_token_id=eos,
                                                                 prefill_chunk=chunk))
    for r in results.values() if isinstance(results, dict) else results:
        assert _tokens(r) == _tokens(want)


@pytest.mark.parametrize("case,error,text", [
    # rank 0 (holding the layer) raises TypeError, rank 1 a RuntimeError naming rank 0: whichever ends first
    ("no protocol", (TypeError, RuntimeError),
     "3 (Sequential) have no forward_cached(x, cache)|the cache protocol) failed on rank 0 (see its error)"),
    ("different prompts", ValueError, "different prompts or settings on rank"),
    ("too long", ValueError, "generation reached position 40, but this GPT has 40 positions"),
    ("2-d prompt", ValueError, "prompts[0] is a tensor of shape (2, 3)"),
    ("logprobs on one rank", ValueError, "different prompts or settings on rank"),
    ("logprobs not a bool", TypeError, "return_logprobs must be True or False, got 'yes'"),
])
def test_bad_input_fails_every_rank_with_a_clear_error(case, error, text):
    start = time.perf_counter()
    with pytest.raises(error, match="|".join(re.escape(part) for part in text.split("|"))):
        run_threads(2, gw.generate_bad, case, timeout=30)  # every rank's thread ends: no hang
    assert time.perf_counter() - start < 20  # far less than the pipeline's 60 s timeout


def test_wire_sends_messages_larger_and_smaller_than_the_posted_envelope():
    """Sizes both ends agree on: a message over the posted envelope goes in two transfers, and the link's
    capacity then follows its recent messages; trees of several dtypes and kept rows arrive whole, and a
    structure's bytes cross once."""
    import torch

    from pipetrain import InProcessHub
    from pipetrain.runtime.values import Signature, flatten
    from pipetrain.runtime.wire import Link, Wire
    from pipetrain.schedule.actions import PASS, Value

    hub = InProcessHub(2)
    sender, receiver = Wire(hub.transport(0), 10), Wire(hub.transport(1), 10)
    out, into = Link(sender, 1, 2, receiving=False), Link(receiver, 0, 2, receiving=True)
    values = [{"h": torch.randn(3, n, 5), "mask": torch.rand(3, n) > 0.5, "pos": torch.arange(3 * n).view(3, n)}
              for n in (1, 400, 2, 3, 500, 1, 1)]  # 4 KiB posted first; 400 rows of floats do not fit
    for i, value in enumerate(values):
        keep = torch.tensor([0, 2]) if i % 2 else None
        leaves, spec = flatten(value)
        size = sender.send(1, Value(PASS, 1, 0, i), leaves, signature=Signature.of(leaves, spec), keep=keep,
                           capacity=out.capacity, doing="test")
        out.sent(size)
        got = into.receive(what="test", doing="test")
        assert got.value == Value(PASS, 1, 0, i) and got.signature.spec == spec
        assert all(torch.equal(a, b) for a, b in zip(got.leaves, leaves, strict=True))
        assert (got.keep is None) == (keep is None) and (keep is None or torch.equal(got.keep, keep))
    assert len(sender.sent_structures[1]) == 5  # the three 1-row values share a structure: sent once
    sender.end(1, out.capacity)
    assert into.receive(what="test", doing="test") is None
    sender.wait_sends()


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["1f1b", "interleaved-1f1b", "zbv", "dualpipev"]), ranks=st.integers(1, 4),
       rounds=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 3)), min_size=1, max_size=7))
def test_circulation_runs_every_pass_once_and_cannot_hang(name, ranks, rounds):
    """The circulation schedule passes the checker (lowered too), and by brute force: ranks take their next
    pass whenever its inputs are done (the stage before in the same round; for stage 0 the last stage's round
    before; the own stage's round before); every pass must run, once, in every placement."""
    from pipetrain.schedule import Op, check, circulation, lower

    placement = pt.schedules.build(name, num_ranks=ranks, num_microbatches=2 * ranks).stage_to_rank
    stages = len(placement)
    prefill, total = [p for p, _ in rounds], [p + d for p, d in rounds]
    schedule = circulation(placement, prefill_rounds=prefill, rounds=total)
    check(schedule)
    check(lower(schedule))
    orders = [[(a.round, a.mb, a.stage, a.op) for a in acts] for acts in schedule.actions]
    assert sorted((t, g, s) for order in orders for t, g, s, _ in order) == sorted(
        (t, g, s) for g, n in enumerate(total) for t in range(n) for s in range(stages))
    assert all((op is Op.P) == (t < prefill[g]) for order in orders for t, g, _, op in order)
    done, heads = set(), [0] * ranks
    while any(h < len(o) for h, o in zip(heads, orders, strict=True)):
        progressed = False
        for r, order in enumerate(orders):
            if heads[r] < len(order):
                t, g, s, op = order[heads[r]]
                needs = {(t, g, s - 1) if s else (t - 1, g, stages - 1), (t - 1, g, s)}
                if op is Op.P and s == 0:
                    needs = {(t - 1, g, s)}
                if all(n in done or n[0] < 0 for n in needs):
                    done.add((t, g, s))
                    heads[r] += 1
                    progressed = True
        assert progressed, f"deadlock at {[o[h] if h < len(o) else None for h, o in zip(heads, orders, strict=True)]}"


def test_calls_of_the_same_shape_reuse_the_checked_lowered_schedule():
    from pipetrain.pipeline.generate import circulation_actions
    from pipetrain.schedule import circulation, lower

    args = ((0, 1, 1, 0), (2, 1, 3), (5, 4, 6))
    first = circulation_actions(*args)
    assert circulation_actions(*args) is first
    assert first == tuple(tuple(acts) for acts in lower(circulation(args[0], prefill_rounds=args[1],
                                                                    rounds=args[2])).actions)
    assert circulation_actions(args[0], args[1], (5, 4, 7)) != first


def test_the_checker_rejects_a_broken_generation_schedule():
    from pipetrain.schedule import Schedule, ScheduleError, check
    from pipetrain.schedule.actions import Action

    def rows(*lists):
        actions = [[Action.parse(a) for a in row.split()] for row in lists]
        return Schedule("custom", 2, 1, 1, (0, 1), actions)

    check(rows("0P0@0 0D0@1", "1P0@0 1D0@1"))
    with pytest.raises(ScheduleError, match="round 1 runs twice"):
        check(rows("0P0@0 0D0@1 0D0@1", "1P0@0 1D0@1"))
    with pytest.raises(ScheduleError, match="without a gap"):
        check(rows("0P0@0 0D0@2", "1P0@0 1D0@2"))
    with pytest.raises(ScheduleError, match="prefill .P. rounds come first"):
        check(rows("0D0@0 0P0@1", "1D0@0 1P0@1"))
    with pytest.raises(ScheduleError, match="every stage runs a group's rounds alike"):
        check(rows("0P0@0 0D0@1", "1P0@0"))
    with pytest.raises(ScheduleError, match="deadlock"):
        check(rows("0D0@1 0P0@0", "1P0@0 1D0@1"))
    with pytest.raises(ScheduleError, match="has not computed yet"):  # the KV cache of round 0 is not there
        check(Schedule("custom", 1, 1, 1, (0,), [[Action.parse("0D0@1"), Action.parse("0P0@0")]]))
    with pytest.raises(ValueError, match="only they take a round"):
        Action.parse("1F0@3")
