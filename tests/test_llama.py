"""The reference Llama: HF's LlamaForCausalLM with the same weights computes the same logits; presets, GQA,
meta-device builds."""

import pytest
import torch
from torch import nn

import pipetrain as pt
from pipetrain.models import PRESETS, build
from pipetrain.models.llama import LlamaConfig, build_llama, flops_per_token

transformers = pytest.importorskip("transformers")


def _hf_names(i: int, n_layers: int) -> dict[str, str]:
    """Our layer i's parameter names -> HF LlamaForCausalLM's."""
    if i == 0:
        return {"tok.weight": "model.embed_tokens.weight"}
    if i == n_layers + 1:
        return {"norm.weight": "model.norm.weight", "proj.weight": "lm_head.weight"}
    p = f"model.layers.{i - 1}."
    return {"attn_norm.weight": p + "input_layernorm.weight", "wq.weight": p + "self_attn.q_proj.weight",
            "wk.weight": p + "self_attn.k_proj.weight", "wv.weight": p + "self_attn.v_proj.weight",
            "wo.weight": p + "self_attn.o_proj.weight", "ffn_norm.weight": p + "post_attention_layernorm.weight",
            "w_gate.weight": p + "mlp.gate_proj.weight", "w_up.weight": p + "mlp.up_proj.weight",
            "w_down.weight": p + "mlp.down_proj.weight"}


def test_the_reference_llama_computes_hf_llamas_logits_with_the_same_weights():
    cfg = LlamaConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                      rope_theta=500.0, norm_eps=1e-6)
    torch.manual_seed(0)
    layers = build_llama(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=16))
    hf_params = dict(hf.named_parameters())
    assert sum(len(_hf_names(i, 3)) for i in range(len(layers))) == len(hf_params)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for ours, theirs in _hf_names(i, 3).items():
                hf_params[theirs].copy_(layer.get_parameter(ours))
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(nn.Sequential(*layers)(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_presets_build_and_a_meta_build_initializes_like_a_real_one():
    for name in ("llama-tiny", "llama-small", "llama-8x256"):
        cfg = PRESETS[name]
        assert cfg.n_heads % cfg.kv_heads == 0 and cfg.kv_heads < cfg.n_heads  # grouped-query attention
    cfg = PRESETS["llama-tiny"]
    with torch.device("meta"):
        layers = build(cfg)
    sched = pt.schedules.build("1f1b", num_ranks=1, num_microbatches=1)
    pipe = pt.Pipeline(layers, schedule=sched, loss_fn=lambda y, t: y.float().mean(), seed=3,
                       transport=pt.InProcessHub(1).transport(0))
    block = pipe.layers[1]
    torch.testing.assert_close(block.inv_freq, 1.0 / cfg.rope_theta ** (torch.arange(0, 16, 2) / 16))
    assert block.wq.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(block.attn_norm.weight, torch.ones(cfg.d_model))
    assert flops_per_token(cfg) > 6 * sum(p.numel() for p in block.parameters()) * cfg.n_layers


def test_bad_llama_config_names_the_fields():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        LlamaConfig(d_model=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="even size"):
        LlamaConfig(d_model=12, n_heads=4)
