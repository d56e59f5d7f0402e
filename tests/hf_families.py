"""A tiny random model of every family `from_hf` supports (nothing downloaded), and the single-process
check each one passes: pipetrain's layers run in a row against HF's own forward."""

from __future__ import annotations

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pipetrain.models.hf import from_hf
from pipetrain.runtime.aux_loss import collect_aux_losses

VOCAB = 96
SIZE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=3,
            vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.1)
# the families the issue names, each with what sets it apart switched on: windows shorter than a row (10),
# soft-capping, Granite's multipliers, an MoE's router loss (Qwen3-MoE with a dense layer among its MoE ones)
NAMED = {
    "GemmaForCausalLM": transformers.GemmaConfig(**SIZE, head_dim=8),
    "Gemma2ForCausalLM": transformers.Gemma2Config(**SIZE, head_dim=8, sliding_window=4, final_logit_softcapping=3.0,
                                                   attn_logit_softcapping=5.0),
    "Gemma3ForCausalLM": transformers.Gemma3TextConfig(**SIZE, head_dim=8, sliding_window=4,
                                                       final_logit_softcapping=3.0, sliding_window_pattern=2),
    "Phi3ForCausalLM": transformers.Phi3Config(**SIZE, sliding_window=4),
    "Olmo2ForCausalLM": transformers.Olmo2Config(**SIZE),
    "GraniteForCausalLM": transformers.GraniteConfig(**SIZE, embedding_multiplier=3.0, logits_scaling=2.0,
                                                     residual_multiplier=0.5, attention_multiplier=0.3),
    "GPT2LMHeadModel": transformers.GPT2Config(n_embd=32, n_head=4, n_layer=3, vocab_size=VOCAB, n_positions=64,
                                               embd_pdrop=0, resid_pdrop=0, attn_pdrop=0, bos_token_id=1,
                                               eos_token_id=2),
    "MixtralForCausalLM": transformers.MixtralConfig(**SIZE, **MOE, num_local_experts=4, num_experts_per_tok=2),
    "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig(**SIZE, **MOE, num_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=16, mlp_only_layers=[1], head_dim=8),
}


def config_of(name: str):
    """A tiny config of the causal LM class `name`: NAMED's, or the family's defaults at SIZE (windows of 4
    and the router loss on where the family has them; dropout off)."""
    if name in NAMED:
        return NAMED[name]
    kind = next(k for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if v == name)
    config = CONFIG_MAPPING[kind]()
    for key, value in {**SIZE, "head_dim": 8, **(MOE if hasattr(config, "output_router_logits") else {})}.items():
        setattr(config, key, value)
    if getattr(config, "sliding_window", None):
        config.sliding_window = 4
    for key in ("dropout", "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return config


def build(name: str):
    torch.manual_seed(0)
    return getattr(transformers, name)(config_of(name)).float()


def in_a_row(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """from_hf's layers one after another in this process: (logits, loss with the auxiliary losses, how many
    auxiliary losses were added); gradients land on `model`'s parameters."""
    layers, loss_fn = from_hf(model)
    with collect_aux_losses() as aux:
        x = inputs
        for layer in layers:
            x = layer(x)
    loss_sum, count = loss_fn(x, labels)
    loss = loss_sum / count + sum(aux)
    loss.backward()
    return x, loss, len(aux)


def reference(model, inputs: dict, labels: torch.Tensor, m: int) -> tuple[float, dict[str, torch.Tensor]]:
    """HF in one process over `m` microbatches, as a pipeline weighs them: the token-mean cross-entropy of the
    whole batch plus each microbatch's router loss (HF's `aux_loss`) / m; (objective, every gradient)."""
    model.zero_grad()
    coefficient = getattr(model.config, "router_aux_loss_coef", 0.0)
    total = (labels[:, 1:] != -100).sum()
    objective = 0.0
    for rows in torch.arange(len(labels)).tensor_split(m):
        out = model(**{k: v[rows] for k, v in inputs.items()}, labels=labels[rows])
        aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else 0.0
        count = (labels[rows][:, 1:] != -100).sum()
        objective = objective + (out.loss - coefficient * aux) * count / total + coefficient * aux / m
    objective.backward()
    return objective.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def pipeline_exactness(rank: int, world: int, cases: list[tuple[str, str]]) -> dict:
    """Each (family, schedule) on `world` gloo ranks, 2 x world microbatches, left padding: (loss with the
    router loss, HF's, relative error of each of this rank's gradients by HF name)."""
    from hf_models import batch, errors, pipeline_grads

    import pipetrain as pt

    inputs, labels = batch("left")
    results = {}
    for name, schedule in cases:
        m = 2 * world
        ref_loss, ref_grads = reference(build(name), inputs, labels, m)
        layers, loss_fn = from_hf(build(name))
        sched = pt.schedules.build(schedule, num_ranks=world, num_microbatches=m)
        pipe = pt.Pipeline(layers, schedule=sched, loss_fn=loss_fn, timeout=60)
        loss = pipe.step(inputs, labels, num_tokens=(labels[:, 1:] != -100).sum().item())  # (router loss + mean)
        loss += pipe.last_step.aux_loss  # (the step returns the cross-entropy; the router loss beside it)
        results[name, schedule] = (loss, ref_loss, errors(pipeline_grads(pipe), ref_grads))
    return results
