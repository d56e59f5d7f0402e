"""A model's tensors under the names its Hugging Face checkpoints use on disk, by transformers' own rules.

transformers 5 holds some weights in another form than its checkpoints store them: an MoE's experts are one
(E, 2I, d) `gate_up_proj` in the model but `experts.{e}.w1/w3.weight` (Mixtral) or
`experts.{e}.gate_proj/up_proj.weight` (Qwen3-MoE) on disk, and `from_pretrained` / `save_pretrained`
convert between them (its `conversion_mapping`). pipetrain reads and writes a stage's tensors itself, so it
applies the same conversions: `stored(model, tensors)` for writing, `Reader` for reading. Families without
conversions pass through unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def stored(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (the model's names) as `save_pretrained` writes them: HF's conversions reverted. The
    tensors a conversion joins (one MoE layer's experts) must all be in `tensors`."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


class Reader:
    """The model's tensors from a checkpoint's tensors: `read(name)` reads the one stored under `name` (the
    names in `available`); a model tensor stored in another form is rebuilt by HF's conversion."""

    def __init__(self, model: nn.Module, available: list[str], read: Callable[[str], torch.Tensor]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model, self.read = model, read
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.plain: dict[str, str] = {name: name for name in available}  # model name -> stored name
        self.sources: dict[str, list[tuple[str, str]]] = {}  # model name -> [(stored name, pattern)] to convert
        self.converter: dict[str, object] = {}
        for name in sorted(available, key=_natural):  # (experts in order: 0, 1, ..., 10)
            renamed, pattern = rename_source_key(name, renamings, converters)
            if pattern is None:
                self.plain.setdefault(renamed, name)
            else:
                self.sources.setdefault(renamed, []).append((name, pattern))
                self.converter.setdefault(renamed, by_pattern[pattern])

    def __contains__(self, name: str) -> bool:
        return name in self.plain or name in self.sources

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.plain:
            return self.read(self.plain[name])
        converter = copy.deepcopy(self.converter[name])  # (it collects the tensors it joins)
        for stored_name, pattern in self.sources[name]:
            converter.add_tensor(name, stored_name, pattern, self.read(stored_name))
        value = converter.convert(name, model=self.model, config=self.model.config)[name]
        return value[0] if isinstance(value, list) else value


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
