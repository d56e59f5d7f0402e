"""On-policy RL on the training pipeline: a small GPT learns to add, first supervised, then with GRPO.

Launch (CPU, 2 ranks):   torchrun --standalone --nproc-per-node 2 examples/rl_addition.py
Options: --warmup-steps, --rl-steps, --max-seconds, --group-size, --prompts, --plot FILE, --jsonl FILE.

The task: "a+b=" with a, b < 100, answered by the digits of the sum and a newline. The reward is
verifiable: 1 if the completion is exactly the sum followed by the newline, else 0. A short supervised
warm-up teaches the format and some sums; then each RL step
  1. samples `--group-size` completions per problem with `pipe.generate` (temperature 1, on the pipeline's
     own stages: no copy of the weights),
  2. scores them and takes each completion's advantage against its group (GRPO: reward minus the group's
     mean, over the group's standard deviation),
  3. trains on the same Pipeline with `step`: the loss is minus the advantage-weighted log-probability of
     the sampled tokens, a token mean over the batch (the loss returns (loss_sum, count)).
Held-out problems are decoded greedily before and after RL. Rank 0 prints the reward and accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pipetrain as pt
from pipetrain.models.gpt import GPTConfig, build_gpt

VOCAB = "0123456789+=\n"
TOKEN = {c: i for i, c in enumerate(VOCAB)}
EOS = TOKEN["\n"]
PROMPT_LEN, ANSWER_LEN = 6, 4  # "99+99=" and "198\n": sequences of at most 10 tokens


def encode(text: str) -> torch.Tensor:
    return torch.tensor([TOKEN[c] for c in text], dtype=torch.int64)


def problems(n: int, rng: random.Random) -> list[tuple[int, int]]:
    return [(rng.randrange(100), rng.randrange(100)) for _ in range(n)]


def reward(a: int, b: int, completion: torch.Tensor) -> float:
    return 1.0 if completion.tolist() == encode(f"{a + b}\n").tolist() else 0.0


def policy_loss(logits: torch.Tensor, targets: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-(advantage x log-probability) of each completion token, as (sum, count) for a token mean.
    logits (b, t, vocab); targets: "next" (b, t) the following token, "weight" (b, t) the advantage on
    completion tokens (1 in the supervised warm-up), "mask" (b, t) which positions count."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets["next"][..., None])[..., 0]  # (b, t)
    return -(targets["weight"] * logp * targets["mask"]).sum(), targets["mask"].sum()


def batch(rows: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, dict]:
    """(prompt, completion, weight) rows -> inputs (b, 10) and targets, right-padded; the loss covers the
    completion tokens (each predicted from the token before it)."""
    length = PROMPT_LEN + ANSWER_LEN
    x = torch.full((len(rows), length), EOS, dtype=torch.int64)
    nxt = torch.full_like(x, EOS)
    weight = torch.zeros(len(rows), length)
    mask = torch.zeros(len(rows), length)
    for i, (prompt, completion, w) in enumerate(rows):
        seq = torch.cat([prompt, completion])[:length]
        x[i, :len(seq)] = seq
        nxt[i, :len(seq) - 1] = seq[1:]
        span = slice(len(prompt) - 1, len(seq) - 1)  # positions whose next token is a completion token
        weight[i, span], mask[i, span] = w, 1.0
    return x, {"next": nxt, "weight": weight, "mask": mask}


def accuracy(pipe: pt.Pipeline, held_out: list[tuple[int, int]]) -> float:
    outs = pipe.generate([encode(f"{a}+{b}=") for a, b in held_out], ANSWER_LEN, eos_token_id=EOS)
    return sum(reward(a, b, o) for (a, b), o in zip(held_out, outs, strict=True)) / len(held_out)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup-steps", type=int, default=400, help="supervised steps before RL")
    p.add_argument("--rl-steps", type=int, default=3000)
    p.add_argument("--max-seconds", type=float, default=180.0, help="stop RL after this long")
    p.add_argument("--prompts", type=int, default=16, help="problems per RL step")
    p.add_argument("--group-size", type=int, default=8, help="completions sampled per problem")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rl-lr", type=float, default=3e-4)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--schedule", default="1f1b", choices=pt.schedules.names())
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", default=None, help="write one JSON line per RL step (rank 0)")
    p.add_argument("--plot", default=None, help="draw the reward curve to this PNG (rank 0, needs matplotlib)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=len(VOCAB), seq_len=PROMPT_LEN + ANSWER_LEN, d_model=64, n_layers=4, n_heads=4)
    schedule = pt.schedules.build(args.schedule, num_ranks=world, num_microbatches=args.microbatches)
    pipe = pt.Pipeline(build_gpt(cfg), schedule=schedule, loss_fn=policy_loss, balance="params")
    rng = random.Random(args.seed)  # the same problems on every rank
    held_out = problems(200, random.Random(12345))

    optimizer = torch.optim.AdamW(pipe.parameters(), lr=args.lr, weight_decay=0.0)
    for step in range(args.warmup_steps):  # supervised: the true answers, weight 1
        rows = [(encode(f"{a}+{b}="), encode(f"{a + b}\n"), 1.0) for a, b in problems(64, rng)]
        loss = pipe.step(*batch(rows))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            say(f"warm-up step {step + 1:4d} | loss {loss:.3f}")
    before = accuracy(pipe, held_out)
    say(f"after the supervised warm-up: held-out accuracy (greedy) {before:.1%}")

    for group in optimizer.param_groups:
        group["lr"] = args.rl_lr
    log = open(args.jsonl, "w") if args.jsonl and rank == 0 else None  # noqa: SIM115 - closed below
    curve, start = [], time.perf_counter()
    for step in range(args.rl_steps):
        batch_problems = problems(args.prompts, rng)
        prompts = [encode(f"{a}+{b}=") for a, b in batch_problems for _ in range(args.group_size)]
        completions = pipe.generate(prompts, ANSWER_LEN, temperature=1.0, eos_token_id=EOS,
                                    seed=args.seed * 100_000 + step)
        rewards = torch.tensor([reward(a, b, c) for (a, b), c in
                                zip([p for p in batch_problems for _ in range(args.group_size)], completions,
                                    strict=True)]).view(args.prompts, args.group_size)
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        rows = [(p, c, float(a)) for p, c, a in zip(prompts, completions, advantages.flatten(), strict=True)]
        pipe.step(*batch(rows))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        curve.append({"step": step + 1, "reward": rewards.mean().item(), "seconds": round(elapsed, 2)})
        if log:
            log.write(json.dumps(curve[-1]) + "\n")
        if (step + 1) % args.log_every == 0:
            recent = sum(c["reward"] for c in curve[-args.log_every:]) / args.log_every
            say(f"RL step {step + 1:4d} | reward {recent:.3f} (mean of {args.log_every} steps) | {elapsed:5.0f} s")
        stop = torch.tensor([float(elapsed > args.max_seconds)])
        dist.all_reduce(stop)  # every rank stops at the same step
        if stop.item() > 0:
            break
    after = accuracy(pipe, held_out)
    first = sum(c["reward"] for c in curve[:args.log_every]) / min(args.log_every, len(curve))
    last = sum(c["reward"] for c in curve[-args.log_every:]) / min(args.log_every, len(curve))
    say(f"\nRL: {len(curve)} steps in {curve[-1]['seconds']:.0f} s; sampled reward {first:.3f} -> {last:.3f} "
        f"(first and last {args.log_every} steps); held-out accuracy (greedy) {before:.1%} -> {after:.1%}")
    sample = held_out[0]
    out = pipe.generate([encode(f"{sample[0]}+{sample[1]}=")], ANSWER_LEN, eos_token_id=EOS)[0]
    say(f"sample: {sample[0]}+{sample[1]}={''.join(VOCAB[t] for t in out.tolist())!r}")
    if log:
        log.close()
    if args.plot and rank == 0:
        draw(curve, before, after, args.plot)
    dist.destroy_process_group()


def draw(curve: list[dict], before: float, after: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curve]
    k = 50
    smooth = [sum(c["reward"] for c in curve[max(0, i - k + 1):i + 1]) / min(k, i + 1) for i in range(len(curve))]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, [c["reward"] for c in curve], color="0.75", lw=0.8, label="sampled reward per step")
    ax.plot(steps, smooth, color="C0", lw=2, label=f"mean of {k} steps")
    ax.axhline(before, color="C1", ls="--", label=f"held-out accuracy after warm-up ({before:.0%})")
    ax.axhline(after, color="C2", ls="--", label=f"held-out accuracy after RL ({after:.0%})")
    ax.set_xlabel("RL step (generate, then one training step)")
    ax.set_ylabel("reward (exact sum)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("GRPO on 2-digit addition, 2 CPU ranks, one Pipeline for rollouts and training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
