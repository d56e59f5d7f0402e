"""Expert parallel inside the pipeline: experts split over "ep" ranks (data-parallel replicas too), tokens
sent with all-to-all; loss and every gradient equal one process running all experts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ep_workers import bad_layout, exactness, generate_in_one_process, generate_on_ep
from workers import SCHEDULES, run_processes

TOL = 1e-5


def _check(results, cases):
    for case in cases:
        seen = set()
        for rank_results in results.values():
            loss, ref_loss, errors = rank_results[case][:3]
            assert loss == pytest.approx(ref_loss, rel=TOL), case
            worst = max(errors, key=errors.get)
            assert errors[worst] <= TOL, f"{case}: {worst} off by {errors[worst]:.1e}"
            seen |= set(errors)
        assert any("experts" in n for n in seen), case


def test_reference_moe_pp2_ep2_equals_one_process_on_every_schedule():
    """Dropless on every schedule; with activation checkpointing (the recomputed forward's all-to-alls run
    inside backward) on ZBV and DualPipeV (split backward); with a capacity factor of 0.75 (pairs dropped),
    as one process drops them; with overlapped pairs (forward and backward taking turns at their all-to-alls)
    on DualPipeV, interleaved 1F1B and ZBV with activation checkpointing, every rank launching them in one
    order."""
    overlapped = ("dualpipev+overlap", "interleaved-1f1b+overlap", "zbv+checkpoint+overlap")
    cases = [("llama-moe", s, None) for s in (*SCHEDULES, "zbv+checkpoint", "dualpipev+checkpoint", *overlapped)]
    cases += [("llama-moe", "1f1b", 0.75)]
    results = run_processes(4, exactness, cases, (1, 2, 2), timeout=400)
    _check(results, cases)
    assert {r[cases[0]][3:5] for r in results.values()} == {(2, 2)}  # ep 2; both ep ranks are replicas
    assert abs(results[0][cases[-1]][0] - results[0][("llama-moe", "1f1b", None)][0]) > 1e-6  # pairs were dropped
    for case in [("llama-moe", s, None) for s in overlapped]:
        lanes = {lane for r in results.values() for lane, _ in r[case][5]}
        assert lanes == {0, 1, None}, case  # both lanes of a pair exchanged (and actions outside pairs)
        for rank in (0, 1):  # ep peers: ranks 0 and 2, 1 and 3 (the mesh's pp dimension is the last)
            assert results[rank][case][6] > 0, case  # pairs
            assert results[rank][case][5] == results[rank + 2][case][5], case  # the same launches, in one order


def test_hf_mixtral_and_qwen3_moe_dp2_ep2_equal_one_process():
    """4 ranks: two replicas of an ep 2 pipeline (the experts' gradients summed over dp only, the rest over
    dp x ep); Mixtral's also with overlapped pairs (transformers' experts module run on its local experts in two
    pieces, each split off its weights)."""
    pytest.importorskip("transformers")
    cases = [("MixtralForCausalLM", "1f1b", None), ("Qwen3MoeForCausalLM", "gpipe", None),
             ("MixtralForCausalLM", "1f1b+overlap", None)]
    results = run_processes(4, exactness, cases, (2, 2, 1), timeout=400)
    _check(results, cases)
    assert {r[cases[0]][3:5] for r in results.values()} == {(2, 4)}
    assert all(r[cases[-1]][6] > 0 for r in results.values())  # pairs ran


@pytest.mark.parametrize("case, world, message", [
    ("experts", 3, r"expert parallel ep=3 must divide the number of experts, 4 in layer 1 \(moe.experts\)"),
    ("dense", 2, r"expert parallel \(ep=2\) or an expert capacity needs layers with experts"),
])
def test_a_model_that_does_not_fit_ep_fails_on_every_rank_at_once(case, world, message):
    results = run_processes(world, bad_layout, case, timeout=120)
    for said in results.values():
        assert re.search(message, said), said
        assert float(said.rsplit("(", 1)[1].split()[0]) < 10


def test_train_cli_trains_a_tiny_qwen3_moe_with_ep2_pp2_resharding_its_checkpoint(tmp_path):
    """`pipetrain train --hf DIR`: 2 steps on 2 ranks (pp 2, every expert on each), then resumed with `--ep 2
    --pp 2` on 4 (the checkpoint's experts resharded over ep) on DualPipeV with overlapped pairs, a sample
    generated through the experts' all-to-all, the trained model loaded back by transformers with the held-out
    loss the run reported."""
    transformers = pytest.importorskip("transformers")
    from pipetrain.train.data import CausalLMBatches, load_corpus

    config = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=16, output_router_logits=True,
                                         router_aux_loss_coef=0.01, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "source")

    def launch(ranks: int, *flags: str) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), "-m",
               "pipetrain", "train", "--hf", str(tmp_path / "source"), "--pp", "2", "--steps", "4", "--batch-size",
               "8", "--microbatches", "2", "--seq-len", "32", "--eval-batches", "2", "--log-every", "1", "--lr",
               "3e-3", "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = launch(2, "--stop-at-step", "2")
    assert re.search(r"\| aux 0\.0\d+ \|", first.stdout)  # the router loss, reported beside the cross-entropy
    again = launch(4, "--ep", "2", "--resume", "--sample-tokens", "8", "--schedule", "dualpipev", "--microbatches",
                   "4", "--overlap")
    assert "on dp 2 (ep 2) x pp 2 ranks" in again.stdout and "generated: " in again.stdout
    assert "schedule dualpipev+overlap" in again.stdout  # forwards paired with backwards (--overlap)
    assert "resumed from" in again.stdout
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "hf")
    trained.config.output_router_logits = False  # (the held-out loss is the cross-entropy alone)
    batches = CausalLMBatches(load_corpus().val, batch_size=8, seq_len=32, seed=1)
    with torch.no_grad():
        want = sum(trained(**x, labels=y).loss.item() for x, y in (batches.next() for _ in range(2))) / 2
    after = float(re.search(r"held-out loss (\S+) \(perplexity", again.stdout.split("summary")[1]).group(1))
    assert after == pytest.approx(want, abs=2e-4)


def test_ep_that_does_not_fit_is_refused_before_launch(capsys):
    from pipetrain.cli import main

    assert main(["train", "--preset", "llama-moe-tiny", "--ep", "3", "--dp", "2"]) == 2
    assert "ep=3 borrows its ranks from data parallel, but dp=2 is not a multiple of it" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--ep", "2", "--dp", "2"]) == 2  # a dense preset
    assert "ep splits or caps a mixture of experts' experts, but preset 'tiny' has none: use a MoE preset " \
           "(llama-moe-8x256, llama-moe-tiny)" in capsys.readouterr().err


def test_generation_on_ep_ranks_equals_one_process_and_refuses_different_prompts():
    """Greedy tokens through the experts' all-to-all equal a plain loop over all experts; prompts that differ
    between the ep ranks (their passes would not match) fail on both at once. (Regression: with one token a
    pass, a rank's experts received no token at all, and the reference experts' reshape of 0 rows failed.)"""
    want = generate_in_one_process()
    results = run_processes(2, generate_on_ep, timeout=120)
    assert [r["tokens"] for r in results.values()] == [want, want]
    for r in results.values():
        assert "different prompts or settings on the expert-parallel ranks (ep=2)" in r["error"]


def test_each_layer_is_made_then_split_so_a_rank_never_holds_every_layers_experts():
    """`materialize(..., then=split)`: a layer's experts taken out by `then` (ep keeping 1/ep) are let go
    before the next layer is made, and the weights are those made without `then`."""
    import weakref

    from torch import nn

    from pipetrain.models.llama import LlamaConfig, build_llama
    from pipetrain.pipeline.materialize import materialize

    cfg = LlamaConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=3, n_heads=2, n_experts=4, top_k=2)
    whole = {}
    for then in (None, "split"):
        with torch.device("meta"):
            layers = build_llama(cfg)
        taken = []

        def split(i, layer, taken=taken):
            assert all(ref() is None for ref in taken), "an earlier layer's whole experts are still held"
            experts = layer.moe.experts if hasattr(layer, "moe") else None
            if experts is not None:
                taken.append(weakref.ref(experts.gate_up))
                experts.gate_up = nn.Parameter(experts.gate_up.detach()[:2].clone())  # (as ep 2 keeps its half)

        made = materialize(dict(enumerate(layers)), torch.device("cpu"), 0, then=split if then else None)
        state = {f"{i}.{k}": v for i, layer in enumerate(layers) for k, v in layer.state_dict().items()}
        if then is None:
            whole = state
            continue
        assert len(taken) == cfg.n_layers and all(ref() is None for ref in taken)  # (`made` holds none of them)
        assert made
        for key, value in state.items():
            want = whole[key][:2] if key.endswith("experts.gate_up") else whole[key]
            assert torch.equal(value, want), key
