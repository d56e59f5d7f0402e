"""Any model: tuples and dicts between stages, token-mean and auxiliary losses, shapes that change; each
against single-process training of the same layers (relative error <= 1e-5), under every schedule."""

import threading
import time
from collections import namedtuple

import pytest
import torch
from any_model import assert_matches, batch, count_messages, reference, run
from workers import _RNG_LOCK, SCHEDULES, run_threads

import pipetrain as pt


def _one_step(world, seed=0, **kwargs):
    m = 2 * world
    return [{"batch": batch(2 * m, 6, seed), **kwargs}], m


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["mean", "token", "mean+aux"])
def test_every_schedule_equals_single_process(world, kind):
    steps, m = _one_step(world)
    ref = reference(kind, steps, m)
    for schedule in SCHEDULES:
        results = run_threads(world, run, schedule, kind, steps)
        assert_matches(results, ref)


@pytest.mark.parametrize("schedule", ["zbv", "zb-h1", "interleaved-1f1b"])
def test_activation_checkpointing_with_trees_and_aux_losses(schedule):
    steps, m = _one_step(2)
    results = run_threads(2, run, schedule, "mean+aux", steps, checkpoint=True)
    assert_matches(results, reference("mean+aux", steps, m))


def test_token_mean_with_aux_losses_needs_the_count_up_front():
    steps, m = _one_step(2)
    count = sum(int((y != -100).sum()) for _, y in [steps[0]["batch"]])
    steps[0]["num_tokens"] = count
    ref = reference("token+aux", steps, m)
    for schedule in ("1f1b", "zbv", "interleaved-1f1b"):
        assert_matches(run_threads(2, run, schedule, "token+aux", steps), ref)
    del steps[0]["num_tokens"]
    with pytest.raises(ValueError, match="num_tokens"):
        run_threads(2, run, "1f1b", "token+aux", steps)


def test_token_mean_over_an_accumulation_window_with_another_sequence_length():
    # two steps with different sequence lengths, the first with sync_gradients=False: one token mean over
    # both batches (the count of each is only known at its end)
    world, m = 2, 4
    steps = [{"batch": batch(8, 6, 1), "sync_gradients": False}, {"batch": batch(8, 9, 2)}]
    ref = reference("token", steps, m)
    for schedule in ("1f1b", "zb-h1", "zbv"):
        assert_matches(run_threads(world, run, schedule, "token", steps), ref)


def test_mean_loss_accumulation_across_shape_changes_keeps_every_gradient():
    world, m = 2, 4
    steps = [{"batch": batch(8, 6, 1), "scale": 0.5}, {"batch": batch(8, 9, 2), "scale": 0.5},
             {"batch": batch(8, 6, 3), "scale": 0.5}]
    ref = reference("mean+aux", steps, m)
    for schedule in SCHEDULES:
        assert_matches(run_threads(world, run, schedule, "mean+aux", steps), ref)


def test_explicit_microbatches_of_different_lengths():
    world, m = 2, 4
    mbs = [batch(2, length, seed) for seed, length in enumerate((3, 7, 5, 7))]
    for kind in ("token", "mean+aux"):
        steps = [{"microbatches": mbs}, {"microbatches": mbs[::-1]}]
        ref = reference(kind, steps if kind != "token" else steps[:1], m)
        for schedule in SCHEDULES:
            got = run_threads(world, run, schedule, kind, steps if kind != "token" else steps[:1])
            assert_matches(got, ref)


@pytest.mark.parametrize("model", ["tensor", "tree"])
def test_once_every_shape_is_known_a_step_sends_only_the_data(model):
    # steps with sequence lengths 6, 9, 6, 9, 6: the first 6 and the first 9 teach their shapes, inside the
    # first envelope of each (these are under the 4 KiB posted for a new shape: no second transfer); every
    # step sends one message per value, as a frozen-shape pipeline would (the step's loss travels in one
    # all-reduce, not in messages), however many tensors the value holds: the tree model's boundary (after
    # the MoE layer) carries {h, mask, pos, skip, scale} forward and the gradients of h and skip back
    # The tensor model then takes sequences of 200 (12.8 KB activations): the first envelope of that shape
    # sends its remainder in a second transfer, once.
    seqs = [6, 9, 6, 9, 6] + ([200, 200] if model == "tensor" else [])
    counts = run_threads(2, count_messages, model, seqs)
    total = [a + b for a, b in zip(*counts, strict=True)]
    data = (1 + 1) * 4  # (activation forward + gradient back) x 4 microbatches
    assert total == [data] * 5 + ([data + 1, data] if model == "tensor" else [])


class _Bad(torch.nn.Module):
    def forward(self, x):
        return x, "not a tensor"


def _bad_output_rank(rank, world, transport=None, timeout=60.0):
    with _RNG_LOCK:  # every rank builds the same layers (in-process ranks share torch's random generator)
        torch.manual_seed(0)
        layers = [torch.nn.Linear(4, 4), _Bad(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=world)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=torch.nn.functional.mse_loss, transport=transport,
                       timeout=timeout, balance=[2] + [1] * (world - 2) + [4 - world])
    start = time.perf_counter()
    try:
        pipe.step(torch.randn(2 * world, 4), torch.randn(2 * world, 4))
    except Exception as err:  # noqa: BLE001 - returned to the test
        return {"type": type(err).__name__, "error": str(err), "seconds": time.perf_counter() - start}
    return {"error": None}


@pytest.mark.parametrize("world", [2, 3])
def test_a_bad_layer_output_fails_its_rank_clearly_and_the_others_fast_in_process(world):
    hub = pt.InProcessHub(world)
    results = [None] * world
    threads = [threading.Thread(target=lambda r: results.__setitem__(r, _bad_output_rank(r, world, hub.transport(r))),
                                args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results[0]["type"] == "BadValueError"
    assert "the output of layer 1 (_Bad)[1] is a str ('not a tensor')" in results[0]["error"]
    for r in range(1, world):
        assert results[r]["type"] == "CommError" and results[r]["seconds"] < 5, results[r]
        assert "rank 0 failed: BadValueError" in results[r]["error"], results[r]["error"]


Pair = namedtuple("Pair", "hidden mask")  # a user's namedtuple (module level: its type crosses the wire)


def test_trees_flatten_and_come_back_with_their_types():
    from pipetrain.runtime.values import BadValueError, Signature, flatten, unflatten

    tree = (torch.ones(2), {"b": [torch.zeros(1), Pair(torch.ones(3), torch.ones(3, dtype=torch.bool))]})
    leaves, spec = flatten(tree)
    back = unflatten([t.clone() for t in leaves], spec)
    assert len(leaves) == 4 and isinstance(back[1]["b"][1], Pair) and back[1]["b"][1].mask.dtype == torch.bool
    assert isinstance(back[1]["b"], list) and torch.equal(back[0], tree[0])
    signature = Signature.of(leaves, spec)
    assert Signature.from_bytes(signature.to_bytes()) == signature  # what crosses the wire
    with pytest.raises(BadValueError, match=r"x\[1\]\['b'\]\[0\] is a NoneType \(None\)"):
        flatten((torch.ones(1), {"b": [None]}), what="x")
