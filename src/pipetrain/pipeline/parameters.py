"""This rank's part of the model as an optimizer sees it: its layers and parameters, their state, and the
optimizer over them (over this replica's shards when the Pipeline shards over data-parallel replicas)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..runtime.data_parallel import sum_over
from ..runtime.expert_parallel import is_expert_parallel
from ..runtime.tensor_parallel import as_part, is_sharded, load_whole_state, local, part_like, whole_like, whole_state


class RankParameters:
    """A mixin of `Pipeline`: needs `stages`, `layer_ranges`, `_extra_layers`, `_ties`, `_averager`, `shard`,
    `dp_group`, `tp_mesh`, `device` and `timeout`."""

    _extra_layers: dict[int, nn.Module] = {}  # (never mutated: each Pipeline sets its own)

    @property
    def layers(self) -> dict[int, nn.Module]:
        """This rank's layers, by their index in the full list of layers (with vocabulary parallelism, on a rank
        without the last stage, the last layer's projection shard alone)."""
        mine = {i: layer for s, stage in self.stages.items()
                for i, layer in zip(self.layer_ranges[s], stage.layers, strict=True)}
        return dict(sorted((mine | self._extra_layers).items()))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of this rank's stages, each once (what this rank's optimizer should own, through
        `optimizer(...)` when the pipeline shards them; with shard="params" whole only in steps: `unshard`)."""
        return (p for _, p in self.named_parameters())

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """`("{layer index}.{name}", parameter)` for this rank's layers, each parameter once; the names are
        those of `nn.Sequential(*layers)` in one process, so they match across rank counts."""
        seen = set()
        for i, layer in self.layers.items():
            for name, p in layer.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{i}.{name}", p

    def owned_parameters(self) -> Iterator[nn.Parameter]:
        """Like `parameters()`, but a weight tied across ranks only on the rank of its first use: summing
        over every rank's owned parameters counts each weight once (e.g. for a global gradient norm)."""
        copies = self._ties.copies()
        return (p for p in self.parameters() if id(p) not in copies)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's layers' state, keyed `"{layer index}.{name}"` (as `nn.Sequential(*layers)`), whole: with
        tensor parallel, split tensors are gathered (collective over tp); with shard="params", collective over
        the replicas (`unshard`)."""
        self.unshard()
        return {f"{i}.{k}": v for i, layer in self.layers.items() for k, v in whole_state(layer).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this rank's layers from a state dict keyed `"{layer index}.{name}"` (more keys may be given:
        the whole model's state dict loads on every rank; tensor-parallel ranks keep their parts of it). With
        shard="params", collective over the replicas."""
        self.unshard()
        try:
            for i, layer in self.layers.items():
                prefix = f"{i}."
                load_whole_state(layer, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except BaseException:
            self.reshard()  # (a part-way load: the next use gathers the shards' values, all old)
            raise
        self.adopt_parameters()

    # --- shard="params" (ZeRO-3) ------------------------------------------------------------------------
    def unshard(self) -> None:
        """With shard="params": make this rank's parameters whole. Between steps the trained ones hold no data
        (an empty tensor; the optimizer's pieces hold this replica's range; frozen ones stay whole) and are
        all-gathered here, collective over the replicas; they stay whole until the next step's reduction or
        optimizer step releases them. evaluate, generate, state_dict, checkpoints, load_weights and
        save_pretrained call it. Otherwise nothing."""
        if self._shards:
            self._shards.unshard()

    def reshard(self) -> None:
        """With shard="params": release this rank's whole parameters (the next use gathers them from the
        shards), e.g. after a write into them that is not to be kept. Otherwise nothing."""
        if self._shards:
            self._shards.reshard()

    def adopt_parameters(self) -> None:
        """With shard="params": after writing into the whole parameters (loading weights, any in-place write
        into `parameters()` outside the optimizer), this replica's shards take their new values (no
        communication); without it the next optimizer step would update the old ones. Otherwise nothing."""
        if self._shards:
            self._shards.take_written()

    # --- the optimizer ---------------------------------------------------------------------------------
    @property
    def _shards(self):
        return self._averager if self.shard != "none" else None

    def optimizer(self, make: Callable[[list[dict]], torch.optim.Optimizer],
                  groups: Sequence[dict] | None = None) -> torch.optim.Optimizer:
        """`make(groups)`, the optimizer of this rank's parameters (`groups`: torch parameter groups over
        `parameters()`; default one group of all). With `shard="optimizer" | "gradients"` it is built over
        this replica's pieces of them instead (1/dp of each stage's parameters, as views of their storage),
        each `step()` is followed by the all-gather of every replica's updates into the parameters (ZeRO-3:
        by releasing them, the next step gathers), and `zero_grad()` also drops the parameters' gradients."""
        groups = list(groups) if groups is not None else [{"params": list(self.parameters())}]
        shards = self._shards
        if shards is None:
            return make(groups)
        optimizer = make(shards.param_groups(groups))
        optimizer.register_step_post_hook(lambda *_: shards.gather_updates())
        pieces_only = optimizer.zero_grad

        def zero_grad(set_to_none: bool = True) -> None:  # the parameters' gradients too (.grad of ZeRO-1)
            pieces_only(set_to_none)
            self.zero_grad()

        optimizer.zero_grad = zero_grad
        shards.has_optimizer = True
        return optimizer

    def gradients(self) -> list[torch.Tensor]:
        """The gradients the optimizer steps on (this replica's pieces' when sharded), e.g. to clip them."""
        params = [piece.master for piece in self._shards.pieces()] if self._shards else self.parameters()
        return [p.grad for p in params if p.grad is not None]

    def gradient_sum_of_squares(self) -> float:
        """This rank's part of the squared global gradient norm: summed over every rank of the job (e.g. with
        `all_reduce`) it is the norm's square, each weight counted once (tied weights too)."""
        if self._shards:
            copies = self._ties.copies()
            grads = [(pc.master.grad, pc.param) for pc in self._shards.pieces() if id(pc.param) not in copies]
            replicas = 1  # each replica holds its own range
        else:
            grads = [(p.grad, p) for p in self.owned_parameters()]
            replicas = self.dp_size  # every replica holds the same reduced gradients
        whole, split, experts = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        for g, p in grads:
            if g is not None:  # (split by tensor parallel: summed over tp; whole ones, the same there, once)
                into = experts if is_expert_parallel(p) else split if is_sharded(p) else whole
                into.add_(local(g).detach().double().pow(2).sum().cpu())
        if self.tp_mesh is not None:
            split = sum_over(self.tp_mesh.get_group(), split.to(self.device), self.timeout, "a tensor-parallel sum")
        # an expert's part differs between the ep ranks (each holds its experts): the job's sum counts each
        # part once per replica that holds the same experts, dp / ep of them
        holders = max(1, replicas // getattr(self, "ep_size", 1))
        return (float(whole) + float(split)) / replicas + float(experts) / holders

    def zero_grad(self) -> None:
        """Drop this rank's gradients (the parameters' and, when sharded, their pieces')."""
        for p in self.parameters():
            p.grad = None
        if self._shards:
            for piece in self._shards.pieces():
                piece.master.grad = None

    def optimizer_state(self, optimizer: torch.optim.Optimizer, *, whole: bool = True) -> dict[int, dict[str, Any]]:
        """`{id(parameter): state}` for this rank's parameters, as an unsharded optimizer of the whole model
        holds it. Sharded: collective over the replicas (replica 0 gets every replica's pieces). Tensor
        parallel: each split state whole (collective over tp), or with `whole=False` this rank's part as a
        DTensor placed like its parameter (what a distributed checkpoint writes)."""
        shards = self._shards
        if shards is None:
            states = {id(p): optimizer.state[p] for g in optimizer.param_groups for p in g["params"]
                      if p in optimizer.state}
        else:
            states = shards.full_state(optimizer)
        if self.tp_mesh is None:
            return states
        convert = whole_like if whole else as_part
        return {id(p): {k: convert(v, p) for k, v in states[id(p)].items()}
                for p in self.parameters() if id(p) in states}  # (the same order on every tp rank)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, states: dict[int, dict[str, Any]]) -> None:
        """Put `states` (`{id(parameter): state}`, as `optimizer_state` gives) into `optimizer`."""
        shards = self._shards
        if self.tp_mesh is not None:  # this rank's parts: DTensors as the parameters, or a shard's plain slices
            states = {id(p): {k: part_like(v, p, split=shards is None) for k, v in states[id(p)].items()}
                      for p in self.parameters() if id(p) in states}
        if shards is None:
            by_id = {id(p): p for p in self.parameters()}
            for key, state in states.items():
                optimizer.state[by_id[key]] = state
            return
        shards.load_state(optimizer, states)

