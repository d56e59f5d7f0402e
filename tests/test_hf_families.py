"""Every family from_hf supports equals HF's own forward in one process (logits, loss with an MoE's router
loss, every gradient), both padding sides; the families it does not support are refused by name."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_families import NAMED, build, in_a_row, pipeline_exactness  # noqa: E402
from hf_models import batch  # noqa: E402
from workers import SCHEDULES, run_processes  # noqa: E402

from pipetrain.models.hf import NOT_YET, SUPPORTED, from_hf  # noqa: E402
from pipetrain.models.hf_layout import layout_of  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_every_supported_family_equals_hf_in_one_process(name):
    model = build(name)
    router = layout_of(model).router  # an MoE whose config adds the router loss (some have no MoE layer)
    moe = router is not None and any(isinstance(m, router.router_class) for m in model.modules())
    assert moe or name not in ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
    for pad in ("right", "left"):
        inputs, labels = batch(pad)
        model.zero_grad()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        logits, loss, aux = in_a_row(model, inputs, labels)
        torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
        assert loss.item() == pytest.approx(out.loss.item(), rel=TOL), pad
        assert aux == (1 if moe else 0)  # the router loss, added once, by the last layer
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(got) == set(want), f"{pad}: gradients of {set(got) ^ set(want)} differ in presence"
        for n, g in got.items():
            error = ((g - want[n]).norm() / want[n].norm().clamp_min(1e-30)).item()
            assert error <= TOL, f"{name}, {pad} padding: {n} off by {error:.1e}"


def test_the_named_mixtures_of_experts_add_hfs_router_loss():
    """Mixtral's and Qwen3-MoE's loss with the router loss is HF's `loss`; their aux_loss is not zero, so
    leaving it out would fail the test above."""
    inputs, labels = batch("left")
    for name in ("MixtralForCausalLM", "Qwen3MoeForCausalLM"):
        out = build(name)(**inputs, labels=labels)
        assert out.aux_loss.item() > 0.5 and NAMED[name].router_aux_loss_coef == 0.1


@pytest.mark.parametrize("name, config", [
    ("CohereForCausalLM", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=32, pad_token_id=0)),
    ("GPTBigCodeForCausalLM", dict(n_embd=16, n_layer=1, n_head=2, vocab_size=32)),
])
def test_a_family_not_supported_yet_is_refused_with_the_reason(name, config):
    model = getattr(transformers, name)(transformers.AutoConfig.for_model(
        {"CohereForCausalLM": "cohere", "GPTBigCodeForCausalLM": "gpt_bigcode"}[name], **config))
    with pytest.raises(TypeError, match=rf"supports the decoder-only causal LMs LlamaForCausalLM, .*GPT2LMHeadModel.*"
                                        rf"got {name}: {name} {NOT_YET[name][:20]}"):
        from_hf(model)


def test_new_families_on_a_pipeline_equal_hf_on_every_schedule():
    """2 gloo ranks: Mixtral on every schedule (its router sums cross stages, with gradients, and the last
    stage adds the router loss per microbatch); GPT-2, Gemma 3 and Qwen3-MoE on two."""
    cases = [("MixtralForCausalLM", s) for s in SCHEDULES]
    cases += [(n, s) for n in ("GPT2LMHeadModel", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM") for s in ("1f1b", "zbv")]
    results = run_processes(2, pipeline_exactness, cases, timeout=300)
    for name, schedule in cases:
        params = {n for n, p in build(name).named_parameters()}
        seen = set()
        for rank_results in results.values():
            loss, ref_loss, grad_errors = rank_results[name, schedule]
            assert loss == pytest.approx(ref_loss, rel=TOL), (name, schedule)
            worst = max(grad_errors, key=grad_errors.get)
            assert grad_errors[worst] <= TOL, f"{name}, {schedule}: {worst}"
            seen |= set(grad_errors)
        assert seen == params, f"{name}: gradients of {params - seen} were not compared"
