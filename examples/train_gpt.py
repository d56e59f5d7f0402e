"""Train a byte-level GPT on the Python standard library's source with pipetrain, on 2+ ranks.

Launch (CPU, 2 ranks):   torchrun --standalone --nproc-per-node 2 examples/train_gpt.py
GPUs (one per rank):     torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --backend nccl --schedule 1f1b
Options: --schedule gpipe|1f1b, --microbatches, --batch-size, --steps, --max-seconds, model size flags.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import pipetrain as pt
from pipetrain.models.gpt import GPTConfig, build_gpt, flops_per_token, gpt_loss
from pipetrain.train.data import Batches, load_corpus


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="1f1b", choices=pt.schedules.names())
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-seconds", type=float, default=None, help="stop at the first log step past this")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--balance", default="params", help='"uniform", "params", "time" or counts like 2,2,2')
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages-per-rank", type=int, default=None, help="for interleaved-1f1b / looped-bfs / zbv")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing on every stage")
    p.add_argument("--trace-dir", default=None, help="write the last steps' measured timelines (JSON, Chrome "
                   "trace, PNG) and print the simulated-vs-measured comparison")
    p.add_argument("--trace-steps", type=int, default=5, help="how many final steps --trace-dir records")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = None
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    cfg = GPTConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    torch.manual_seed(args.seed)  # every rank builds the same weights, then keeps its own stages
    layers = build_gpt(cfg)
    corpus = load_corpus()
    train = Batches(corpus.train, batch_size=args.batch_size, seq_len=cfg.seq_len, seed=args.seed)
    held_out = Batches(corpus.val, batch_size=args.batch_size, seq_len=cfg.seq_len, seed=args.seed + 1)
    eval_set = [held_out.next() for _ in range(args.eval_batches)]

    schedule = pt.schedules.build(args.schedule, num_ranks=world, num_microbatches=args.microbatches,
                                  stages_per_rank=args.stages_per_rank)
    balance = [int(n) for n in args.balance.split(",")] if "," in args.balance else args.balance
    sample = eval_set[0][0][: args.batch_size // args.microbatches]
    pipe = pt.Pipeline(layers, schedule=schedule, loss_fn=gpt_loss, balance=balance, device=device,
                       timeout=args.timeout, sample=sample, checkpoint=args.checkpoint)
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=args.lr, weight_decay=0.0)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"pipetrain {pt.__version__}: {world} ranks ({args.backend}), schedule {args.schedule}, "
        f"{args.microbatches} microbatches of {args.batch_size // args.microbatches}, "
        f"GPT {cfg.n_layers}x{cfg.d_model} ({cfg.num_params() / 1e6:.2f}M params), seq {cfg.seq_len}")
    say(f"corpus: {corpus.num_files} stdlib files, {corpus.train.numel() / 1e6:.1f}M train bytes, "
        f"{corpus.val.numel() / 1e6:.1f}M held-out bytes; stages (layers per stage): {pipe.balance}")

    def held_out_loss() -> float:
        pipe.eval()
        loss = statistics.fmean(pipe.evaluate(x, y) for x, y in eval_set)
        pipe.train()
        return loss

    val_before = held_out_loss()
    say(f"held-out loss before training: {val_before:.4f}")
    tokens_per_step = args.batch_size * cfg.seq_len
    start = window_start = time.perf_counter()
    losses, rates, bubbles = [], [], []
    window_busy = window_time = 0.0
    step = 0
    traced = []  # measured timelines of the last --trace-steps steps (rank 0)
    while step < args.steps:
        x, y = train.next()
        loss = pipe.step(x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        step += 1
        if args.trace_dir and step > args.steps - args.trace_steps:
            traced.append(pipe.gather_timeline())  # collective: every rank calls it
        window_busy += pipe.last_step.busy_time
        window_time += pipe.last_step.step_time
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - window_start
            steps_in_window = (step - 1) % args.log_every + 1
            out_of_time = args.max_seconds is not None and time.perf_counter() - start > args.max_seconds
            gathered = [None] * world  # (bubble over the window, out of time) from every rank
            dist.all_gather_object(gathered, (1.0 - window_busy / window_time, out_of_time))
            bubble = [g[0] for g in gathered]
            rate = steps_in_window * tokens_per_step / elapsed
            rates.append(rate)
            bubbles.append(bubble)
            say(f"step {step:5d} | loss {loss:.4f} | {rate:8.0f} tokens/s | "
                f"{rate * flops_per_token(cfg) / 1e9:6.2f} "
                f"GFLOP/s | idle per rank {' '.join(f'{b:.1%}' for b in bubble)}")
            window_start, window_busy, window_time = time.perf_counter(), 0.0, 0.0
            if any(g[1] for g in gathered):
                break
    total = time.perf_counter() - start
    val_after = held_out_loss()
    first = statistics.fmean(losses[: min(10, len(losses))])
    last = statistics.fmean(losses[-min(10, len(losses)):])
    mean_bubble = [statistics.fmean(b[r] for b in bubbles) for r in range(world)]
    say("\nsummary")
    say(f"  steps {step} in {total:.1f}s, {step * tokens_per_step / total:.0f} tokens/s overall")
    say(f"  train loss (mean of 10 steps) {first:.4f} -> {last:.4f}")
    say(f"  held-out loss {val_before:.4f} -> {val_after:.4f} (perplexity {torch.tensor(val_after).exp():.2f})")
    say(f"  measured idle (bubble) per rank {' '.join(f'{b:.1%}' for b in mean_bubble)}; "
        f"simulated for uniform stages {pt.simulate(schedule).bubble_fraction:.1%}")
    if args.trace_dir and rank == 0:
        if traced:
            write_trace(args.trace_dir, schedule, traced)
        else:
            print("(no timeline: the run stopped before its last --trace-steps steps; raise --max-seconds)")
    dist.destroy_process_group()


def write_trace(directory: str, schedule, timelines) -> None:
    """The last steps: timeline JSON (for `pipetrain compare`), Chrome trace and picture of the last one."""
    from pathlib import Path

    from pipetrain.schedule import save_chrome_trace, save_timeline
    from pipetrain.schedule.compare import compare

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_timeline(timelines, out / "timeline.json", schedule)
    save_chrome_trace(timelines[-1], out / "trace.json")
    result = compare(schedule, timelines)
    print(f"\nlast {len(timelines)} steps, simulated with their measured per-action costs vs measured:\n"
          f"{result.report()}")
    try:
        from pipetrain.viz import save_comparison

        save_comparison(result.predicted.timeline, timelines[-1], out / "timeline.png", title=schedule.name)
    except ImportError as err:
        print(f"(no picture: {err})")
    print(f"wrote {out / 'timeline.json'}, {out / 'trace.json'} and {out / 'timeline.png'}")


if __name__ == "__main__":
    main()
