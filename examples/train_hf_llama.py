"""Bring a Hugging Face model: a small Llama built from a config, trained with a pipeline on the Python stdlib's
source (bytes), saved as a Hugging Face checkpoint and loaded back with `transformers`.

Launch (CPU, 2 ranks):  torchrun --standalone --nproc-per-node 2 examples/train_hf_llama.py --out runs/hf-llama
Then, anywhere:          AutoModelForCausalLM.from_pretrained("runs/hf-llama")
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import pipetrain as pt
from pipetrain.models.hf import from_hf, save_pretrained
from pipetrain.train.data import CausalLMBatches, load_corpus


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hf-llama", help="where the trained model goes (HF safetensors)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--schedule", default="1f1b", choices=pt.schedules.names())
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len + 1)
    with torch.device("meta"):  # no memory yet: each rank materializes only its own stages
        model = LlamaForCausalLM(config)
    layers, loss_fn = from_hf(model)  # embedding, 4 decoder layers, norm + head; HF's token-mean loss
    schedule = pt.schedules.build(args.schedule, num_ranks=dist.get_world_size(), num_microbatches=args.microbatches)
    pipe = pt.Pipeline(layers, schedule=schedule, loss_fn=loss_fn, balance="params", seed=0)
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=args.lr)

    corpus = load_corpus(max_bytes=2_000_000)
    train = CausalLMBatches(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    held_out = CausalLMBatches(corpus.val, batch_size=args.batch_size, seq_len=args.seq_len, seed=1).next()
    before = pipe.evaluate(*held_out)
    for step in range(1, args.steps + 1):
        inputs, labels = train.next()  # ({"input_ids": (b, t + 1)}, labels = the ids; the loss shifts them)
        loss = pipe.step(inputs, labels)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % args.log_every == 0:
            print(f"step {step:4d} | loss {loss:.4f}", flush=True)
    after = pipe.evaluate(*held_out)
    save_pretrained(pipe, args.out)  # every rank writes its own stages; rank 0 the index and config.json
    if rank == 0:
        print(f"held-out loss {before:.4f} -> {after:.4f}; saved to {args.out}")
        loaded = AutoModelForCausalLM.from_pretrained(args.out)
        with torch.no_grad():
            again = loaded(**held_out[0], labels=held_out[1]).loss.item()
        print(f"transformers loads it back: held-out loss {again:.4f} (the pipeline's: {after:.4f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
