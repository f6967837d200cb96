"""Loading checkpoints in the report's published format.

The fixture is built from the specification alone: a ``config.json`` with the fields the reference
checkpoints carry (including ones transformers 5 dropped) and a ``model.safetensors`` with the reference
key names and shapes. Expected logits come from the independent naive forward in ``reference_kphi3``.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from kphi.modeling.block import group_count
from reference_kphi3 import reference_greedy, reference_logits

HIDDEN, EMBED, INTER, LAYERS, HEADS, VOCAB = 64, 32, 128, 2, 4, 101


def _reference_config(min_channels, embed_size):
    return {
        "_name_or_path": "someone/experimental-kphi3",
        "architectures": ["KPhi3ForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "someone/experimental--configuration_kphi3.KPhi3Config",
            "AutoModelForCausalLM": "someone/experimental--modeling_kphi3.KPhi3ForCausalLM",
        },
        "bos_token_id": 1,
        "do_layer_norm_before": True,
        "embd_pdrop": 0.0,
        "embed_size": embed_size,
        "eos_token_id": 2,
        "ffn_dim": HIDDEN,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": 256,
        "min_channels_per_group": min_channels,
        "model_type": "kphi3",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "original_max_position_embeddings": 256,
        "pad_token_id": 0,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def _block_tensors(prefix, i, o, m, gen):
    g = group_count(i, o, m)
    if g == 1:
        return {f"{prefix}.first_pointwise_conv.group_layers.0.weight": torch.randn(o, i, generator=gen) / i**0.5}
    scale = (g / (2 * i)) ** 0.5
    return {
        f"{prefix}.first_pointwise_conv.weight": torch.randn(g, i // g, o // g, generator=gen) * scale,
        f"{prefix}.second_pointwise_conv.weight": torch.randn(g, i // g, o // g, generator=gen) * scale,
    }


def _reference_state_dict(m, embed):
    gen = torch.Generator().manual_seed(1234)
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, embed, generator=gen)}
    if embed != HIDDEN:
        sd.update(_block_tensors("model.embed_to_hidden", embed, HIDDEN, m, gen))
        sd.update(_block_tensors("hidden_to_embed", HIDDEN, embed, m, gen))
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        sd.update(_block_tensors(f"{p}.self_attn.qkv_proj", HIDDEN, 3 * HIDDEN, m, gen))
        sd.update(_block_tensors(f"{p}.self_attn.o_proj", HIDDEN, HIDDEN, m, gen))
        sd.update(_block_tensors(f"{p}.mlp.gate_up_proj", HIDDEN, 2 * INTER, m, gen))
        sd.update(_block_tensors(f"{p}.mlp.down_proj", INTER, HIDDEN, m, gen))
        sd[f"{p}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
        sd[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
    sd["lm_head.weight"] = torch.randn(VOCAB, embed, generator=gen) / embed**0.5
    return sd


# m=16: every block grouped (G=4, G=8, embed blocks G=2). m=48: a mix of G == 1 and G == 2 blocks.
@pytest.fixture(params=[(16, HIDDEN), (16, EMBED), (48, EMBED)], ids=["grouped", "embed-blocks", "mixed-G1"])
def reference_checkpoint(request, tmp_path):
    m, embed = request.param
    cfg = _reference_config(m, embed)
    sd = _reference_state_dict(m, embed)
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path, cfg, sd


def test_reference_checkpoint_loads_with_no_missing_or_unexpected_keys(reference_checkpoint):
    path, cfg, sd = reference_checkpoint
    config = AutoConfig.from_pretrained(path)
    assert type(config).__name__ == "KPhi3Config"
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == "KPhi3ForCausalLM"
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert set(model.state_dict()) == set(sd)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, sd[key]), key


def test_reference_checkpoint_reproduces_reference_logits_and_greedy(reference_checkpoint):
    path, cfg, sd = reference_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([5, 17, 3, 88, 42, 9, 61, 23])
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    torch.testing.assert_close(logits, reference_logits(sd, cfg, ids), rtol=1e-4, atol=1e-4)

    expected = reference_greedy(sd, cfg, ids[:4], new_tokens=6)
    got = model.generate(ids[None, :4], max_new_tokens=6, do_sample=False, eos_token_id=None)[0]
    assert got.tolist() == expected.tolist()


def test_reference_fields_are_kept_or_folded(reference_checkpoint):
    path, cfg, _ = reference_checkpoint
    config = AutoConfig.from_pretrained(path)
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.embed_size == cfg["embed_size"]
    # the checkpoint's legacy fields are folded into projection and not kept
    assert config.projection == {"kind": "grouped", "min_channels_per_group": cfg["min_channels_per_group"],
                                 "init": cfg.get("grouped_init", "scaled_normal"), "branches": 2}
    assert not hasattr(config, "min_channels_per_group") and "min_channels_per_group" not in config.to_dict()
    assert config.original_max_position_embeddings == 256
