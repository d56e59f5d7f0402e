"""A model that passes (hidden, mask, positions) between stages, trained on lines of the Python standard
library batched by length, so the sequence length changes from step to step, with an exact token-mean loss.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/train_any_model.py --steps 100

Every layer takes the previous layer's output as its one argument: here a tuple of a float tensor (which
gets its gradient back), a bool padding mask and int64 position ids (which travel forward only). The loss
returns (sum, count): pipetrain then divides by the number of real tokens in the whole batch, however they
fall across microbatches. pt.Trainer does the rest (optimizer, schedule, evaluation, checkpoints).
"""

from __future__ import annotations

import argparse
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pipetrain as pt
from pipetrain.train.data import stdlib_files

PAD = 0  # byte 0 never occurs in source text


class Embed(nn.Module):
    """ids (b, t) -> (hidden (b, t, d), mask (b, t) bool: a real token, positions (b, t) int64)."""

    def __init__(self, d: int, max_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(max_len, d)

    def forward(self, ids):
        mask = ids != PAD
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.tok(ids) + self.pos(pos), mask, pos


class Block(nn.Module):
    """Pre-norm causal self-attention over the real tokens, then an MLP: (h, mask, pos) -> (h, mask, pos)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h, mask, pos = x
        b, t, d = h.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(h)).split(d, dim=2))  # each (b, heads, t, d / heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        allowed = causal & mask[:, None, None, :]  # (b, 1, t, t): earlier real tokens only
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h)), mask, pos


class Head(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, x):
        h, _, _ = x
        return self.out(self.ln(h))  # (b, t, 256)


def token_mean_loss(logits, labels):
    """(sum of the cross-entropy over real tokens, their number): an exact token mean over the batch."""
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


class LineBatches:
    """Endless batches of source lines of similar length, padded to the longest: inputs (b, t) and
    next-byte labels (b, t), -100 where there is no next byte. Resumable (its state is its RNG)."""

    def __init__(self, lines: list[bytes], batch_size: int, seed: int) -> None:
        self.buckets: dict[int, list[bytes]] = {}
        for line in lines:  # lengths 9-16 -> bucket 16, 17-24 -> 24, ... up to 64 bytes
            self.buckets.setdefault(min(64, 8 * -(-len(line) // 8)), []).append(line)
        self.buckets = {n: b for n, b in self.buckets.items() if len(b) >= batch_size}
        self.batch_size, self.rng = batch_size, random.Random(seed)

    def __iter__(self):
        return self

    def __next__(self):
        width = self.rng.choice(sorted(self.buckets))
        lines = self.rng.sample(self.buckets[width], self.batch_size)
        rows = torch.zeros(self.batch_size, width + 1, dtype=torch.long)
        for i, line in enumerate(lines):
            rows[i, :len(line)] = torch.tensor(list(line[:width + 1]))
        ids, labels = rows[:, :-1].clone(), rows[:, 1:].clone()
        labels[labels == PAD] = -100
        return ids, labels

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


def stdlib_lines(max_files: int) -> tuple[list[bytes], list[bytes]]:
    """Non-empty lines of 9-64 bytes (newline included); every 10th file held out."""
    train, held_out = [], []
    for i, path in enumerate(stdlib_files()[:max_files]):
        lines = [line for line in path.read_bytes().splitlines(keepends=True) if 9 <= len(line) <= 65]
        (held_out if i % 10 == 9 else train).extend(lines)
    return train, held_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--files", type=int, default=300, help="stdlib files to read lines from")
    p.add_argument("--checkpoint-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # every rank builds the same model, then keeps its own stages
    layers = [Embed(args.d_model, 64), *(Block(args.d_model, 4) for _ in range(args.layers)), Head(args.d_model)]
    train, held_out = stdlib_lines(args.files)
    config = pt.TrainConfig(schedule=args.schedule, microbatches=args.microbatches, batch_size=args.batch_size,
                            steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup=10, eval_every=50,
                            eval_batches=4, log_every=10, checkpoint_dir=args.checkpoint_dir, progress=False)
    trainer = pt.Trainer(layers, loss_fn=token_mean_loss, data=LineBatches(train, args.batch_size, seed=1),
                         eval_data=LineBatches(held_out, args.batch_size, seed=2), config=config,
                         model_info={"name": "line model", "layers": args.layers, "d_model": args.d_model})
    trainer.fit()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
