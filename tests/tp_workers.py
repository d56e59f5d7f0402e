"""Tensor-parallel scenarios run on every spawned gloo rank: dp x pp x tp against one process."""

from __future__ import annotations

import torch
from torch import nn

import pipetrain as pt
from pipetrain.models.gpt import GPTConfig, build_gpt, gpt_loss
from pipetrain.models.llama import LlamaConfig, build_llama

STEPS = 3  # optimizer steps: step 0 checks the gradients, the loss curve the updates (AdamW on DTensors)


def tiny_hf(family: str):
    """A 4-layer random model from transformers (Llama, or Qwen3 with its per-head q/k norms) as (layers, loss_fn)."""
    import transformers

    from pipetrain.models.hf import from_hf

    size = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**size, head_dim=8))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**size))
    return from_hf(model)


def plain_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss_fn pipetrain does not know (not a pt.CrossEntropy): it reads the logits whole."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(model: str):
    """(layers, loss_fn), the same on every rank after seeding."""
    torch.manual_seed(0)
    if model.startswith("gpt"):
        gpt = build_gpt(GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=4, n_heads=2))
        return gpt, plain_loss if model == "gpt-plain" else gpt_loss
    if model.startswith("llama"):
        cfg = LlamaConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=4, n_heads=4, n_kv_heads=2)
        return build_llama(cfg), gpt_loss
    return tiny_hf(model.removeprefix("hf-"))


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _hidden(x):
    """A block's hidden states: the tensor itself, or the first of (hidden, positions), or HF's dict's."""
    return x["hidden_states"] if isinstance(x, dict) else x[0] if isinstance(x, tuple) else x


def tensor_parallel_scenario(rank: int, world: int, dp: int, tp: int, schedule: str, model: str,
                             shard: str = "none", export: str | None = None) -> dict:
    """A dp x pp x tp pipeline trained STEPS steps on the global batch's share of each replica; returns the
    first step's gradients (whole; none under ZeRO-2/3, which keep only the optimizer's shards), the losses, the
    trained parameters (whole), and the same from single-process training."""
    from torch.distributed.device_mesh import init_device_mesh

    pp = world // (dp * tp)
    mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    layers, loss_fn = build(model)
    reference, _ = build(model)
    sched = pt.schedules.build(schedule, num_ranks=pp, num_microbatches=2 * pp)
    m = sched.num_microbatches
    torch.manual_seed(1)
    batches = [(torch.randint(0, 64, (2 * m * dp, 8)), torch.randint(0, 64, (2 * m * dp, 8))) for _ in range(STEPS)]
    for _, y in batches if model.startswith("hf-") else []:  # (a token mean: exact over microbatches)
        y[::3, 1] = -100  # tokens no loss is taken on
    inputs = (lambda ids: {"input_ids": ids}) if model.startswith("hf-") else (lambda ids: ids)

    ref = nn.Sequential(*reference)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_losses, ref_grads = [], None
    for step, (x, y) in enumerate(batches):
        loss = loss_fn(ref(inputs(x)), y)
        if isinstance(loss, tuple):
            loss = loss[0] / loss[1]
        loss.backward()
        ref_losses.append(loss.item())
        if step == 0:
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_opt.step()
        ref_opt.zero_grad()

    # "-sp": sequence parallelism (the Llama's with activation checkpointing: recomputed split by sequence)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, mesh=mesh, timeout=60, shard=shard,
                       sequence_parallel=model.endswith("-sp"), checkpoint=model == "llama-sp")
    opt = pipe.optimizer(lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    lengths = set()  # the sequence lengths the blocks' inputs have in training (sequence parallel: t / tp)
    for i, layer in pipe.layers.items():
        if 0 < i < len(layers) - 1:
            layer.register_forward_pre_hook(lambda m, args: lengths.add(_hidden(args[0]).shape[1]))
    names = {id(p): n for n, p in nn.Sequential(*layers).named_parameters()}
    losses, grads = [], None
    for step, (x, y) in enumerate(batches):
        share = slice(pipe.dp_rank * 2 * m, (pipe.dp_rank + 1) * 2 * m)
        losses.append(pipe.step(inputs(x[share]), y[share]))
        if step == 0:
            grads = {names[id(p)]: whole(p.grad) for p in pipe.parameters() if p.grad is not None}  # (ZeRO-2/3: none)
            norm = float(pipe.all_reduce(torch.tensor([pipe.gradient_sum_of_squares()], dtype=torch.float64))[0])
        opt.step()
        opt.zero_grad()
    split = sorted(names[id(p)] for p in pipe.parameters() if hasattr(p, "full_tensor"))
    lengths, trained_lengths = set(), sorted(lengths)
    # generation on the same stages (the KV cache holds this rank's heads) against greedy decoding in one process
    prompts = [batches[0][0][0, :5], batches[0][0][1, :3]]
    generated = [t.tolist() for t in pipe.generate(prompts, 4)]
    greedy = []
    with torch.no_grad():
        for prompt in prompts:
            ids = prompt[None]
            for _ in range(4):
                ids = torch.cat([ids, ref(inputs(ids))[:, -1:].argmax(-1)], dim=1)
            greedy.append(ids[0, len(prompt):].tolist())
    exported = None
    if export is not None and model.startswith("hf-"):  # HF safetensors from the split (and sharded) run
        import transformers

        from pipetrain.models.hf import save_pretrained

        save_pretrained(pipe, export)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(export)
        with torch.no_grad():
            x = batches[0][0]
            exported = (loaded(input_ids=x).logits - ref(inputs(x))).abs().max().item()
    pipe.unshard()
    trained = {names[id(p)]: whole(p.detach()) for p in pipe.parameters()}
    ref_params = dict(ref.named_parameters())
    return {"grads": grads, "expected": {n: ref_grads[n] for n in grads}, "losses": losses, "params": trained,
            "reference_params": {n: ref_params[n].detach() for n in trained},
            "reference_losses": ref_losses, "all_names": sorted(ref_grads), "split": split, "norm": norm,
            "generated": generated, "greedy": greedy, "exported": exported,
            "reference_norm": sum(float(g.double().pow(2).sum()) for g in ref_grads.values()),
            "lengths": trained_lengths,
            "coords": (pipe.dp_rank, pipe.rank, pipe.tp_mesh.get_local_rank() if pipe.tp_mesh else 0)}


def tp_cases(rank: int, world: int, cases: list[tuple], export: str, refusals: bool = False) -> dict:
    """`tensor_parallel_scenario` for each (dp, tp, schedule, model[, shard]) of `cases`, one after another on
    the same ranks (HF models exported under `export`); with `refusals`, also the errors of layouts tensor
    parallel refuses (each raised on every rank)."""
    out = {"cases": [tensor_parallel_scenario(rank, world, *case, **({"shard": "none"} if len(case) == 4 else {}),
                                              export=f"{export}/{i}") for i, case in enumerate(cases)], "errors": {}}
    if refusals:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1, world // 2, 2), mesh_dim_names=("dp", "pp", "tp"))
        for name, cfg in {"heads": GPTConfig(vocab_size=64, seq_len=8, d_model=12, n_layers=2, n_heads=3),
                          "vocab": GPTConfig(vocab_size=63, seq_len=8, d_model=16, n_layers=2, n_heads=2),
                          "tied": GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=2, n_heads=2,
                                            tie_embeddings=True)}.items():
            torch.manual_seed(0)
            try:
                pt.Pipeline(build_gpt(cfg), schedule="1f1b", num_microbatches=2, loss_fn=gpt_loss, mesh=mesh,
                            timeout=30)
            except ValueError as err:
                out["errors"][name] = str(err)
        import transformers

        from pipetrain.models.hf import from_hf

        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        with torch.device("meta"):  # (each rank materializes only its layers: the tie is across ranks)
            layers, loss_fn = from_hf(transformers.LlamaForCausalLM(config))
        try:
            pt.Pipeline(layers, schedule="1f1b", num_microbatches=2, loss_fn=loss_fn, mesh=mesh, timeout=30)
        except ValueError as err:
            out["errors"]["hf tied"] = str(err)
        config.tie_word_embeddings = False
        layers, loss_fn = from_hf(transformers.LlamaForCausalLM(config))
        try:
            pt.Pipeline(layers, schedule="1f1b", num_microbatches=2, loss_fn=loss_fn, mesh=mesh, timeout=30,
                        sequence_parallel=True)
        except ValueError as err:
            out["errors"]["hf sequence"] = str(err)
        torch.manual_seed(0)
        plain = [nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()]  # (no layer says how to split)
        try:
            pt.Pipeline(plain, schedule="1f1b", num_microbatches=2, loss_fn=nn.functional.mse_loss, mesh=mesh,
                        timeout=30)
        except ValueError as err:
            out["errors"]["no plan"] = str(err)
        out["cross_entropy"] = split_cross_entropy_errors(rank, world)
    return out


def split_cross_entropy_errors(rank: int, world: int) -> list[float]:
    """The vocabulary-split cross-entropy over all `world` ranks (each holding vocab / world of the logits)
    against F.cross_entropy on the whole logits, for targets in every part, ignored rows (all of a row set,
    too), shifted HF labels and bf16 logits: the largest relative error of each case's loss and gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from pipetrain.runtime import cross_entropy

    mesh = init_device_mesh("cpu", (world,))
    errors = []
    split_calls = []
    split = cross_entropy._SplitCrossEntropy.apply
    cross_entropy._SplitCrossEntropy.apply = lambda *args: split_calls.append(1) or split(*args)
    for case, (loss_fn, dtype) in enumerate([(pt.CrossEntropy(), torch.float32),
                                             (pt.CrossEntropy(token_mean=False), torch.float32),
                                             (pt.CrossEntropy(shift=True), torch.bfloat16),
                                             (pt.CrossEntropy(ignore_index=3), torch.float64)]):
        torch.manual_seed(case)
        logits = (torch.randn(3, 5, 8 * world) * 4).to(dtype).requires_grad_()
        targets = torch.randint(0, 8 * world, (3, 5))
        targets[0, :2] = loss_fn.ignore_index
        targets[1] = torch.arange(5) * world  # (in every part)
        want = loss_fn(logits, targets)
        want_loss = want[0] / want[1] if isinstance(want, tuple) else want
        (want_grad,) = torch.autograd.grad(want_loss, logits)
        part = distribute_tensor(logits.detach(), mesh, [Shard(-1)], src_data_rank=None).requires_grad_()
        got = loss_fn(part, targets, timeout=30)
        got_loss = got[0] / got[1] if isinstance(got, tuple) else got
        (got_grad,) = torch.autograd.grad(got_loss, part, retain_graph=True)
        (again,) = torch.autograd.grad(got_loss, part)  # (a second backward of the same graph: the same)
        errors.append(max(abs(got_loss.item() - want_loss.item()) / abs(want_loss.item()),
                          ((got_grad.full_tensor() - want_grad).norm() / want_grad.norm()).item(),
                          ((again.full_tensor() - want_grad).norm() / want_grad.norm()).item()))
    errors.append(0.0 if len(split_calls) == 4 else float("inf"))  # (each case computed from the parts)
    cross_entropy._SplitCrossEntropy.apply = split
    try:  # a target outside the vocabulary: an error on every rank, as F.cross_entropy raises
        pt.CrossEntropy()(part, torch.full((3, 5), 8 * world), timeout=30)
    except ValueError as err:
        errors.append(0.0 if "targets must be in [0," in str(err) else float("inf"))
    else:
        errors.append(float("inf"))
    return errors
