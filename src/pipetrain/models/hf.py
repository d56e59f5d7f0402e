"""Hugging Face causal LMs of the Llama family as pipetrain layers, using the model's own modules.

    layers, loss_fn = from_hf(model)   # [Embedding, decoder layer x N, Norm+Head], causal_lm_loss

Between the layers travels a dict: "hidden_states" (b, t, d) (gets gradients), "position_ids" (b, t) and,
when the inputs have one, the 2-d "attention_mask" (b, t) (both forward only). Each decoder layer derives
its 4-d mask and rotary embedding from them, once per stage and microbatch, with transformers' own code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..runtime.cross_entropy import CrossEntropy
from ..runtime.tensor_parallel import Split, require_divisible
from .hf_checkpoint import load_weights, save_pretrained

__all__ = ["SUPPORTED", "causal_lm_loss", "from_hf", "load_weights", "save_pretrained"]

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def from_hf(model: nn.Module) -> tuple[list[nn.Module], Callable[[torch.Tensor, torch.Tensor], Any]]:
    """`(layers, loss_fn)` for a decoder-only causal LM from `transformers` built as `model.embed_tokens`,
    `model.layers`, `model.norm`, `model.rotary_emb` and `lm_head`: one of SUPPORTED (or a subclass).

    The layers hold the model's own parameters (tied embeddings stay tied); the model may be on the meta
    device, and a Pipeline then materializes each rank's own layers (see `load_weights`). Inputs are HF's:
    a dict with "input_ids" and optionally "attention_mask" (padding on either side) and "position_ids";
    targets are `labels`, with -100 where no loss is taken, shifted inside `loss_fn` as HF shifts them."""
    _check_supported(model)
    base = model.model
    keys_of: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        keys_of.setdefault(id(tensor), []).append(key)
    masks = _Masks(model.config)
    layers: list[nn.Module] = [Embedding(base.embed_tokens),
                               *(DecoderLayer(layer, i, base.rotary_emb, masks) for i, layer in enumerate(base.layers)),
                               NormHead(base.norm, model.lm_head)]
    for layer in layers:
        layer.config = model.config
        layer._init_module = model._init_weights  # a bound method: HF's initialization of one module
        layer.hf_keys = {k: keys_of[id(t)] for k, t in layer.state_dict(keep_vars=True).items()}
    return layers, causal_lm_loss


causal_lm_loss = CrossEntropy(shift=True)
"""HF's causal-LM loss as `(loss_sum, count)`: position i predicts labels[:, i + 1]; -100 is ignored.
logits (b, t, vocab), labels (b, t)."""


class _HFLayer(nn.Module):
    """What every adapter layer has: HF's config, its names for the layer's tensors, HF's initialization."""

    config: Any
    hf_keys: dict[str, list[str]]  # the layer's state_dict key -> the model's keys for that tensor (tied: several)

    def init_weights(self) -> None:
        for module in self.modules():
            if module is not self:
                self._init_module(module)

    def _divisible(self, tp: int, **sizes: int) -> None:
        require_divisible(tp, type(self.config).__name__, **sizes)


class Embedding(_HFLayer):
    """inputs {"input_ids" (b, t), ["attention_mask" (b, t)], ["position_ids" (b, t)]} (or the ids alone)
    -> {"hidden_states" (b, t, d), "position_ids" (b, t), ["attention_mask"]}."""

    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, inputs: dict | torch.Tensor) -> dict:
        inputs = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown or "input_ids" not in inputs:
            raise ValueError(f"inputs must be a dict with 'input_ids' and optionally 'attention_mask' and "
                             f"'position_ids', got keys {sorted(inputs)} (labels go to targets)")
        ids = inputs["input_ids"]  # (b, t)
        out = {"hidden_states": self.embed_tokens(ids)}  # (b, t, d)
        if inputs.get("attention_mask") is not None:
            out["attention_mask"] = inputs["attention_mask"]
        positions = inputs.get("position_ids")
        if positions is None:  # as HF's model without a cache: 0..t-1 whatever the padding
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
        out["position_ids"] = positions.expand(ids.shape[0], -1).contiguous()  # (b, t): split with the batch
        return out

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        self._divisible(tp, vocab_size=self.embed_tokens.num_embeddings)
        return {"embed_tokens": Split.EMBEDDING}

    def forward_cached(self, ids: torch.Tensor, cache) -> dict:
        """Generation (pipetrain.generation.kv_cache): the new tokens (b, t); positions come from the cache."""
        return {"hidden_states": self.embed_tokens(ids)}


class DecoderLayer(_HFLayer):
    """HF decoder layer `index`: {"hidden_states", ...} -> the same dict with new hidden states."""

    def __init__(self, layer: nn.Module, index: int, rotary_emb: nn.Module, masks: _Masks) -> None:
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb  # shared by all decoder layers (buffers only)
        self.masks = masks
        types = getattr(masks.config, "layer_types", None)
        sliding = getattr(masks.config, "sliding_window", None) is not None
        self.attention_type = types[index] if types else "sliding_attention" if sliding else "full_attention"
        accepted = inspect.signature(layer.forward).parameters  # the cache's keyword, renamed across versions
        self.cache_keyword = next((k for k in ("cache", "past_key_values", "past_key_value") if k in accepted), None)

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        """The model's own `base_model_tp_plan` (transformers' names: colwise, rowwise, and a per-head norm's
        replicated_with_grad_allreduce), for this layer."""
        config = self.config
        self._divisible(tp, num_attention_heads=config.num_attention_heads,
                        num_key_value_heads=config.num_key_value_heads, intermediate_size=config.intermediate_size)
        known = {"colwise": Split.COLUMNS, "rowwise": Split.ROWS, "replicated_with_grad_allreduce": Split.GRAD_SUM}
        plan = {}
        for key, style in (getattr(config, "base_model_tp_plan", None) or {}).items():
            if not key.startswith("layers.*."):
                continue
            if style not in known:
                raise ValueError(f"{type(config).__name__}'s tensor-parallel plan splits {key} as {style!r}, which "
                                 f"pipetrain does not run (it runs {', '.join(known)}): use tp=1 for this model")
            plan["layer." + key[len("layers.*."):]] = known[style]
        if not plan:
            raise ValueError(f"{type(config).__name__} has no base_model_tp_plan for its decoder layers: use tp=1")
        return plan

    def forward(self, x: dict) -> dict:
        hidden = x["hidden_states"]
        mask, rotary = self.masks.get(hidden, x.get("attention_mask"), x["position_ids"], self.attention_type,
                                      self.rotary_emb)
        out = self.layer(hidden, attention_mask=mask, position_ids=x["position_ids"], position_embeddings=rotary)
        return {**x, "hidden_states": out[0] if isinstance(out, tuple) else out}

    def forward_cached(self, x: dict, cache) -> dict:
        """Generation (pipetrain.generation.kv_cache): HF's layer with our cache in place of its Cache (attention calls
        `cache.update(k, v, layer_idx, ...)`), our 0/-inf mask and rotary embedding at each token's position."""
        if self.cache_keyword is None:
            raise TypeError(f"{type(self.layer).__name__}.forward takes no cache argument; this transformers "
                            "version cannot generate through pipetrain")
        hidden = x["hidden_states"]
        window = self.masks.config.sliding_window if self.attention_type == "sliding_attention" else None
        out = self.layer(hidden, attention_mask=cache.additive_mask(hidden.dtype, window),
                         position_ids=cache.positions, position_embeddings=self.rotary_emb(hidden, cache.positions),
                         use_cache=True, **{self.cache_keyword: cache})
        return {"hidden_states": out[0] if isinstance(out, tuple) else out}


class NormHead(_HFLayer):
    """{"hidden_states" (b, t, d), ...} -> logits (b, t, vocab)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        self._divisible(tp, vocab_size=self.lm_head.out_features)
        return {"lm_head": Split.HEAD}

    def forward(self, x: dict) -> torch.Tensor:
        return self.lm_head(self.norm(x["hidden_states"]))

    def forward_cached(self, x: dict, cache) -> torch.Tensor:
        """Generation: the logits of the last position only, (b, 1, vocab)."""
        return self.lm_head(self.norm(x["hidden_states"][:, -1:]))


class _Masks:
    """The 4-d attention mask and the rotary (cos, sin) of one microbatch, made by transformers' functions
    and kept for the next layer of the stage (it gets the same mask and position tensors)."""

    def __init__(self, config) -> None:
        from transformers import masking_utils

        self.config = config
        self.makers = {"full_attention": masking_utils.create_causal_mask,
                       "sliding_attention": masking_utils.create_sliding_window_causal_mask}
        self._last: tuple | None = None  # (mask 2-d, positions, kind, dtype, result): read and written whole

    def get(self, hidden, attention_mask, positions, kind: str, rotary_emb: nn.Module):
        last = self._last
        if (last is not None and last[0] is attention_mask and last[1] is positions and last[2] == kind
                and last[3] == hidden.dtype):
            return last[4]
        if kind not in self.makers:
            raise ValueError(f"attention type {kind!r} of {type(self.config).__name__} is not supported "
                             f"(supported: {sorted(self.makers)})")
        maker = self.makers[kind]
        accepted = inspect.signature(maker).parameters
        kwargs = {"config": self.config, "attention_mask": attention_mask, "position_ids": positions,
                  "inputs_embeds" if "inputs_embeds" in accepted else "input_embeds": hidden}
        for name in ("cache", "past_key_values"):  # renamed across transformers versions
            if name in accepted:
                kwargs[name] = None
        if "cache_position" in accepted:
            kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
        result = (maker(**kwargs), rotary_emb(hidden, positions))
        self._last = (attention_mask, positions, kind, hidden.dtype, result)
        return result


def _check_supported(model: nn.Module) -> None:
    """Only the classes whose model forward is exactly embed -> layers -> norm -> head (Gemma, for one, has the
    same parts but scales the embedding and caps the logits: adapting it by its parts would be wrong)."""
    classes = {cls.__name__ for cls in type(model).__mro__}
    base = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not classes & set(SUPPORTED) or base is None or not all(hasattr(base, p) for p in parts):
        raise TypeError(f"from_hf supports the decoder-only causal LMs {', '.join(SUPPORTED)} (and subclasses); "
                        f"got {type(model).__name__}")
