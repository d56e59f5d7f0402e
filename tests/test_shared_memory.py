"""The shared-memory transport between ranks of one host: every size and dtype in order, rings that wrap and
fill, the all-reduce's bits, a peer that stops, and the switch that turns it off."""

import pytest
import shm_workers
from workers import run_processes


def test_every_size_and_dtype_arrives_in_order_through_wrapping_and_full_rings():
    results = run_processes(2, shm_workers.sizes_order_and_wrapping)
    assert results[0]["pending_before_reply"] > 0  # the ring filled: sends waited for room, nothing hung
    assert results[0]["checked"] == results[1]["checked"] > len(shm_workers.MESSAGES) + 40


def test_the_all_reduce_adds_in_rank_order_with_the_same_bits_on_every_rank():
    results = run_processes(3, shm_workers.all_reduce_in_rank_order)
    first = (1e16 + 1.0) + -1e16  # rank order (another order gives 1.0)
    assert results[0] == results[1] == results[2]
    assert results[0][0] == first and results[0][1] == pytest.approx(0.6)


@pytest.mark.parametrize("how", ["abort", "exit"])
def test_a_peer_that_stops_ends_a_wait_on_it_within_a_second(how):
    results = run_processes(2, shm_workers.peer_closes, how, expect=1 if how == "exit" else None)
    error = results[0]["error"]
    assert error is not None and results[0]["seconds"] < 3
    assert "rank 1" in error and ("closed its shared-memory link" in error or "on purpose" in error)


def test_turned_off_the_transfers_go_over_gloo():
    results = run_processes(2, shm_workers.turned_off)
    assert results[1] == [True, [0.0, 1.0, 2.0]]


def test_with_no_room_in_dev_shm_the_ranks_fall_back_to_gloo_together_or_fail_naming_the_fix(caplog):
    results = run_processes(2, shm_workers.no_room_on_rank_1)
    assert [results[rank][:3] for rank in (0, 1)] == [[True, [0.0, 0.0, 0.0], True], [True, [0.0, 1.0, 2.0], True]]
    assert "no room in /dev/shm" in results[0][3] and "PIPETRAIN_SHARED_MEMORY=0" in results[0][3]
