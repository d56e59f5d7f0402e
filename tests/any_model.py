"""A model that passes what real models pass between layers (tuples and dicts with an int mask, position ids,
a constant and two float streams), a top-2 mixture-of-experts layer with a load-balancing loss, and the
scenarios that train it on every rank, with their single-process references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from workers import _RNG_LOCK, built_alone

import pipetrain as pt
from pipetrain.train.loader import share

VOCAB, D, PAD = 16, 8, 0


class Embed(nn.Module):
    """ids (b, t) -> (hidden (b, t, d), mask (b, t) bool, positions (b, t) int64)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)

    def forward(self, ids):
        mask = ids != PAD
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        return self.tok(ids), mask, pos


class ToDict(nn.Module):
    """(h, mask, pos) -> {"h", "mask", "pos", "skip" (a second float stream), "scale" (a float constant)}."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(32, D)
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h, mask, pos = x
        h = h + self.pos(pos)
        scale = torch.full(mask.shape, 0.5)  # float, no grad: travels forward only
        return {"h": torch.tanh(self.lin(h)) * mask[..., None], "mask": mask, "pos": pos, "skip": h, "scale": scale}


class DictBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = x["h"] + torch.tanh(self.lin(x["h"])) * x["scale"][..., None] * x["mask"][..., None]
        return {**x, "h": h}


class MoE(nn.Module):
    """Top-2 of 4 experts per token; adds a Switch-style load-balancing loss with pt.add_aux_loss."""

    def __init__(self, aux_weight: float) -> None:
        super().__init__()
        self.router = nn.Linear(D, 4)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(4))
        self.aux_weight = aux_weight

    def forward(self, x):
        h = x["h"]
        probs = self.router(h).softmax(-1)  # (b, t, 4)
        top, idx = probs.topk(2, dim=-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            weight = (top * (idx == e)).sum(-1, keepdim=True)  # (b, t, 1), 0 where e is not chosen
            out = out + weight * expert(h)
        if self.aux_weight:
            chosen = F.one_hot(idx, 4).sum(-2).float().flatten(0, 1)  # (b*t, 4)
            load = chosen.mean(0) / 2
            pt.add_aux_loss(self.aux_weight * 4 * (load * probs.flatten(0, 1).mean(0)).sum())
        return {**x, "h": h + out}


class ToTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x["h"] + x["skip"]), x["mask"]


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, VOCAB)

    def forward(self, x):
        h, mask = x
        return self.proj(h * mask[..., None])


def build(aux_weight: float = 0.0) -> list[nn.Module]:
    """8 layers: a tuple boundary, dict boundaries, the MoE layer in the middle (index 3), a tuple again."""
    with _RNG_LOCK:  # in-process ranks are threads sharing torch's global RNG
        torch.manual_seed(0)
        return [Embed(), ToDict(), DictBlock(), MoE(aux_weight), DictBlock(), DictBlock(), ToTuple(), Head()]


def mean_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def token_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"), \
        (labels != -100).sum()


def batch(rows: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids with padding at the end of some rows; labels (a function of the ids) -100 at padding and at random
    other places, so each microbatch counts a different number of tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
    lengths = torch.randint(1, seq + 1, (rows,), generator=g)
    ids[torch.arange(seq)[None, :] >= lengths[:, None]] = PAD
    labels = (3 * ids + 1) % VOCAB  # learnable
    labels[(ids == PAD) | (torch.rand(rows, seq, generator=g) < 0.3)] = -100
    return ids, labels


# --- what each rank runs ---------------------------------------------------------------------------------
def run(rank: int, world: int, schedule: str, kind: str, steps: list, transport=None, checkpoint=False,
        microbatches: int | None = None, group_kw: dict | None = None) -> dict:
    """Train `build()` on `steps`, a list of optimizer-free accumulation steps; each step is a dict with
    "batch": (ids, labels) or "microbatches": [(ids, labels), ...], plus step() keywords. Returns this
    rank's gradients by (layer index, name), the losses and the reported auxiliary losses."""
    layers = built_alone(transport, build, 0.1 if "aux" in kind else 0.0)
    m = microbatches or 2 * world
    sched = pt.schedules.build(schedule, num_ranks=world, num_microbatches=m)
    loss_fn = token_loss if kind.startswith("token") else mean_loss
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport, timeout=30,
                       checkpoint=checkpoint, **(group_kw or {}))
    losses, aux = [], []
    for step in steps:
        kwargs = {k: v for k, v in step.items() if k not in ("batch", "microbatches")}
        if "batch" in step:
            x, y = step["batch"]
            x, y = share((x, y), pipe.dp_size, pipe.dp_rank)
            losses.append(pipe.step(x, y, **kwargs))
        else:
            losses.append(pipe.step(microbatches=step["microbatches"], **kwargs))
        aux.append(pipe.last_step.aux_loss)
    assert all(not s.pending() for s in pipe.stages.values()), "activations left after the step"
    grads = {}
    for name, p in pipe.named_parameters():
        i, rest = name.split(".", 1)
        grads[(int(i), rest)] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return {"grads": grads, "losses": losses, "aux": aux}


def reference(kind: str, steps: list, m: int) -> dict:
    """The same objective in one process, microbatch by microbatch (the load-balancing loss depends on
    which tokens share a microbatch): mean: sum of (loss + aux) * scale / M; token: loss_sum / (the window's
    count) + aux * scale / M."""
    layers = build(aux_weight=0.1 if "aux" in kind else 0.0)
    model = nn.Sequential(*layers)
    window_count = sum(int((mb[1] != -100).sum()) for step in steps for mb in _mbs(step, m))
    losses, aux_reported = [], []
    for step in steps:
        scale = step.get("scale", 1.0)
        num, den, aux_total = 0.0, 0, 0.0
        for x, y in _mbs(step, m):
            with pt.collect_aux_losses() as aux:
                logits = model(x)
            aux_sum = sum(aux) if aux else torch.zeros(())
            if kind.startswith("token"):
                loss_sum, count = token_loss(logits, y)
                objective = loss_sum / window_count + aux_sum * scale / m
                num, den = num + loss_sum.item(), den + int(count)
            else:
                loss = mean_loss(logits, y)
                objective = (loss + aux_sum) * scale / m
                num, den = num + loss.item(), den + 1
            objective.backward()
            aux_total += float(aux_sum.detach()) / m
        losses.append(num / den)
        aux_reported.append(aux_total)
    grads = {(i, n): p.grad for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    return {"grads": grads, "losses": losses, "aux": aux_reported, "window_count": window_count}


def _mbs(step: dict, m: int) -> list:
    if "microbatches" in step:
        return step["microbatches"]
    x, y = step["batch"]
    return list(zip(x.tensor_split(m), y.tensor_split(m), strict=True))


def assert_matches(results_by_rank: dict | list, ref: dict, *, tol: float = 1e-5) -> None:
    ranks = results_by_rank.values() if isinstance(results_by_rank, dict) else results_by_rank
    grads = {}
    for r in ranks:
        grads.update(r["grads"])
        assert r["losses"] == [pytest_approx(v) for v in ref["losses"]], (r["losses"], ref["losses"])
        assert r["aux"] == [pytest_approx(v) for v in ref["aux"]], (r["aux"], ref["aux"])
    assert grads.keys() == ref["grads"].keys()
    for name, want in ref["grads"].items():
        if want is None:
            continue
        err = (grads[name] - want).norm() / want.norm().clamp_min(1e-6)
        assert err <= tol, f"grad {name}: relative error {err:.2e}"


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-5, abs=1e-7)


def run_dp(rank: int, world: int, dp: int, schedule: str, kind: str, steps: list) -> dict:
    """`run` on a (dp, pp) DeviceMesh of spawned gloo ranks; each replica takes its share of every batch."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "pp"))
    return run(rank, world // dp, schedule, kind, steps, group_kw={"mesh": mesh})


class Counting:
    """A transport that counts the point-to-point messages it sends."""

    def __init__(self, inner) -> None:
        self.inner, self.sent = inner, 0
        self.rank, self.world_size, self.device = inner.rank, inner.world_size, inner.device
        self.test_barrier = getattr(inner, "test_barrier", None)

    def isend(self, tensor, peer):
        self.sent += 1
        return self.inner.isend(tensor, peer)

    def irecv(self, tensor, peer):
        return self.inner.irecv(tensor, peer)

    def all_reduce(self, tensor, timeout):
        return self.inner.all_reduce(tensor, timeout)

    def abort(self, reason):
        self.inner.abort(reason)


def count_messages(rank: int, world: int, model: str, seqs: list[int], transport=None) -> list[int]:
    """Messages this rank sends in each step (one step per sequence length in `seqs`)."""
    counting = Counting(transport)
    if model == "tree":
        layers, loss_fn = build(), mean_loss
    else:
        with _RNG_LOCK:
            torch.manual_seed(0)
            layers, loss_fn = [nn.Linear(D, D) for _ in range(4)], F.mse_loss
    sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=4)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=counting, timeout=30)
    counts = []
    for i, seq in enumerate(seqs):
        before = counting.sent
        if model == "tree":
            pipe.step(*batch(8, seq, i))
        else:
            pipe.step(torch.randn(8, seq, D), torch.randn(8, seq, D))
        counts.append(counting.sent - before)
    return counts


# --- the Trainer on this model ---------------------------------------------------------------------------
class TokenRows(torch.utils.data.Dataset):
    """A map-style dataset of (ids, labels) rows."""

    def __init__(self, rows: int, seq: int, seed: int) -> None:
        self.ids, self.labels = batch(rows, seq, seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.labels[i]


class Stream:
    """An endless iterable of global batches with no state of its own (resuming replays it)."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows, self.seed = rows, seed

    def __iter__(self):
        k = 0
        while True:
            yield batch(self.rows, 5 + k % 3, self.seed + k)  # sequence lengths 5, 6, 7, 5, ...
            k += 1


def train_any(rank: int, world: int, settings: dict, data_kind: str, as_pipeline: bool = False) -> dict:
    """pt.Trainer on `build()` with a token-mean loss: from a map-style dataset ("map") or a stream."""
    config = pt.TrainConfig.from_dict(settings)
    data = TokenRows(64, 6, 0) if data_kind == "map" else Stream(config.batch_size, 0)
    model = build(aux_weight=0.0)
    if as_pipeline:
        sched = pt.schedules.build(config.schedule, num_ranks=world, num_microbatches=config.microbatches)
        model = pt.Pipeline(model, schedule=sched, loss_fn=token_loss)
    trainer = pt.Trainer(model, loss_fn=None if as_pipeline else token_loss, data=data, config=config,
                         eval_data=TokenRows(16, 6, 1), model_info={"name": "any_model"})
    history = trainer.fit()
    params = {name: p.detach().clone() for name, p in trainer.pipe.named_parameters()}
    return {"losses": [r["loss"] for r in history], "eval": [r.get("eval_loss") for r in history], "params": params,
            "history": history}
