"""Timelines: measured ones gathered from the ranks, pictures, Chrome traces, simulated vs measured."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from workers import make_model, run_threads

import pipetrain as pt
import pipetrain.schedule as S
from pipetrain.cli import main
from pipetrain.schedule.compare import compare

ALL = S.names()


def _costs(sched, rng, comm=0.3, post=0.05):
    n = sched.num_stages
    split = any(a.op is S.Op.W for acts in sched.actions for a in acts)
    return S.Costs(f=[rng.uniform(1, 2) for _ in range(n)], b=[rng.uniform(1, 3) for _ in range(n)],
                   w=[rng.uniform(0.5, 1.5) for _ in range(n)] if split else 0.0, comm=comm, post=post)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ALL), st.integers(2, 4), st.integers(4, 9), st.integers(0, 10_000))
def test_compare_recovers_the_costs_of_a_simulated_step_exactly(name, ranks, mbs, seed):
    if name == "dualpipev":
        mbs = max(mbs, 2 * ranks)  # its least microbatch count
    sched = S.build(name, num_ranks=ranks, num_microbatches=mbs)
    truth = S.simulate(sched, _costs(sched, random.Random(seed)))
    result = compare(sched, truth.timeline)
    assert result.step_time_error == pytest.approx(0.0, abs=1e-9)
    assert result.costs.comm == pytest.approx(0.3) and result.costs.post == pytest.approx(0.05)


def test_compare_pools_several_steps():
    sched = S.build("zb-h1", num_ranks=3, num_microbatches=6)
    costs = _costs(sched, random.Random(7))
    steps = [S.simulate(sched, costs).timeline] * 3
    result = compare(sched, steps)
    assert result.step_time_error == pytest.approx(0.0, abs=1e-9) and len(result.steps) == 3
    assert "(3 steps, mean)" in result.report()
    with pytest.raises(ValueError, match="at least one"):
        compare(sched, [])


def test_several_steps_round_trip_through_json(tmp_path):
    sched = S.build("1f1b", num_ranks=2, num_microbatches=2)
    steps = [S.simulate(sched, S.Costs(comm=c)).timeline for c in (0.1, 0.2)]
    S.save_timeline(steps, tmp_path / "steps.json", sched)
    loaded, loaded_sched = S.load_timeline(tmp_path / "steps.json")
    assert loaded == steps and loaded_sched == sched


def test_simulated_waits_are_the_time_inputs_held_compute_back():
    # 0F0 [0, 1], transfer 0.5 -> 1F0 [1.5, 2.5], 1B0 [2.5, 3.5], transfer 0.5 -> 0B0 starts at 4
    res = S.simulate(S.build("gpipe", num_ranks=2, num_microbatches=1), S.Costs(f=1.0, b=1.0, w=0.0, comm=0.5))
    assert [(str(w.action), w.start, w.end) for w in res.timeline.waits] == [("1F0", 0.0, 1.5), ("0B0", 1.0, 4.0)]


def test_chrome_trace_and_json_round_trip(tmp_path):
    sched = S.build("zbv", num_ranks=2, num_microbatches=4)
    timeline = S.simulate(sched, _costs(sched, random.Random(1))).timeline
    trace = S.chrome_trace(timeline, time_unit=1e-3)["traceEvents"]
    compute = [e for e in trace if e["ph"] == "X" and e["tid"] == 0]
    assert len(compute) == sum(len(a) for a in sched.actions)
    assert {e["pid"] for e in compute} == {0, 1} and all(e["dur"] > 0 for e in compute)
    assert any(e.get("tid") == 1 and e["name"].startswith("wait") for e in trace)  # waits on their own row
    assert any(e.get("tid") == 2 for e in trace)  # send/recv postings
    S.save_timeline(timeline, tmp_path / "t.json", sched)
    loaded, loaded_sched = S.load_timeline(tmp_path / "t.json")
    assert loaded == timeline and loaded_sched == sched


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_pictures_are_written(tmp_path, suffix):
    from pipetrain import viz

    sched = S.build("interleaved-1f1b", num_ranks=2, num_microbatches=4)
    res = S.simulate(sched)
    viz.save(res.timeline, tmp_path / f"one{suffix}", title="interleaved")
    viz.save_comparison(res.timeline, res.timeline, tmp_path / f"two{suffix}")
    for name in ("one", "two"):
        data = (tmp_path / f"{name}{suffix}").read_bytes()
        assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data[:2000]


def test_measured_timeline_is_gathered_on_rank_zero():
    def body(rank, world, transport):
        layers, loss_fn, x, y = make_model("mlp", 4)
        sched = pt.schedules.build("zbv", num_ranks=world, num_microbatches=4)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport)
        pipe.step(x, y)
        return sched, pipe.gather_timeline()

    (sched, timeline), (_, other) = run_threads(2, body)
    assert other is None
    got = sorted((e.rank, str(e.action)) for e in timeline.events if e.action.op.is_compute)
    assert got == sorted((r, str(a)) for r, acts in enumerate(sched.actions) for a in acts)
    lowered = S.lower(sched)
    comms = sorted((e.rank, str(e.action)) for e in timeline.events if e.action.op.is_comm)
    assert comms == sorted((r, str(a)) for r, acts in enumerate(lowered.actions) for a in acts if a.op.is_comm)
    assert timeline.waits and all(0 <= e.start <= e.end <= timeline.step_time() for e in timeline.events)
    for r in range(2):  # each rank's compute events follow its schedule order
        order = [str(e.action) for e in timeline.events if e.rank == r and e.action.op.is_compute]
        assert order == [str(a) for a in sched.actions[r]]
    assert abs(compare(sched, timeline).step_time_error) < 1.0  # sane; accuracy is measured, not tested


def test_gather_before_any_step_is_an_error():
    sched = pt.schedules.build("gpipe", num_ranks=1, num_microbatches=1)
    pipe = pt.Pipeline([nn.Linear(2, 2)], schedule=sched, loss_fn=nn.functional.mse_loss,
                       transport=pt.InProcessHub(1).transport(0))
    with pytest.raises(RuntimeError, match="needs a step first"):
        pipe.gather_timeline()
    with pytest.raises(RuntimeError, match="needs a generate"):
        pipe.gather_timeline(of="generate")
    with pytest.raises(ValueError, match='of must be "step" or "generate"'):
        pipe.gather_timeline(of="decode")


def test_cli_pictures_trace_and_compare(tmp_path, capsys):
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    assert main(["simulate", "--schedule", "zb-h1", "--ranks", "3", "--microbatches", "6", "--png", str(png),
                 "--trace", str(trace)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert json.loads(trace.read_text())["traceEvents"]
    sched = S.build("1f1b", num_ranks=2, num_microbatches=4)
    S.save_timeline(S.simulate(sched, S.Costs(comm=0.2, post=0.01)).timeline, tmp_path / "m.json", sched)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "m.json"), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "error +0.0%" in out and (tmp_path / "c.png").exists()
    (tmp_path / "garbage.json").write_text("{not json")
    for path, says in [(trace, "is a Chrome/Perfetto trace"), (tmp_path / "missing.json", "no such file"),
                        (tmp_path / "garbage.json", "is not JSON"), (tmp_path / "t.png", "is not JSON")]:
        assert main(["compare", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "save_timeline" in err
