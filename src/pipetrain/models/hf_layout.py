"""Where a Hugging Face causal LM keeps its parts, and what its forward does between them.

Every decoder-only causal LM in `transformers` that pipetrain runs is one of two layouts:

    LLAMA   model.embed_tokens -> model.layers[i] -> model.norm -> lm_head   (model.rotary_emb: cos, sin)
    GPT2    transformer.wte + transformer.wpe -> transformer.h[i] -> transformer.ln_f -> lm_head

and a family differs from another of its layout only by what its config says: an embedding multiplier
(Granite), logits divided (Granite) or soft-capped (Gemma 2/3), a rotary embedding per attention type
(Gemma 3), sliding-window layers (Mistral, Gemma 2/3, Phi-3), a router whose load-balancing loss joins the
objective (Mixtral, Qwen3-MoE). `layout_of(model)` reads them; the layers in `hf.py` apply them.

Only the classes in SUPPORTED are taken: each was checked against HF's own forward (tests/test_hf_families.py:
logits, loss and every gradient). A class with the same parts but a forward that does something else
between them (Cohere multiplies the logits, Falcon runs attention and MLP side by side) would train wrong
without a word, so it is refused by name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Parts:
    """Attribute names, from the causal LM: `base` holds the decoder; the others are attributes of `base`."""

    base: str
    embed: str
    layers: str
    norm: str
    positions: str | None = None  # a learned position embedding added to the token embedding
    rotary: str | None = None  # a rotary embedding module: (hidden, positions[, attention type]) -> (cos, sin)
    dropout: str | None = None  # applied to the embedding's output


LLAMA = Parts(base="model", embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb")
GPT2 = Parts(base="transformer", embed="wte", layers="h", norm="ln_f", positions="wpe", dropout="drop")

# class name -> layout; each checked against HF's forward in tests/test_hf_families.py (logits, loss with the
# router's loss, every gradient; windows shorter than the rows). The second group are families of the same
# layout found by running that check over every causal LM of transformers 5.25.
SUPPORTED: dict[str, Parts] = {
    **dict.fromkeys(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                     "Olmo2ForCausalLM", "GraniteForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"), LLAMA),
    "GPT2LMHeadModel": GPT2,
    **dict.fromkeys(("ApertusForCausalLM", "Apertus1p5TextForCausalLM", "ArceeForCausalLM", "AriaTextForCausalLM",
                     "BeamForCausalLM", "BitNetForCausalLM", "CwmForCausalLM", "DiffLlamaForCausalLM",
                     "DogeForCausalLM", "Ernie4_5ForCausalLM", "Exaone4ForCausalLM", "FlexOlmoForCausalLM",
                     "GlmForCausalLM", "Glm4ForCausalLM", "GptOssForCausalLM", "GraniteMoeForCausalLM",
                     "GraniteMoeSWAForCausalLM", "GraniteMoeSharedForCausalLM", "GraniteSWAForCausalLM",
                     "HeliumForCausalLM", "HunYuanDenseV1ForCausalLM", "HyperCLOVAXForCausalLM", "Jais2ForCausalLM",
                     "MiniMaxM2ForCausalLM", "MiniMaxM3VLForCausalLM", "MinistralForCausalLM",
                     "Ministral3ForCausalLM", "NemotronForCausalLM", "OlmoForCausalLM", "Olmo3ForCausalLM",
                     "OlmoeForCausalLM", "SmolLM3ForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM",
                     "VaultGemmaForCausalLM"), LLAMA),
}
# families people ask for that do something else between the parts (see the docs' list)
NOT_YET = {
    "CohereForCausalLM": "multiplies the logits by logit_scale and runs attention and MLP side by side",
    "Cohere2ForCausalLM": "multiplies the logits by logit_scale and runs attention and MLP side by side",
    "FalconForCausalLM": "runs attention and MLP side by side on one norm (parallel blocks)",
    "GPTNeoXForCausalLM": "keeps its parts under gpt_neox with another forward",
    "GPTBigCodeForCausalLM": "has GPT-2's parts with another attention (multi-query) forward",
    "JetMoeForCausalLM": "routes attention heads too (mixture of attention heads), with its own router loss",
    "HunYuanMoEV1ForCausalLM": "does not add its router loss the way Mixtral does",
    "PhimoeForCausalLM": "routes with sparsemixer (another forward than top-k softmax)",
    "Llama4ForCausalLM": "has chunked attention layers",
    "Qwen3NextForCausalLM": "has linear-attention (gated delta) layers",
    "Gemma3ForConditionalGeneration": "is a vision-language model (load the text model as Gemma3ForCausalLM)",
    "DeepseekV3ForCausalLM": ("is not checked against HF's forward yet (grouped top-k routing with a bias "
                              "and shared experts)"),
}


@dataclass(frozen=True)
class Layout:
    """One model's parts and the config's scalars its forward applies between them."""

    parts: Parts
    embedding_multiplier: float = 1.0  # Granite: the embedding's output times this
    logit_divisor: float = 1.0  # Granite: logits / logits_scaling
    logit_softcap: float | None = None  # Gemma 2/3: cap * tanh(logits / cap)
    rotary_per_type: bool = False  # Gemma 3: the rotary embedding takes the attention type
    router: MoE | None = None  # a mixture of experts whose load-balancing loss joins the objective


@dataclass(frozen=True)
class MoE:
    """What HF's `load_balancing_loss_func` needs, and which modules' outputs are the router logits."""

    router_class: type[nn.Module]  # from the model's `_can_record_outputs["router_logits"]`
    index: int  # which of the router's outputs are the logits
    num_experts: int
    top_k: int
    coefficient: float  # config.router_aux_loss_coef


def layout_of(model: nn.Module) -> Layout:
    """The layout of `model`, an instance of one of SUPPORTED (or a subclass); TypeError otherwise."""
    name = next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in SUPPORTED), None)
    if name is None:
        reason = next((f": {cls.__name__} {NOT_YET[cls.__name__]}" for cls in type(model).__mro__
                       if cls.__name__ in NOT_YET), "")
        raise TypeError(f"from_hf supports the decoder-only causal LMs {', '.join(SUPPORTED)} (and subclasses); "
                        f"got {type(model).__name__}{reason}")
    parts, config = SUPPORTED[name], model.config
    base = getattr(model, parts.base, None)
    named = [parts.embed, parts.layers, parts.norm, parts.positions, parts.rotary, parts.dropout]
    missing = [p for p in named if p is not None and not hasattr(base, p)]
    if base is None or missing or not hasattr(model, "lm_head"):
        raise TypeError(f"{type(model).__name__} lacks the parts of {name} ({parts.base}.{', '.join(missing)} or "
                        "lm_head): from_hf adapts the model classes of transformers as they are")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{type(config).__name__}.use_bidirectional_attention is set (an embedding model): from_hf "
                         "trains causal LMs only")
    rotary = getattr(base, parts.rotary) if parts.rotary else None
    return Layout(parts=parts,
                  embedding_multiplier=float(getattr(config, "embedding_multiplier", 1.0) or 1.0),
                  logit_divisor=float(getattr(config, "logits_scaling", 1.0) or 1.0),
                  logit_softcap=getattr(config, "final_logit_softcapping", None),
                  rotary_per_type=rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters,
                  router=_moe(model))


def supported_model_types() -> set[str]:
    """The config.json `model_type`s whose causal LM is in SUPPORTED (e.g. "gemma3_text", "gpt2")."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {kind for kind, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if name in SUPPORTED}


def _moe(model: nn.Module) -> MoE | None:
    """The router of an MoE whose config asks for the load-balancing loss (`output_router_logits`, as HF's
    forward adds it to the loss only then), else None."""
    config = model.config
    recorder = getattr(model, "_can_record_outputs", None) or {}
    recorder = recorder.get("router_logits")
    if recorder is None or not getattr(config, "output_router_logits", False):
        return None
    router_class, index = (recorder, 0) if isinstance(recorder, type) else (recorder.target_class, recorder.index)
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    return MoE(router_class=router_class, index=index, num_experts=num_experts, top_k=config.num_experts_per_tok,
               coefficient=float(config.router_aux_loss_coef))
