"""Every rank must start from the same model: each rank builds the whole list of layers and keeps its own
stages, so ranks that built different weights would silently train a model stitched from several.

Different weights come from an unseeded build in each process, or from in-process ranks (threads), which
share torch's one global random generator: `torch.manual_seed(0); build()` in each thread interleaves
their draws. One all-reduce of a fingerprint per layer finds it before the first step, on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.comm import Transport, rank_name

SAMPLES = 1024  # elements of each parameter in its fingerprint (evenly spaced): a different draw changes all


def fingerprint(layer: nn.Module) -> tuple[float, float, float]:
    """(1 if its parameters have values (not meta), a sum and a position-weighted sum of a sample of them)."""
    total = weighted = 0.0
    for p in layer.parameters():
        if p.is_meta:
            return 0.0, 0.0, 0.0
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p  # split by tensor parallel: collective over tp
        flat = whole.detach().reshape(-1)
        sample = torch.nan_to_num(flat[::max(1, flat.numel() // SAMPLES)][:SAMPLES].double().cpu())
        total += float(sample.sum())
        weighted += float((sample * torch.arange(1, sample.numel() + 1, dtype=torch.float64)).sum())
    return 1.0, total, weighted


def check_same_weights(layers: list[nn.Module], transport: Transport, timeout: float) -> None:
    """Raise on every rank, naming a layer and the two ranks, if the ranks built different weights for a layer
    (layers on the meta device on any rank are not compared: `Pipeline(seed=...)` initializes those alike)."""
    world, rank = transport.world_size, transport.rank
    if world == 1:
        return
    table = torch.zeros(world, len(layers), 3, dtype=torch.float64, device=transport.device)
    table[rank] = torch.tensor([fingerprint(layer) for layer in layers], dtype=torch.float64)
    table = transport.all_reduce(table, timeout).cpu()
    for i in range(len(layers)):
        if not bool((table[:, i, 0] == 1).all()):
            continue
        for r in range(1, world):
            if not torch.equal(table[r, i], table[0, i]):
                raise ValueError(
                    f"{rank_name(transport, r)} built different weights for layer {i} ({type(layers[i]).__name__}) "
                    f"than {rank_name(transport, 0)}: every rank must build the same model. Seed before building "
                    "(torch.manual_seed(0)) in every process; ranks in one process (threads) share torch's random "
                    "generator, so build the layers once and give each thread a copy.deepcopy, build under a lock, "
                    "or build on the meta device and pass Pipeline(seed=...)")
