"""KPhi3Config / KPhi3ForCausalLM as transformers models."""

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM, Trainer, TrainingArguments

from kphi import GroupedPointwiseBlock, KPhi3Config, KPhi3ForCausalLM
from kphi.sources.auto import config_fields
from tiny import tiny_config


def test_auto_classes_know_kphi3_without_remote_code(tmp_path):
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("kphi3", hidden_size=64, num_attention_heads=4), KPhi3Config)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, KPhi3ForCausalLM)


def test_projections_are_grouped_blocks_with_expected_groups():
    model = KPhi3ForCausalLM(tiny_config())
    layer = model.model.layers[0]
    groups = {
        "qkv": layer.self_attn.qkv_proj.groups,
        "o": layer.self_attn.o_proj.groups,
        "gate_up": layer.mlp.gate_up_proj.groups,
        "down": layer.mlp.down_proj.groups,
    }
    assert groups == {"qkv": 4, "o": 4, "gate_up": 4, "down": 8}
    assert all(isinstance(m, GroupedPointwiseBlock) for m in (layer.self_attn.qkv_proj, layer.mlp.down_proj))
    assert model.model.embed_to_hidden is None and model.hidden_to_embed is None


def test_embed_size_adds_embed_blocks_in_order():
    model = KPhi3ForCausalLM(tiny_config(embed_size=32)).eval()
    assert model.model.embed_tokens.weight.shape == (97, 32)
    assert (model.model.embed_to_hidden.in_features, model.model.embed_to_hidden.out_features) == (32, 64)
    assert (model.hidden_to_embed.in_features, model.hidden_to_embed.out_features) == (64, 32)
    assert model.lm_head.weight.shape == (97, 32)
    ids = torch.randint(0, 97, (2, 7))
    assert model(ids).logits.shape == (2, 7, 97)


def _random_dense_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)


def test_dense_setting_is_transformers_phi3():
    config = tiny_config(min_channels_per_group=-1)
    ours = KPhi3ForCausalLM(config).eval()
    _random_dense_weights(ours)
    phi3_fields = {k: v for k, v in config.to_dict().items() if k in Phi3Config.__dataclass_fields__}
    theirs = Phi3ForCausalLM(Phi3Config(**phi3_fields)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip_with_safetensors(tmp_path):
    model = KPhi3ForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, KPhi3ForCausalLM)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_from_pretrained_initialises_weights_missing_from_the_checkpoint(tmp_path):
    """transformers 5 builds on the meta device; missing grouped weights must be initialised, not garbage."""
    from safetensors.torch import load_file, save_file

    model = KPhi3ForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = "model.layers.1.mlp.down_proj.second_pointwise_conv.weight"
    del state[dropped]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert dropped in info["missing_keys"]
    weight = loaded.get_parameter(dropped)
    assert torch.isfinite(weight).all()
    expected_std = 0.02 * (8 / 2) ** 0.5  # scaled_normal for G = 8
    assert weight.std().item() == pytest.approx(expected_std, rel=0.25)


def test_default_and_reference_initialisation():
    model = KPhi3ForCausalLM(tiny_config(intermediate_size=512))
    w = model.model.layers[0].mlp.gate_up_proj.first_pointwise_conv.weight  # G = 4
    assert w.std().item() == pytest.approx(0.02 * (4 / 2) ** 0.5, rel=0.1)
    ref = KPhi3ForCausalLM(tiny_config(intermediate_size=512, grouped_init="kaiming_uniform"))
    w = ref.model.layers[0].mlp.gate_up_proj.first_pointwise_conv.weight  # [4, 16, 256]
    bound = 1 / (16 * 256) ** 0.5
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.9 * bound


def test_generate_with_cache_equals_without():
    model = KPhi3ForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without)


def test_sdpa_and_eager_attention_agree():
    model = KPhi3ForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 10))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        sdpa = model(ids).logits
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = KPhi3ForCausalLM(tiny_config())
    ids = torch.randint(0, 97, (2, 12))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    plain = grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


def test_trainer_trains_a_few_steps(tmp_path):
    model = KPhi3ForCausalLM(tiny_config())
    ids = torch.randint(3, 97, (16, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = model.model.layers[0].self_attn.qkv_proj.first_pointwise_conv.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = model.model.layers[0].self_attn.qkv_proj.first_pointwise_conv.weight
    assert not torch.equal(before, after)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(hidden_size=65), "divisible by num_attention_heads"),
        (dict(min_channels_per_group=0), "min_channels_per_group"),
        (dict(grouped_init="xavier"), "grouped_init"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_bad_dimensions_give_clear_errors(fields, message):
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        tiny_config(**fields)



def _old_config_rule(min_channels_per_group=256, grouped_init="scaled_normal", low_rank_fraction=None, projection=None):
    """How KPhi3Config derived its projection when it had four fields (kphi before ``projection`` alone):
    ``projection`` when given, else grouped when ``m > 0``, else low-rank when a fraction is set, else dense."""
    if projection is not None:
        return projection
    if min_channels_per_group > 0:
        return {"kind": "grouped", "min_channels_per_group": min_channels_per_group, "init": grouped_init, "branches": 2}
    if low_rank_fraction is not None:
        return {"kind": "low_rank", "fraction": low_rank_fraction}
    return {"kind": "dense"}


LEGACY_CASES = [
    {"min_channels_per_group": 256},
    {"min_channels_per_group": 32},
    {"min_channels_per_group": 32, "grouped_init": "kaiming_uniform"},
    {"min_channels_per_group": -1},
    {"min_channels_per_group": -1, "grouped_init": "kaiming_uniform"},
    {"min_channels_per_group": -1, "low_rank_fraction": 0.3},
    {"min_channels_per_group": 32, "projection": {"kind": "monarch", "blocks": 4, "fraction": 0.25}},
    {"min_channels_per_group": -1, "low_rank_fraction": None, "projection": None},
]


@pytest.mark.fast
@pytest.mark.parametrize("legacy", LEGACY_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_legacy_projection_fields_are_folded_into_projection_as_the_old_config_read_them(legacy, tmp_path):
    """Every report checkpoint and recorded run spells its projection with the old fields; they are read once
    and not kept (``projection`` is the only field), and save/load keeps the projection."""
    from kphi.modeling.projections import projection_kind

    config = KPhi3Config(**legacy)
    assert config.projection == projection_kind(_old_config_rule(**legacy)).to_dict()  # every setting spelled out
    for name in ("min_channels_per_group", "grouped_init", "low_rank_fraction"):
        assert not hasattr(config, name) and name not in config.to_dict()
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).projection == config.projection


@pytest.mark.fast
def test_the_default_grouped_init_is_the_reports_but_configs_from_before_keep_theirs(tmp_path):
    """``kaiming_uniform`` is the init of a config, preset or projection that names none (it beat
    ``scaled_normal`` at 0.7M and 6.8M tokens); what was written before it became the default — legacy fields,
    a ``config.json`` holding both ``projection`` and legacy fields — keeps ``scaled_normal``, the init it
    was trained from."""
    from kphi.modeling.block import DEFAULT_GROUPED_INIT
    from kphi.presets import load_preset

    assert DEFAULT_GROUPED_INIT == "kaiming_uniform"
    assert KPhi3Config().projection == {"kind": "grouped", "min_channels_per_group": 256, "init": "kaiming_uniform", "branches": 2}
    assert KPhi3Config(projection={"kind": "grouped", "min_channels_per_group": 32}).projection["init"] == "kaiming_uniform"
    assert load_preset("cpu-kphi3").config.projection["init"] == "kaiming_uniform"
    assert KPhi3Config(min_channels_per_group=32).projection["init"] == "scaled_normal"
    older = {**config_fields(tiny_config()), "projection": {"kind": "grouped", "min_channels_per_group": 16},
             "min_channels_per_group": 16, "grouped_init": None, "low_rank_fraction": None}
    (tmp_path / "config.json").write_text(json.dumps({**older, "model_type": "kphi3"}))
    assert AutoConfig.from_pretrained(tmp_path).projection["init"] == "scaled_normal"
    # an explicit init is kept either way
    assert KPhi3Config(min_channels_per_group=32, grouped_init="kaiming_uniform").projection["init"] == "kaiming_uniform"
    assert KPhi3Config(projection={"kind": "grouped", "min_channels_per_group": 32, "init": "scaled_normal"}).projection["init"] == "scaled_normal"


@pytest.mark.fast
@pytest.mark.parametrize("base,overrides,expected", [
    # a legacy field on top of a config changes its projection, keeping the rest of a grouped kind's settings
    ({"min_channels_per_group": 32}, {"min_channels_per_group": 8},
     {"kind": "grouped", "min_channels_per_group": 8, "init": "scaled_normal", "branches": 2}),
    ({"projection": {"kind": "grouped", "min_channels_per_group": 32, "branches": 1}}, {"grouped_init": "kaiming_uniform"},
     {"kind": "grouped", "min_channels_per_group": 32, "init": "kaiming_uniform", "branches": 1}),
    ({"min_channels_per_group": -1}, {"min_channels_per_group": 16},
     {"kind": "grouped", "min_channels_per_group": 16, "init": "scaled_normal", "branches": 2}),
    ({"min_channels_per_group": 32}, {"min_channels_per_group": -1}, {"kind": "dense"}),
    ({"min_channels_per_group": -1}, {"low_rank_fraction": 0.5}, {"kind": "low_rank", "fraction": 0.5}),
    ({"projection": {"kind": "monarch", "blocks": 4, "fraction": 0.25}}, {"min_channels_per_group": 16},
     {"kind": "grouped", "min_channels_per_group": 16, "init": "scaled_normal", "branches": 2}),
    # an explicit projection replaces it whole; None keeps the config's
    ({"min_channels_per_group": 32}, {"projection": {"kind": "dense"}, "min_channels_per_group": 8}, {"kind": "dense"}),
    ({"min_channels_per_group": 32}, {"projection": None, "hidden_size": 128},
     {"kind": "grouped", "min_channels_per_group": 32, "init": "scaled_normal", "branches": 2}),
])
def test_overrides_change_the_projection_of_a_config(base, overrides, expected):
    from kphi.sources.auto import with_overrides

    assert KPhi3Config(**with_overrides(tiny_config(**base), overrides)).projection == expected


@pytest.mark.fast
@pytest.mark.parametrize("fields,message", [
    ({"min_channels_per_group": 32, "low_rank_fraction": 0.3}, "low_rank_fraction needs dense projections"),
    ({"min_channels_per_group": 1.5}, "min_channels_per_group must be positive"),
    ({"projection": {"kind": "grouped", "min_channels_per_group": -4}}, "min_channels_per_group must be a positive integer"),
    ({"projection": {"kind": "sparse"}}, "unknown projection kind 'sparse'"),
])
def test_a_bad_projection_is_refused_naming_it(fields, message):
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        tiny_config(**fields)


@pytest.mark.fast
def test_width_adapters_start_norm_preserving_whatever_the_grouped_init():
    """``embed_to_hidden`` / ``hidden_to_embed`` sit in series with the whole network: they get the
    dense-equivalent std ``1 / sqrt(in)`` (times ``sqrt(G / 2)`` in a grouped block), even when the decoder's
    grouped weights take the report's ``kaiming_uniform`` (``U(+-1/sqrt(s*o))``, std ``1/sqrt(3*s*o)``)."""
    import math

    from kphi.modeling.block import group_count

    dense = tiny_config(embed_size=32, projection={"kind": "dense"})
    torch.manual_seed(0)
    model = KPhi3ForCausalLM(dense)
    for adapter, fan_in in ((model.model.embed_to_hidden, 32), (model.hidden_to_embed, 64)):
        assert adapter.weight.std().item() == pytest.approx(fan_in**-0.5, rel=0.1)

    grouped = tiny_config(embed_size=32, projection={"kind": "grouped", "min_channels_per_group": 16, "init": "kaiming_uniform"})
    torch.manual_seed(0)
    model = KPhi3ForCausalLM(grouped)
    for adapter, (fan_in, fan_out) in ((model.model.embed_to_hidden, (32, 64)), (model.hidden_to_embed, (64, 32))):
        groups = group_count(fan_in, fan_out, 16)
        assert groups > 1
        for layer in (adapter.first_pointwise_conv, adapter.second_pointwise_conv):
            assert layer.weight.std().item() == pytest.approx(fan_in**-0.5 * math.sqrt(groups / 2), rel=0.1)
    qkv = model.model.layers[0].self_attn.qkv_proj.first_pointwise_conv.weight  # [G, s, o]: the report's init
    s, o = qkv.shape[1:]
    assert qkv.std().item() == pytest.approx((3 * s * o) ** -0.5, rel=0.1)
