"""Tensor parallel inside the stages, on spawned gloo ranks: pp x tp and dp x pp x tp equal one process on the
reference GPT and Llama and a from_hf Llama, for 1F1B, ZBV and interleaved 1F1B, with every shard mode; and
the layouts it refuses, each with one clear error on every rank."""

import pytest
import torch
from tp_workers import tp_cases
from workers import run_processes

from pipetrain.models.gpt import Block, GPTConfig
from pipetrain.models.llama import Block as LlamaBlock
from pipetrain.models.llama import LlamaConfig


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    # (a key bias's gradient is zero up to rounding, softmax ignoring a shift of every key: floor 1e-6)
    return ((got - want).norm() / want.norm().clamp_min(1e-6)).item()


def check_equal_to_one_process(results: dict, cases: list[tuple]) -> None:
    for i, case in enumerate(cases):
        dp, tp = case[0], case[1]
        runs = {rank: r["cases"][i] for rank, r in results.items()}
        covered, split = set(), set()
        for rank, r in runs.items():
            for name, grad in r["grads"].items():  # (ZeRO-2/3 keep only the optimizer's shards: none)
                assert relative_error(grad, r["expected"][name]) <= 1e-5, (case, rank, name)
            for name, value in r["params"].items():
                # (Adam normalizes the key bias's rounding-noise gradient into lr-sized steps: not compared; it
                # divides every gradient by its own size: the split cross-entropy's rounding, ~1e-7 in the
                # gradients, grows to a few 1e-5 in the weights after 3 steps)
                if not name.endswith("k.bias"):
                    assert relative_error(value, r["reference_params"][name]) <= 5e-5, (case, rank, name)
                covered.add(name)
            for got, want in zip(r["losses"], r["reference_losses"], strict=True):
                assert got == pytest.approx(want, rel=1e-5), (case, rank)
            split.update(r["split"])
        assert covered == set(runs[0]["all_names"]), case  # every weight trained somewhere
        assert any(name.endswith(("q.weight", "wq.weight", "q_proj.weight")) for name in split), case
        if case[3] == "hf-qwen3":  # (per-head norms stay whole)
            assert any(n.endswith("q_norm.weight") for n in covered - split), case
        # every rank has its own coordinates, and the global gradient norm (each split weight summed over tp once)
        assert sorted(r["coords"] for r in runs.values()) == sorted(
            (d, p, t) for d in range(dp) for p in range(len(runs) // (dp * tp)) for t in range(tp))
        for r in runs.values():
            # between the split layers, each tp rank holds its part of the sequence with sequence parallelism
            assert r["lengths"] in ([], [8 // tp] if case[3].endswith("-sp") else [8]), (case, r["lengths"])
            assert r["norm"] == pytest.approx(r["reference_norm"], rel=1e-5), case
            assert r["generated"] == r["greedy"], case  # the trained model, decoded with sharded KV heads
            if case[3].startswith("hf-"):  # exported as HF safetensors, transformers loads the trained model
                assert r["exported"] < 1e-5, case


# (-sp: sequence parallel, the Llama's with activation checkpointing; Qwen3's per-head norms: summed over tp)
PP_TP = [(1, 2, "1f1b", "gpt"), (1, 2, "zbv", "gpt-sp"), (1, 2, "interleaved-1f1b", "gpt")]
PP_TP += [(1, 2, schedule, "hf-llama") for schedule in ("1f1b", "zbv", "interleaved-1f1b")]
PP_TP += [(1, 2, "dualpipev", "llama-sp"), (1, 2, "1f1b", "hf-qwen3")]


def test_pp2_tp2_equals_one_process_and_refuses_what_it_cannot_split(tmp_path):
    results = run_processes(4, tp_cases, PP_TP, str(tmp_path), True, timeout=400)
    check_equal_to_one_process(results, PP_TP)
    for rank, r in results.items():  # one clear line on every rank, before any step
        errors = r["errors"]
        assert "tp=2 must divide n_heads=3 of the GPT" in errors["heads"], rank
        assert "vocab_size=63" in errors["vocab"], rank
        assert "tied weights" in errors["tied"] and "tie_embeddings=False" in errors["tied"], rank
        assert "tie_word_embeddings false" in errors["hf tied"], rank  # (on the meta device, tied across ranks)
        assert "tensor_parallel_plan" in errors["no plan"], rank
        assert "sequence parallelism needs layers" in errors["hf sequence"], rank
        # the vocabulary-split cross-entropy (each of 4 ranks a quarter of the logits) equals F.cross_entropy
        assert max(r["cross_entropy"]) < 1e-5, (rank, r["cross_entropy"])


# (gpt-plain: a loss_fn not pt.CrossEntropy, given the head's logits gathered)
DP_PP_TP = [(2, 2, "1f1b", "gpt-plain", "none"), (2, 2, "zbv", "llama", "optimizer"),
            (2, 2, "interleaved-1f1b", "hf-llama", "gradients"), (2, 2, "1f1b", "llama-sp", "params")]


def test_dp2_pp2_tp2_equals_one_process_with_every_shard_mode(tmp_path):
    results = run_processes(8, tp_cases, DP_PP_TP, str(tmp_path), timeout=600)
    check_equal_to_one_process(results, DP_PP_TP)


def test_a_plan_names_what_tp_must_divide():
    with pytest.raises(ValueError, match=r"tp=4 must divide n_heads=6, d_ff=6 of the GPT"):
        Block(GPTConfig(d_model=12, n_heads=6, d_ff=6)).tensor_parallel_plan(4)
    with pytest.raises(ValueError, match=r"n_kv_heads=1 of the Llama"):
        LlamaBlock(LlamaConfig(d_model=16, n_heads=4, n_kv_heads=1)).tensor_parallel_plan(2)
    assert set(Block(GPTConfig()).tensor_parallel_plan(2)) == {"q", "k", "v", "proj", "fc", "out", "ln1", "ln2"}


def test_trainer_tp2_equals_one_pipeline_and_checkpoints_reshard_across_tp(tmp_path):
    # pp 2 x tp 2 trains as pp 2 alone (same losses, clipped gradient norms, weights); its step-3 checkpoint
    # (torch.distributed.checkpoint: split weights and their optimizer state written as their parts) resumes
    # at pp 4, at pp 1 x tp 2 and at pp 2 without tp on ZBV's V stage map, each going on as the uninterrupted
    # run (a dp 2 x pp 2 ZeRO-1 checkpoint resuming at pp 1 x tp 2: test_data_parallel.py)
    from workers import trainer_run

    base = {"preset": "tiny", "steps": 5, "microbatches": 2, "batch_size": 8, "log_every": 100,
            "eval_batches": 2, "seed": 3, "progress": False, "warmup": 2, "grad_clip": 0.05}
    one = run_processes(2, trainer_run, base)
    tp = run_processes(4, trainer_run, {**base, "tp": 2, "checkpoint_dir": str(tmp_path / "tp2"), "stop_at_step": 3})
    assert tp[0]["losses"] == pytest.approx(one[0]["losses"][:3], rel=1e-5)
    assert [r["grad_norm"] for r in tp[0]["history"]] == pytest.approx(
        [r["grad_norm"] for r in one[0]["history"][:3]], rel=1e-5)
    assert all(r["grad_norm"] > base["grad_clip"] for r in tp[0]["history"]), "the test must actually clip"
    for rank in range(4):
        assert tp[rank]["losses"] == tp[0]["losses"]  # every rank reports the same numbers
    saved = str(tmp_path / "tp2" / "step_00000003")
    # ... at pp 4, and at pp 2 on a V schedule (ZBV: stages 0 and 3 on rank 0), from the same DCP checkpoint
    wider = run_processes(4, trainer_run, {**base, "resume": saved, "microbatches": 4})  # (1F1B on 4: 4 needed)
    assert wider[0]["losses"] == pytest.approx(one[0]["losses"][3:], rel=1e-5)
    parts = run_processes(2, trainer_run, {**base, "resume": saved, "tp": 2})  # (pp 1 x tp 2: parts read as parts)
    assert parts[0]["losses"] == pytest.approx(one[0]["losses"][3:], rel=1e-5)
    v_shaped = run_processes(2, trainer_run, {**base, "resume": saved, "schedule": "zbv"})
    assert v_shaped[0]["losses"] == pytest.approx(one[0]["losses"][3:], rel=1e-5)
    want = {k: v for r in one.values() for k, v in r["params"].items()}
    got = {k: v for r in v_shaped.values() for k, v in r["params"].items()}
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


def test_sequence_parallel_is_refused_where_it_cannot_split():
    from pipetrain.train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="it needs tp > 1"):
        TrainConfig(preset="tiny", sequence_parallel=True).validate()
    with pytest.raises(ConfigError, match="seq_len=9 is not a multiple of it"):
        TrainConfig(preset="tiny", tp=2, seq_len=9, sequence_parallel=True).validate()
    with pytest.raises(ConfigError, match="sequence_parallel with dropout"):
        TrainConfig(preset="tiny", tp=2, dropout=0.1, sequence_parallel=True).validate()
