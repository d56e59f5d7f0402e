"""Choosing a schedule from measured per-layer costs: every candidate simulated on its best split, ranked."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipetrain.schedule as S
from pipetrain.schedule.choose import rank_schedules
from pipetrain.schedule.partition import partition, rank_partition


def test_with_equal_layers_the_v_schedule_that_holds_least_wins():
    ranked = rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=[(1.0, 1.0, 1.0)] * 8)
    assert (ranked[0].name, ranked[0].stages_per_rank, ranked[0].balance) == ("zbv", 2, (2, 2, 2, 2))
    assert ranked[0].bubble_fraction == pytest.approx(1 / 49)  # (P-1)/(6M+P-1)
    dual = next(c for c in ranked if c.name == "dualpipev")
    assert dual.step_time == pytest.approx(ranked[0].step_time) and dual.peak_microbatches > 2
    assert ranked[-1].name in ("gpipe", "1f1b", "looped-bfs")
    assert "zbv (stages per rank 2, balance [2, 2, 2, 2])" in ranked[0].describe()


def test_a_memory_limit_drops_the_schedules_that_hold_more():
    costs = [(1.0, 1.0, 1.0)] * 8
    ranked = rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=costs, memory_limit=2)
    assert ranked and all(c.peak_microbatches <= 2 for c in ranked)
    assert not {"gpipe", "dualpipev", "looped-bfs"} & {c.name for c in ranked}
    with pytest.raises(ValueError, match="within memory_limit=0.5"):
        rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=costs, memory_limit=0.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 3), st.integers(1, 8),
       st.lists(st.tuples(*(st.floats(0.1, 5.0),) * 3), min_size=6, max_size=12), st.floats(0.0, 0.5))
def test_each_candidate_is_its_schedule_simulated_on_the_better_split(ranks, mbs, layers, comm):
    # a heavy head or any uneven model: the oracle rebuilds and simulates each candidate by hand, on the
    # rank-balanced and the stage-balanced split
    ranked = rank_schedules(num_ranks=ranks, num_microbatches=mbs, layer_costs=layers, comm=comm)
    assert [c.step_time for c in ranked] == sorted(c.step_time for c in ranked)
    totals = [sum(x) for x in layers]
    for c in ranked:
        splits = [rank_partition(totals, c.schedule.stage_to_rank), partition(totals, c.schedule.num_stages)]
        assert list(c.balance) in splits
        if c.name != "zb-auto":  # (zb-auto is built for the costs: its own tests check it)
            assert c.schedule == S.build(c.name, num_ranks=ranks, num_microbatches=mbs,
                                         stages_per_rank=c.stages_per_rank)
            assert c.step_time <= min(S.simulate(c.schedule, _costs(layers, b, comm)).step_time for b in splits)
        truth = S.simulate(c.schedule, _costs(layers, list(c.balance), comm))
        assert c.step_time == pytest.approx(truth.step_time)
    assert {c.name for c in ranked} >= {"gpipe", "zb-h1"}  # these run any microbatch count


def _costs(layers, balance, comm):
    starts = [sum(balance[:s]) for s in range(len(balance) + 1)]
    per_stage = [[sum(x[k] for x in layers[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
                 for k in range(3)]
    return S.Costs(f=per_stage[0], b=per_stage[1], w=per_stage[2], comm=comm)


def test_a_v_takes_the_stage_balanced_split_when_the_rank_balanced_one_is_lopsided():
    # the reference Llama's measured shape: a cheap embedding, 8 equal blocks, a light head; the ranks'
    # totals favour 5 + 1 | 2 + 2 layers by a hair (block noise), but stage 0 then holds 4 blocks and the
    # V's chain through it waits (simulated bubble 8% against 3%)
    blocks = [1.0, 0.99, 1.01, 0.98, 1.0, 1.02, 1.0, 1.03]
    layers = [(0.002, 0.001, 0.001)] + [(0.33 * b, 0.4 * b, 0.27 * b) for b in blocks] + [(0.03, 0.03, 0.02)]
    zbv = next(c for c in rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=layers, schedules=["zbv"])
               if c.stages_per_rank == 2)
    totals = [sum(x) for x in layers]
    lopsided = rank_partition(totals, zbv.schedule.stage_to_rank)
    assert lopsided[0] >= 4 and list(zbv.balance) == partition(totals, 4)
    assert zbv.step_time < S.simulate(zbv.schedule, _costs(layers, lopsided, 0.0)).step_time * 0.97



LLAMA_SHAPE = [0.004, 1.0, 0.99, 1.01, 0.98, 1.0, 1.02, 1.0, 1.03, 0.08]  # F + I + W per layer


def test_a_named_balance_on_a_v_takes_the_split_the_schedule_runs_faster():
    # the Llama shape above: evening out the ranks gives stage 0 four blocks; the stage-balanced split wins.
    # A heavy head (63% of the compute): evening out the stages leaves rank 0 with the head and two more
    # stages' worth; the ranks' split wins. One stage per rank: the exact partition, nothing simulated.
    from pipetrain.pipeline.balance import named_split

    zbv = S.build("zbv", num_ranks=2, num_microbatches=8)
    heavy = [1.0] * 7 + [12.0]
    for costs, want in [(LLAMA_SHAPE, partition), (heavy, lambda c, n: rank_partition(c, zbv.stage_to_rank))]:
        by_ranks, by_stages = rank_partition(costs, zbv.stage_to_rank), partition(costs, 4)
        assert by_ranks != by_stages
        assert named_split(costs, zbv) == want(costs, 4)
        times = {tuple(b): S.simulate(zbv, _costs([(c / 3,) * 3 for c in costs], b, 0.0)).step_time
                 for b in (by_ranks, by_stages)}
        assert times[tuple(named_split(costs, zbv))] == min(times.values())
    one_per_rank = S.build("1f1b", num_ranks=4, num_microbatches=8)
    assert named_split(LLAMA_SHAPE, one_per_rank) == partition(LLAMA_SHAPE, 4)


def _time_balanced_v(rank, world, transport=None):
    import torch
    from torch import nn
    from workers import seeded

    import pipetrain as pt

    layers = seeded(lambda: [nn.Linear(4, 4) for _ in LLAMA_SHAPE])
    pipe = pt.Pipeline(layers, schedule=S.build("zbv", num_ranks=world, num_microbatches=4),
                       loss_fn=nn.functional.mse_loss, balance="time", sample=torch.ones(2, 4), transport=transport)
    return pipe.balance


def test_pipeline_balance_time_on_a_v_uses_the_faster_split(monkeypatch):
    from workers import run_threads

    import pipetrain.pipeline.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "time_costs", lambda layers, sample: list(LLAMA_SHAPE))
    assert run_threads(2, _time_balanced_v) == [partition(LLAMA_SHAPE, 4)] * 2

def _heavy_head_mlp():
    """The MLP of the exactness tests with a heavy head, the same in every rank and in the reference."""
    import torch
    from torch import nn
    from workers import _RNG_LOCK, make_model

    layers, loss_fn, x, y = make_model("mlp", 4)
    with _RNG_LOCK:  # in-process ranks are threads sharing torch's global RNG
        torch.manual_seed(1)
        layers[-1] = nn.Sequential(nn.Linear(16, 2048), nn.Tanh(), nn.Linear(2048, 3))
    return layers, loss_fn, x, y


def auto_rank(rank, world, transport=None, memory_limit=None, how="plan"):
    """A Pipeline built from pt.plan_pipeline (or schedule="auto", the same called for you) on the MLP with a
    heavy head: its choice and first gradients."""
    from workers import built_alone

    import pipetrain as pt

    layers, loss_fn, x, y = built_alone(transport, _heavy_head_mlp)  # (rank 0 times layers while 1 builds)
    if how == "plan":
        plan = pt.plan_pipeline(layers, num_microbatches=4, loss_fn=loss_fn, sample=x[:2], sample_target=y[:2],
                                transport=transport, timeout=60, memory_limit=memory_limit)
        pipe = pt.Pipeline(layers, schedule=plan, loss_fn=loss_fn, transport=transport, timeout=60)
        assert (pipe.schedule, tuple(pipe.balance)) == (plan.schedule.compute_only(), plan.balance)
    else:
        pipe = pt.Pipeline(layers, schedule="auto", num_microbatches=4, loss_fn=loss_fn, sample=x[:2],
                           transport=transport, timeout=60)
    pipe.step(x, y)
    grads = {(i, n): p.grad.clone() for i, layer in pipe.layers.items() for n, p in layer.named_parameters()}
    return {"name": pipe.schedule.name, "balance": pipe.balance, "grads": grads,
            "stages": pipe.schedule.num_stages}


def _reference_grads():
    from torch import nn

    layers, loss_fn, x, y = _heavy_head_mlp()
    loss_fn(nn.Sequential(*layers)(x), y).backward()
    return {(i, n): p.grad for i, layer in enumerate(layers) for n, p in layer.named_parameters()}


@pytest.mark.parametrize("processes", [False, True])
def test_pipeline_auto_runs_the_fastest_schedule_on_its_split_exactly(processes, caplog):
    from workers import run_processes, run_threads

    caplog.set_level("INFO", logger="pipetrain")
    # threads: pt.plan_pipeline, then Pipeline(schedule=plan); processes: schedule="auto"
    results = list(run_processes(2, auto_rank, None, None, "auto").values()) if processes else run_threads(2, auto_rank)
    assert results[0]["name"] == results[1]["name"] and results[0]["balance"] == results[1]["balance"]
    balance = results[0]["balance"]
    assert len(balance) == results[0]["stages"] and sum(balance) == 8 and min(balance) >= 1
    ref = _reference_grads()
    grads = {k: v for r in results for k, v in r["grads"].items()}
    assert grads.keys() == ref.keys()
    for k in ref:
        assert (grads[k] - ref[k]).norm() / ref[k].norm() <= 1e-5, k
    if not processes:
        chose = re.search(r'plan_pipeline on 2 ranks, 4 microbatches, transfer ([\d.]+) ms: (\S+)', caplog.text)
        assert chose and float(chose[1]) > 0 and chose[2] == results[0]["name"]
        assert "also simulated: gpipe" in caplog.text


def test_pipeline_auto_says_what_it_needs():
    import torch
    from torch import nn

    import pipetrain as pt

    hub = pt.InProcessHub(1)
    layers = [nn.Linear(2, 2)]
    with pytest.raises(ValueError, match="needs num_microbatches="):
        pt.Pipeline(layers, schedule="auto", loss_fn=nn.functional.mse_loss, transport=hub.transport(0))
    with torch.device("meta"):
        meta = [nn.Linear(2, 2)]
    with pytest.raises(ValueError, match="meta device cannot run: build a schedule with pipetrain.schedules.build"):
        pt.Pipeline(meta, schedule="auto", num_microbatches=1, sample=torch.ones(1, 2), loss_fn=nn.functional.mse_loss,
                    transport=hub.transport(0))
    with pytest.raises(ValueError, match="schedule='zbv' needs num_microbatches="):
        pt.Pipeline(layers, schedule="zbv", loss_fn=nn.functional.mse_loss, transport=hub.transport(0))
    with pytest.raises(ValueError, match="unknown schedule 'zvb': give a registered name"):
        pt.Pipeline(layers, schedule="zvb", num_microbatches=2, loss_fn=nn.functional.mse_loss,
                    transport=hub.transport(0))
    with pytest.raises(ValueError, match="num_microbatches= goes with a schedule given by name"):
        pt.Pipeline(layers, schedule=S.build("gpipe", num_ranks=1, num_microbatches=1), num_microbatches=2,
                    loss_fn=nn.functional.mse_loss, transport=hub.transport(0))
    with pytest.raises(ValueError, match="brings its own split; leave balance= out"):
        pt.Pipeline(layers, schedule="auto", num_microbatches=1, sample=torch.ones(1, 2), balance=[1],
                    loss_fn=nn.functional.mse_loss, transport=hub.transport(0))
    with pytest.raises(TypeError, match="a PipelinePlan, a registered name or \"auto\", got int"):
        pt.Pipeline(layers, schedule=3, loss_fn=nn.functional.mse_loss, transport=hub.transport(0))
    named = pt.Pipeline(layers, schedule="gpipe", num_microbatches=2, loss_fn=nn.functional.mse_loss,
                        transport=hub.transport(0))  # a registered name, built for this pipeline's ranks
    assert (named.schedule.name, named.schedule.num_ranks, named.schedule.num_microbatches) == ("gpipe", 1, 2)


def test_the_transfer_timed_is_the_largest_boundary_between_two_ranks():
    import torch
    from torch import nn
    from workers import run_threads

    from pipetrain.pipeline.profile import boundary_bytes, transfer_time

    layers = [nn.Linear(4, 8), nn.Linear(8, 16), nn.Linear(16, 2)]
    assert boundary_bytes(layers, torch.ones(3, 4)) == 3 * 16 * 4  # the last layer's output is never sent
    times = run_threads(3, lambda rank, world, transport: transfer_time(transport, 1 << 16, timeout=10))
    assert times[0] > 0 and times[1] == times[2] == 0


def test_with_targets_the_last_layer_is_timed_with_its_loss():
    import torch
    from torch import nn

    from pipetrain.pipeline.profile import phase_costs

    calls = []

    def loss_fn(out, y):
        calls.append(tuple(y.shape))
        return (out - y).square().mean()

    costs = phase_costs([nn.Linear(4, 8), nn.Linear(8, 3)], torch.ones(2, 4), loss_fn=loss_fn,
                        target=torch.zeros(2, 3), repeats=2, warmup=1)
    assert len(costs) == 2 and all(t > 0 for row in costs for t in row)
    assert calls == [(2, 3)] * 3  # every timed run of the last layer, warm-up included


@pytest.mark.parametrize("how", ["auto", "time"])
def test_a_bad_sample_fails_on_rank_0_and_the_others_at_once(how):
    # schedule="auto" (a target of the wrong shape) and balance="time" (a sample of the wrong width): rank 0
    # raises its own error and rank 1 names rank 0, both well before the 60 s timeout
    import time

    import torch
    from torch import nn
    from workers import run_threads, seeded

    import pipetrain as pt

    def body(rank, world, transport):
        layers = seeded(lambda: [nn.Linear(4, 4), nn.Linear(4, 3)])
        try:
            if how == "auto":
                pt.plan_pipeline(layers, num_microbatches=2, loss_fn=nn.functional.mse_loss, sample=torch.ones(2, 4),
                                 sample_target=torch.ones(5, 7), transport=transport, timeout=60)
            else:
                pt.Pipeline(layers, schedule=pt.schedules.build("1f1b", num_ranks=2, num_microbatches=2),
                            balance="time", sample=torch.ones(2, 9), loss_fn=nn.functional.mse_loss,
                            transport=transport, timeout=60)
        except Exception as err:
            return type(err).__name__, str(err)

    start = time.perf_counter()
    errors = run_threads(2, body)
    assert time.perf_counter() - start < 20
    assert ("size" if how == "auto" else "shapes") in errors[0][1]  # rank 0: torch's own shape error
    what = 'plan_pipeline (schedule="auto")' if how == "auto" else 'balance="time"'
    assert errors[1] == ("RuntimeError", f"timing the layers on `sample` for {what} failed on rank 0 "
                                         "(see its error); rank 1 stops too")


def test_plan_pipeline_in_one_process_plans_for_the_ranks_asked():
    # offline: measured here, for a pipeline of num_ranks ranks (no process group); the plan then runs as is
    import torch
    from torch import nn

    import pipetrain as pt

    layers = [nn.Linear(8, 8) for _ in range(6)]
    plan = pt.plan_pipeline(layers, num_microbatches=4, sample=torch.randn(2, 8), num_ranks=2, transfer_seconds=1e-4)
    assert plan.schedule.num_ranks == 2 and plan.schedule.num_microbatches == 4
    assert len(plan.balance) == plan.schedule.num_stages and sum(plan.balance) == 6
    assert plan.candidates[0].schedule is plan.schedule and plan.transfer_seconds == 1e-4
    assert [c.step_time for c in plan.candidates] == sorted(c.step_time for c in plan.candidates)
    with pytest.raises(ValueError, match="needs num_ranks= when it runs in one process"):
        pt.plan_pipeline(layers, num_microbatches=4, sample=torch.randn(2, 8))
    with pytest.raises(ValueError, match="needs num_microbatches="):
        pt.plan_pipeline(layers, num_microbatches=0, sample=torch.randn(2, 8), num_ranks=2)


def test_a_heavy_projection_is_weighed_split_by_vocabulary_and_wins():
    # 6 blocks of cost 1 and a head of 8 whose projection is 90% of it: split over the ranks (S, T placed), the
    # step is shorter than with the head on the last stage; a light head stays whole
    heavy = [(1.0, 1.0, 1.0)] * 6 + [(8.0, 8.0, 8.0)]
    ranked = rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=heavy, projection=0.9)
    best, whole = ranked[0], next(c for c in ranked if not c.vocab_parallel)
    assert best.vocab_parallel and best.step_time < 0.95 * whole.step_time
    assert best.schedule.vocabulary_shards == 2 and "vocabulary parallel" in best.describe()
    assert {c.vocab_parallel for c in ranked} == {True, False}
    assert all(c.vocab_parallel for c in rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=heavy,
                                                        projection=0.9, whole=False))
    light = [(1.0, 1.0, 1.0)] * 8 + [(0.1, 0.1, 0.1)]
    assert not rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=light, projection=0.9)[0].vocab_parallel


def test_plan_pipeline_weighs_vocabulary_parallelism_where_the_layers_can_split():
    import torch
    from torch import nn

    import pipetrain as pt
    from pipetrain.models.gpt import GPTConfig, build_gpt, gpt_loss

    layers = build_gpt(GPTConfig(vocab_size=4096, seq_len=8, d_model=16, n_layers=4, n_heads=2))
    sample = torch.randint(0, 4096, (2, 8))
    weighed = pt.plan_pipeline(layers, num_microbatches=4, sample=sample, num_ranks=2, loss_fn=gpt_loss,
                               vocab_parallel=None)
    assert {c.vocab_parallel for c in weighed.candidates} == {True, False}
    assert weighed.vocab_parallel == weighed.candidates[0].vocab_parallel
    off = pt.plan_pipeline(layers, num_microbatches=4, sample=sample, num_ranks=2, loss_fn=gpt_loss)
    assert not any(c.vocab_parallel for c in off.candidates)  # (the default of a plan asked for directly)
    plain = [nn.Linear(8, 8) for _ in range(4)]  # nothing to split: weighed as without
    assert not pt.plan_pipeline(plain, num_microbatches=4, sample=torch.randn(2, 8), num_ranks=2,
                                vocab_parallel=None).vocab_parallel
    with pytest.raises(ValueError, match="no vocabulary_parallel_plan"):
        pt.plan_pipeline(plain, num_microbatches=4, sample=torch.randn(2, 8), num_ranks=2, vocab_parallel=True)
