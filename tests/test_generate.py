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
    """With the prompts (1-11 tokens) prefilled whole or `chunk` tokens per pass. Then training is as if
    generate had not run: same parameters, no gradients, train mode, the loss of single-process training."""
    results = run_threads(world, gw.generate, kind, schedule, [{**GREEDY, "prefill_chunk": chunk}])
    want = gw.reference_greedy(gw.model(kind), gw.prompts(), 9, gw.EOS)
    assert any(len(t) < 9 and t[-1] == gw.EOS for t in want) and any(gw.EOS not in t for t in want)
    for r in results:
        assert _tokens(r["out"][0]) == _tokens(want)
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
                                                              ("qwen3", "interleaved-1f1b", 2, 56, 16)])
def test_hf_models_generate_what_hf_generate_does(family, schedule, world, eos, chunk):
    """HF's generate, greedy, one prompt at a time, stopping at `eos` (which some prompts reach); the tied
    model in 2 gloo processes (its embedding and head on different ranks: a tie across ranks needs
    processes), the others on in-process ranks; Mistral's window of 4 prefilled 3 tokens per pass."""
    want = gw.hf_reference(family, 10, eos)
    assert any(t[-1] == eos for t in want) and any(eos not in t for t in want)
    run = run_processes if family.endswith("tied") else run_threads
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
    capacity then follows its recent messages; trees of several dtypes and kept rows arrive whole."""
    import torch

    from pipetrain import InProcessHub
    from pipetrain.generation.wire import Message, Wire

    hub = InProcessHub(2)
    sender = Wire(hub.transport(0), 10, sources=set(), targets={1}, history=2, device=torch.device("cpu"))
    receiver = Wire(hub.transport(1), 10, sources={0}, targets=set(), history=2, device=torch.device("cpu"))
    values = [{"h": torch.randn(3, n, 5), "mask": torch.rand(3, n) > 0.5, "pos": torch.arange(3 * n).view(3, n)}
              for n in (1, 400, 2, 3, 500, 1)]  # 4 KiB posted first; 400 rows of floats do not fit
    for i, value in enumerate(values):
        keep = torch.tensor([0, 2]) if i % 2 else None
        sender.send(1, (i, 0, 1), Message(0, keep, value))
        key, got = receiver.receive(0, "test")
        assert key == (i, 0, 1) and set(got.value) == set(value)
        assert all(torch.equal(got.value[k], value[k]) for k in value)
        assert (got.keep is None) == (keep is None) and (keep is None or torch.equal(got.keep, keep))
    sender.close()
    receiver.close()


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["1f1b", "interleaved-1f1b", "zbv", "dualpipev"]), ranks=st.integers(1, 4),
       passes=st.lists(st.integers(1, 5), min_size=1, max_size=7))
def test_circulation_order_runs_every_item_once_and_cannot_hang(name, ranks, passes):
    """Brute force: ranks take their next item whenever its inputs are done (the stage before in the same
    pass; for stage 0 the last stage's previous pass); every item must run, once, in every placement."""
    from pipetrain.generation.generate import circulation_order

    placement = pt.schedules.build(name, num_ranks=ranks, num_microbatches=2 * ranks).stage_to_rank
    stages = len(placement)
    orders = [list(circulation_order([s for s in range(stages) if placement[s] == r], stages, passes))
              for r in range(ranks)]
    items = sorted(item for order in orders for item in order)
    assert items == sorted((t, g, s) for g, n in enumerate(passes) for t in range(n) for s in range(stages))
    done, heads = set(), [0] * ranks
    while any(h < len(o) for h, o in zip(heads, orders, strict=True)):
        progressed = False
        for r, order in enumerate(orders):
            if heads[r] < len(order):
                t, g, s = order[heads[r]]
                needs = (t, g, s - 1) if s else (t - 1, g, stages - 1)
                if needs in done or needs[0] < 0:
                    done.add(order[heads[r]])
                    heads[r] += 1
                    progressed = True
        assert progressed, f"deadlock at {[o[h] if h < len(o) else None for h, o in zip(heads, orders, strict=True)]}"
