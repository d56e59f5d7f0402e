"""The benchmark suite end to end on a tiny GPT (fast): every output is written and its figures hold together."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run  # noqa: E402


def test_schedule_bound_is_one_minus_the_bubble():
    assert run.schedule_bound("gpipe", 2, 8) == pytest.approx(8 / 9)
    assert run.schedule_bound("1f1b", 4, 8) == pytest.approx(8 / 11)
    assert run.schedule_bound("interleaved-1f1b", 2, 8) == pytest.approx(16 / 17)
    assert run.schedule_bound("zbv", 2, 8) > run.schedule_bound("1f1b", 2, 8)


def test_quick_suite_writes_table_json_and_pictures(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(run.WORKLOADS, "tiny", dict(family="llama", vocab_size=32, seq_len=16, d_model=32, n_layers=4,
                                                    n_heads=2, n_kv_heads=1))  # the reference Llama
    schedules = ["gpipe", "1f1b", "zb-auto"]
    assert run.main(["--workloads", "tiny", "--ranks", "2", "--schedules", *schedules, "--microbatches", "4",
                     "--batch-size", "8", "--sweep", "2", "--rounds", "2", "--steps", "1", "--warmup", "1",
                     "--no-jax", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (block,) = results["runs"]
    assert [r["schedule"] for r in block["rows"]] == schedules
    for row in block["rows"]:
        pt = row["pipetrain"]
        assert len(pt["blocks"]) == 2 and pt["step_time"] > 0 and 0 < pt["efficiency"] < 5
        assert len(pt["peak_memory_per_rank"]) == 2 and min(pt["peak_memory_per_rank"]) > 2**20
        assert 0 < row["bound"] < 1
        assert row["single_process_p_threads_step_time"] > 0 and row["speedup_vs_single_p_threads"] > 0
        if row["schedule"] == "zb-auto":
            assert "torch" not in row  # torch.distributed.pipelining builds no schedule from costs
        else:
            assert row["speedup_vs_torch"] > 0
            assert row["max_speedup_vs_torch"] == pytest.approx(row["bound"] / row["torch"]["efficiency"])
    assert set(block["sweep"]["1f1b"]) == {"2", "4"}
    assert block["sweep"]["1f1b"]["2"]["bound"] == pytest.approx(2 / 3)
    table = (tmp_path / "results.md").read_text()
    assert "| tiny | 2 | zb-auto |" in table and "| tiny | 1 | single process (2 threads) |" in table
    assert re.search(r"Best schedules, tiny on 2 ranks: pipetrain \S+ \(efficiency [\d.]+, [\d.]+x one process on 1 "
                     r"thread, [\d.]+x one process on 2 threads\), torch \S+ \([\d.]+\): [\d.]+x torch's best",
                     table), table
    assert (tmp_path / "efficiency_tiny_p2.png").stat().st_size > 10_000
    assert (tmp_path / "timeline_tiny_p2_1f1b.png").exists()


def test_split_cost_reports_each_part_of_the_backward(capsys):
    import split_cost

    assert split_cost.main(["--model", "llama", "--d-model", "32", "--blocks", "1", "--rows", "1", "--seq", "8",
                            "--reps", "2", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert set(result["ms"]) == {"F", "B", "I", "W"} and all(v > 0 for v in result["ms"].values())
    assert result["ratio"] == pytest.approx((result["ms"]["I"] + result["ms"]["W"]) / result["ms"]["B"])


def test_corun_bound_times_each_share_alone_and_together(monkeypatch):
    import corun_bound

    monkeypatch.setitem(run.WORKLOADS, "tiny", dict(vocab_size=32, seq_len=16, d_model=32, n_layers=2, n_heads=2))
    r = corun_bound.measure("tiny", world=2, microbatches=2, batch_size=4, rounds=3)
    assert sum(r["balance"]) == 4 and len(r["alone_ms"]) == len(r["together_ms"]) == 2  # embedding, 2 blocks, head
    lo, hi = r["ideal_efficiency_range"]
    assert 0 < lo <= r["ideal_efficiency"] <= hi and r["single_ms"] > 0 and r["split"] > 0
    assert all(s > 0 for s in r["corun_slowdown"])


def test_generation_benchmark_compares_with_one_process_and_draws_the_timeline(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import generation

    monkeypatch.setitem(run.WORKLOADS, "tiny", dict(vocab_size=32, seq_len=24, d_model=32, n_layers=2, n_heads=2))
    r = generation.measure("tiny", prompts=6, new_tokens=4, prompt_lengths=(2, 9), rounds=2,
                           timeline=str(tmp_path / "gen.png"))
    assert r["same_tokens"] and r["tokens"] == 6 * 4 and r["groups"] == 4
    assert set(r["tokens_per_s"]) == {"pipeline", "single_1_thread", "single_2_threads", "single_1_thread_groups"}
    assert len(r["idle_per_rank"]) == 2 and r["speedup_vs_1_thread"] > 0 and r["grouping_cost"] > 0
    assert (tmp_path / "gen.png").stat().st_size > 10_000


def test_moe_all_to_all_benchmark_measures_the_exposed_exchanges_with_and_without_overlap(capsys):
    import moe_all_to_all

    assert moe_all_to_all.main(["--pp", "1", "--layers", "2", "--d-model", "64", "--seq", "16", "--microbatches", "3",
                                "--microbatch-size", "1", "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ranks = out["ranks"]
    for r in ranks.values():
        assert r["before"]["pairs"] == 0 and r["after"]["pairs"] == 2  # 0F0 0B0 +0F1 0B1 +0F2 0B2
        for c in (r["before"], r["after"]):
            assert 0 < c["exposed"] < c["step"] and 0 < c["share"] < 1 and c["cpu"] > 0
        # the same weights and batches: overlapped pairs compute the same step
        assert r["after"]["losses"] == pytest.approx(r["before"]["losses"], rel=1e-6)
    assert ranks["0"]["before"]["losses"] == ranks["1"]["before"]["losses"]
    total = out["summary"]
    assert total["exposed_after_over_before"] == pytest.approx(total["after"]["exposed"] / total["before"]["exposed"])


def test_action_cost_benchmark_times_both_libraries_on_the_same_thin_pipeline(capsys):
    import action_cost

    assert action_cost.main(["--layers", "4", "--width", "8", "--microbatches", "4", "--steps", "2", "--warmup", "1",
                             "--runs", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ranks = out["runs"][0]
    assert out["ratios"] == [pytest.approx(action_cost._ratio(ranks))]
    assert out["ratios_over_gloo"] == [pytest.approx(action_cost._ratio(ranks, "pipetrain-gloo"))]
    for r in ranks.values():
        assert r["actions"] == r["messages"] == 8 and r["work"] > 0
        for library in ("pipetrain", "pipetrain-gloo", "torch"):
            assert r[library]["step"] > r["work"] and r[library]["per_action"] > 0
        for library in ("pipetrain", "pipetrain-gloo"):
            parts = [r[library][k] for k in ("inside", "between", "posting", "waiting")]
            assert all(p == p for p in parts) and r[library]["posting"] > 0  # (the timeline's own figures)
    last = ranks["1"]
    # the same layers, weights and rows: the same loss (torch's on the last rank), over either transport
    assert last["torch"]["losses"] == pytest.approx(last["pipetrain"]["losses"], rel=1e-5)
    assert last["pipetrain-gloo"]["losses"] == last["pipetrain"]["losses"]


def test_vocabulary_benchmark_times_every_contender_and_reports_the_goals_figures(capsys):
    import vocabulary

    assert vocabulary.main(["--vocab", "512", "--width", "32", "--layers", "4", "--batch-size", "8",
                            "--microbatches", "4", "--rounds", "1", "--vocab-schedules", "1f1b", "dualpipev",
                            "--whole-schedules", "1f1b", "--json"]) == 0
    (out,) = json.loads(capsys.readouterr().out)
    steps = out["steps_ms"]
    assert set(steps) == {"vocab 1f1b", "vocab dualpipev", "pipetrain 1f1b", "torch 1f1b", "one process"}
    assert all(t > 0 for t in steps.values()) and out["best"] in ("vocab 1f1b", "vocab dualpipev")
    assert out["vs_one_process"] == pytest.approx(steps["one process"] / steps[out["best"]], rel=0.01)
    assert out["vs_torch"] == pytest.approx(steps["torch 1f1b"] / steps[out["best"]], rel=0.01)
    assert 0 < out["efficiency"] <= 1 and 0 < out["efficiency_whole"] <= 1
    assert set(out["peak_mib"]) == {out["best"], "pipetrain 1f1b"}
    assert all(len(mib) == 2 and min(mib) > 0 for mib in out["peak_mib"].values())
