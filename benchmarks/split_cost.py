"""What splitting the backward costs: I + W against a full B on one stage, for the reference GPT and Llama.

    python benchmarks/split_cost.py            # 4 blocks d256, microbatch 4 x 128, 1 thread
    python benchmarks/split_cost.py --json

Two copies of the same stage run alternately, in a random order each repetition (the CPU's caches favour
whatever ran last): one with a full backward (B), one split into I then W, as zero-bubble schedules run it.
Reports the median of each and (I + W) / B; with deferred linear weight products (deferred_linear.py) W is
only the linears' weight matmuls, so the ratio is what splitting costs beyond them. Each model runs twice,
in fresh processes: with malloc keeping freed memory (what a CPU Stage sets, host_memory.py) and with glibc's
default (PIPETRAIN_KEEP_FREED_MEMORY=0), under which I pays page faults for the pairs it keeps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

from pipetrain.models.gpt import GPTConfig, build_gpt
from pipetrain.models.llama import LlamaConfig, build_llama
from pipetrain.runtime.host_memory import keep_freed_memory
from pipetrain.runtime.stage import Stage
from pipetrain.runtime.values import Packet, Signature, flatten


def stage_blocks(model: str, d_model: int, blocks: int, seq: int) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    if model == "gpt":
        return build_gpt(GPTConfig(seq_len=seq, d_model=d_model, n_layers=blocks, n_heads=8))[1:-1]
    return build_llama(LlamaConfig(seq_len=seq, d_model=d_model, n_layers=blocks, n_heads=8, n_kv_heads=4))[1:-1]


def measure(model: str, *, d_model: int = 256, blocks: int = 4, rows: int = 4, seq: int = 128, reps: int = 40) -> dict:
    layers = stage_blocks(model, d_model, blocks, seq)
    full = Stage(1, 3, copy.deepcopy(layers))
    split = Stage(1, 3, layers, split_backward=True)
    x, g = torch.randn(rows, seq, d_model), torch.randn(rows, seq, d_model)
    _, spec = flatten(x)
    packet = Packet([x], Signature.of([x.clone().requires_grad_(True)], spec))
    times: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}

    def timed(op: str, fn) -> None:
        start = time.perf_counter()
        fn()
        times[op].append(time.perf_counter() - start)

    def run_full() -> None:
        full.forward(0, packet)
        timed("B", lambda: full.backward(0, [g]))

    def run_split() -> None:
        timed("F", lambda: split.forward(0, packet))
        timed("I", lambda: split.backward_input(0, [g]))
        timed("W", lambda: split.backward_weight(0))

    order = random.Random(0)
    for _ in range(reps + 3):
        for fn in order.sample([run_full, run_split], 2):
            fn()
    ms = {op: statistics.median(v[3:]) * 1e3 for op, v in times.items()}
    return {"model": model, "d_model": d_model, "blocks": blocks, "rows": rows, "seq": seq, "ms": ms,
            "ratio": (ms["I"] + ms["W"]) / ms["B"], "malloc": "kept" if keep_freed_memory() else "default"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=["gpt", "llama"], help="one model, in this process (default: each in its own)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        results = [measure(args.model, d_model=args.d_model, blocks=args.blocks, rows=args.rows, seq=args.seq,
                           reps=args.reps)]
    else:  # a fresh process per model: what one leaves in the allocator and caches slows the next
        flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        results = [json.loads(subprocess.run([sys.executable, __file__, *flags, "--model", m, "--json"],
                                             capture_output=True, text=True, check=True,
                                             env={**os.environ, "PIPETRAIN_KEEP_FREED_MEMORY": keep}).stdout)[0]
                   for m in ("gpt", "llama") for keep in ("1", "0")]
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        ms = r["ms"]
        print(f"{r['model']:5s} {r['blocks']} blocks d{r['d_model']}, {r['rows']}x{r['seq']}: F {ms['F']:.1f} ms, "
              f"B {ms['B']:.1f}, I {ms['I']:.1f} + W {ms['W']:.1f} -> (I + W) / B = {r['ratio']:.3f} "
              f"(malloc {r['malloc']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
