"""Layer-wise reconstruction: each converted layer trained to reproduce the source's hidden states lowers its
output error against the source (asserted per layer, and on the whole model's logits), measured as a plain
full-model pass measures it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kphi.convert import ConvertError, convert, convert_to_dir
from kphi.convert.reconstruct import decoder_layers, reconstruct_layers

VOCAB = 120


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def first_layer_error(model, source, ids) -> float:
    """The reference: both whole models run on ``ids``; the relative error of the first layer's outputs."""
    model.eval(), source.eval()  # GPT-2 has dropout
    with torch.no_grad():
        ours = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        theirs = source(input_ids=ids, output_hidden_states=True).hidden_states[1]
    return float((ours - theirs).pow(2).sum() / theirs.pow(2).sum())


def logits_error(model, source, ids) -> float:
    model.eval(), source.eval()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, source(input_ids=ids).logits
    return float((ours - theirs).pow(2).sum() / theirs.pow(2).sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reconstruction_lowers_every_trained_layers_error_against_the_source(arch):
    source = tiny(arch)
    converted = convert(source, {"kind": "low_rank", "fraction": 0.25})
    ids = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(1))
    judge = ids[1::2]
    first_before = first_layer_error(converted.model, source, judge)
    logits_before = logits_error(converted.model, source, judge)

    reports = reconstruct_layers(converted.model, source, ids, converted.replaced, steps=60, learning_rate=3e-3, batch_size=8)

    assert [r.layer for r in reports] == [0, 1]
    assert reports[0].error_before == pytest.approx(first_before, rel=1e-4)
    assert all(r.improved and r.error_after < 0.9 * r.error_before for r in reports)
    assert reports[0].error_after == pytest.approx(first_layer_error(converted.model, source, judge), rel=1e-4)
    assert logits_error(converted.model, source, judge) < logits_before


def test_only_the_structured_projections_change():
    source = tiny("llama")
    converted = convert(source, {"kind": "low_rank", "fraction": 0.25})
    before = {k: v.clone() for k, v in converted.model.state_dict().items()}
    reconstruct_layers(converted.model, source, torch.randint(0, VOCAB, (4, 16)), converted.replaced, steps=5)
    changed = {k for k, v in converted.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(any(k.startswith(name + ".") for name in converted.replaced) for k in changed)
    assert all(p.requires_grad for p in converted.model.parameters())


def test_reconstruction_needs_two_rows_and_finds_the_layers():
    source = tiny("llama")
    converted = convert(source, {"kind": "low_rank", "fraction": 0.5})
    assert len(decoder_layers(converted.model)) == 2
    with pytest.raises(ConvertError, match="at least two rows"):
        reconstruct_layers(converted.model, source, torch.randint(0, VOCAB, (1, 16)), converted.replaced)


def test_convert_reconstruct_steps_records_each_layer_and_both_scores(tmp_path):
    from test_allocate import tiny_llama  # a tokenizer-free source: reconstruction without held-out scoring

    src = tmp_path / "src"
    tiny_llama(vocab=VOCAB).save_pretrained(src)
    ids = torch.randint(0, VOCAB, (6, 16))
    result = convert_to_dir(src, tmp_path / "out", kind="low_rank", fraction=0.25, calibration=ids, reconstruct_steps=20,
                            progress=False)
    report = json.loads((tmp_path / "out" / "kphi-convert.json").read_text())
    assert [r["layer"] for r in report["reconstruction"]] == [0, 1]
    assert report["reconstruction"] == result.reconstruction
    assert "layer-wise reconstruction lowered" in result.describe(src, tmp_path / "out")
    with pytest.raises(ConvertError, match="give --calibration-data"):
        convert_to_dir(src, tmp_path / "other", kind="low_rank", reconstruct_steps=5, progress=False)
