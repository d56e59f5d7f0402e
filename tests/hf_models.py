"""Tiny random Llama-family models from `transformers` (built from config objects, nothing downloaded), the
padded batches they train on, and what each gloo rank runs to compare a Pipeline with HF in one process."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import transformers
from workers import SCHEDULES

import pipetrain as pt
from pipetrain.models.hf import from_hf, load_weights, save_pretrained

VOCAB = 96
_SIZE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=6,
             vocab_size=VOCAB, max_position_embeddings=64)
FAMILIES = {  # name -> (class, config): 6 decoder layers, so 8 layers fill 4 ranks x 2 stages
    "llama": ("LlamaForCausalLM", transformers.LlamaConfig(**_SIZE)),
    "mistral": ("MistralForCausalLM", transformers.MistralConfig(**_SIZE, sliding_window=4)),  # shorter than a row
    "qwen2-tied": ("Qwen2ForCausalLM", transformers.Qwen2Config(**_SIZE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", transformers.Qwen3Config(**_SIZE, head_dim=12)),
}


def build(family: str, *, meta: bool = False):
    """The family's model (a key of FAMILIES, or a class name of hf_families), the same weights in every
    process (seed 0), or on the meta device."""
    from hf_families import config_of

    name, config = FAMILIES[family] if family in FAMILIES else (family, config_of(family))
    cls = getattr(transformers, name)
    if meta:
        with torch.device("meta"):
            return cls(config)
    torch.manual_seed(0)
    return cls(config).float()


def batch(pad: str, rows: int = 8, seq: int = 10, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """({"input_ids", "attention_mask"}, labels): rows of different lengths padded on the `pad` side
    ("right" or "left"); labels are the ids, -100 at padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (rows,), generator=g)
    pos = torch.arange(seq)[None, :]
    mask = (pos < lengths[:, None]) if pad == "right" else (pos >= seq - lengths[:, None])
    labels = ids.masked_fill(~mask, -100)
    return {"input_ids": ids, "attention_mask": mask.long()}, labels


def reference(model, inputs, labels) -> tuple[float, dict[str, torch.Tensor]]:
    """HF in one process: the loss of `model(**inputs, labels=labels)` and every gradient, by HF name."""
    model.zero_grad()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def pipeline_grads(pipe) -> dict[str, torch.Tensor]:
    """This rank's gradients by HF name (a tied weight under its first name, as HF's named_parameters)."""
    grads = {}
    for layer in pipe.layers.values():
        params = dict(layer.named_parameters(remove_duplicate=False))
        grads.update({names[0]: params[key].grad.clone() for key, names in layer.hf_keys.items() if key in params})
    return grads


def errors(grads: dict, ref: dict) -> dict[str, float]:
    return {n: ((g - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n, g in grads.items()}


# --- what each rank runs ---------------------------------------------------------------------------------
def exactness(rank: int, world: int, families: list[str], pads: list[str]) -> dict:
    """Every family x padding x schedule: (pipeline loss, HF loss, relative error of each of this rank's
    gradients)."""
    results = {}
    for family in families:
        for pad in pads:
            inputs, labels = batch(pad)
            ref_loss, ref_grads = reference(build(family), inputs, labels)
            for schedule in SCHEDULES:
                model = build(family)
                layers, loss_fn = from_hf(model)
                sched = pt.schedules.build(schedule, num_ranks=world, num_microbatches=2 * world)
                pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, timeout=60)
                loss = pipe.step(inputs, labels)
                results[family, pad, schedule] = (loss, ref_loss, errors(pipeline_grads(pipe), ref_grads))
    return results


def meta_load_and_save(rank: int, world: int, family: str, source: str, out: str) -> dict:
    """Build on meta, load this rank's tensors from `source`, train one step (SGD), save_pretrained to `out`;
    the gradients against HF's full model loaded in this process, and the held-out loss after the step."""
    import hf_families

    pipe = _pipeline(build(family, meta=True), world)
    load_weights(pipe, source)
    inputs, labels = batch("left")
    loss = pipe.step(inputs, labels, num_tokens=(labels[:, 1:] != -100).sum().item())
    loss += pipe.last_step.aux_loss  # an MoE's router loss (0 for the others)
    full = transformers.AutoModelForCausalLM.from_pretrained(source)
    ref_loss, ref_grads = hf_families.reference(full, inputs, labels, world)  # (1F1B: world microbatches)
    grad_errors = errors(pipeline_grads(pipe), ref_grads)
    torch.optim.SGD(pipe.parameters(), lr=0.5).step()
    save_pretrained(pipe, out)
    held_out = batch("right", seed=1)
    return {"loss": loss, "ref_loss": ref_loss, "errors": grad_errors, "held_out": pipe.evaluate(*held_out)}


def load_fails_on_one_rank(rank: int, world: int, source: str) -> dict:
    """load_weights from a checkpoint that lacks one of the last rank's tensors: what each rank raised."""
    pipe = _pipeline(build("llama", meta=True), world)
    start = time.monotonic()
    try:
        load_weights(pipe, source)
    except Exception as err:  # noqa: BLE001 - the test reads it
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def peak_memory_of_loading(rank: int, world: int, config, source: str) -> dict:
    """Bytes this rank's peak RSS grew by while building its stages of a Llama from the meta device and
    loading them."""
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    pipe = _pipeline(model, world, timeout=120, balance="params")
    load_weights(pipe, source)
    peak = _status_bytes("VmHWM")  # not getrusage: its maximum carries the parent's over fork and exec
    mine = sum(p.numel() * p.element_size() for p in pipe.parameters())
    return {"growth": peak - before, "params_bytes": mine}


def _pipeline(model, world: int, timeout: float = 60, **kwargs):
    """A 1F1B Pipeline of `from_hf(model)` over this process group."""
    layers, loss_fn = from_hf(model)
    sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=world)
    return pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, timeout=timeout, **kwargs)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
