"""The runtime: gradients and losses equal single-process training; bad input fails before communicating."""

import threading

import pytest
import torch
from torch import nn
from workers import all_scenarios, make_model, reference, run_threads, seeded, train

import pipetrain as pt
from pipetrain.schedule import Schedule


def assert_matches_reference(results_by_rank, world):
    for key in results_by_rank[0]:
        kind, _, m = key
        ref = reference(kind, m)
        curves = [results_by_rank[r][key]["curve"] for r in range(world)]
        assert all(c == curves[0] for c in curves), f"{key}: ranks report different losses"
        assert curves[0] == pytest.approx(ref["curve"], rel=1e-5), f"{key}: loss curve differs"
        grads = {}
        for r in range(world):
            grads.update(results_by_rank[r][key]["grads"])
        assert grads.keys() == ref["grads"].keys(), f"{key}: every parameter is owned by exactly one rank"
        for name, want in ref["grads"].items():
            # (a key bias's gradient is zero up to rounding, softmax ignoring a shift of every key: floor 1e-6)
            err = (grads[name] - want).norm() / want.norm().clamp_min(1e-6)
            assert err <= 1e-5, f"{key}: grad {name} relative error {err:.2e}"


def test_in_process_pipeline_equals_single_process():
    # the in-process transport on 2 ranks; the same scenarios run on 2 and 4 gloo processes (test_distributed)
    results = run_threads(2, all_scenarios)
    assert_matches_reference(results, 2)


def _threads_expect_error(world, make_and_step):
    with pytest.raises(Exception) as err:
        run_threads(world, lambda rank, world, transport: make_and_step(rank, world, transport), timeout=30)
    return err


def _mlp(n=4):
    return seeded(lambda: [nn.Linear(4, 4) for _ in range(n)])


def test_batch_not_divisible_by_microbatches():
    def body(rank, world, transport):
        sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=4)
        pipe = pt.Pipeline(_mlp(), schedule=sched, loss_fn=nn.functional.mse_loss, transport=transport)
        pipe.step(torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="batch size 6, which does not split into 4 equal microbatches"):
        raise _threads_expect_error(2, body).value


def test_ranks_given_differently_shaped_batches_fail_together_naming_the_shapes():
    # the first envelope of a new shape carries a check of the sender's microbatch shapes: no extra message
    def body(rank, world, transport):
        layers = seeded(lambda: [nn.Linear(4, 4) for _ in range(4)])
        pipe = pt.Pipeline(layers, schedule=pt.schedules.build("1f1b", num_ranks=world, num_microbatches=2),
                           loss_fn=nn.functional.mse_loss, transport=transport, timeout=20)
        pipe.step(torch.ones(4, 4), torch.ones(4, 4))  # the same shapes: fine
        rows = 4 if rank == 0 else 6  # rank 1 was given another batch size
        try:
            pipe.step(torch.ones(rows, 3, 4), torch.ones(rows, 3, 4))
        except Exception as err:  # noqa: BLE001
            return type(err).__name__, str(err)

    errors = run_threads(2, body)
    assert errors[1][0] == "ValueError", errors
    assert ("rank 1 and rank 0 were given differently shaped batches: microbatch 0 holds (3, 3, 4) float32"
            in errors[1][1])
    assert errors[0][0] == "CommError" and "rank 1 failed: ValueError" in errors[0][1], errors


def test_fewer_layers_than_stages():
    sched = pt.schedules.build("gpipe", num_ranks=4, num_microbatches=2)
    with pytest.raises(pt.BalanceError, match="3 layers cannot fill 4 stages"):
        pt.Pipeline(_mlp(3), schedule=sched, loss_fn=nn.functional.mse_loss,
                    transport=pt.InProcessHub(4).transport(0))


def test_world_size_must_match_schedule():
    sched = pt.schedules.build("gpipe", num_ranks=2, num_microbatches=2)
    with pytest.raises(ValueError, match="is for 2 ranks but the process group has 3"):
        pt.Pipeline(_mlp(), schedule=sched, loss_fn=nn.functional.mse_loss, transport=pt.InProcessHub(3).transport(0))


def test_schedule_failing_the_checker_is_refused():
    sched = pt.schedules.build("1f1b", num_ranks=2, num_microbatches=2)
    broken = Schedule("broken", 2, 2, 1, (0, 1), [sched.actions[0][:-1], sched.actions[1]])
    with pytest.raises(pt.ScheduleError, match="backward runs 0 times"):
        pt.Pipeline(_mlp(), schedule=broken, loss_fn=nn.functional.mse_loss, transport=pt.InProcessHub(2).transport(0))


@pytest.mark.parametrize("balance,message", [([1, 2], "summing to the 4 layers"), ([4, 0], "positive"),
                                             ("fast", "balance must be")])
def test_bad_balance(balance, message):
    sched = pt.schedules.build("gpipe", num_ranks=2, num_microbatches=2)
    with pytest.raises(ValueError, match=message):
        pt.Pipeline(_mlp(), schedule=sched, loss_fn=nn.functional.mse_loss, balance=balance,
                    transport=pt.InProcessHub(2).transport(0))


def test_balance_by_params_and_time():
    def body(rank, world, transport):
        layers = seeded(lambda: [nn.Linear(4, 64), nn.Linear(64, 64), nn.Linear(64, 4), nn.Tanh()])
        sched = pt.schedules.build("gpipe", num_ranks=world, num_microbatches=2)
        by_params = pt.Pipeline(layers, schedule=sched, loss_fn=nn.functional.mse_loss, balance="params",
                                transport=transport)
        by_time = pt.Pipeline(layers, schedule=sched, loss_fn=nn.functional.mse_loss, balance="time",
                              sample=torch.randn(2, 4), transport=transport)
        return by_params.balance, by_time.balance
    results = run_threads(2, body)
    assert results[0][0] == [1, 3]  # params 320 | 4160 + 260 + 0 beats 320 + 4160 | 260 + 0
    assert results[0][1] == results[1][1], "ranks must agree on the measured partition"


def test_evaluate_is_forward_only_and_matches_the_loss():
    def body(rank, world, transport):
        layers, loss_fn, x, y = __import__("workers").make_model("gpt", 4)
        sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=4)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport)
        loss = pipe.evaluate(x, y)
        assert all(p.grad is None for p in pipe.parameters())
        return loss
    layers, loss_fn, x, y = __import__("workers").make_model("gpt", 4)
    with torch.no_grad():
        want = loss_fn(nn.Sequential(*layers)(x), y).item()
    assert run_threads(2, body) == pytest.approx([want, want], rel=1e-5)


def test_measured_timeline_covers_every_compute_action():
    def body(rank, world, transport):
        return train(rank, world, "1f1b", "mlp", 4, transport)["curve"]
    run_threads(2, body)  # smoke: the scenario asserts no activations are left
    hub = pt.InProcessHub(1)
    sched = pt.schedules.build("gpipe", num_ranks=1, num_microbatches=3)
    pipe = pt.Pipeline(_mlp(), schedule=sched, loss_fn=nn.functional.mse_loss, transport=hub.transport(0))
    pipe.step(torch.randn(6, 4), torch.randn(6, 4))
    step = pipe.last_step
    assert [str(e.action) for e in step.events] == "0F0 0F1 0F2 0B0 0B1 0B2".split()
    assert 0 <= step.bubble_fraction < 1 and step.step_time >= step.busy_time


def test_a_transfer_nobody_answers_fails_naming_both_ranks():
    from pipetrain.runtime.comm import wait_or_raise

    hub = pt.InProcessHub(2)
    work = hub.transport(1).irecv(torch.empty(3), 0)
    with pytest.raises(pt.CommError, match=r"rank 1: waiting on rank 0 for the test transfer timed out after 0.2s"):
        wait_or_raise(work, timeout=0.2, transport=hub.transport(1), peer=0, what="the test transfer")


def test_errors_name_global_ranks_when_the_pipeline_is_a_subgroup():
    from pipetrain.runtime.comm import rank_name

    class Sub:  # the second replica's pipeline of a dp 2 x pp 2 mesh
        rank, world_size, global_ranks = 0, 2, (2, 3)

    assert rank_name(Sub(), 1) == "global rank 3 (pipeline rank 1)"
    assert rank_name(pt.InProcessHub(2).transport(0), 1) == "rank 1"


def test_a_stages_reduce_launches_as_soon_as_its_weight_gradients_are_complete():
    # interleaved: rank 0 holds stages 0 and 2; stage 2 finishes its backward well before stage 0, and the
    # data-parallel reduction of its gradients is launched then (its REDUCE action), overlapping stage 0's tail
    world, m = 2, 4
    layers, loss_fn, x, y = make_model("mlp", m)
    hub = pt.InProcessHub(world)
    done: dict[int, list] = {0: [], 1: []}
    launched = {}

    class Launches:
        def __init__(self, rank, executor):
            self.rank, self.executor = rank, executor

        def reduce(self, stage):
            done[self.rank].append((stage, len(self.executor._step.events)))

        def gather(self, stage):
            raise AssertionError("no GATHER was placed")

        def wait_gathered(self, stage):
            return False

        def before_backward(self, stage):  # (before each backward: its gradients' buffer, once per step)
            if stage not in prepared[self.rank]:
                prepared[self.rank].append(stage)

    prepared: dict[int, list] = {0: [], 1: []}

    def rank_main(rank: int) -> None:
        sched = pt.schedules.build("interleaved-1f1b", num_ranks=world, num_microbatches=m)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=hub.transport(rank), timeout=30)
        actions = pt.schedules.lower(pt.schedules.with_collectives(sched)).actions[rank]
        executor = pipe._executor
        step = executor.run(actions, inputs=list(x.tensor_split(m)), targets=list(y.tensor_split(m)), keys=[None] * m,
                            grad=True, collectives=Launches(rank, executor))
        launched[rank] = [str(e.action) for e in step.comms if e.action.op.is_collective]
        done[rank].append(("total", len(step.events)))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (s2, at2), (s0, at0), (_, total) = done[0]
    assert (s2, s0) == (2, 0) and at2 < at0 == total  # stage 2 launched with actions still to run
    assert [s for s, _ in done[1][:-1]] == [3, 1]
    assert launched == {0: ["2REDUCE", "0REDUCE"], 1: ["3REDUCE", "1REDUCE"]}  # (in the step's timeline too)
    assert prepared == {0: [2, 0], 1: [3, 1]}  # each stage's buffer before its first backward


def test_split_backward_names_the_torch_it_needs(monkeypatch):
    # torch.autograd.backward from GradientEdges (pytorch#144744) arrived in 2.7; pyproject says torch>=2.7
    from torch.torch_version import TorchVersion

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.6.0"))
    sched = pt.schedules.build("zbv", num_ranks=1, num_microbatches=2)
    with pytest.raises(RuntimeError, match=r"needs torch >= 2.7 .* this is torch 2.6.0"):
        pt.Pipeline(_mlp(), schedule=sched, loss_fn=nn.functional.mse_loss, transport=pt.InProcessHub(1).transport(0))
    pt.Pipeline(_mlp(), schedule=pt.schedules.build("1f1b", num_ranks=1, num_microbatches=2),
                loss_fn=nn.functional.mse_loss, transport=pt.InProcessHub(1).transport(0))  # no W: fine


_BUILD = threading.Lock()


def _built_alike_or_not(rank, world, transport=None, alike=True):
    with _BUILD:  # one thread builds at a time: each gets the draws of its own seed
        torch.manual_seed(0 if alike else rank)
        layers = [nn.Linear(4, 4) for _ in range(4)]
    with torch.device("meta"):
        layers.append(nn.Linear(4, 4))  # on the meta device: given storage by Pipeline(seed=...), not compared
    sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=2)
    try:
        pt.Pipeline(layers, schedule=sched, loss_fn=nn.functional.mse_loss, transport=transport, timeout=20)
    except ValueError as err:
        return str(err)
    return None


def test_ranks_that_built_different_weights_are_refused_on_every_rank():
    """In-process ranks share torch's random generator: seeding and building in each thread can give each rank
    other weights, which would train a model stitched from two. Every rank refuses, naming the layer."""
    assert run_threads(2, _built_alike_or_not) == [None, None]
    errors = run_threads(2, _built_alike_or_not, alike=False)
    assert all(e is not None and "rank 1" in e and "different weights for layer 0 (Linear)" in e and
               "copy.deepcopy" in e for e in errors), errors
