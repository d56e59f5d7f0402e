"""Reference models written as flat lists of layers (GPT, Llama), by preset name; `hf` adapts transformers.

Each model is a list of `nn.Module`s a Pipeline splits, implementing the generation cache protocol
(`forward_cached`); FLOPs are counted by `pipetrain.flops`. It may import torch, `pipetrain.flops` and the
runtime's helpers, never `train`, `pipeline` or the command line (import-linter checks it).
"""

from __future__ import annotations

from torch import nn

from . import gpt, llama

ModelConfig = gpt.GPTConfig | llama.LlamaConfig
PRESETS: dict[str, ModelConfig] = {**gpt.PRESETS, **llama.PRESETS}


def build(cfg: ModelConfig) -> list[nn.Module]:
    """The layers of a GPT or Llama config (seed torch first, or build under torch.device("meta"))."""
    return gpt.build_gpt(cfg) if isinstance(cfg, gpt.GPTConfig) else llama.build_llama(cfg)


def flops_per_token(cfg: ModelConfig) -> float:
    return (gpt if isinstance(cfg, gpt.GPTConfig) else llama).flops_per_token(cfg)


def family(cfg: ModelConfig) -> str:
    return "GPT" if isinstance(cfg, gpt.GPTConfig) else "Llama"
