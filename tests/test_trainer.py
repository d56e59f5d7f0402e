"""The trainer: exact resume (also on another rank count), global clipping, accumulation, bf16, config."""

import json
import math
import shutil

import pytest
import torch
from torch import nn
from workers import (
    make_model,
    run_processes,
    run_threads,
    trainer_clip,
    trainer_resume_errors,
    trainer_run,
    trainer_sgd,
)

import pipetrain as pt
from pipetrain.cli import main
from pipetrain.models.gpt import build_gpt, gpt_loss
from pipetrain.train import checkpoint as ckpt
from pipetrain.train.trainer import ConfigError, TrainConfig, warmup_cosine

BASE = {"preset": "tiny", "steps": 10, "microbatches": 4, "batch_size": 8, "log_every": 100, "eval_batches": 1,
        "seed": 3, "progress": False, "warmup": 3}


def _params(results):
    merged = {}
    for r in results.values():
        merged.update(r["params"])
    return merged


def test_resume_is_exact(tmp_path):
    # (resuming on another layout: test_data_parallel.py, dp 2 x pp 2 -> pp 3; test_tensor_parallel.py)
    from workers import trainer_saves_format_2

    straight = run_processes(2, trainer_run, BASE)
    ck = str(tmp_path / "ck")
    first = run_processes(2, trainer_run, {**BASE, "checkpoint_dir": ck, "stop_at_step": 5})
    resumed = run_processes(2, trainer_run, {**BASE, "checkpoint_dir": ck, "resume": True})
    assert first[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]  # bit for bit
    want = _params(straight)
    got = _params(resumed)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # runs saved before torch.distributed.checkpoint (a .pt file per layer) resume, and go on exactly
    old = str(tmp_path / "old")
    first = run_processes(2, trainer_saves_format_2, {**BASE, "stop_at_step": 5}, old)
    assert sorted(p.name for p in (tmp_path / "old").glob("*.pt"))[:2] == ["data.pt", "layer_0000.pt"]
    resumed = run_processes(2, trainer_run, {**BASE, "resume": old})
    assert first[0] + resumed[0]["losses"] == straight[0]["losses"]  # bit for bit


@pytest.mark.parametrize("tied", [False, True])
def test_global_clipping_equals_single_process(tied):
    # with tied embeddings the shared matrix lives on both ranks; its gradient is summed across them
    # and counted once in the norm, as in the single-process model where it is one parameter
    settings = {**BASE, "grad_clip": 0.05, "tie_embeddings": tied}
    results = run_processes(2, trainer_clip, settings)
    torch.manual_seed(settings["seed"])
    config = TrainConfig.from_dict(settings)
    model = nn.Sequential(*build_gpt(config.model_config()))
    x, y = results[0]["batch"]
    gpt_loss(model(x), y).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    assert results[0]["norm"] == pytest.approx(total.item(), rel=1e-6) == results[1]["norm"]
    assert results[0]["norm"] > 0.05, "the test must actually clip"
    grads = {}
    for r in results.values():
        grads.update(r["grads"])
    for i, layer in enumerate(model):
        for n, p in layer.named_parameters():
            err = (grads[(i, n)] - p.grad).norm() / p.grad.norm().clamp_min(1e-6)
            assert err < 1e-5, (i, n, err.item())
    if tied:
        assert torch.equal(grads[(0, "tok.weight")], grads[(len(model) - 1, "proj.weight")])


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_tied_embeddings_train_like_one_rank(preset):
    settings = {**BASE, "steps": 5, "tie_embeddings": True, "preset": preset}
    one = run_processes(1, trainer_run, settings)
    two = run_processes(2, trainer_run, settings)
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    last = max(i for i, _ in two[1]["params"])
    assert torch.equal(two[0]["params"][(0, "tok.weight")], two[1]["params"][(last, "proj.weight")]), \
        "the two copies of the tied matrix must stay identical"


def test_tied_weights_across_in_process_ranks_are_refused():
    from pipetrain.models.gpt import GPTConfig

    layers = build_gpt(GPTConfig(vocab_size=16, seq_len=4, d_model=8, n_layers=2, n_heads=2, tie_embeddings=True))
    sched = pt.schedules.build("gpipe", num_ranks=2, num_microbatches=2)
    with pytest.raises(ValueError, match="separate processes"):
        pt.Pipeline(layers, schedule=sched, loss_fn=gpt_loss, transport=pt.InProcessHub(2).transport(0))


def test_accumulation_equals_the_mean_over_the_batches():
    def body(rank, world, transport):
        layers, loss_fn, x, y = make_model("gpt", 4)
        sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=4)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport)
        pipe.step(x, y, scale=0.5)
        pipe.step(x.flip(0), y.flip(0).roll(1, dims=1), scale=0.5)
        return {(i, n): p.grad.clone() for s in pipe.stages for i in pipe.layer_ranges[s]
                for n, p in layers[i].named_parameters()}

    results = run_threads(2, body)
    layers, loss_fn, x, y = make_model("gpt", 4)
    model = nn.Sequential(*layers)
    (0.5 * (loss_fn(model(x), y) + loss_fn(model(x.flip(0)), y.flip(0).roll(1, dims=1)))).backward()
    grads = {**results[0], **results[1]}
    for i, layer in enumerate(layers):
        for n, p in layer.named_parameters():
            assert ((grads[(i, n)] - p.grad).norm() / p.grad.norm().clamp_min(1e-6)) < 1e-5  # (key bias: ~0)


def test_bf16_autocast_keeps_fp32_master_weights():
    def body(rank, world, transport):
        layers, loss_fn, x, y = make_model("gpt", 4)
        sched = pt.schedules.build("zbv", num_ranks=world, num_microbatches=4)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport, precision="bf16")
        loss = pipe.step(x, y)
        return loss, {p.dtype for p in pipe.parameters()} | {p.grad.dtype for p in pipe.parameters()}

    results = run_threads(2, body)
    layers, loss_fn, x, y = make_model("gpt", 4)
    with torch.no_grad():
        want = loss_fn(nn.Sequential(*layers)(x), y).item()
    assert results[0][0] == pytest.approx(want, rel=2e-2) and results[0][0] != want
    assert results[0][1] == {torch.float32}  # parameters and their gradients stay fp32


def test_metrics_log_plot_and_checkpoints_on_disk(tmp_path):
    settings = {**BASE, "steps": 6, "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 3,
                "metrics_jsonl": str(tmp_path / "m.jsonl"), "plot": str(tmp_path / "loss.png"), "accumulation": 2}
    results = run_processes(2, trainer_run, settings)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for r in lines:
        assert {"step", "loss", "tokens_per_s", "bubble_fraction", "step_time", "mfu", "lr", "grad_norm",
                "bubble_per_rank", "peak_memory_per_rank"} <= r.keys()
        assert len(r["bubble_per_rank"]) == 2 and all(m > 0 for m in r["peak_memory_per_rank"])
    assert lines[-1]["eval_loss"] < 6 and results[0]["losses"] == [r["loss"] for r in lines]
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    root = tmp_path / "ck"
    assert ckpt.latest(root).name == "step_00000006"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000006"]
    manifest = ckpt.read_manifest(ckpt.latest(root))
    assert manifest["step"] == 6 and manifest["num_layers"] == 6 and manifest["world_size"] == 2


def test_a_rank_killed_in_the_middle_of_a_save_leaves_the_last_good_checkpoint(tmp_path):
    # then resuming is exact (and keeps the newest 2), and damaged copies of the last good checkpoint stop
    # every rank with one line naming the file
    from workers import trainer_crash_in_save

    settings = {**BASE, "steps": 8, "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 3}
    survivors = run_processes(2, trainer_crash_in_save, settings, 6, expect=1, timeout=120)
    assert survivors[0]["error"] is not None and survivors[0]["step"] == 6, survivors  # failed in the save, fast
    root = tmp_path / "ck"
    torn = [p.read_bytes() for p in (root / ".tmp-step_00000006").glob("__1_*.distcp")]
    assert torn == [b"half a shard"]  # interrupted for real, mid-write
    assert ckpt.latest(root).name == "step_00000003"
    shutil.copytree(root / "step_00000003", tmp_path / "good")
    again = run_processes(2, trainer_run, {**settings, "resume": True, "keep_last": 2})
    assert [r["step"] for r in again[0]["history"]] == [4, 5, 6, 7, 8]  # resumed at 3
    straight = run_processes(2, trainer_run, {**BASE, "steps": 8})
    assert again[0]["losses"] == straight[0]["losses"][3:]  # bit for bit
    want, got = _params(straight), _params(again)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ckpt.latest(root).name == "step_00000008"
    assert b"half a shard" not in [p.read_bytes() for p in (root / "step_00000006").iterdir()], "a torn file published"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000006", "step_00000008"]  # keep_last=2

    # damaged copies of the step-3 checkpoint: every rank raises one line naming the file, within seconds
    def damaged(name, change):
        path = tmp_path / name
        shutil.copytree(tmp_path / "good", path)
        change(path)
        return path

    last_layer = tmp_path / "good" / "__1_0.distcp"  # written by rank 1: the last layers
    truncated = damaged("truncated", lambda p: (p / last_layer.name).write_bytes(last_layer.read_bytes()[:500]))
    garbage = damaged("garbage", lambda p: (p / "manifest.json").write_text("{not json"))
    manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
    other = damaged("other", lambda p: (p / "manifest.json").write_text(
        json.dumps({**manifest, "model": {**manifest["model"], "d_model": 999}})))
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "latest").write_text("step_00000009")
    variants = [{"resume": str(truncated)}, {"resume": str(garbage)}, {"resume": str(other)},
                {"resume": True, "checkpoint_dir": str(tmp_path / "dangling")}, {"resume": str(tmp_path)}]
    errors = run_processes(2, trainer_resume_errors, BASE, variants)
    for rank in (0, 1):  # (DCP tells every rank which one could not read its part)
        assert errors[rank][0][0] == "CheckpointError" and errors[rank][0][1].startswith(
            f"reading the checkpoint {truncated} failed on global rank(s) [1] (EOFError)"), errors[rank][0]
        assert f"{garbage}/manifest.json cannot be read" in errors[rank][1][1]
        assert f"{other} holds a model" in errors[rank][2][1] and "resume with the same model" in errors[rank][2][1]
        assert "latest names" in errors[rank][3][1] and "which has no manifest.json" in errors[rank][3][1]
        assert f"{tmp_path} is not a checkpoint" in errors[rank][4][1]
        assert all("\n" not in e[1] and e[2] < 20 for e in errors[rank]), errors[rank]


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, warmup=4, total=12, lr=1.0, min_lr=0.1) for s in range(13)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[12] == pytest.approx(0.1) and lr[8] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert all(a >= b for a, b in zip(lr[4:], lr[5:], strict=False))


@pytest.mark.parametrize("settings,field", [
    ({"microbatches": 0}, "microbatches"), ({"batch_size": 10, "microbatches": 4}, "batch_size=10"),
    ({"schedule": "nope"}, "schedule='nope'"), ({"preset": "huge"}, "preset='huge'"),
    ({"lr": 0.1, "min_lr": 1.0}, "min_lr"), ({"resume": True}, "checkpoint_dir"),
    ({"heads": 3}, "divisible by n_heads"), ({"precision": "fp8"}, "precision"), ({"bogus": 1}, "bogus"),
    ({"stop_at_step": 0}, "stop_at_step"),
    ({"dp": 0}, "dp must be"),
    ({"dp": 3, "batch_size": 16, "microbatches": 4}, "dp=3 replicas x microbatches=4: use a multiple of 12"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ({"shard": "zero3"}, 'shard must be "none", "optimizer", "gradients" or "params"'),
    ({"shard": "optimizer"}, "shards over data-parallel replicas: set dp to 2 or more"),
])
def test_bad_configs_name_the_field(settings, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_dict(settings).validate()


def test_cli_rejects_bad_config_before_any_process_group(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "tiny"\nmicrobatches = 3\nbatch_size = 16\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "batch_size=16 does not split into microbatches=3" in capsys.readouterr().err
    assert main(["train", "--config", str(bad), "--batch-size", "12"]) == 2  # valid now: asks for torchrun
    assert "torchrun" in capsys.readouterr().err


def test_tensorboard_needs_its_package_or_logs(tmp_path):
    config = TrainConfig.from_dict({"tensorboard": str(tmp_path / "tb")})
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            config.validate()
        return
    run_processes(2, trainer_run, {**BASE, "steps": 2, "tensorboard": str(tmp_path / "tb")})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_any_torch_optimizer_from_a_factory():
    results = run_processes(2, trainer_sgd, {**BASE, "steps": 8, "weight_decay": 0.01})
    assert results[0]["kind"] == results[1]["kind"] == "SGD"
    assert results[0]["decay"] == [0.01, 0.0]  # matrices decay, biases and norms do not
    assert results[0]["losses"][-1] < results[0]["losses"][0]


def test_progress_bar_only_when_asked_or_on_a_terminal(monkeypatch):
    from pipetrain.train.report import progress_bar as _progress

    bar = _progress(TrainConfig(progress=True, steps=5), initial=2)
    assert type(bar).__name__ == "tqdm" and bar.n == 2 and bar.total == 5
    bar.close()
    assert _progress(TrainConfig(progress=False), initial=0) is None
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert _progress(TrainConfig(), initial=0) is None  # plain lines in logs and pipes


ANY = {"steps": 6, "microbatches": 4, "batch_size": 8, "log_every": 100, "eval_batches": 2, "seed": 3,
       "progress": False, "warmup": 2, "eval_every": 3, "lr": 1e-2}


@pytest.mark.parametrize("data_kind", ["map", "stream"])
def test_trainer_trains_any_model_and_resumes_exactly(tmp_path, data_kind):
    # tuple/dict boundaries and a token-mean loss; a map-style dataset (shuffled epochs) or a stateless stream
    # of batches whose sequence length changes every step (resumed by replaying it)
    from any_model import train_any

    straight = run_processes(2, train_any, ANY, data_kind)
    assert straight[0]["eval"][-1] < straight[0]["eval"][2]  # held-out loss after 6 steps below that after 3
    ck = {**ANY, "checkpoint_dir": str(tmp_path / "ck")}
    first = run_processes(2, train_any, {**ck, "stop_at_step": 3}, data_kind)
    resumed = run_processes(2, train_any, {**ck, "resume": True}, data_kind)
    assert first[0]["losses"] + resumed[0]["losses"] == straight[0]["losses"]  # bit for bit
    for r in (0, 1):
        assert all(torch.equal(resumed[r]["params"][k], v) for k, v in straight[r]["params"].items())


def test_trainer_shards_batches_over_replicas_and_takes_a_ready_pipeline():
    from any_model import train_any

    pp = run_processes(2, train_any, {**ANY, "steps": 3}, "map")  # dp 1 x pp 2
    dp = run_processes(2, train_any, {**ANY, "steps": 3, "schedule": "gpipe", "dp": 2}, "map")  # dp 2 x pp 1
    assert dp[0]["losses"] == pytest.approx(pp[0]["losses"], rel=1e-5)  # the same global batches, token mean
    given = run_processes(2, train_any, {**ANY, "steps": 3}, "map", True)
    assert given[0]["losses"] == pp[0]["losses"]


def test_max_seconds_on_a_step_without_eval_still_ends_with_an_eval():
    # regression: --max-seconds stopping at a step without an eval crashed with KeyError: 'eval_loss'
    results = run_processes(2, trainer_run, {**BASE, "steps": 50, "max_seconds": 1e-6, "eval_every": 100})
    history = results[0]["history"]
    assert len(history) == 1 and "eval_loss" not in history[0]
    assert math.isfinite(results[0]["final"])


def test_trainer_token_mean_with_aux_losses_counts_each_window_up_front():
    # one optimizer step of 2 accumulated batches (sequence lengths 6 and 9), a token mean and an MoE
    # load-balancing loss: with count_tokens the trainer passes the window's count as num_tokens. SGD with
    # lr 1 makes the parameter change equal the gradient, compared with single-process training.
    from any_model import batch, build, reference, token_loss

    data = [batch(8, 6, 11), batch(8, 9, 12)]

    def body(rank, world, transport):
        config = pt.TrainConfig(microbatches=4, batch_size=8, accumulation=2, steps=1, warmup=0, grad_clip=0.0,
                                weight_decay=0.0,
                                eval_batches=1, progress=False, log_every=100)
        trainer = pt.Trainer(build(aux_weight=0.1), loss_fn=token_loss, data=iter(data), config=config,
                             optimizer=lambda groups: torch.optim.SGD(groups, lr=1.0), transport=transport,
                             count_tokens=lambda y: (y != -100).sum())
        before = {n: p.detach().clone() for n, p in trainer.pipe.named_parameters()}
        record = trainer.train_step()
        return record, {n: before[n] - p.detach() for n, p in trainer.pipe.named_parameters()}

    results = run_threads(2, body)
    ref = reference("token+aux", [{"batch": b, "scale": 0.5} for b in data], 4)
    window = ref["window_count"]
    loss = sum(v * int((b[1] != -100).sum()) for v, b in zip(ref["losses"], data, strict=True)) / window
    assert results[0][0]["loss"] == pytest.approx(loss, rel=1e-6) and results[0][0]["aux_loss"] > 0
    changes = {**results[0][1], **results[1][1]}
    for (i, name), want in ref["grads"].items():
        got = changes[f"{i}.{name}"]
        assert (got - want).norm() / want.norm().clamp_min(1e-6) < 1e-5, (i, name)
