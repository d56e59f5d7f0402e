"""The planner: specs, the exactness of its short simulations, the search's constraints, the CLI contract."""

import json
import time

import pytest

from pipetrain.cli import main
from pipetrain.planner import CLUSTERS, MODELS, ModelSpec, SpecError, cluster_from, model_from, plan
from pipetrain.planner.plan import _Candidate, _evaluate
from pipetrain.planner.simulation import _simulate
from pipetrain.schedule import Costs, build, names, simulate, with_vocabulary
from pipetrain.schedule.registry import options


def test_presets_have_the_published_shapes():
    llama = MODELS["llama3-405b"]
    assert 400e9 < llama.params() < 410e9  # "405B"
    assert 7.5e9 < MODELS["llama3-8b"].params() < 8.5e9
    assert 68e9 < MODELS["llama3-70b"].params() < 72e9
    assert 0.95e12 < MODELS["dense-1t"].params() < 1.05e12
    assert 9.5e12 < MODELS["dense-10t"].params() < 10.5e12
    # the reference GPT's count equals pipetrain.models.gpt's
    from pipetrain.models.gpt import GPTConfig

    cfg = GPTConfig(vocab_size=256, seq_len=128, d_model=256, n_layers=8, n_heads=8)
    assert MODELS["gpt-8x256"].params() == pytest.approx(cfg.num_params(), rel=0.02)


def test_models_and_planner_count_flops_alike():
    # one convention (pipetrain.flops): the trainer's MFU and the planner's agree on the same shape; the GPT
    # once halved causal attention and the planner did not
    from pipetrain.models.gpt import GPTConfig
    from pipetrain.models.gpt import flops_per_token as gpt_flops
    from pipetrain.models.llama import LlamaConfig
    from pipetrain.models.llama import flops_per_token as llama_flops
    from pipetrain.planner.specs import ModelSpec

    gpt = GPTConfig(vocab_size=256, seq_len=128, d_model=256, n_layers=8, n_heads=8)
    assert gpt_flops(gpt) == MODELS["gpt-8x256"].flops_per_token()
    llama = LlamaConfig(vocab_size=300, seq_len=64, d_model=128, n_layers=3, n_heads=8, n_kv_heads=2)
    spec = ModelSpec("llama", 3, 128, 8, llama.ffn, 300, 64, kv_heads=2)
    assert llama_flops(llama) == spec.flops_per_token()


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zbv", 2),
                                        ("dualpipev", 2), ("looped-bfs", 2)])
@pytest.mark.parametrize("comm", [0.0, 0.4])
@pytest.mark.parametrize("p,m", [(2, 16), (4, 40), (8, 64)])
def test_a_short_simulation_extended_linearly_equals_the_full_one(schedule, v, comm, p, m):
    # the step is affine in the microbatch count once the pipeline is full: the planner simulates short
    costs = Costs(f=[1.0, 1.3, 0.9, 1.1, 1.0, 1.2, 0.8, 1.5] * 2, b=1.1, w=0.9, comm=comm)
    full = simulate(build(schedule, num_ranks=p, num_microbatches=m, stages_per_rank=v), costs)
    step, bubble, peak = _simulate(_Candidate(1, p, 1, v, 1, m, schedule, False), costs)
    assert step == pytest.approx(full.step_time, rel=1e-9)
    busy = max(s.busy_time for s in full.per_rank)
    assert bubble == pytest.approx(1 - busy / full.step_time, abs=1e-9)
    assert peak == pytest.approx(max(s.peak_activations for s in full.per_rank))


def test_the_screening_estimate_is_close_to_the_simulation():
    model, cluster = MODELS["llama3-70b"], CLUSTERS["h100-16k"]
    for c in [_Candidate(8, 8, 16, 1, 1, 32, "1f1b", True), _Candidate(8, 16, 8, 2, 1, 64, "zbv", False),
              _Candidate(4, 8, 32, 2, 2, 8, "interleaved-1f1b", True),
              _Candidate(8, 8, 16, 2, 1, 32, "dualpipev", False),
              _Candidate(8, 4, 32, 3, 1, 32, "looped-bfs", True), _Candidate(8, 8, 16, 1, 1, 8, "gpipe", False)]:
        estimate, exact = _evaluate(model, cluster, c, exact=False), _evaluate(model, cluster, c, exact=True)
        assert estimate.step_time == pytest.approx(exact.step_time, rel=0.05), c


@pytest.mark.parametrize("schedule", names())
def test_the_planner_plans_every_registered_schedule_at_sizes_it_builds(schedule):
    # the planner reads the registry (names, the stages per rank and microbatch counts each takes); it once
    # listed five schedules by hand and missed dualpipev, zb-auto and looped-bfs
    model, cluster = MODELS["gpt-16x512"], CLUSTERS["a100-3k"]
    plans = plan(model, cluster, devices=8, tp=1, schedule=schedule, top=2, margin=1)
    assert plans and {p.schedule for p in plans} == {schedule}
    for p in plans:
        built = build(schedule, num_ranks=p.pp, num_microbatches=p.microbatches, stages_per_rank=p.stages_per_rank)
        assert built.num_stages <= model.layers and p.dp * p.microbatch_size * p.microbatches == model.global_batch


def test_the_unpinned_search_tries_every_registered_schedule_not_built_from_costs():
    model, cluster = MODELS["gpt-16x512"], CLUSTERS["a100-3k"]
    searched = {p.schedule for p in plan(model, cluster, devices=8, tp=1, top=500, margin=0)}
    assert searched == {name for name in names() if "costs" not in options(name)}  # zb-auto: when pinned


def test_asking_fewer_plans_lists_the_first_of_the_same_ranking():
    model, cluster = MODELS["llama3-8b"], CLUSTERS["a100-3k"]  # (simulating top + 5 ranked these apart)
    assert plan(model, cluster, devices=512, top=5) == plan(model, cluster, devices=512)[:5]


def test_plans_respect_memory_pins_and_divisibility():
    model, cluster = MODELS["llama3-70b"], CLUSTERS["h100-16k"]
    plans = plan(model, cluster, devices=1024, top=20)
    assert len(plans) == 20 and all(p.simulated for p in plans)
    assert [p.step_time for p in plans] == sorted(p.step_time for p in plans)  # best first
    for p in plans:
        assert p.devices <= 1024 and p.tp <= cluster.domain and model.heads % p.tp == 0
        assert model.global_batch == p.dp * p.microbatch_size * p.microbatches
        assert p.memory_per_device <= cluster.memory * 0.9
        assert 0 < p.mfu < 1 and 0 <= p.bubble_fraction < 1
    pinned = plan(model, cluster, devices=1024, tp=4, pp=8, schedule="1f1b", top=5)
    assert {(p.tp, p.pp, p.schedule) for p in pinned} == {(4, 8, "1f1b")}
    with pytest.raises(ValueError, match="no .* layout"):
        plan(model, cluster, devices=1024, tp=3)  # 3 does not divide 64 heads


def test_a_model_that_cannot_fit_says_so():
    with pytest.raises(ValueError, match="no plan fits"):
        plan(MODELS["llama3-405b"], CLUSTERS["h100-16k"], devices=8)


def test_large_plans_finish_within_a_minute():
    for model, cluster in (("llama3-405b", "h100-16k"), ("dense-10t", "gb300-220k")):
        start = time.perf_counter()
        plans = plan(model_from(model), cluster_from(cluster), top=5)
        assert time.perf_counter() - start < 60
        assert plans and plans[0].simulated


def test_toml_specs_and_their_errors(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('layers = 4\nhidden = 512\nheads = 8\nffn = 2048\nvocab = 1000\nseq = 256\n')
    assert model_from(str(good)).name == "mine"
    bad = tmp_path / "bad.toml"
    bad.write_text('layers = 4\nhiden = 512\n')
    with pytest.raises(SpecError, match="unknown field.*hiden"):
        model_from(str(bad))
    with pytest.raises(SpecError, match="unknown cluster 'nope'"):
        cluster_from("nope")
    rack = tmp_path / "rack.toml"
    rack.write_text('devices = 64\npeak_flops = { bf16 = 1e15 }\nmemory = 96e9\ndomain = 8\n'
                    'domain_bandwidth = 4e11\nnic_bandwidth = 5e10\nnic_latency = 4e-6\n')
    cluster = cluster_from(str(rack))
    assert (cluster.name, cluster.peak, cluster.domain) == ("rack", 1e15, 8)
    assert plan(model_from(str(good)), cluster, top=1)[0].devices <= 64
    rack.write_text(rack.read_text() + 'dtype = "fp8"\n')
    with pytest.raises(SpecError, match="dtype='fp8' has no entry in peak_flops"):
        cluster_from(str(rack))


def test_cli_json_contract(capsys):
    assert main(["plan", "--model", "llama3-70b", "--cluster", "h100-16k", "--gpus", "512", "--json",
                 "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["plans"]) == 3 and out["assumptions"]
    for key in ("tp", "pp", "dp", "stages_per_rank", "microbatches", "schedule", "step_time", "tokens_per_s",
                "mfu", "bubble_fraction", "memory_per_device"):
        assert key in out["plans"][0]
    assert main(["plan", "--model", "nope", "--cluster", "h100-16k"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_cli_table_and_the_best_plans_timeline(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "best.png"
    assert main(["plan", "--model", "llama3-8b", "--cluster", "h100-16k", "--gpus", "64", "--pp", "4", "--top", "4",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b" in out and "schedule" in out and "assumptions" not in out and "- compute:" in out
    rows = [line for line in out.splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == 4 and all(row.split()[3] == "4" for row in rows)  # pp pinned
    assert png.stat().st_size > 10_000


def test_the_memory_model_shards_what_each_mode_shards():
    from pipetrain.planner.memory import best_shard, rank_memory

    params, stage, act, dp = 1e9, 5e8, 3e9, 4
    got = {s: rank_memory(params, stage, act, dp=dp, shard=s) for s in ("none", "optimizer", "gradients", "params")}
    # between steps: AdamW state 1/dp under any mode, then gradients, then weights too
    assert got["none"].between_steps == params * 16
    assert got["optimizer"].between_steps == params * (4 + 4 + 8 / dp)
    assert got["gradients"].between_steps == params * (4 + (4 + 8) / dp)
    assert got["params"].between_steps == params * (4 + 4 + 8) / dp
    assert got["optimizer"].peak < got["none"].peak
    # one replica: nothing to shard, every mode the same; gloo's reduce-scatter copies the stage's buffer
    assert len({rank_memory(params, stage, act, dp=1, shard=s).peak for s in got}) == 1
    gloo = rank_memory(params, stage, act, dp=dp, shard="gradients", backend="gloo")
    assert gloo.moments["reduction"] - got["gradients"].moments["reduction"] == 4 * stage
    assert best_shard(1, lambda s: False) == "none" and best_shard(dp, lambda s: s == "params") == "params"
    with pytest.raises(ValueError, match="shard='zero3': choose one of none, optimizer, gradients, params"):
        rank_memory(params, stage, act, dp=dp, shard="zero3")


def test_plans_take_the_first_shard_mode_that_fits_or_the_pinned_one():
    model, cluster = MODELS["llama3-70b"], CLUSTERS["h100-16k"]
    plans = plan(model, cluster, devices=1024, top=5)
    assert all(p.shard == ("optimizer" if p.dp > 1 else "none") for p in plans)
    pinned = plan(model, cluster, devices=1024, shard="params", top=3)
    assert {p.shard for p in pinned} == {"params"}
    alone = plan(model, cluster, devices=64, dp=1, shard="params", top=1)  # (no replicas: nothing to shard)
    assert alone[0].shard == "none"
    assert all(p.memory_per_device <= cluster.memory * 0.9 for p in pinned)


def test_pipetrain_plan_prints_a_command_the_trainer_takes(capsys, monkeypatch):
    assert main(["plan", "--model", "gpt-8x256", "--cluster", "h100-16k", "--gpus", "8", "--tp", "1",
                 "--top", "1"]) == 0
    out = capsys.readouterr().out
    command = out.split("run the best plan:\n")[1].splitlines()[0].strip()
    assert command.startswith("torchrun --nnodes 1 --nproc-per-node 8 ") and "--preset gpt-8x256" in command
    flags = command.split(" -m pipetrain ")[1].split()
    assert flags[0] == "train"
    # the trainer takes the flags and the layout fits the world size; it stops only for want of torchrun
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("RANK", raising=False)
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "launch it under torchrun" in err and "bad configuration" not in err
    # a plan with tensor parallel runs it: the command says --tp, and the trainer lays out dp x pp x tp
    assert main(["plan", "--model", "gpt-8x256", "--cluster", "h100-16k", "--gpus", "16", "--tp", "2",
                 "--top", "1", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["plans"][0]
    assert best["tp"] == 2 and " --tp 2 --sequence-parallel" in best["command"]  # (as the plan's memory assumes)
    assert not any("sequence parallelism" in note for note in best["notes"])
    flags = best["command"].split(" -m pipetrain ")[1].split()
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "launch it under torchrun" in err and "bad configuration" not in err


def test_mixtures_of_experts_have_their_published_sizes_and_active_weights():
    ds = MODELS["deepseek-v3"]
    assert ds.params() == pytest.approx(671e9, rel=0.01) and ds.active_params() == pytest.approx(37e9, rel=0.03)
    qwen = MODELS["qwen3-235b-a22b"]
    assert qwen.params() == pytest.approx(235e9, rel=0.01) and qwen.active_params() == pytest.approx(22e9, rel=0.03)
    assert MODELS["grok-moe"].params() == pytest.approx(314e9, rel=0.02)
    # FLOPs count the weights a token goes through: 6 x active matmul weights + attention
    assert ds.flops_per_token() < 6 * ds.active_params() * 1.2
    assert ds.layer_matmul_params() < ds.layer_params() / 10


def test_expert_parallel_in_the_search_and_the_memory_model():
    """DeepSeek-V3 on 2048 H800 at pp 16: its experts fit only split over ep ranks; each rank holds 1/ep of
    them; the all-to-all costs more once the ep group leaves the node; dense models plan ep 1."""
    from pipetrain.planner.memory import first_rank_memory
    from pipetrain.planner.plan import _a2a_time

    model, cluster = MODELS["deepseek-v3"], CLUSTERS["h800-2k"]
    pins = dict(pp=16, tp=1, schedule="1f1b", microbatch_size=1, stages_per_rank=1)
    best = plan(model, cluster, top=3, **pins)
    assert all(p.ep > 1 and p.dp % p.ep == 0 and p.shard == "none" for p in best)
    assert all(p.memory_per_device <= cluster.memory * 0.9 for p in best)
    with pytest.raises(ValueError, match="no plan fits in 80 GB"):
        plan(model, cluster, ep=1, top=1, **pins)
    kw = dict(tp=1, dp=64, stages_per_rank=1, microbatch_size=1, recompute=True, peak_in_flight=16,
              blocks_per_stage=4, shard="none")
    weights = {ep: first_rank_memory(model, cluster, ep=ep, **kw).moments["optimizer step"] for ep in (8, 16)}
    experts = 4 * model.layer_expert_params()
    assert weights[8] - weights[16] == pytest.approx(16 * experts * (1 / 8 - 1 / 16), rel=1e-9)  # fp32 w, g, AdamW
    inside, across = (_a2a_time(model, cluster, _Candidate(1, pp, 128, 1, 1, 120, "1f1b", True, None, 8), 4096)
                      for pp in (1, 16))
    assert 0 < inside < across
    assert {p.ep for p in plan(MODELS["llama3-8b"], CLUSTERS["h100-16k"], devices=64, pp=2, top=3)} == {1}
    command = main(["plan", "--model", "deepseek-v3", "--cluster", "h800-2k", "--pp", "16", "--tp", "1",
                    "--schedule", "1f1b", "--microbatch-size", "1", "--stages-per-rank", "1", "--top", "1"])
    assert command == 0


def test_an_moe_block_keeps_its_routed_copies_and_its_experts_run_whole_on_every_tp_rank():
    """An MoE block's activations: the dense block's with its MLP's 19 bytes per token and hidden unit replaced
    by the routed copies and the experts' intermediates (DeepSeek-V3: ~4x the dense MLP's); under tp the MoE
    MLP's FLOPs are not divided (the runtime runs the experts whole on each tp rank)."""
    from pipetrain.planner.plan import _stage_costs, _tp_time

    ds, tokens = MODELS["deepseek-v3"], 4096
    h, moe_blocks = ds.hidden, ds.layers - ds.dense_layers
    mlp = (2 * h + 8 * h * 8 + 8 * 2048 * (8 + 1) + 8 * 256) * tokens  # top 8 of 256, one shared, ffn 2048
    dense = 34 * h * tokens
    want = (3 * dense + moe_blocks * (dense - 19 * h * tokens + mlp)) / ds.layers
    assert ds.layer_activation_bytes(tokens, 1, False) == pytest.approx(want)
    assert mlp > 4 * 19 * h * tokens
    assert MODELS["llama3-8b"].layer_activation_bytes(tokens, 2, False) == 17 * MODELS["llama3-8b"].hidden * tokens
    cluster = CLUSTERS["h800-2k"]
    c = _Candidate(2, 4, 8, 1, 1, 8, "1f1b", False, None, 1)  # tp 2, pp 4: 16 blocks on the first stage
    rate, whole = cluster.peak * cluster.achievable, ds.layer_moe_forward_flops(ds.seq)
    assert 0.3 < whole / ds.layer_forward_flops(ds.seq) < 1  # (most of a block's FLOPs are its experts')
    f_block = (ds.layer_forward_flops(ds.seq) - whole) / (2 * rate) + whole / rate + _tp_time(ds, cluster, c, ds.seq)
    assert _stage_costs(ds, cluster, c).w[0] == pytest.approx(16 * f_block)


def test_vocabulary_parallel_in_the_search_the_memory_model_and_the_command(capsys, monkeypatch):
    """A 128k vocabulary on 8 blocks of d 2048 (the head: 1.3 blocks' compute) on 2 ranks of a node: split by
    vocabulary it plans faster than on the last stage; each rank holds 1/(pp x tp) of both tables instead of the
    first stage the whole embedding; the plan's command runs it (without sequence parallelism, as its memory
    assumes)."""
    from pipetrain.planner.memory import first_rank_memory

    model = ModelSpec("heavy-head", 8, 2048, 16, 8192, 128256, 4096, kv_heads=8, global_batch=64)
    cluster = CLUSTERS["h100-16k"]
    pins = dict(devices=2, pp=2, tp=1, dp=1, schedule="zbv", microbatch_size=1)
    best = plan(model, cluster, top=1, **pins)[0]
    whole = plan(model, cluster, top=1, vocab_parallel=False, **pins)[0]
    assert best.vocab_parallel and not whole.vocab_parallel and best.step_time < 0.95 * whole.step_time
    kw = dict(dp=1, stages_per_rank=1, microbatch_size=1, recompute=False, peak_in_flight=2, blocks_per_stage=4,
              shard="none", sequence_parallel=False)
    split = first_rank_memory(model, cluster, tp=2, vocab_shards=4, **kw).moments["optimizer step"]
    alone = first_rank_memory(model, cluster, tp=2, **kw).moments["optimizer step"]
    tables = 2 * model.embedding_params()
    assert split - alone == pytest.approx(16 * (tables / 4 - model.embedding_params() / 2), rel=1e-9)
    # the command: --vocab-parallel, no --sequence-parallel with tp; the trainer takes it
    assert main(["plan", "--model", "gpt-8x256", "--cluster", "h100-16k", "--gpus", "16", "--tp", "2", "--pp", "4",
                 "--vocab-parallel", "--top", "1", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["plans"][0]
    assert planned["vocab_parallel"] and " --vocab-parallel" in planned["command"]
    assert "--sequence-parallel" not in planned["command"]
    flags = planned["command"].split(" -m pipetrain ")[1].split()
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.delenv("RANK", raising=False)
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "launch it under torchrun" in err and "bad configuration" not in err


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("zbv", 2), ("interleaved-1f1b", 2)])
def test_a_short_simulation_with_vocabulary_passes_extended_is_close_to_the_full_one(schedule, v):
    costs = Costs(f=1.0, b=1.1, w=0.9, comm=0.1, s=0.4, t=0.8, e=0.01, g=0.01, collective=0.3)
    p, m = 4, 40
    full = simulate(with_vocabulary(build(schedule, num_ranks=p, num_microbatches=m, stages_per_rank=v), costs,
                                    delays=(0,)), costs)
    step, _, _ = _simulate(_Candidate(1, p, 1, v, 1, m, schedule, False, vocab=True), costs)
    assert step == pytest.approx(full.step_time, rel=0.03)
