"""Layers built on the meta device: each rank materializes only its own stages, initialized from the seed and
the layer's index, so 1, 2 or 4 ranks start from the same weights (tied weights included)."""

import pytest
import torch
from torch import nn
from workers import run_processes, run_threads

import pipetrain as pt
from pipetrain.models.gpt import GPTConfig, build_gpt, gpt_loss

CONFIG = GPTConfig(seq_len=8, d_model=16, n_layers=6, n_heads=2)


def _weights(rank, world, transport=None, tie=False, seed=0):
    """This rank's state dict, keyed by layer index, after building the GPT on meta."""
    with torch.device("meta"):
        layers = build_gpt(GPTConfig(**{**CONFIG.__dict__, "tie_embeddings": tie}))
    sched = pt.schedules.build("1f1b", num_ranks=world, num_microbatches=world)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=gpt_loss, transport=transport, seed=seed, balance="uniform")
    others = [layer for i, layer in enumerate(layers) if i not in pipe.layers]
    assert all(p.is_meta for layer in others for p in layer.parameters()), "a rank built another rank's layer"
    assert not any(p.is_meta for p in pipe.parameters())
    return {k: v.clone() for k, v in pipe.state_dict().items()}


def _merged(results) -> dict:
    return {k: v for state in results for k, v in state.items()}


def test_a_model_built_on_meta_starts_from_the_same_weights_on_1_2_or_4_ranks():
    one = _merged(run_threads(1, _weights))
    for world in (2, 4):
        split = _merged(run_threads(world, _weights))
        assert split.keys() == one.keys()
        for k in one:
            assert torch.equal(split[k], one[k]), k
    other_seed = _merged(run_threads(1, _weights, seed=1))
    assert not torch.equal(other_seed["1.q.weight"], one["1.q.weight"])
    assert one["1.q.weight"].std().item() == pytest.approx(0.02, rel=0.2)  # the model's own init, not torch's
    assert torch.equal(one["1.ln1.weight"], torch.ones(CONFIG.d_model))


def test_tied_weights_built_on_meta_start_equal_on_both_ranks():
    one = _merged(run_threads(1, _weights, tie=True))
    last = CONFIG.n_layers + 1
    assert torch.equal(one[f"{last}.proj.weight"], one["0.tok.weight"])
    split = _merged(run_processes(2, _weights, None, True).values())
    assert torch.equal(split[f"{last}.proj.weight"], one["0.tok.weight"])  # rank 1 took rank 0's value
    assert torch.equal(split["0.tok.weight"], one["0.tok.weight"])


class _RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


def _pipe(layers, **kwargs):
    sched = pt.schedules.build("1f1b", num_ranks=1, num_microbatches=1)
    return pt.Pipeline(layers, schedule=sched, loss_fn=lambda y, t: y.sum(), transport=pt.InProcessHub(1).transport(0),
                       **kwargs)


def test_a_meta_layer_that_cannot_initialize_itself_is_refused():
    with torch.device("meta"):
        layers = [nn.Sequential(nn.Linear(4, 4), _RawParameter())]
    with pytest.raises(ValueError, match=r"layer 0 \(Sequential\).*submodule '1' \(_RawParameter\).*init_weights"):
        _pipe(layers)


def test_a_layer_half_on_meta_and_time_balance_on_meta_are_refused():
    layer = nn.Sequential(nn.Linear(4, 4))
    with torch.device("meta"):
        layer.append(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="some parameters on the meta device and some not"):
        _pipe([layer])
    with torch.device("meta"):
        layers = [nn.Linear(4, 4)]
    with pytest.raises(ValueError, match='layers on the meta device cannot run: use balance="params"'):
        _pipe(layers, balance="time", sample=torch.ones(1, 4))
