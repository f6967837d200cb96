"""Parameter accounting and presets."""

import re

import pytest

from kphi.modeling.block import GroupedPointwiseBlock
from kphi.sources.auto import KPhi3ForCausalLM
from kphi.params import count_parameters, parameter_report
from kphi.presets import PresetError, list_presets, load_preset, resolve_config


pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    "name,layers,intermediate,non_embedding,percent",
    [
        ("JP47D54C", 2, 8192, 226_507_776, 100.0),
        ("JP47D55C", 2, 9216, 35_011_584, 15.46),
        ("JP47D56C", 3, 9216, 52_515_840, 23.19),
    ],
)
def test_report_presets_match_the_report(name, layers, intermediate, non_embedding, percent):
    preset = load_preset(name)
    baseline = load_preset(preset.baseline)
    report = parameter_report(preset.config, (baseline.name, baseline.config))
    assert (report.layers, report.intermediate_size) == (layers, intermediate)
    assert report.non_embedding == non_embedding
    assert report.embedding == 2 * 32064 * 3072
    assert report.total == report.embedding + report.non_embedding
    assert report.percent_of_baseline == percent


def naive_non_embedding(config):
    """Hand count: per layer the four projections + two norms, plus the final norm."""
    h, i = config.hidden_size, config.intermediate_size

    def proj(a, b):
        if config.projection["kind"] == "dense":
            return a * b
        block = GroupedPointwiseBlock.from_min_channels(a, b, config.projection["min_channels_per_group"], device="meta")
        return sum(p.numel() for p in block.parameters())

    per_layer = proj(h, 3 * h) + proj(h, h) + proj(h, 2 * i) + proj(i, h) + 2 * h
    return config.num_hidden_layers * per_layer + h


@pytest.mark.parametrize("name", ["JP47D54C", "JP47D55C", "JP47D56C", "tiny-phi3", "tiny-kphi3"])
def test_counts_agree_with_hand_count(name):
    config = load_preset(name).config
    total, embedding = count_parameters(config)
    assert total - embedding == naive_non_embedding(config)


def test_tiny_presets_are_small_and_tiny_kphi3_is_really_grouped():
    assert {"tiny-phi3", "tiny-kphi3", "JP47D54C", "JP47D55C", "JP47D56C"} <= set(list_presets())
    for name in ("tiny-phi3", "tiny-kphi3"):
        total, _ = count_parameters(load_preset(name).config)
        assert total < 1_000_000
    model = KPhi3ForCausalLM(load_preset("tiny-kphi3").config)
    blocks = [m for m in model.modules() if isinstance(m, GroupedPointwiseBlock)]
    assert blocks and all(b.groups > 1 for b in blocks)


def test_count_parameters_allocates_nothing(monkeypatch):
    """The paper presets are counted on the meta device: every parameter built is a meta tensor."""
    import kphi.params

    built = []

    class Recording(KPhi3ForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            built.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(kphi.params, "KPhi3ForCausalLM", Recording)
    count_parameters(load_preset("JP47D56C").config)
    assert built == [{"meta"}]


def test_resolve_config_accepts_model_dirs_and_config_json(tmp_path):
    model = KPhi3ForCausalLM(load_preset("tiny-kphi3").config)
    model.save_pretrained(tmp_path / "m")
    preset = resolve_config(tmp_path / "m")
    assert preset.config.projection["min_channels_per_group"] == 16
    assert resolve_config(tmp_path / "m" / "config.json").config.hidden_size == 64


def test_unknown_preset_and_bad_yaml_name_the_problem(tmp_path):
    with pytest.raises(PresetError, match="unknown preset 'nope'; available: .*tiny-kphi3"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("config:\n  hidden_size: 65\n  num_attention_heads: 4\n")
    with pytest.raises(PresetError, match=f"invalid model configuration in {re.escape(str(bad))}: .*divisible by num_attention_heads"):
        load_preset(bad)
    bad.write_text("config:\n  use_return_dict: false\n")
    with pytest.raises(PresetError, match="'use_return_dict' is derived from the config's other fields, not set"):
        load_preset(bad)
    with pytest.raises(PresetError, match="not a model directory: it has no config.json"):
        resolve_config(tmp_path)


@pytest.mark.parametrize("fields", [
    {"min_channels_per_group": 16},                                              # the report's fields
    {"projection": {"kind": "grouped", "min_channels_per_group": 16}},           # the same, as a kind
    {"projection": {"kind": "monarch", "blocks": 4, "fraction": 0.25}},
    {"min_channels_per_group": -1, "low_rank_fraction": 0.25},
    {"projection": {"kind": "low_rank", "fraction": 0.25}},
])
def test_the_dense_counterpart_and_the_dense_control_of_every_kind_are_dense(fields):
    """Both once kept ``projection`` while clearing the report's fields, so a kind given as ``projection``
    stayed structured: ``kphi params`` reported 100% of dense and the control was not dense."""
    from kphi.experiments.arms import dense_control, non_embedding
    from kphi.sources.auto import KPhi3Config, with_overrides
    from kphi.params import dense_counterpart

    dense_preset = load_preset("tiny-phi3").config
    config = KPhi3Config(**with_overrides(dense_preset, fields))
    assert config.projection_kind().name != "dense"
    counterpart = dense_counterpart(config)
    assert counterpart.projection_kind().name == "dense"
    assert count_parameters(counterpart) == count_parameters(dense_preset)  # the same shape, dense
    report = parameter_report(config)
    assert report.dense_same_shape_non_embedding == non_embedding(dense_preset) > report.non_embedding
    assert report.percent_of_dense_same_shape < 100
    control = dense_control(config, non_embedding(config))
    assert control.projection_kind().name == "dense" and control.hidden_size < config.hidden_size
    assert abs(non_embedding(control) - non_embedding(config)) < 0.1 * non_embedding(config)
