"""Vocabulary parallelism: S and T passes placed into every registered schedule (checked, simulated, refused
where misplaced), and on spawned gloo ranks loss and gradients equal to one process for the reference GPT and
Llama at 2 and 4 ranks, every schedule; the layouts it refuses, each with a clear error."""

import pytest
import torch
from vocab_workers import VOCAB, vocabulary_scenario
from workers import run_processes

import pipetrain as pt
from pipetrain.models.gpt import GPTConfig, build_gpt, gpt_loss
from pipetrain.schedule import Action, Costs, Op, Schedule, ScheduleError, check, simulate, with_vocabulary


def test_vocabulary_actions_print_with_their_shard_and_parse_back():
    for text in ("0S5", "3T12", "1E0", "2G7"):
        assert str(Action.parse(text)) == text
    assert Action.parse("1T5") == Action(1, Op.T, 5)


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_registered_schedule_gets_its_passes_placed_checked_and_simulated(ranks):
    costs = Costs(s=0.5, t=1.0, comm=0.02)
    for name in pt.schedules.names():
        base = pt.schedules.build(name, num_ranks=ranks, num_microbatches=2 * ranks)
        placed = with_vocabulary(base, costs)
        check(placed)
        assert placed.vocabulary_shards == ranks and placed.name == f"{name}/vocabulary"
        for rank, acts in enumerate(placed.actions):
            for op in (Op.E, Op.S, Op.T, Op.G):  # each kind once per microbatch, in microbatch order, everywhere
                assert [a for a in acts if a.op is op] == [Action(rank, op, m) for m in range(2 * ranks)], name
            assert [a for a in acts if a.op._value_ in "FBIW"] != [], name
        assert sorted(map(str, (a for acts in placed.actions for a in acts if a.op._value_ in "FBIW"))) == \
            sorted(map(str, (a for acts in base.actions for a in acts))), name  # the schedule's own actions, all
        evaluation = placed.forward_only()
        check(evaluation)
        assert {a.op for acts in evaluation.actions for a in acts} == {Op.E, Op.F, Op.S}
        assert simulate(placed, costs).step_time > 0


def test_placing_the_passes_beats_the_head_on_the_last_stage_when_the_head_is_heavy():
    """A head 63% of the compute (gpt-8x256-v32k's): split over 2 ranks, DualPipeV simulates within a few percent
    of perfect balance; whole on the last stage it cannot pass 0.8."""
    ranks, m, head = 2, 8, 10.0  # 4 stages of 1.5 per microbatch each (f + b + w) against a head of 10 (x 3)
    base = pt.schedules.build("dualpipev", num_ranks=ranks, num_microbatches=m)
    per_stage = 0.5
    placed = with_vocabulary(base, Costs(f=per_stage, b=per_stage, w=per_stage, s=head / ranks, t=2 * head / ranks))
    work = m * (base.num_stages * 3 * per_stage + 3 * head) / ranks  # every rank's share
    split = simulate(placed, Costs(f=per_stage, b=per_stage, w=per_stage, s=head / ranks, t=2 * head / ranks))
    assert work / split.step_time > 0.93
    whole = [per_stage] * (base.num_stages - 1) + [per_stage + head]
    at_last = simulate(base, Costs(f=whole, b=whole, w=whole))
    assert work / at_last.step_time < 0.8


def _schedule(rows: list[str], ranks_stages: tuple[int, ...] = (0, 1)) -> Schedule:
    return Schedule("hand", len(rows), 1, 1, ranks_stages, [[Action.parse(a) for a in row.split()] for row in rows])


@pytest.mark.parametrize(("rows", "match"), [
    (["0E0 0F0 0B0 1S0 0T0 0G0", "1E0 1F0 1S0 1T0 1B0 1G0"], "vocabulary shard 1's pass"),  # another rank's shard
    (["0E0 0F0 0S0 0B0 0G0", "1E0 1F0 1S0 1T0 1B0 1G0"], "0T0 runs 0 times"),
    (["0E0 0F0 0S0 0T0 0B0", "1E0 1F0 1S0 1T0 1B0 1G0"], "0G0 runs 0 times"),
    (["0E0 0F0 0T0 0S0 0B0 0G0", "1E0 1F0 1S0 1T0 1B0 1G0"], "not computed yet"),  # its statistics after it
    (["0E0 0F0 0S0 0B0 0T0 0G0", "1E0 1F0 1S0 1T0 1B0 1G0"], "deadlock"),  # the last B waits for shard 0's T
    (["0F0 0E0 0S0 0T0 0B0 0G0", "1E0 1F0 1S0 1T0 1B0 1G0"], "not computed yet"),  # the first F before its E
    (["0E0 0F0 0S0 0T0 0B0 0G0", "1G0 1E0 1F0 1S0 1T0 1B0"], "deadlock"),  # G before the gradient it takes
])
def test_misplaced_vocabulary_passes_are_refused(rows, match):
    with pytest.raises(ScheduleError, match=match):
        check(_schedule(rows))


def test_vocabulary_passes_in_the_wrong_microbatch_order_are_refused():
    rows = ["0E0 0E1 0F0 0F1 0S1 0S0 0T0 0T1 0B0 0B1 0G0 0G1", "1E0 1E1 1F0 1F1 1S0 1S1 1T0 1T1 1B0 1B1 1G0 1G1"]
    with pytest.raises(ScheduleError, match=r"run microbatches \[1, 0\]"):
        check(Schedule("hand", 2, 2, 1, (0, 1), [[Action.parse(a) for a in row.split()] for row in rows]))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    # (a key bias's gradient is zero up to rounding, softmax ignoring a shift of every key: floor 1e-6)
    return ((got - want).norm() / want.norm().clamp_min(1e-6)).item()


def check_equal(results: dict) -> None:
    for rank, cases in results.items():
        for case, r in cases.items():
            assert r["loss"] == pytest.approx(r["want"], rel=1e-5), (case, rank)
            assert r["evaluated"] == pytest.approx(r["want"], rel=1e-5), (case, rank)
            assert r["generated"] == r["reference_generated"], (case, rank)
            for key, grad in r["grads"].items():
                assert relative_error(grad, r["ref_grads"][key]) <= 1e-5, (case, rank, key)
    for case in results[0]:  # every weight has its gradient on some rank, the head's projection on all
        held = {key for cases in results.values() for key in cases[case]["grads"]}
        assert held == set(results[0][case]["ref_grads"]), case
        head = max(i for i, _ in held)
        projection = (head, "lm_head.weight" if case[0].startswith("hf-") else "proj.weight")
        assert all(projection in cases[case]["grads"] for cases in results.values()), case


def test_two_ranks_equal_one_process():
    cases = [("gpt", "1f1b", 4), ("llama", "zbv", 4), ("hf-llama", "dualpipev", 4), ("hf-qwen2-tied", "zb-h1", 4),
             ("gpt-tied", "interleaved-1f1b", 4), ("gpt", "auto", 4)]  # (auto: planned with the passes placed)
    results = run_processes(2, vocabulary_scenario, cases, timeout=200)
    check_equal(results)
    assert "0S0" in results[0][("gpt", "auto")]["schedule"]


def test_four_ranks_equal_one_process_on_every_schedule():
    cases = [("gpt", "1f1b", 4), ("llama", "interleaved-1f1b", 8), ("gpt-tied", "zb-h1", 4), ("llama", "dualpipev", 8),
             ("gpt", "zb-auto", 4), ("llama", "gpipe", 4), ("gpt-tied", "zbv", 8), ("hf-qwen2-tied", "looped-bfs", 8)]
    check_equal(run_processes(4, vocabulary_scenario, cases, timeout=300))


def test_data_parallel_replicas_of_vocabulary_parallel_pipelines_equal_one_process_sharded_or_not():
    from vocab_workers import vocabulary_dp_scenario

    check_equal(run_processes(4, vocabulary_dp_scenario, "zbv", timeout=200))


def test_tensor_parallel_ranks_split_the_tables_further_and_stay_exact():
    # pp 2 x tp 2: each table's rows over the 4 ranks (37 rows: uneven), statistics and sums combined over tp too;
    # tied GPT (a tie between the tables is theirs, not tensor parallel's) and from_hf Llama included
    cases = [("gpt", "1f1b", 4), ("llama", "zbv", 4), ("gpt-tied", "interleaved-1f1b", 4), ("hf-llama", "dualpipev", 4)]
    results = run_processes(4, vocabulary_scenario, cases, 2, timeout=300)
    check_equal(results)
    rows = {rank: r[("gpt", "1f1b")]["rows"] for rank, r in results.items()}
    assert rows == {0: 10, 1: 10, 2: 10, 3: 7}  # (pipeline rank-major: ranks 0 and 1 are pp rank 0's tp ranks)


def test_what_vocab_parallel_cannot_split_is_refused_before_any_communication():
    layers = build_gpt(GPTConfig(vocab_size=VOCAB, seq_len=8, d_model=16, n_layers=2, n_heads=2))
    hub = pt.InProcessHub(2)
    cases = [
        (dict(loss_fn=lambda out, y: out.mean()), "pass loss_fn=pipetrain.CrossEntropy"),
        (dict(loss_fn=gpt_loss, transport=hub.transport(0)), "needs torch.distributed ranks"),
        (dict(loss_fn=gpt_loss, shard="params"), "shard='params' is not supported yet"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pt.Pipeline(layers, schedule="1f1b", num_microbatches=2, vocab_parallel=True, **kwargs)
    with pytest.raises(ValueError, match="last layer's vocabulary table, but Linear has no vocabulary_parallel_plan"):
        pt.Pipeline([*layers[:-1], torch.nn.Linear(16, VOCAB)], schedule="1f1b", num_microbatches=2, loss_fn=gpt_loss,
                    vocab_parallel=True)
    other = build_gpt(GPTConfig(vocab_size=VOCAB + 1, seq_len=8, d_model=16, n_layers=2, n_heads=2))
    with pytest.raises(ValueError, match=f"the embedding has {VOCAB} rows and the head {VOCAB + 1}"):
        pt.Pipeline([*layers[:-1], other[-1]], schedule="1f1b", num_microbatches=2, loss_fn=gpt_loss,
                    vocab_parallel=True)
    with pytest.raises(ValueError, match="first layer's vocabulary table"):
        pt.Pipeline([torch.nn.Identity(), *layers[1:]], schedule="1f1b", num_microbatches=2, loss_fn=gpt_loss,
                    vocab_parallel=True)


def test_the_trainer_trains_with_vocab_parallel_as_without_and_resumes_exactly(tmp_path):
    from workers import trainer_run

    base = {"preset": "tiny", "steps": 6, "microbatches": 4, "batch_size": 8, "log_every": 100, "eval_batches": 1,
            "seed": 3, "progress": False, "warmup": 2, "tie_embeddings": True}
    plain = run_processes(2, trainer_run, base)
    straight = run_processes(2, trainer_run, {**base, "vocab_parallel": True})
    assert straight[0]["losses"] == pytest.approx(plain[0]["losses"], rel=1e-5)
    assert straight[0]["final"] == pytest.approx(plain[0]["final"], rel=1e-5)
    ck = str(tmp_path / "ck")
    first = run_processes(2, trainer_run, {**base, "vocab_parallel": True, "checkpoint_dir": ck, "stop_at_step": 3})
    resumed = run_processes(2, trainer_run, {**base, "vocab_parallel": True, "checkpoint_dir": ck, "resume": True})
    assert first[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]  # bit for bit
    for rank in (0, 1):  # the head's projection, whole on every rank, trained alike
        key = (max(i for i, _ in plain[1]["params"]), "proj.weight")  # (the head: the last layer)
        assert torch.equal(resumed[rank]["params"][key], straight[rank]["params"][key])
        assert relative_error(straight[rank]["params"][key], plain[1]["params"][key]) < 1e-4


def test_balance_by_params_leaves_the_split_projection_out_of_the_last_stage():
    from pipetrain.pipeline.balance import resolve_balance

    with torch.device("meta"):
        layers = build_gpt(GPTConfig(vocab_size=32768, seq_len=128, d_model=256, n_layers=8, n_heads=8))
    schedule = pt.schedules.build("1f1b", num_ranks=2, num_microbatches=4)
    whole = resolve_balance("params", layers, schedule, measured_costs=list)
    split = resolve_balance("params", layers, schedule, measured_costs=list, projection="proj")
    assert whole == [9, 1] and split == [5, 5]  # the head whole outweighs 8 blocks; without its projection, nothing
