"""The reference GPT in JAX, timed two ways: jit on one CPU device, and GPipe over 2 host devices.

Run by benchmarks/run.py in its own process when `jax` is installed (it never is a pipetrain dependency):
    python benchmarks/jax_gpt.py --d-model 256 --layers 8 --heads 8 --seq-len 128 --batch-size 32 --microbatches 8
Prints one JSON object: {"single": [step seconds...], "gpipe": [...]}.

The architecture matches pipetrain.models.gpt: token + position embedding, pre-norm blocks (causal
attention with a fused qkv projection, a 4x GELU MLP), final norm and a bias-free head, mean cross-entropy.
GPipe pipelines the transformer blocks: each of the 2 devices holds half of them, microbatches move between
devices with ppermute inside shard_map, and autodiff turns the forward loop into the backward schedule.
Embedding and head run replicated on both devices (they are small next to the blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import shard_map  # noqa: E402  (jax >= 0.7)
from jax.sharding import Mesh, PartitionSpec  # noqa: E402


def init(key, vocab, seq, d, layers, heads):
    k = iter(jax.random.split(key, 8))
    normal = jax.nn.initializers.normal(0.02)
    blocks = {
        "ln1": jnp.ones((layers, d)), "ln1b": jnp.zeros((layers, d)),
        "qkv": normal(next(k), (layers, d, 3 * d)), "qkvb": jnp.zeros((layers, 3 * d)),
        "proj": normal(next(k), (layers, d, d)), "projb": jnp.zeros((layers, d)),
        "ln2": jnp.ones((layers, d)), "ln2b": jnp.zeros((layers, d)),
        "fc": normal(next(k), (layers, d, 4 * d)), "fcb": jnp.zeros((layers, 4 * d)),
        "out": normal(next(k), (layers, 4 * d, d)), "outb": jnp.zeros((layers, d)),
    }
    return {"tok": normal(next(k), (vocab, d)), "pos": normal(next(k), (seq, d)), "blocks": blocks,
            "lnf": jnp.ones(d), "lnfb": jnp.zeros(d), "head": normal(next(k), (d, vocab))}, heads


def layer_norm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * w + b


def block(p, x, heads):
    b, t, d = x.shape  # (b, t, d)
    q, k, v = jnp.split(layer_norm(x, p["ln1"], p["ln1b"]) @ p["qkv"] + p["qkvb"], 3, axis=-1)
    q, k, v = (z.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3) for z in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(d // heads)  # (b, h, t, t)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    y = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = x + y @ p["proj"] + p["projb"]
    h = jax.nn.gelu(layer_norm(x, p["ln2"], p["ln2b"]) @ p["fc"] + p["fcb"], approximate=False)
    return x + h @ p["out"] + p["outb"]


def run_blocks(blocks, x, heads):
    return jax.lax.scan(lambda h, p: (block(p, h, heads), None), x, blocks)[0]


def loss_from_hidden(params, h, y):
    logits = layer_norm(h, params["lnf"], params["lnfb"]) @ params["head"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()


def embed(params, x):
    return params["tok"][x] + params["pos"][: x.shape[1]]


def single_step(heads, m):
    """One device: the microbatches accumulated, as pipetrain's single-process baseline does."""

    def loss(params, xs, ys):
        def one(total, xy):
            x, y = xy
            return total + loss_from_hidden(params, run_blocks(params["blocks"], embed(params, x), heads), y) / m, None

        return jax.lax.scan(one, 0.0, (xs, ys))[0]

    return jax.jit(jax.value_and_grad(loss))


def gpipe_step(heads, m, mesh, blocks):
    """GPipe over the mesh's 'pp' axis: ticks t = 0..M+P-2, device i runs microbatch t-i on its blocks."""
    stages = mesh.shape["pp"]

    def pipelined(blocks, hs):  # per device: its half of the blocks; hs (M, mb, t, d) replicated
        i = jax.lax.axis_index("pp")
        state = jnp.zeros_like(hs[0])
        outs = jnp.zeros_like(hs)
        for t in range(m + stages - 1):
            inp = jnp.where(i == 0, hs[min(t, m - 1)], state)
            out = run_blocks(blocks, inp, heads)
            done = t - (stages - 1)
            if done >= 0:
                outs = outs.at[done].set(jnp.where(i == stages - 1, out, outs[done]))
            state = jax.lax.ppermute(out, "pp", [(j, (j + 1) % stages) for j in range(stages)])
        return jax.lax.psum(jnp.where(i == stages - 1, outs, 0.0), "pp")

    layer_axis = jax.tree_util.tree_map(lambda _: PartitionSpec("pp"), blocks)  # split the stacked blocks
    run = shard_map(pipelined, mesh=mesh, in_specs=(layer_axis, PartitionSpec()), out_specs=PartitionSpec(),
                    check_vma=False)

    def loss(params, xs, ys):
        hs = jax.vmap(lambda x: embed(params, x))(xs)
        outs = run(params["blocks"], hs)
        return jax.vmap(lambda h, y: loss_from_hidden(params, h, y))(outs, ys).mean()

    return jax.jit(jax.value_and_grad(loss))


def timed(step, params, xs, ys, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(step(params, xs, ys))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, xs, ys))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in (("vocab", 256), ("seq-len", 128), ("d-model", 256), ("layers", 8), ("heads", 8),
                          ("batch-size", 32), ("microbatches", 8), ("repeats", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    params, heads = init(jax.random.PRNGKey(0), a.vocab, a.seq_len, a.d_model, a.layers, a.heads)
    key = jax.random.PRNGKey(1)
    xs = jax.random.randint(key, (a.microbatches, a.batch_size // a.microbatches, a.seq_len), 0, a.vocab)
    ys = jax.random.randint(jax.random.fold_in(key, 1), xs.shape, 0, a.vocab)
    single = timed(single_step(heads, a.microbatches), params, xs, ys, a.repeats)
    mesh = Mesh(jax.devices()[:2], ("pp",))
    gpipe = timed(gpipe_step(heads, a.microbatches, mesh, params["blocks"]), params, xs, ys, a.repeats)
    print(json.dumps({"jax": jax.__version__, "devices": len(jax.devices()), "single": single, "gpipe": gpipe}))


if __name__ == "__main__":
    main()
