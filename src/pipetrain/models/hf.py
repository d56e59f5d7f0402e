"""Hugging Face decoder-only causal LMs as pipetrain layers, using the model's own modules.

    layers, loss_fn = from_hf(model)   # [Embedding, decoder layer x N, Norm+Head], causal_lm_loss

The families (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo2, Granite, GPT-2, Mixtral, Qwen3-MoE) are
one adapter over their layout (`hf_layout`). Between the layers travels a dict: "hidden_states" (b, t, d)
(gets gradients), "position_ids" (b, t) and, when the inputs have one, the 2-d "attention_mask" (b, t)
(both forward only); an MoE whose config sets `output_router_logits` adds "router_sums" (`load_balance`),
which the last layer turns into HF's load-balancing loss (`pt.add_aux_loss`). Each decoder layer derives
its 4-d mask and rotary embedding from them, once per stage and microbatch, with transformers' own code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..runtime.aux_loss import add_aux_loss
from ..runtime.cross_entropy import CrossEntropy
from ..runtime.tensor_parallel import Split, require_divisible, vocabulary_rows
from .hf_checkpoint import load_weights, save_pretrained
from .hf_layout import NOT_YET, SUPPORTED, Layout, layout_of
from .load_balance import add_sums, balance_loss, router_sums

__all__ = ["NOT_YET", "SUPPORTED", "causal_lm_loss", "from_hf", "load_weights", "save_pretrained"]

INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def from_hf(model: nn.Module) -> tuple[list[nn.Module], Callable[[torch.Tensor, torch.Tensor], Any]]:
    """`(layers, loss_fn)` for a decoder-only causal LM from `transformers`: one of SUPPORTED (or a subclass).

    The layers hold the model's own parameters (tied embeddings stay tied); the model may be on the meta
    device, and a Pipeline then materializes each rank's own layers (see `load_weights`). Inputs are HF's:
    a dict with "input_ids" and optionally "attention_mask" (padding on either side) and "position_ids";
    targets are `labels`, with -100 where no loss is taken, shifted inside `loss_fn` as HF shifts them."""
    layout = layout_of(model)
    parts = layout.parts
    base = getattr(model, parts.base)
    keys_of: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        keys_of.setdefault(id(tensor), []).append(key)
    rotary = getattr(base, parts.rotary) if parts.rotary else None
    masks = _Masks(model.config, rotary, layout.rotary_per_type)
    layers: list[nn.Module] = [
        Embedding(getattr(base, parts.embed), layout, positions=getattr(base, parts.positions, None) if parts.positions
                  else None, dropout=getattr(base, parts.dropout) if parts.dropout else None),
        *(DecoderLayer(layer, i, masks, layout) for i, layer in enumerate(getattr(base, parts.layers))),
        NormHead(getattr(base, parts.norm), model.lm_head, layout)]
    for layer in layers:
        layer.config = model.config
        object.__setattr__(layer, "hf_model", model)  # (not a submodule: the layers hold its parts)
        layer.hf_keys = {k: keys_of[id(t)] for k, t in layer.state_dict(keep_vars=True).items()}
    return layers, causal_lm_loss


causal_lm_loss = CrossEntropy(shift=True)
"""HF's causal-LM loss as `(loss_sum, count)`: position i predicts labels[:, i + 1]; -100 is ignored.
logits (b, t, vocab), labels (b, t)."""


class _HFLayer(nn.Module):
    """What every adapter layer has: HF's config, its names for the layer's tensors, HF's initialization."""

    config: Any
    hf_model: nn.Module  # the model the layer came from: its class names its conversions and initialization
    hf_keys: dict[str, list[str]]  # the layer's state_dict key -> the model's keys for that tensor (tied: several)

    def init_weights(self) -> None:
        for module in self.modules():
            if module is not self:
                self.hf_model._init_weights(module)  # HF's initialization of one module

    def _divisible(self, tp: int, **sizes: int | None) -> None:
        require_divisible(tp, type(self.config).__name__, **sizes)


class Embedding(_HFLayer):
    """inputs {"input_ids" (b, t), ["attention_mask" (b, t)], ["position_ids" (b, t)]} (or the ids alone)
    -> {"hidden_states" (b, t, d), "position_ids" (b, t), ["attention_mask"]}."""

    def __init__(self, embed_tokens: nn.Module, layout: Layout, *, positions: nn.Module | None = None,
                 dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.position_embeddings = positions  # GPT-2's learned positions (wpe)
        self.dropout = dropout
        self.multiplier = layout.embedding_multiplier

    def forward(self, inputs: dict | torch.Tensor) -> dict:
        inputs = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown or "input_ids" not in inputs:
            raise ValueError(f"inputs must be a dict with 'input_ids' and optionally 'attention_mask' and "
                             f"'position_ids', got keys {sorted(inputs)} (labels go to targets)")
        ids = inputs["input_ids"]  # (b, t)
        positions = inputs.get("position_ids")
        if positions is None:  # as HF's model without a cache: 0..t-1 whatever the padding
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
        positions = positions.expand(ids.shape[0], -1).contiguous()  # (b, t): split with the batch
        out = {"hidden_states": self._embed(ids, positions), "position_ids": positions}  # (b, t, d)
        if inputs.get("attention_mask") is not None:
            out["attention_mask"] = inputs["attention_mask"]
        return out

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(ids)  # (b, t, d)
        if self.multiplier != 1.0:
            hidden = hidden * self.multiplier
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(positions)
        return self.dropout(hidden) if self.dropout is not None else hidden

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        if self.position_embeddings is not None:
            raise ValueError(f"{type(self.config).__name__} has no tensor-parallel plan in transformers: use tp=1")
        self._divisible(tp, vocab_size=vocabulary_rows(self.embed_tokens))
        return {"embed_tokens": Split.EMBEDDING}

    def vocabulary_parallel_plan(self) -> str:
        """The token table vocabulary parallelism splits over the pipeline ranks."""
        return "embed_tokens"

    def forward_cached(self, ids: torch.Tensor, cache) -> dict:
        """Generation (pipetrain.generation.kv_cache): the new tokens (b, t); positions come from the cache."""
        return {"hidden_states": self._embed(ids, cache.positions)}


class DecoderLayer(_HFLayer):
    """HF decoder layer `index`: {"hidden_states", ...} -> the same dict with new hidden states (and, in an
    MoE that trains its router's balance, "router_sums" with this layer's added)."""

    def __init__(self, layer: nn.Module, index: int, masks: _Masks, layout: Layout) -> None:
        super().__init__()
        self.layer = layer
        self.rotary_emb = masks.rotary_emb  # shared by the decoder layers (buffers only): materialized with them
        self.masks = masks
        config = masks.config
        types = getattr(config, "layer_types", None)
        sliding = getattr(config, "sliding_window", None) is not None
        self.attention_type = types[index] if types else "sliding_attention" if sliding else "full_attention"
        accepted = inspect.signature(layer.forward).parameters  # the cache's keyword, renamed across versions
        self.cache_keyword = next((k for k in ("cache", "past_key_values", "past_key_value") if k in accepted), None)
        self.moe = layout.router
        self._routers = [m for m in layer.modules() if isinstance(m, self.moe.router_class)] if self.moe else []

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

    def expert_parallel_plan(self) -> list[str]:
        """The experts modules of this layer, by the model's own `base_model_ep_plan` ("ep_dispatch_experts")."""
        plan = getattr(self.config, "base_model_ep_plan", None) or {}
        paths = ["layer." + key[len("layers.*."):] for key, style in plan.items()
                 if key.startswith("layers.*.") and style == "ep_dispatch_experts"]
        found = {name for name, _ in self.named_modules()}
        return [path for path in paths if path in found]  # (a dense layer of an MoE model has none)

    def forward(self, x: dict) -> dict:
        hidden = x["hidden_states"]
        mask, rotary = self.masks.get(hidden, x.get("attention_mask"), x["position_ids"], self.attention_type)
        if not self._routers:  # a dense layer (in an MoE model, some layers may be)
            return {**x, "hidden_states": self._call(hidden, mask, x["position_ids"], rotary)}
        logits: list[torch.Tensor] = []  # each router's (b * t, E), as HF's output recorder takes them
        keep = lambda module, args, out: logits.append(out[self.moe.index] if isinstance(out, tuple) else out)  # noqa: E731
        hooks = [router.register_forward_hook(keep) for router in self._routers]
        try:
            out = self._call(hidden, mask, x["position_ids"], rotary)
        finally:
            for hook in hooks:
                hook.remove()
        sums = x.get("router_sums")
        for each in logits:
            sums = add_sums(sums, router_sums(each, self.moe.top_k, x.get("attention_mask")))
        return {**x, "hidden_states": out, "router_sums": sums}

    def _call(self, hidden, mask, positions, rotary, **kwargs) -> torch.Tensor:
        if rotary is not None:
            kwargs["position_embeddings"] = rotary
        out = self.layer(hidden, attention_mask=mask, position_ids=positions, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def forward_cached(self, x: dict, cache) -> dict:
        """Generation (pipetrain.generation.kv_cache): HF's layer with our cache in place of its Cache (attention calls
        `cache.update(k, v, layer_idx, ...)`), our 0/-inf mask and rotary embedding at each token's position."""
        if self.cache_keyword is None:
            raise TypeError(f"{type(self.layer).__name__}.forward takes no cache argument; this transformers "
                            "version cannot generate through pipetrain")
        hidden = x["hidden_states"]
        window = self.masks.config.sliding_window if self.attention_type == "sliding_attention" else None
        out = self._call(hidden, cache.additive_mask(hidden.dtype, window), cache.positions,
                         self.masks.rotary(hidden, cache.positions, self.attention_type),
                         use_cache=True, **{self.cache_keyword: cache})
        return {"hidden_states": out}


class NormHead(_HFLayer):
    """{"hidden_states" (b, t, d), ...} -> logits (b, t, vocab), as the model's forward scales or caps them;
    with "router_sums", adds the MoE's load-balancing loss times its coefficient (HF's `aux_loss`)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, layout: Layout) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.logit_divisor = layout.logit_divisor
        self.logit_softcap = layout.logit_softcap
        self.balance = layout.router.coefficient if layout.router is not None else None

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        self._divisible(tp, vocab_size=vocabulary_rows(self.lm_head))
        return {"lm_head": Split.HEAD}

    def vocabulary_parallel_plan(self) -> str:
        """The projection vocabulary parallelism splits over the pipeline ranks: lm_head, applied last unless the
        model scales or caps its logits after it."""
        if self.logit_divisor != 1.0 or self.logit_softcap is not None:
            raise ValueError("vocab_parallel=True splits lm_head, which must be the head's last operation; this "
                             "model scales or caps its logits after it (logit divisor or softcap): leave "
                             "vocab_parallel off for it")
        return "lm_head"

    def forward(self, x: dict) -> torch.Tensor:
        if self.balance is not None and "router_sums" in x:
            add_aux_loss(self.balance * balance_loss(x["router_sums"]))
        return self._logits(x["hidden_states"])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))  # (b, t, vocab)
        if self.logit_divisor != 1.0:
            logits = logits / self.logit_divisor
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def forward_cached(self, x: dict, cache) -> torch.Tensor:
        """Generation: the logits of the last position only, (b, 1, vocab)."""
        return self._logits(x["hidden_states"][:, -1:])


class _Masks:
    """The 4-d attention mask and the rotary (cos, sin) of one microbatch, made by transformers' functions
    and kept for the next layer of the stage (it gets the same mask and position tensors)."""

    def __init__(self, config, rotary_emb: nn.Module | None, per_type: bool) -> None:
        from transformers import masking_utils

        self.config = config
        self.rotary_emb = rotary_emb  # shared by all decoder layers (buffers only); None: positions are learned
        self.per_type = per_type
        self.makers = {"full_attention": masking_utils.create_causal_mask,
                       "sliding_attention": masking_utils.create_sliding_window_causal_mask}
        self._last: tuple | None = None  # (mask 2-d, positions, kind, dtype, result): read and written whole

    def rotary(self, hidden, positions, kind: str):
        if self.rotary_emb is None:
            return None
        return self.rotary_emb(hidden, positions, kind) if self.per_type else self.rotary_emb(hidden, positions)

    def get(self, hidden, attention_mask, positions, kind: str):
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
        cache = next((name for name in ("cache", "past_key_values") if name in accepted), None)  # renamed in 5.x
        if cache is not None:
            kwargs[cache] = None
        if "cache_position" in accepted:
            kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
        result = (maker(**kwargs), self.rotary(hidden, positions, kind))
        self._last = (attention_mask, positions, kind, hidden.dtype, result)
        return result
