"""The local machine as a cluster: its devices are CPU cores (one pipeline rank per core, 1 thread each).

Measured in a few seconds: the fp32 matmul peak of one core, and how much of it one transformer block of
the model being planned reaches in forward + backward (its `achievable` fraction), and the copy bandwidth
for transfers between ranks.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import TYPE_CHECKING

from .specs import ClusterSpec, ModelSpec

if TYPE_CHECKING:
    import torch


def local_cluster(model: ModelSpec | None = None, microbatch_size: int = 4) -> ClusterSpec:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = measure_peak_flops(torch.device("cpu"))
        achievable = _block_efficiency(model, microbatch_size, peak) if model is not None else 0.5
        bandwidth = _copy_bandwidth()
    finally:
        torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / cores
    what = f"one {model.name} block" if model is not None else "no block measured (0.5 assumed)"
    return ClusterSpec("local", cores, {"fp32": peak}, memory, cores, bandwidth, bandwidth, nic_latency=2e-4,
                       domain_latency=2e-4, achievable=achievable, memory_reserved=0.2, dtype="fp32", backend="gloo",
                       notes=f"this machine: {cores} CPU cores as devices (1 thread each); measured matmul peak "
                             f"{peak / 1e9:.1f} GFLOP/s, {what} at {achievable:.0%} of it, copies at "
                             f"{bandwidth / 1e9:.1f} GB/s")


def _block_efficiency(model: ModelSpec, microbatch_size: int, peak: float) -> float:
    """Forward + backward of one block of `model` (the reference GPT block: plain GELU MLP, full
    attention heads), timed; its FLOPs by the planner's count over the time, as a fraction of `peak`."""
    import torch

    from ..models.gpt import GPTConfig, build_gpt

    # a block of a large model is measured scaled down (shorter sequence, then narrower), to about 2e10
    # FLOPs a step: a fraction of a second, and never out of memory; its efficiency is then an estimate
    block_model = model
    while 3 * block_model.layer_forward_flops(microbatch_size * block_model.seq) > 2e10 and block_model.seq > 128:
        block_model = dataclasses.replace(block_model, seq=block_model.seq // 2)
    while 3 * block_model.layer_forward_flops(microbatch_size * block_model.seq) > 2e10 and block_model.heads > 1:
        block_model = dataclasses.replace(block_model, hidden=block_model.hidden // 2, ffn=block_model.ffn // 2,
                                          heads=block_model.heads // 2, kv_heads=None)
    cfg = GPTConfig(vocab_size=model.vocab, seq_len=block_model.seq, d_model=block_model.hidden, n_layers=1,
                    n_heads=block_model.heads, d_ff=block_model.ffn)
    torch.manual_seed(0)
    block = build_gpt(cfg)[1]
    x = torch.randn(microbatch_size, block_model.seq, block_model.hidden, requires_grad=True)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        block(x).sum().backward()
        times.append(time.perf_counter() - start)
    flops = 3 * block_model.layer_forward_flops(microbatch_size * block_model.seq)
    return min(1.0, flops / statistics.median(times[1:]) / peak)


def _copy_bandwidth(seconds: float = 0.2) -> float:
    """Bytes/s of copying a 4 MiB tensor (what a loopback transfer costs at the least)."""
    import torch

    src = torch.empty(1 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dst.copy_(src)
        count += 1
    return count * src.numel() * 4 / (time.perf_counter() - start)


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None = None, seconds: float = 0.3) -> float:
    """FLOP/s of a large square matmul on this device and thread setting: the denominator of MFU.

    A measured peak keeps MFU honest on CPUs, whose datasheet peaks are rarely reachable from PyTorch.
    """
    import torch

    dtype = dtype or torch.float32
    n = 512 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= 3:
            return 2.0 * n**3 * runs / elapsed
