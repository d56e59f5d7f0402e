"""Generation on the pipeline: token-for-token equal to single-process decoding, seeded sampling equal at
any rank count, groups that shrink and retire, clear errors; training unchanged afterwards."""

import gen_workers as gw
import pytest
from workers import run_threads


@pytest.mark.parametrize("kind,schedule", [("gpt", "1f1b"), ("llama", "zbv")])
def test_greedy_equals_a_plain_loop_in_process(kind, schedule):
    settings = dict(max_new_tokens=9, eos_token_id=gw.EOS)
    results = run_threads(2, gw.generate, kind, schedule, settings)
    want = gw.reference_greedy(gw.model(kind), gw.prompts(), 9, gw.EOS)
    for r in results:
        assert [t.tolist() for t in r["out"]] == [t.tolist() for t in want]
        assert r["unchanged"] and r["no_grads"] and r["training"] and r["loss"] > 0
    assert any(len(t) < 9 and t[-1] == gw.EOS for t in want), "no prompt stopped at EOS: pick another EOS"
