"""dp x pp over gloo (4 spawned ranks): gradients equal single-process training of the global batch;
sharded data parallelism (ZeRO-1/2) equals the unsharded run."""

import math
import re

import pytest
import torch
from torch import nn
from workers import data_parallel_scenario, run_processes

import pipetrain as pt


@pytest.mark.parametrize("schedule,tie,accumulation,layout", [
    ("1f1b", False, 1, "mesh"), ("1f1b", True, 2, "mesh"), ("zbv", True, 1, "mesh"), ("gpipe", False, 1, "strided")])
def test_dp2_pp2_gradients_equal_single_process_on_the_global_batch(schedule, tie, accumulation, layout):
    results = run_processes(4, data_parallel_scenario, 2, schedule, tie, accumulation, layout, timeout=180)
    covered = set()
    for rank, r in results.items():
        assert r["got"], f"rank {rank} holds no parameters"
        for name, grad in r["got"].items():
            expected = r["expected"][name]
            # (a key bias's gradient is zero up to rounding, softmax ignoring a shift of every key: floor 1e-6)
            err = ((grad - expected).norm() / expected.norm().clamp_min(1e-6)).item()
            assert err <= 1e-5, f"rank {rank} {name}: relative error {err:.2e}"
            covered.add(name)
        # the loss is the global batch's (the mean over replicas), on every rank
        for got, want in zip(r["losses"], r["reference_losses"], strict=True):
            assert got == pytest.approx(want, rel=1e-5)
    assert covered == set(results[0]["all_names"])  # every weight of the model is checked somewhere
    assert {r["dp_rank"] for r in results.values()} == {0, 1}
    # tied gradients cross between the pipeline's ranks once per accumulation window, not once per step
    assert all(r["tie_syncs"] == 1 for r in results.values())
    # each stage's reduction was launched by its REDUCE action (in the order its last B/W came) and waited for
    # at the step's end, both in the step's timeline
    for r in results.values():
        assert sorted(r["launched"]) == sorted(r["waited"]) == [f"{s}REDUCE" for s in r["stages"]]
    # replicas hold identical gradients
    by_name = {}
    for r in results.values():
        for name, grad in r["got"].items():
            by_name.setdefault(name, []).append(grad)
    for name, grads in by_name.items():
        assert all(torch.equal(grads[0], g) for g in grads[1:]), name


BASE = {"preset": "tiny", "steps": 5, "microbatches": 2, "batch_size": 8, "log_every": 100, "eval_batches": 2,
        "seed": 3, "progress": False, "warmup": 2, "grad_clip": 0.05}


def test_trainer_dp2_pp2_equals_one_pipeline_and_resumes_on_another_layout(tmp_path):
    from workers import trainer_run

    one = run_processes(2, trainer_run, BASE)  # dp 1 x pp 2, the same global batches
    ck = str(tmp_path / "ck")
    two = run_processes(4, trainer_run, {**BASE, "dp": 2, "checkpoint_dir": ck, "stop_at_step": 3})
    history = two[0]["history"]
    assert [r["loss"] for r in history] == pytest.approx(one[0]["losses"][:3], rel=1e-5)
    assert [r["grad_norm"] for r in history] == pytest.approx([r["grad_norm"] for r in one[0]["history"][:3]],
                                                             rel=1e-5)
    assert all(r["grad_norm"] > BASE["grad_clip"] for r in history), "the test must actually clip"
    for rank in range(4):  # replicas agree on every reported number
        assert [r["loss"] for r in two[rank]["history"]] == [r["loss"] for r in history]
    # the dp 2 x pp 2 checkpoint resumes as dp 1 x pp 3 (layers re-partitioned, same data stream)
    three = run_processes(3, trainer_run, {**BASE, "checkpoint_dir": ck, "resume": True, "microbatches": 4})
    assert three[0]["losses"] == pytest.approx(one[0]["losses"][3:], rel=1e-5)


def test_a_nan_gradient_on_one_rank_skips_the_update_on_every_rank():
    from workers import trainer_nonfinite

    results = run_processes(4, trainer_nonfinite, {**BASE, "dp": 2}, 3, 2)  # rank 3 = replica 1, pipeline rank 1
    for rank, r in results.items():
        assert r["skipped"] == [False, True, False, False, False], rank
        before, after = r["snapshots"][2], r["snapshots"][3]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "a skipped step changed weights"
        assert r["finite"] and all(map(math.isfinite, r["losses"]))


def test_a_nan_gradient_stops_every_rank_when_asked():
    from workers import trainer_nonfinite

    results = run_processes(2, trainer_nonfinite, {**BASE, "on_nonfinite": "stop"}, 0, 3)
    for r in results.values():
        assert r["error"] is not None and "step 3: " in r["error"] and "not finite" in r["error"]
        assert r["step"] == 2  # the weights are those of the last good step


def test_a_killed_rank_makes_every_other_rank_of_every_replica_fail_fast():
    from workers import dp_rank_dies

    results = run_processes(4, dp_rank_dies, expect=3, timeout=90)
    assert sorted(results) == [0, 1, 2]
    for rank, r in results.items():
        assert r["error"] is not None, f"rank {rank} finished a step a peer never ran"
        assert r["error"].startswith(f"global rank {rank}") and "crashed or be stuck" in r["error"], r["error"]
        assert r["seconds"] < 20, r  # a closed connection, well before the 20 s timeout
    # rank 1 waits on rank 3 (its replica) for their stage's gradient reduction
    assert "data-parallel gradient all-reduce of stage 1" in results[1]["error"]
    assert "waiting on global rank 3 (pipeline rank 1)" in results[2]["error"]  # rank 2 on its activations


def test_measured_balance_is_the_same_on_every_replica():
    from workers import dp_time_balance

    results = run_processes(4, dp_time_balance, timeout=90)
    # the mean of both replicas' times ([2, 4]), not one replica's ([4, 2] or [1, 5]) nor uniform ([3, 3])
    assert all(b == [2, 4] for b in results.values()), results


@pytest.mark.parametrize("kind", ["token", "mean+aux"])
def test_dp2_pp2_token_mean_and_aux_losses_equal_single_process_on_the_global_batch(kind):
    # each replica holds different numbers of counted tokens; the token mean is over the whole global batch,
    # and each replica's auxiliary losses weigh 1/(M x dp), as accumulating its 2M microbatches would
    from any_model import assert_matches, batch, reference, run_dp

    m, dp = 4, 2
    steps = [{"batch": batch(2 * m * dp, 6, 5)}]
    results = run_processes(4, run_dp, dp, "1f1b", kind, steps, timeout=120)
    assert_matches(results, reference(kind, steps, m * dp))


def test_sharded_optimizer_gradients_and_params_equal_unsharded_and_checkpoints_reshard(tmp_path):
    # dp 2 x pp 2, ZBV (W after I: each stage's reduction starts after its last W), tied embeddings (a
    # bucket of its own, on two pipeline ranks), clipping on, held-out evaluation: shard="optimizer" (ZeRO-1)
    # gives the unsharded run's losses, norms and weights with half its optimizer state per rank; its
    # step-3 checkpoint (the state gathered into the unsharded format) resumes as shard="params" (ZeRO-3:
    # the state cut again, parameters released between steps and gathered by each stage's GATHER) and goes
    # on as the unsharded run does; ZeRO-2 and ZeRO-3 with two steps per optimizer step do too
    from workers import trainer_state_bytes

    settings = {**BASE, "dp": 2, "schedule": "zbv", "tie_embeddings": True}
    ref = run_processes(4, trainer_state_bytes, settings)
    zero1 = run_processes(4, trainer_state_bytes, {**settings, "shard": "optimizer",
                                                   "checkpoint_dir": str(tmp_path / "z1"), "checkpoint_every": 3})
    assert zero1[0]["losses"] == pytest.approx(ref[0]["losses"], rel=1e-5)
    assert zero1[0]["norms"] == pytest.approx(ref[0]["norms"], rel=1e-5)
    assert all(n > BASE["grad_clip"] for n in ref[0]["norms"]), "the test must actually clip"
    for rank in range(4):
        for name, want in ref[rank]["params"].items():
            assert torch.allclose(zero1[rank]["params"][name], want, rtol=1e-5, atol=1e-6), (rank, name)
        # half, but for the padding of each bucket to a multiple of dp (a few elements x 2 states)
        assert abs(zero1[rank]["state_bytes"] - ref[rank]["state_bytes"] / 2) <= 256, \
            (rank, zero1[rank]["state_bytes"], ref[rank]["state_bytes"])
    # the checkpoint holds each weight and its state once (not the stage buffer its weights are views of, nor
    # one copy per replica: DCP writes a tensor several ranks hold once)
    numel = sum(t.numel() for r in ref.values() for t in r["params"].values()) // 2  # (replicas hold copies)
    written = sum(f.stat().st_size for f in (tmp_path / "z1" / "step_00000003").glob("*.distcp"))
    # weights, exp_avg, exp_avg_sq (+ DCP's per-tensor headers: 17% on this tiny model's ~300 tensors)
    assert numel * 4 * 3 < written < 1.25 * numel * 4 * 3, (written, numel)
    zero3 = run_processes(4, trainer_state_bytes, {**settings, "shard": "params",
                                                   "resume": str(tmp_path / "z1" / "step_00000003")})
    assert zero3[0]["losses"] == pytest.approx(ref[0]["losses"][3:], rel=1e-5)
    assert zero3[0]["evals"] == pytest.approx(ref[0]["evals"][-len(zero3[0]["evals"]):], rel=1e-5)
    for rank in range(4):
        for name, want in ref[rank]["params"].items():
            assert torch.allclose(zero3[rank]["params"][name], want, rtol=1e-5, atol=1e-6), (rank, name)
        assert zero3[rank]["released"], "between steps ZeRO-3's parameters hold no data"
        assert zero3[rank]["gathers"] == sorted(f"{s}GATHER" for s in zero3[rank]["stages"])
    # ... and at pp 1 x tp 2 with sequence parallelism (every layer on both ranks, split in two; tied
    # embeddings untied for tp)
    untied = {**BASE, "dp": 2, "tie_embeddings": False}
    ref = run_processes(4, trainer_state_bytes, {**untied, "checkpoint_dir": str(tmp_path / "u"),
                                                 "checkpoint_every": 3, "shard": "optimizer"})
    split = run_processes(2, trainer_state_bytes, {**BASE, "tp": 2, "sequence_parallel": True,
                                                   "resume": str(tmp_path / "u" / "step_00000003")})
    assert split[0]["losses"] == pytest.approx(ref[0]["losses"][3:], rel=1e-5)
    accumulated = {**settings, "accumulation": 2, "steps": 3, "schedule": "1f1b"}  # (tied across ranks: own bucket)
    ref = run_processes(4, trainer_state_bytes, accumulated)
    for shard in ("gradients", "params"):  # (steps that do not sync: no REDUCE, ZeRO-3's parameters stay whole)
        got = run_processes(4, trainer_state_bytes, {**accumulated, "shard": shard})
        assert got[0]["losses"] == pytest.approx(ref[0]["losses"], rel=1e-5)
        for rank in range(4):
            for name, want in ref[rank]["params"].items():
                assert torch.allclose(got[rank]["params"][name], want, rtol=1e-5, atol=1e-6), (shard, rank, name)


def test_zero3_parameters_are_gathered_whenever_used_and_never_stale():
    # weights loaded after building, step, evaluate (gathers), optimizer step (the gathered weights go stale:
    # released), evaluate, step, generate, state_dict: shard="params" gives the unsharded losses, tokens and
    # weights
    from workers import zero3_between_steps

    for rank, r in run_processes(2, zero3_between_steps, timeout=120).items():
        assert r["params"]["losses"] == pytest.approx(r["none"]["losses"], rel=1e-5), rank
        assert r["params"]["tokens"] == r["none"]["tokens"]
        for name, want in r["none"]["state"].items():
            assert torch.allclose(r["params"]["state"][name], want, rtol=1e-5, atol=1e-6), name


def test_a_stage_of_mixed_dtypes_averages_each_in_its_own_dtype():
    from workers import mixed_dtype_replicas

    results = run_processes(2, mixed_dtype_replicas, timeout=60)
    for name, got in results[0]["averaged"].items():
        want = (results[0]["mine"][name] + results[1]["mine"][name]) / 2
        assert got.dtype == want.dtype and torch.allclose(got, want, rtol=1e-6), name
        assert torch.equal(got, results[1]["averaged"][name])


def test_replicas_whose_collectives_would_mix_up_are_refused_before_the_first_step():
    from workers import replicas_reduce_in_another_order

    for error in run_processes(2, replicas_reduce_in_another_order, timeout=60).values():
        assert ("ranks 0 and 1 disagree on the collectives over ranks 0, 1: collective 1 is '1REDUCE' on rank 0 but "
                "'0REDUCE' on rank 1") in error, error


@pytest.mark.parametrize("shard,error", [("zero3", "shard='zero3': choose one of 'none', 'optimizer', 'gradients', "
                                                    "'params'"),
                                         ("optimizer", "shards over data-parallel replicas, but this pipeline has")])
def test_a_shard_mode_needs_replicas_and_a_known_name(shard, error):
    sched = pt.schedules.build("gpipe", num_ranks=1, num_microbatches=1)
    with pytest.raises(ValueError, match=re.escape(error)):
        pt.Pipeline([nn.Linear(2, 2)], schedule=sched, loss_fn=nn.functional.mse_loss,
                    transport=pt.InProcessHub(1).transport(0), shard=shard)


def test_a_sharded_step_without_the_pipelines_optimizer_says_how_to_build_it():
    from workers import sharded_without_its_optimizer

    for error in run_processes(2, sharded_without_its_optimizer, timeout=60).values():
        assert "build the optimizer with pipe.optimizer(make)" in error, error
