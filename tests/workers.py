"""Scenarios run on every rank (as threads in-process, or as spawned gloo processes) and their runners."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import torch
from torch import nn

import pipetrain as pt
from pipetrain import spawn
from pipetrain.models.gpt import GPTConfig, build_gpt, gpt_loss
from pipetrain.runtime.tensor_parallel import whole

STEPS = 5  # optimizer steps per exactness scenario: the loss curve checks updates, step 0 the gradients
_RNG_LOCK = threading.Lock()  # in-process ranks are threads sharing torch's global RNG


def make_model(kind: str, num_microbatches: int):
    """(layers, loss_fn, inputs, targets), the same on every rank and in the reference."""
    with _RNG_LOCK:
        return _make_model(kind, num_microbatches)


def _make_model(kind: str, num_microbatches: int):
    torch.manual_seed(0)
    batch = 2 * num_microbatches
    if kind == "gpt":
        cfg = GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=6, n_heads=2)  # 8 layers
        layers = build_gpt(cfg)
        x = torch.randint(0, 64, (batch, 8))
        return layers, gpt_loss, x, torch.randint(0, 64, (batch, 8))
    layers = [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16),
              nn.Sigmoid(), nn.Linear(16, 3)]
    return layers, nn.functional.mse_loss, torch.randn(batch, 6), torch.randn(batch, 3)


def seeded(build, *args, seed: int = 0):
    """build(*args) after torch.manual_seed(seed), one thread at a time: the same weights on every in-process
    rank (threads share torch's global RNG), as Pipeline's same-weights check requires."""
    with _RNG_LOCK:
        torch.manual_seed(seed)
        return build(*args)


def built_alone(transport, build, *args):
    """build(*args) while no other in-process rank computes: ranks that are threads share torch's global RNG,
    which building draws from and which profiling (balance="time", schedule="auto") and checkpoint
    recomputation restore when they finish. Spawned ranks (no test barrier) just build."""
    barrier = getattr(transport, "test_barrier", None)
    if barrier is not None:
        barrier.wait()
    built = build(*args)
    if barrier is not None:
        barrier.wait()
    return built


def reference(kind: str, num_microbatches: int) -> dict:
    """Single-process training of the same layers on the same batch: first loss, grads, loss curve."""
    layers, loss_fn, x, y = make_model(kind, num_microbatches)
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    curve, grads = [], None
    for step in range(STEPS):
        loss = loss_fn(model(x), y)
        loss.backward()
        if step == 0:
            grads = {(i, n): p.grad.clone() for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
        curve.append(loss.item())
        opt.step()
        opt.zero_grad()
    return {"grads": grads, "curve": curve}


def train(rank: int, world: int, schedule: str | pt.schedules.Schedule, kind: str, num_microbatches: int,
          transport=None, split_directions: bool | None = None, checkpoint: bool = False) -> dict:
    """The pipelined version of `reference`, as seen by one rank (`schedule`: a name, or a built one)."""
    layers, loss_fn, x, y = built_alone(transport, make_model, kind, num_microbatches)
    sched = (schedule if isinstance(schedule, pt.schedules.Schedule) else
             pt.schedules.build(schedule, num_ranks=world, num_microbatches=num_microbatches))
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, transport=transport, timeout=30,
                       split_directions=split_directions, checkpoint=checkpoint)
    params = list(pipe.parameters())  # a stage may hold only parameter-free layers (e.g. GELU)
    opt = torch.optim.AdamW(params, lr=1e-2) if params else None
    curve, grads = [], None
    for step in range(STEPS):
        curve.append(pipe.step(x, y))
        if step == 0:
            grads = {(i, n): p.grad.clone() for i, layer in enumerate(layers) if any(
                i in r for r in (pipe.layer_ranges[s] for s in pipe.stages)) for n, p in layer.named_parameters()}
        if opt is not None:
            opt.step()
            opt.zero_grad()
    assert all(not s.pending() for s in pipe.stages.values()), "activations left after the step"
    if (barrier := getattr(transport, "test_barrier", None)) is not None:  # in-process ranks leave together
        barrier.wait()
    directions = sorted(getattr(pipe.transport, "_direction_groups", {}))
    return {"grads": grads, "curve": curve, "balance": pipe.balance, "directions": directions}


SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv", "looped-bfs", "dualpipev")


def all_scenarios(rank: int, world: int, transport=None) -> dict:
    """Every schedule on both models; with activation checkpointing on every stage for the split-backward
    and interleaved schedules too (the third key element says whether it was on)."""
    out = {}
    m = 2 * world
    for kind in ("gpt", "mlp"):
        for schedule in SCHEDULES:
            out[(kind, schedule, m)] = train(rank, world, schedule, kind, m, transport)
    for schedule in ("1f1b", "zb-h1", "zbv", "interleaved-1f1b"):
        out[("gpt", f"{schedule}+checkpoint", m)] = train(rank, world, schedule, "gpt", m, transport,
                                                           checkpoint=True)
    for per_rank in (1, 2):
        out[("gpt", f"zb-auto/{per_rank}", m)] = train(rank, world, uneven_zb_auto(world, m, per_rank), "gpt", m,
                                                        transport)
    return out


def uneven_zb_auto(world: int, num_microbatches: int, stages_per_rank: int) -> pt.schedules.Schedule:
    """zb-auto built for a heavy last stage, cheap weight gradients and twice 1F1B's memory: an order no
    hand-written schedule has (tests/test_zb_auto.py checks that it differs from zb-h1's and zbv's)."""
    n = world * stages_per_rank
    costs = pt.schedules.Costs(f=[1.0] * (n - 1) + [3.0], b=[1.5] * (n - 1) + [4.0], w=[0.5] * n, comm=0.2)
    return pt.schedules.build("zb-auto", num_ranks=world, num_microbatches=num_microbatches,
                              stages_per_rank=stages_per_rank, costs=costs, memory_limit=2 * world)


def split_direction_scenario(rank: int, world: int) -> dict:
    """The NCCL communicator layout (one group per direction), exercised over gloo."""
    os.environ["PIPETRAIN_SHARED_MEMORY"] = "0"  # (the communicators carry the transfers only over gloo)
    return {("gpt", "1f1b", 2 * world): train(rank, world, "1f1b", "gpt", 2 * world, split_directions=True)}


class _ExitAt(nn.Module):
    """A layer that kills its process (or hangs) on its n-th forward call: a rank dying mid-step."""

    def __init__(self, calls: int, mode: str) -> None:
        super().__init__()
        self.calls, self.mode, self.seen = calls, mode, 0

    def forward(self, x):
        self.seen += 1
        if self.seen == self.calls:
            if self.mode == "exit":
                os._exit(3)
            if self.mode == "kill":  # as the OOM killer or a node failure would: no cleanup at all
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
        return x


def dies_mid_step(rank: int, world: int, mode: str, timeout: float) -> dict:
    layers = [nn.Linear(4, 4) for _ in range(world)]
    layers.insert(world - 1, _ExitAt(calls=world + 2, mode=mode))  # last rank: 2nd step, 2nd microbatch
    sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=world)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=nn.functional.mse_loss, timeout=timeout,
                       balance=[1] * (world - 1) + [2])
    return _second_step_error(pipe, torch.randn(2 * world, 4), torch.randn(2 * world, 4))


def _second_step_error(pipe, x, y) -> dict:
    """Run one step, then time a second one that a dying peer must make fail with a CommError."""
    pipe.step(x, y)
    start = time.perf_counter()
    try:
        pipe.step(x, y)
    except pt.CommError as err:
        return {"error": str(err), "seconds": time.perf_counter() - start}
    return {"error": None}


def wrong_world_size(rank: int, world: int) -> str:
    sched = pt.schedules.build("gpipe", num_ranks=world + 1, num_microbatches=2)
    try:
        pt.Pipeline([nn.Linear(2, 2) for _ in range(4)], schedule=sched, loss_fn=nn.functional.mse_loss)
    except ValueError as err:
        return str(err)
    return "no error"


# --- runners ---------------------------------------------------------------------------------------------
def run_threads(world: int, fn, *args, timeout: float = 120, **kwargs):
    """Run fn(rank, world, *args, transport=..., **kwargs) on `world` threads sharing an in-process hub."""
    hub = pt.InProcessHub(world)
    results, errors = [None] * world, []
    barrier = threading.Barrier(world, timeout=timeout)

    def body(rank):
        try:
            transport = hub.transport(rank)
            transport.test_barrier = barrier
            results[rank] = fn(rank, world, *args, transport=transport, **kwargs)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append((rank, err))
            hub.abort(f"rank {rank} raised {err!r}")
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0][1]
    assert not any(t.is_alive() for t in threads), "in-process ranks hung"
    return results


def run_processes(world: int, fn, *args, timeout: float = 180, expect: int | None = None):
    """Spawned gloo ranks (see pipetrain.spawn); a failing rank fails the test with its traceback."""
    try:
        return spawn.run_processes(world, fn, *args, timeout=timeout, expect=expect)
    except (RuntimeError, TimeoutError) as err:
        raise AssertionError(str(err)) from None


# --- the trainer, on spawned gloo ranks ------------------------------------------------------------------
def _small_corpus():
    from pipetrain.train.data import load_corpus

    return load_corpus(max_bytes=300_000)


def trainer_run(rank: int, world: int, settings: dict) -> dict:
    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings), corpus=_small_corpus())
    history = trainer.fit()
    params = {(i, n): whole(p.detach()).clone() for i, layer in trainer.pipe.layers.items()
              for n, p in layer.named_parameters()}
    return {"losses": [r["loss"] for r in history], "params": params, "history": history, "final": trainer.final_loss}


def trainer_state_bytes(rank: int, world: int, settings: dict) -> dict:
    """`trainer_run`, plus the bytes of this rank's optimizer state tensors and its gradient norms."""
    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings), corpus=_small_corpus())
    history = trainer.fit()  # (ends with an evaluation: shard="params" gathered the parameters for it)
    trainer.optimizer.step()  # (no gradients left: changes nothing, but shard="params" releases them after it)
    released = all(p.numel() == 0 for p in trainer.pipe.parameters())
    trainer.pipe.step(*trainer.train_data.next())  # (its GATHERs gather them, its REDUCEs release them again)
    released = released and all(p.numel() == 0 for p in trainer.pipe.parameters())
    gathers = sorted(str(e.action) for e in trainer.pipe.last_step.comms if e.action.op is pt.Op.GATHER)
    trainer.pipe.unshard()  # (shard="params": the parameters are whole only in steps)
    params = {(i, n): whole(p.detach()).clone() for i, layer in trainer.pipe.layers.items()
              for n, p in layer.named_parameters()}
    state = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim())
    return {"losses": [r["loss"] for r in history], "norms": [r["grad_norm"] for r in history], "params": params,
            "state_bytes": state, "released": released, "stages": sorted(trainer.pipe.stages),
            "evals": [r["eval_loss"] for r in history if r.get("eval_loss") is not None],
            "gathers": gathers}


def trainer_clip(rank: int, world: int, settings: dict) -> dict:
    """One pipeline step's gradients, then the trainer's global clip: norm and clipped gradients."""
    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings), corpus=_small_corpus())
    x, y = trainer.train_data.next()
    trainer.pipe.step(x, y)
    norm = trainer.clip_gradients()
    grads = {(i, n): p.grad.clone() for i, layer in trainer.pipe.layers.items() for n, p in layer.named_parameters()}
    return {"norm": norm, "grads": grads, "batch": (x, y)}


def trainer_sgd(rank: int, world: int, settings: dict) -> dict:
    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings), corpus=_small_corpus(),
                             optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5, momentum=0.9))
    history = trainer.fit()
    return {"losses": [r["loss"] for r in history], "kind": type(trainer.optimizer).__name__,
            "decay": [g["weight_decay"] for g in trainer.optimizer.param_groups]}


def data_parallel_scenario(rank: int, world: int, dp: int, schedule: str, tie: bool, accumulation: int,
                           layout: str = "mesh") -> dict:
    """dp x pp ranks on a DeviceMesh (contiguous or strided): each replica takes its share of the global batch;
    returns this rank's gradients after `accumulation` steps, and the same from single-process training
    on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh

    pp = world // dp
    if layout == "mesh":
        where = {"mesh": init_device_mesh("cpu", (dp, pp), mesh_dim_names=("dp", "pp"))}
    else:  # "strided": pipelines of every dp-th rank (0, 2 | 1, 3), numbered unlike the job's ranks
        from torch.distributed.device_mesh import DeviceMesh

        where = {"mesh": DeviceMesh("cpu", torch.arange(world).view(pp, dp).T, mesh_dim_names=("dp", "pp"))}
    m = 2 * pp
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=6, n_heads=2, tie_embeddings=tie)
    layers = build_gpt(cfg)
    batches = [(torch.randint(0, 64, (2 * m * dp, 8)), torch.randint(0, 64, (2 * m * dp, 8)))
               for _ in range(accumulation)]
    model = nn.Sequential(*build_gpt(cfg))
    model.load_state_dict(nn.Sequential(*layers).state_dict())
    for x, y in batches:  # the reference: the whole global batch in one process
        (gpt_loss(model(x), y) / accumulation).backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    sched = pt.schedules.build(schedule, num_ranks=pp, num_microbatches=m)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=gpt_loss, timeout=30, **where)
    tie_syncs, sync_ties = [], pipe._ties.sync
    pipe._ties.sync = lambda *args: (tie_syncs.append(1), sync_ties(*args))
    losses = []
    for k, (x, y) in enumerate(batches):
        share = slice(pipe.dp_rank * 2 * m, (pipe.dp_rank + 1) * 2 * m)
        losses.append(pipe.step(x[share], y[share], scale=1 / accumulation,
                                sync_gradients=k == accumulation - 1))
    names = {id(p): name for name, p in nn.Sequential(*layers).named_parameters()}
    got = {names[id(p)]: p.grad for p in pipe.parameters()}
    return {"got": got, "expected": {n: expected[n] for n in got}, "losses": losses,
            "reference_losses": [gpt_loss(model(x), y).item() for x, y in batches], "dp_rank": pipe.dp_rank,
            "all_names": sorted(expected), "tie_syncs": len(tie_syncs), "stages": sorted(pipe.stages),
            "launched": [str(e.action) for e in pipe.last_step.comms if e.action.op.is_collective],
            "waited": [str(e.action) for e in pipe.last_step.waits if e.action.op.is_collective]}


def trainer_nonfinite(rank: int, world: int, settings: dict, poison_rank: int, poison_step: int) -> dict:
    """Train, and on one rank turn a gradient to NaN in optimizer step `poison_step` (1-based)."""
    from pipetrain.train.config import NonFiniteError

    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings), corpus=_small_corpus())
    original, snapshots = trainer.pipe.step, {}

    def poisoned_step(*args, **kwargs):
        if trainer.step + 1 in (poison_step, poison_step + 1):  # the weights before and after that step
            snapshots[trainer.step + 1] = [p.detach().clone() for p in trainer.pipe.parameters()]
        loss = original(*args, **kwargs)
        if trainer.global_rank == poison_rank and trainer.step + 1 == poison_step:
            next(p for p in trainer.pipe.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return loss

    trainer.pipe.step = poisoned_step
    try:
        history = trainer.fit()
    except NonFiniteError as err:
        return {"error": str(err), "step": trainer.step}
    return {"skipped": [r["skipped"] for r in history], "snapshots": snapshots, "error": None,
            "finite": all(torch.isfinite(p).all().item() for p in trainer.pipe.parameters()),
            "losses": [r["loss"] for r in history]}


def dp_rank_dies(rank: int, world: int) -> dict:
    """dp 2 x pp 2; global rank 3 is SIGKILLed in its second step: the other three must raise, bounded."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    layers = [nn.Linear(4, 4), nn.Linear(4, 4), _ExitAt(calls=4 if rank == 3 else 10**9, mode="kill")]
    sched = pt.schedules.build("1f1b", num_ranks=2, num_microbatches=2)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=nn.functional.mse_loss, mesh=mesh, timeout=20,
                       balance=[1, 2])
    return _second_step_error(pipe, torch.randn(4, 4), torch.randn(4, 4))


def dp_time_balance(rank: int, world: int) -> list[int]:
    """balance="time" under dp 2 x pp 2, where the replicas' measurements disagree. Each replica alone, their
    mean and uniform costs give four different splits, so the result shows which one was used: the mean
    of both replicas (rank 0's numbers for replica 0, rank 2's for replica 1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import pipetrain.pipeline.pipeline as pipeline_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    measured = [1.0, 1, 1, 1, 1, 3] if dist.get_rank() < 2 else [6.0, 1, 1, 1, 1, 1]  # alone: [4, 2] / [1, 5]
    pipeline_module.time_costs = lambda layers, sample: measured
    layers = [nn.Linear(4, 4) for _ in range(len(measured))]
    sched = pt.schedules.build("1f1b", num_ranks=2, num_microbatches=2)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=nn.functional.mse_loss, mesh=mesh, balance="time",
                       sample=torch.randn(2, 4), timeout=30)
    return pipe.balance


def trainer_crash_in_save(rank: int, world: int, settings: dict, crash_step: int) -> dict:
    """Rank 1 is SIGKILLed in the middle of writing its part of the step-`crash_step` checkpoint, leaving a
    torn file behind, as a node failure during a save would; rank 0 must fail fast, not hang."""
    from pipetrain.train import distributed_checkpoint as dist_ckpt

    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings), corpus=_small_corpus())
    if rank == 1:
        original = dist_ckpt.save

        def dying_save(directory, *args, **kwargs):
            if trainer.step == crash_step:
                directory.mkdir(parents=True, exist_ok=True)
                (directory / "__1_0.distcp").write_bytes(b"half a shard")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(directory, *args, **kwargs)

        dist_ckpt.save = dying_save
    try:
        trainer.fit()
    except pt.CommError as err:
        return {"error": str(err), "step": trainer.step}
    return {"error": None}


# --- a rank that fails and lingers ---------------------------------------------------------------------------
class _FailAt(nn.Module):
    """A layer that fails on its n-th forward call: raises (how="raise") or returns a string ("string")."""

    def __init__(self, calls: int, how: str) -> None:
        super().__init__()
        self.calls, self.how, self.seen = calls, how, 0

    def forward(self, x):
        self.seen += 1
        if self.seen == self.calls:
            if self.how == "raise":
                raise ValueError("the layer failed on purpose")
            return "not a tensor"
        return x


class _FailCachedAt(nn.Module):
    """A generating layer whose n-th cached pass (prefill or decode) raises."""

    def __init__(self, inner: nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.calls, self.seen = inner, calls, 0

    def forward(self, x):
        return self.inner(x)

    def forward_cached(self, x, cache):
        self.seen += 1
        if self.seen == self.calls:
            raise ValueError("the layer failed on purpose")
        return self.inner.forward_cached(x, cache)


def fails_and_lingers(rank: int, world: int, cases: list[tuple[str, str]], linger: float = 40.0) -> list[dict]:
    """For each (schedule, how), a Pipeline whose rank-1 layer fails in the 2nd step (schedule "generate":
    a GPT on 1f1b whose last layer, on rank 1, fails in its 3rd pass of a generate call). Rank 1 catches
    its error and stays alive (up to `linger` s) until every other rank has failed too, as a script cleaning
    up would. Per case: the error's type and text, when it was raised (time.time()), and a further step's
    (or generate's) error. At the end a barrier on the default group: the caller's own group survives the
    pipeline's teardown."""
    import torch.distributed as dist
    from gen_workers import model, prompts

    store = dist.distributed_c10d._get_default_store()
    results = []
    for i, (schedule, how) in enumerate(cases):
        if schedule == "generate":
            layers = model("gpt")
            layers[-1] = _FailCachedAt(layers[-1], calls=3)
            sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=2)
            pipe = pt.Pipeline(layers, schedule=sched, loss_fn=gpt_loss, timeout=60.0)
            attempt = functools.partial(pipe.generate, prompts(), max_new_tokens=4)
        else:
            sched = pt.schedules.build(schedule, num_ranks=world, num_microbatches=2 * world)
            torch.manual_seed(0)
            layers = [nn.Linear(4, 4) for _ in range(sched.num_stages)]
            failing = sched.stages_of(1)[-1]
            layers[failing] = nn.Sequential(layers[failing], _FailAt(calls=2 * world + 2, how=how))
            pipe = pt.Pipeline(layers, schedule=sched, loss_fn=nn.functional.mse_loss, timeout=60.0)
            x, y = torch.randn(4 * world, 4), torch.randn(4 * world, 4)
            pipe.step(x, y)
            attempt = functools.partial(pipe.step, x, y)
        result = {"error": None}
        try:
            attempt()
        except Exception as err:  # noqa: BLE001 - the test looks at it
            result = {"type": type(err).__name__, "error": str(err), "at": time.time()}
        if rank == 1:
            deadline = time.perf_counter() + linger
            while store.add(f"failed-{i}", 0) < world - 1 and time.perf_counter() < deadline:
                time.sleep(0.05)
        else:
            store.add(f"failed-{i}", 1)
        try:
            attempt()
            result["again"] = None
        except Exception as err:  # noqa: BLE001
            result["again"] = str(err)
        results.append(result)
    dist.barrier()
    return results


def trainer_resume_errors(rank: int, world: int, settings: dict, variants: list[dict]) -> list:
    """For each variant (settings to override: resume=, checkpoint_dir=), (error type, its text, seconds) of
    building a trainer that resumes, or None if it resumed."""
    out = []
    for variant in variants:
        start = time.perf_counter()
        try:
            pt.trainer_from_config(pt.TrainConfig.from_dict({**settings, **variant}), corpus=_small_corpus())
            out.append(None)
        except Exception as err:  # noqa: BLE001 - the test reads it
            out.append((type(err).__name__, str(err), time.perf_counter() - start))
    return out


def sharded_without_its_optimizer(rank: int, world: int) -> str:
    """dp 2 x pp 1, shard="gradients": a step without `pipe.optimizer(...)` built; the error's text."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "pp"))
    pipe = pt.Pipeline([nn.Linear(4, 4)], schedule=pt.schedules.build("gpipe", num_ranks=1, num_microbatches=1),
                       loss_fn=nn.functional.mse_loss, mesh=mesh, shard="gradients")
    try:
        pipe.step(torch.randn(2, 4), torch.randn(2, 4))
    except RuntimeError as err:
        return str(err)
    return "no error"


def zero3_between_steps(rank: int, world: int) -> dict:
    """dp 2 x pp 1 GPT, unsharded and shard="params" side by side: weights loaded after the pipeline was built
    (the shards must take them), step, evaluate (gathers), optimizer step (updates the shards: the gathered
    weights are stale and must be released), evaluate, step, state_dict, generate; the losses, tokens and
    weights of each."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "pp"))
    cfg = GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2)
    torch.manual_seed(0)
    layers = build_gpt(cfg)
    torch.manual_seed(1 + mesh.get_local_rank("dp"))
    x, y = torch.randint(0, 32, (4, 8)), torch.randint(0, 32, (4, 8))
    out = {}
    for shard in ("none", "params"):
        copies = build_gpt(cfg)
        nn.Sequential(*copies).load_state_dict(nn.Sequential(*layers).state_dict())
        pipe = pt.Pipeline(copies, schedule=pt.schedules.build("1f1b", num_ranks=1, num_microbatches=2),
                           loss_fn=gpt_loss, mesh=mesh, shard=shard)
        torch.manual_seed(2)
        pipe.load_state_dict(nn.Sequential(*build_gpt(cfg)).state_dict())  # (as loading HF weights does)
        opt = pipe.optimizer(lambda groups: torch.optim.AdamW(groups, lr=1e-2))
        losses = [pipe.step(x, y), pipe.evaluate(x, y)]
        opt.step()
        opt.zero_grad()
        losses += [pipe.evaluate(x, y), pipe.step(x, y)]
        opt.step()
        tokens = pipe.generate([torch.tensor([1, 2, 3])], max_new_tokens=3)
        out[shard] = {"losses": losses, "state": pipe.state_dict(), "tokens": [t.tolist() for t in tokens]}
    return out


def replicas_reduce_in_another_order(rank: int, world: int) -> str:
    """dp 2 x pp 1, two stages per rank, a custom schedule whose REDUCEs the replicas order differently
    (each a valid place): the error every rank raises before the first step."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "pp"))
    rows = ["0F0 1F0 1B0 1REDUCE 0B0 0REDUCE", "0F0 1F0 1B0 0B0 0REDUCE 1REDUCE"]
    sched = pt.Schedule("custom", 1, 1, 2, (0, 0), [[pt.Action.parse(a) for a in rows[rank].split()]])
    try:
        pt.Pipeline([nn.Linear(4, 4), nn.Linear(4, 4)], schedule=sched, loss_fn=nn.functional.mse_loss, mesh=mesh)
    except ValueError as err:
        return str(err)
    return "no error"


def mixed_dtype_replicas(rank: int, world: int) -> dict:
    """dp 2 x pp 1, unsharded, one stage holding an fp32 and a float64 parameter; each replica's batch its own:
    the averaged gradients (each in its parameter's dtype) and this replica's own."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "pp"))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, x):
            return self.lin(x) * self.scale.float()

    torch.manual_seed(0)
    model = Scaled()
    pipe = pt.Pipeline([model], schedule=pt.schedules.build("gpipe", num_ranks=1, num_microbatches=1),
                       loss_fn=nn.functional.mse_loss, mesh=mesh)
    torch.manual_seed(1 + rank)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    pipe.step(x, y)
    averaged = {n: p.grad.clone() for n, p in model.named_parameters()}
    mine = Scaled()
    mine.load_state_dict(model.state_dict())
    nn.functional.mse_loss(mine(x), y).backward()
    return {"averaged": averaged, "mine": {n: p.grad for n, p in mine.named_parameters()}}


def trainer_saves_format_2(rank: int, world: int, settings: dict, directory: str) -> list:
    """Train, then write the checkpoint as pipetrain wrote it before torch.distributed.checkpoint (format 2:
    a file per layer with its weights and AdamW state, a file per rank with its RNG, data.pt, the manifest)."""
    import dataclasses
    import json
    from pathlib import Path

    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings), corpus=_small_corpus())
    history = trainer.fit()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    states = trainer.pipe.optimizer_state(trainer.optimizer)
    for index, layer in trainer.pipe.layers.items():
        opt = {name: states[id(p)] for name, p in layer.named_parameters() if id(p) in states}
        torch.save({"model": layer.state_dict(), "optimizer": opt}, path / f"layer_{index:04d}.pt")
    torch.save({"torch": torch.get_rng_state()}, path / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(trainer.train_data.state_dict(), path / "data.pt")
        config = {k: v for k, v in dataclasses.asdict(trainer.config).items() if k != "extra"}
        (path / "manifest.json").write_text(json.dumps({
            "format": 2, "step": trainer.step, "world_size": world, "dp": 1, "pp": world,
            "num_layers": trainer.num_layers, "model": trainer.model_info, "config": config,
            "scheduler": trainer.scheduler.state_dict()}))
    return [r["loss"] for r in history]
