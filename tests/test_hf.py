"""Hugging Face Llama-family models as they are: loss and every gradient equal HF's in one process (every
family, padding side and schedule, 2 and 4 gloo ranks); built on meta and loaded per stage; saved back and
loaded by `from_pretrained`."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_models import (  # noqa: E402
    FAMILIES,
    batch,
    build,
    exactness,
    load_fails_on_one_rank,
    meta_load_and_save,
    peak_memory_of_loading,
)
from workers import SCHEDULES, run_processes  # noqa: E402

from pipetrain.models.hf import causal_lm_loss, from_hf  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_loss_and_gradients_equal_hf_for_every_family_padding_and_schedule(world):
    # padding is handled per microbatch, the same at any rank count: both sides on 2 ranks, left on 4
    families, pads = list(FAMILIES), ["right", "left"] if world == 2 else ["left"]
    results = run_processes(world, exactness, families, pads, timeout=300)
    for family in families:
        params = {n for n, _ in build(family).named_parameters()}
        for pad in pads:
            for schedule in SCHEDULES:
                seen = set()
                for rank_results in results.values():
                    loss, ref_loss, grad_errors = rank_results[family, pad, schedule]
                    where = f"{family}, {pad} padding, {schedule}, {world} ranks"
                    assert loss == pytest.approx(ref_loss, rel=TOL), where
                    worst = max(grad_errors, key=grad_errors.get)
                    assert grad_errors[worst] <= TOL, f"{where}: {worst}"
                    seen |= set(grad_errors)
                assert seen == params, f"{family}: gradients of {params - seen} were not compared"


def test_the_layers_hold_the_models_own_parameters_and_compute_its_logits():
    model = build("qwen2-tied")
    layers, loss_fn = from_hf(model)
    assert {id(p) for layer in layers for p in layer.parameters()} == {id(p) for p in model.parameters()}
    assert layers[-1].lm_head.weight is layers[0].embed_tokens.weight  # tied: one Parameter in two layers
    inputs, labels = batch("left")
    x = inputs
    for layer in layers:
        x = layer(x)
    torch.testing.assert_close(x, model(**inputs).logits, rtol=0, atol=0)
    loss_sum, count = loss_fn(x, labels)
    assert (loss_sum / count).item() == pytest.approx(model(**inputs, labels=labels).loss.item(), rel=1e-6)
    assert causal_lm_loss is loss_fn


def test_inputs_other_than_hfs_are_refused_naming_the_keys():
    layers, _ = from_hf(build("llama"))
    with pytest.raises(ValueError, match=r"'input_ids'.*got keys \['input_ids', 'labels'\]"):
        layers[0]({"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.zeros(1, 3)})


@pytest.mark.parametrize("family, world, shard", [("qwen2-tied", 2, None), ("llama", 4, "40KB"),
                                                  ("MixtralForCausalLM", 2, "40KB")])
def test_built_on_meta_loaded_per_stage_trained_and_loaded_back_by_from_pretrained(tmp_path, family, world, shard):
    source, out = tmp_path / "source", tmp_path / "out"
    kwargs = {"max_shard_size": shard} if shard else {}
    build(family).save_pretrained(source, **kwargs)  # a sharded checkpoint has an index
    assert (source / "model.safetensors.index.json").exists() == bool(shard)
    results = run_processes(world, meta_load_and_save, family, str(source), str(out), timeout=300)
    for r in results.values():
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=TOL)
        assert max(r["errors"].values()) <= TOL
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors.index.json",
                                               *(f"model-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world))}
    assert _stored_names(out) == _stored_names(source)  # under HF's names on disk (an MoE's experts one by one)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # this process built no model from them
    assert type(loaded).__name__ == FAMILIES[family][0] if family in FAMILIES else family
    loaded.config.output_router_logits = False  # (evaluate's loss is the cross-entropy alone)
    inputs, labels = batch("right", seed=1)
    with torch.no_grad():
        held_out = loaded(**inputs, labels=labels).loss.item()
        before = build(family)(**inputs, labels=labels).loss.item()
    assert held_out == pytest.approx(results[0]["held_out"], rel=TOL)
    assert abs(held_out - before) > 1e-3  # the trained weights, not the source's
    if loaded.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def _stored_names(directory) -> set[str]:
    from safetensors import safe_open

    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    return names


def test_a_tensor_missing_for_one_rank_fails_every_rank_at_once(tmp_path):
    from safetensors.torch import load_file, save_file

    build("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]  # on the last rank only
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    results = run_processes(2, load_fails_on_one_rank, str(tmp_path), timeout=120)
    assert results[1]["error"].startswith("KeyError") and "model.norm.weight" in results[1]["error"]
    error = results[0]["error"]
    assert error.startswith("RuntimeError") and "failed on pipeline rank 1 (see its error)" in error
    assert max(r["seconds"] for r in results.values()) < 10  # not the 60 s transfer timeout


def test_each_rank_reads_only_its_own_tensors(tmp_path):
    """A model of >= 200 MB on 2 ranks: each rank's peak RSS grows by well under the whole model."""
    config = transformers.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=12, num_key_value_heads=12, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert total >= 200e6
    model.save_pretrained(tmp_path)
    del model
    results = run_processes(2, peak_memory_of_loading, config, str(tmp_path), timeout=300)
    for rank, r in results.items():
        assert r["growth"] <= 0.7 * total, f"rank {rank} grew by {r['growth'] / 1e6:.0f} MB of {total / 1e6:.0f} MB"
        assert r["params_bytes"] <= 0.6 * total
