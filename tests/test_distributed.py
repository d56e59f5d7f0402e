"""Over torch.distributed (gloo, spawned processes): exact gradients, early errors, no hangs."""

import any_model
import pytest
from any_model import assert_matches, batch, reference
from test_any_model import _bad_output_rank
from test_runtime import assert_matches_reference
from workers import (
    all_scenarios,
    dies_mid_step,
    fails_and_lingers,
    run_processes,
    split_direction_scenario,
    wrong_world_size,
)


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_pipeline_equals_single_process(world):
    results = run_processes(world, all_scenarios)
    assert_matches_reference(results, world)


def test_one_communicator_per_direction_stays_exact():
    # the layout used for NCCL; run here over gloo so the group creation and routing are exercised
    results = run_processes(3, split_direction_scenario)
    assert_matches_reference(results, 3)
    directions = {rank: r[("gpt", "1f1b", 6)]["directions"] for rank, r in results.items()}
    assert directions == {0: [(0, 1), (1, 0)], 1: [(0, 1), (1, 0), (1, 2), (2, 1)], 2: [(1, 2), (2, 1)]}


def test_wrong_world_size_fails_on_every_rank_before_communicating():
    results = run_processes(2, wrong_world_size, timeout=60)
    for message in results.values():
        assert "is for 3 ranks but the process group has 2" in message


@pytest.mark.parametrize("world,how", [(2, "exit"), (3, "exit"), (3, "kill")])
def test_a_rank_that_dies_mid_step_makes_the_others_fail_fast(world, how):
    # the last rank exits (or is SIGKILLed) in its second step; every other rank must raise naming the
    # action and the peer
    results = run_processes(world, dies_mid_step, how, 20.0, expect=world - 1, timeout=90)
    for rank, result in results.items():
        assert result["error"] is not None, f"rank {rank} finished a step its peer never ran"
        assert f"rank {rank}: " in result["error"] and "waiting on rank" in result["error"]
        # (a closed connection shows at a receive's wait, or at posting a send)
        assert any(what in result["error"] for what in ("RECV", "SEND", "loss")), result["error"]
        assert result["seconds"] < 25
        assert "failed after" in result["error"]  # a closed connection, not the timeout


def test_a_stuck_rank_makes_the_others_time_out_with_the_action_and_peer():
    results = run_processes(2, dies_mid_step, "hang", 3.0, expect=1, timeout=90)
    error = results[0]["error"]
    assert error is not None and "rank 0: 0RECV_B" in error and "waiting on rank 1" in error, error
    assert "timed out after 3s" in error
    assert 2.5 < results[0]["seconds"] < 10


@pytest.mark.parametrize("world,schedule", [(2, "1f1b"), (2, "zbv"), (4, "interleaved-1f1b")])
def test_gloo_trees_token_mean_aux_losses_and_a_new_sequence_length(world, schedule):
    # tuple/dict boundaries with an int mask and position ids, an MoE layer's load-balancing loss on a middle
    # stage, a token mean over two accumulated batches of different sequence lengths
    m = 2 * world
    steps = [{"batch": batch(2 * m, 6, 1), "sync_gradients": False}, {"batch": batch(2 * m, 9, 2)}]
    count = sum(int((s["batch"][1] != -100).sum()) for s in steps)
    for s in steps:
        s["num_tokens"] = count
    results = run_processes(world, any_model.run, schedule, "token+aux", steps)
    assert_matches(results, reference("token+aux", steps, m))


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_a_bad_layer_output_fails_its_rank_clearly_and_the_others_fast(world):
    results = run_processes(world, _bad_output_rank, None, 60.0, timeout=90)
    assert results[0]["type"] == "BadValueError", results[0]
    assert "the output of layer 1 (_Bad)[1] is a str ('not a tensor')" in results[0]["error"]
    for r in range(1, world):
        assert results[r]["type"] == "CommError" and results[r]["seconds"] < 10, results[r]
        assert "rank 0" in results[r]["error"] or r > 1, results[r]["error"]


def _environment_and_threads(rank: int, world: int) -> tuple:
    import os

    import torch

    return os.environ.get("PIPETRAIN_TEST_MARK"), torch.get_num_threads(), os.getpid()


def test_forked_ranks_see_the_callers_environment_as_it_is_at_the_call(monkeypatch):
    # ranks come from a forkserver started once per process: the variables set since must still reach them
    import os

    from pipetrain import spawn

    for mark in ("first", "second"):
        monkeypatch.setenv("PIPETRAIN_TEST_MARK", mark)
        results = spawn.run_processes(2, _environment_and_threads, threads=2)
        assert [r[:2] for r in results.values()] == [(mark, 2), (mark, 2)]
        assert os.getpid() not in {r[2] for r in results.values()}


@pytest.mark.parametrize("world,cases", [(2, [("zbv", "raise"), ("1f1b", "string"), ("generate", "raise")]),
                                         (4, [("1f1b", "raise"), ("zbv", "string")])])
def test_a_rank_that_fails_and_lingers_stops_every_rank_within_seconds(world, cases):
    # rank 1's layer fails in the second step (or in a generate call) and its process stays alive (as a
    # script that catches the error and cleans up for 40 s): every other rank raises within 5 s naming rank 1
    # and its error, every pipeline then refuses further steps, and the job's default group still works (a
    # barrier at the end)
    results = run_processes(world, fails_and_lingers, cases, timeout=150)
    for i, (_, how) in enumerate(cases):
        failed = results[1][i]
        assert failed["type"] == ("ValueError" if how == "raise" else "BadValueError"), failed
        first = ("rank 1 failed: ValueError: the layer failed on purpose" if how == "raise"
                 else "rank 1 failed: BadValueError: ")
        for rank in set(range(world)) - {1}:
            other = results[rank][i]
            assert other["type"] == "CommError", other
            assert other["error"].startswith(f"rank {rank}: the pipeline stopped at its first failure: {first}"), \
                other["error"]
            assert other["at"] - failed["at"] < 5, (rank, other["at"] - failed["at"])
        for rank in range(world):
            assert "this pipeline stopped at a failure" in results[rank][i]["again"], results[rank][i]["again"]
