"""The command line and the example (main job) as a user runs them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipetrain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_simulate_json_has_the_contract_fields(capsys):
    assert main(["simulate", "--schedule", "1f1b", "--ranks", "4", "--microbatches", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in ("schedule", "ranks", "microbatches", "stages_per_rank")} == \
        {"schedule": "1f1b", "ranks": 4, "microbatches": 8, "stages_per_rank": 1}
    assert out["bubble_fraction"] == pytest.approx(3 / 11)
    assert out["step_time"] == pytest.approx(33.0)
    assert [r["peak_activations"] for r in out["per_rank"]] == [4, 3, 2, 1]
    assert set(out["per_rank"][0]) == {"rank", "busy_time", "bubble_fraction", "peak_activations"}


def test_simulate_prints_table_and_timeline(capsys):
    assert main(["simulate", "--schedule", "gpipe", "--ranks", "2", "--microbatches", "2", "--cost-w", "0"]) == 0
    out = capsys.readouterr().out
    assert "rank  0: 0F0 0F1" in out and "bubble fraction 0.3333" in out


def test_simulate_rejects_bad_sizes_with_the_fix(capsys):
    assert main(["simulate", "--schedule", "1f1b", "--ranks", "4", "--microbatches", "2"]) == 2
    assert "use 'gpipe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--schedule", "1f1b", "--ranks", "0", "--microbatches", "2"])


def test_train_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    entries = {" ".join(e.split()).split(" ")[0]: " ".join(e.split())
               for e in re.split(r"\n  (?=--)", capsys.readouterr().out)}  # one per option
    for flag, default in [("--schedule", "1f1b"), ("--lr", "0.001"), ("--microbatches", "4"), ("--preset", "tiny")]:
        assert entries[flag].endswith(f"(default: {default})"), entries[flag]


def test_train_errors_found_before_launching_are_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    # as torchrun would start rank 2 of 4: --layers 1 is checked in the user's terms before any rank talks
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert main(["train", "--preset", "tiny", "--layers", "1"]) == 2
    assert capsys.readouterr().err == (
        "pipetrain train (rank 2): bad configuration: the model has 3 pipeline layers (the embedding, 1 block(s), "
        "the head), fewer than the 4 stages of 4 pipeline rank(s) x 1 stage(s) per rank (1f1b): use layers=2 or "
        "more, or fewer ranks\n")
    from pipetrain.train.config import TrainConfig, check_fits

    check_fits(TrainConfig(layers=1, dp=2), world_size=4)  # 2 stages per replica: fine
    # an HF folder holding a model pipetrain cannot split: said from config.json, before any weight is read
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(n_layer=2, n_embd=16, n_head=2, vocab_size=300, bos_token_id=0, eos_token_id=0)
    config.architectures = ["GPTBigCodeForCausalLM"]
    config.save_pretrained(tmp_path)
    assert main(["train", "--hf", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    why = "is GPTBigCodeForCausalLM (config.json): GPTBigCodeForCausalLM has GPT-2's parts with another attention"
    assert err.count("\n") == 1 and why in err and "pipetrain trains LlamaForCausalLM" in err, err


def test_console_script_is_installed():
    out = subprocess.run([str(Path(sys.executable).parent / "pipetrain"), "simulate", "--schedule", "gpipe",
                          "--ranks", "2", "--microbatches", "4", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["bubble_fraction"] == pytest.approx(1 / 5)


def test_example_trains_on_two_gloo_ranks_and_writes_its_timeline(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(ROOT / "examples" / "train_gpt.py"),
           "--steps", "40", "--log-every", "10", "--d-model", "32", "--layers", "2", "--seq-len", "32",
           "--batch-size", "16", "--microbatches", "4", "--eval-batches", "2", "--schedule", "zbv",
           "--trace-dir", str(tmp_path / "trace")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "idle per rank" in out and "summary" in out
    before, after = map(float, re.search(r"held-out loss (\S+) -> (\S+)", out).groups())
    assert after < before - 0.5, out
    assert re.search(r"step time .* error [+-]\d+\.\d%", out), out  # simulated vs measured
    for name in ("timeline.json", "trace.json", "timeline.png"):
        assert (tmp_path / "trace" / name).stat().st_size > 0


def test_pipetrain_train_under_torchrun_with_toml_flags_and_resume(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('preset = "tiny"\nschedule = "zb-h1"\nmicrobatches = 4\nbatch_size = 8\nlog_every = 2\n'
                      'eval_batches = 1\nsteps = 100\n')
    torchrun = Path(sys.executable).parent / "torchrun"
    launch = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pipetrain", "train", "--config",
              str(config), "--checkpoint-dir", str(tmp_path / "ck"), "--metrics-jsonl", str(tmp_path / "m.jsonl"),
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*launch, "--steps", "4", "--log-file", str(tmp_path / "log.txt")], capture_output=True,
                           text=True, timeout=120, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "summary: 4 steps" in first.stdout and "summary: 4 steps" in (tmp_path / "log.txt").read_text()
    again = subprocess.run([*launch, "--steps", "6", "--resume", "--sample-tokens", "20"], capture_output=True,
                           text=True, timeout=120, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"prompt: +['\"]def .*\n  generated: ", again.stdout), again.stdout  # a held-out def, continued
    assert "resumed from" in again.stdout and "step_00000004" in again.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_any_model_example_trains_with_trees_shape_changes_and_a_token_mean(tmp_path):
    # (hidden, mask, positions) between stages, a sequence length that changes every step, a token mean
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(ROOT / "examples" / "train_any_model.py"),
           "--steps", "60", "--layers", "2", "--d-model", "32", "--batch-size", "16", "--files", "120",
           "--schedule", "zbv", "--checkpoint-dir", str(tmp_path / "ck")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = float(re.search(r"held-out loss before training (\S+)", proc.stdout).group(1))
    after = float(re.search(r"held-out loss (\S+) \(perplexity", proc.stdout.split("summary")[1]).group(1))
    assert after < before - 1.0, proc.stdout
    assert (tmp_path / "ck" / "latest").exists()


def test_pipetrain_train_hf_loads_the_weights_resumes_and_saves_a_model_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from pipetrain.train.data import CausalLMBatches, load_corpus

    config = transformers.Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    source_model = transformers.Qwen2ForCausalLM(config)
    source_model.save_pretrained(tmp_path / "source")
    # as older models ship: weights as a PyTorch pytorch_model.bin only; and a tokenizer file to carry over
    (tmp_path / "source" / "model.safetensors").unlink()
    torch.save(source_model.state_dict(), tmp_path / "source" / "pytorch_model.bin")
    (tmp_path / "source" / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>"}')
    torchrun = Path(sys.executable).parent / "torchrun"
    launch = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pipetrain", "train", "--hf",
              str(tmp_path / "source"), "--steps", "4", "--batch-size", "8", "--microbatches", "4", "--seq-len",
              "32", "--eval-batches", "2", "--log-every", "1", "--lr", "3e-3", "--schedule", "zbv",
              "--checkpoint-dir", str(tmp_path / "ck"), "--metrics-jsonl", str(tmp_path / "m.jsonl"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*launch, "--stop-at-step", "2"], capture_output=True, text=True, timeout=180, env=env,
                           cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*launch, "--resume", "--sample-tokens", "12"], capture_output=True, text=True, timeout=180,
                           env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"prompt: +['\"]def .*\n  generated: ", again.stdout), again.stdout  # generated on its stages
    assert "resumed from" in again.stdout and "step_00000002" in again.stdout
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    def held_out(model) -> float:  # the trainer's held-out batches: the corpus's held-out files, seed + 1
        batches = CausalLMBatches(load_corpus().val, batch_size=8, seq_len=32, seed=1)
        with torch.no_grad():
            return sum(model(**x, labels=y).loss.item() for x, y in (batches.next() for _ in range(2))) / 2

    source = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "source")
    before = float(re.search(r"held-out loss before training (\S+)", first.stdout).group(1))
    assert before == pytest.approx(held_out(source), abs=2e-4)  # the run started from the checkpoint's weights
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "hf")
    for name in ("generation_config.json", "special_tokens_map.json"):  # carried over from the source folder
        assert (tmp_path / "ck" / "hf" / name).read_text() == (tmp_path / "source" / name).read_text()
    after = float(re.search(r"held-out loss (\S+) \(perplexity", again.stdout.split("summary")[1]).group(1))
    assert after == pytest.approx(held_out(trained), abs=2e-4) and after < before


def test_hf_example_trains_a_llama_saves_it_and_transformers_loads_it_back(tmp_path):
    pytest.importorskip("transformers")
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(ROOT / "examples" / "train_hf_llama.py"),
           "--steps", "60", "--out", str(tmp_path / "llama")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(float, re.search(r"held-out loss (\S+) -> (\S+);", proc.stdout).groups())
    assert after < before - 1.0, proc.stdout
    again, pipeline = map(float, re.search(r"held-out loss (\S+) \(the pipeline's: (\S+)\)", proc.stdout).groups())
    assert again == pytest.approx(pipeline, abs=1e-4)
    assert (tmp_path / "llama" / "model.safetensors.index.json").exists()


def test_rl_example_alternates_generate_and_training_on_two_gloo_ranks(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(ROOT / "examples" / "rl_addition.py"),
           "--warmup-steps", "20", "--rl-steps", "6", "--log-every", "3", "--prompts", "4", "--group-size", "4",
           "--jsonl", str(tmp_path / "rl.jsonl"), "--plot", str(tmp_path / "reward.png")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"RL: 6 steps .* held-out accuracy \(greedy\) [\d.]+% -> [\d.]+%", proc.stdout), proc.stdout
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "rl.jsonl").read_text().splitlines()]
    assert len(rewards) == 6 and all(0 <= r <= 1 for r in rewards)
    assert (tmp_path / "reward.png").stat().st_size > 10_000


def test_rl_loss_raises_the_probability_of_completions_with_a_positive_advantage():
    """The policy gradient's sign and alignment: one SGD step on `policy_loss` makes a completion with a
    positive advantage more likely and one with a negative advantage less likely."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("rl_addition", ROOT / "examples" / "rl_addition.py")
    rl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*rl.build_gpt(rl.GPTConfig(vocab_size=len(rl.VOCAB), seq_len=10, d_model=16,
                                                           n_layers=1, n_heads=2)))
    good, bad = rl.encode("3+4="), rl.encode("12+9=")
    rows = [(good, rl.encode("7\n"), 1.0), (bad, rl.encode("5\n"), -1.0)]

    def logprob(prompt, completion):  # log p(completion | prompt) under the model
        seq = torch.cat([prompt, completion])[None]
        logp = torch.log_softmax(model(seq)[0, :-1], dim=-1)
        return sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(completion.tolist())).item()

    before = [logprob(p, c) for p, c, _ in rows]
    x, targets = rl.batch(rows)
    loss_sum, count = rl.policy_loss(model(x), targets)
    assert count.item() == 4  # two completion tokens each
    (loss_sum / count).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = [logprob(p, c) for p, c, _ in rows]
    assert after[0] > before[0] and after[1] < before[1]
