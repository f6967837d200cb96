"""``kphi convert`` on tiny random Llama, Mistral, Qwen2, Phi-3 and GPT-2 models, and on two architectures
kphi has no class written for (GPT-NeoX, OPT: classes built on first use, targets found in the model).

Each converted model must load through the Auto classes (after ``import kphi``, and with
``trust_remote_code`` where kphi is not imported), give the logits of an independent naive forward (the
source architecture's own dense forward with every structured projection expanded to its dense matrix
through the kind's reference path), generate, train with ``kphi train --init-from`` and report its
parameters with ``kphi params``.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from processes import run_cli
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from corpus import prepare_small
from kphi.convert import ConvertError, convert, convert_to_dir
from kphi.data.prepare import load_prepared
from kphi.export import code_files, export_model
from kphi.modeling.projections import projection_kind
from kphi.train import TrainSettings, train

LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, LLAMA_LIKE),
    "mistral": (MistralConfig, MistralForCausalLM, {**LLAMA_LIKE, "sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, LLAMA_LIKE),
    "phi3": (Phi3Config, Phi3ForCausalLM, {**LLAMA_LIKE, "original_max_position_embeddings": 64}),
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    # beyond the five written out: projection names found by kphi (query_key_value, dense, ...; q/k/v/out_proj, fc1, fc2)
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=64)),
    "opt": (OPTConfig, OPTForCausalLM, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                            word_embed_proj_dim=32, max_position_embeddings=64)),
}
GENERIC_TARGETS = {"gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                   "opt": ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"]}
GROUPED = {"kind": "grouped", "min_channels_per_group": 8}




@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def sources(prepared, tmp_path_factory):
    """A trained-looking dense model directory per architecture, with the prepared data's tokenizer."""
    tokenizer = load_prepared(prepared)[2]
    root = tmp_path_factory.mktemp("sources")
    dirs = {}
    for arch, (config_class, model_class, fields) in ARCHITECTURES.items():
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        model = model_class(config_class(vocab_size=len(tokenizer), **fields, **ids))
        with torch.no_grad():  # biases away from zero, so that keeping them is checked
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        dirs[arch] = root / arch
    return dirs


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    for arch, src in sources.items():
        convert_to_dir(src, root / arch, kind=GROUPED, progress=False)
    return {arch: root / arch for arch in sources}


def replaced_names(model):
    return [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in model.config.projection_targets]


def naive_logits(arch, converted_model, input_ids):
    """The source architecture's dense forward, each replaced projection expanded to ``kind.dense_weight``."""
    config_class, model_class, _ = ARCHITECTURES[arch]
    fields = {k: v for k, v in converted_model.config.to_dict().items() if k not in ("projection", "target_modules", "model_type", "architectures", "auto_map")}
    dense = model_class(config_class(**fields)).double().eval()  # GPT-2 has dropout
    dense.load_state_dict({k: v for k, v in converted_model.state_dict().items()}, strict=False)
    kind = projection_kind(converted_model.config.projection)
    with torch.no_grad():
        for name in replaced_names(converted_model):
            module = converted_model.get_submodule(name)
            weight = kind.dense_weight(module).double()  # through the block's naive_forward (per-group loops)
            target = dense.get_submodule(name)
            target.weight.copy_(weight.T if arch == "gpt2" else weight)  # Conv1D stores [in, out]
            if module.bias is not None:
                target.bias.copy_(module.bias)
    return dense(input_ids=input_ids).logits.float()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_converted_model_matches_a_naive_forward_and_generates(arch, converted):
    model = AutoModelForCausalLM.from_pretrained(converted[arch])
    assert type(model).__name__.startswith("Kphi") and type(model).__module__ == "kphi.modeling.modeling_structured"
    assert model.config.model_type == f"kphi_{arch}"
    names = replaced_names(model)
    assert len(names) >= 8
    for name in names:
        module = model.get_submodule(name)
        assert type(module).__name__ == "GroupedPointwiseBlock" and module.groups > 1, name
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        reference = naive_logits(arch, model, ids)
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)
    out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=model.config.pad_token_id)
    assert out.shape == (1, 7)


def test_every_targeted_projection_was_replaced_and_biases_kept(sources, converted):
    for arch in ARCHITECTURES:
        report = json.loads((converted[arch] / "kphi-convert.json").read_text())
        source = AutoModelForCausalLM.from_pretrained(sources[arch])
        model = AutoModelForCausalLM.from_pretrained(converted[arch])
        dense_names = [n for n, m in source.named_modules() if n.rsplit(".", 1)[-1] in model.config.projection_targets]
        assert sorted(report["projections"]) == sorted(dense_names) and len(dense_names) >= 8, arch
        assert report["non_embedding_after"] < report["non_embedding_before"]
        for name in dense_names:
            if source.get_submodule(name).bias is not None:
                torch.testing.assert_close(model.get_submodule(name).bias, source.get_submodule(name).bias)
        assert 0 < report["mean_relative_error"] < 1  # a random dense matrix is far from any block


NO_KPHI = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    results = {}
    for path in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        ids = torch.tensor([[1, 5, 7, 9]])
        logits = model(input_ids=ids).logits
        results[path] = {"class": type(model).__module__ + "." + type(model).__name__, "sum": float(logits.double().sum())}
    results["kphi_modules"] = sorted(m for m in sys.modules if m == "kphi" or m.startswith("kphi."))
    print(json.dumps(results))
    """
)


def test_converted_directories_load_with_trust_remote_code_without_kphi(converted, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(NO_KPHI)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(p) for p in converted.values()]
    run = subprocess.run([sys.executable, "-I", str(script), *paths], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report.pop("kphi_modules") == []
    for arch, path in converted.items():
        assert report[str(path)]["class"].startswith("transformers_modules.")
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(path)(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
        assert report[str(path)]["sum"] == pytest.approx(float(expected.double().sum()), rel=1e-5, abs=1e-3), arch


WITH_KPHI = textwrap.dedent(
    """
    import json, sys
    import torch
    import kphi
    from transformers import AutoModelForCausalLM
    results = {}
    for path in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(path)  # no trust_remote_code
        logits = model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
        results[path] = {"class": type(model).__module__ + "." + type(model).__name__, "sum": float(logits.double().sum())}
    print(json.dumps(results))
    """
)


def test_import_kphi_makes_every_converted_architecture_loadable_through_the_auto_classes(converted, tmp_path):
    """A fresh process (no classes built yet) loads GPT-NeoX and OPT conversions, which kphi has no written-out
    classes for, with ``import kphi`` and ``AutoModelForCausalLM.from_pretrained(DIR)`` alone."""
    script = tmp_path / "load.py"
    script.write_text(WITH_KPHI)
    paths = [converted["gpt_neox"], converted["opt"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(script), *map(str, paths)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for path in paths:
        assert report[str(path)]["class"].startswith("kphi.modeling.modeling_structured."), report
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(path)(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
        assert report[str(path)]["sum"] == pytest.approx(float(expected.double().sum()), rel=1e-6, abs=1e-4)


def test_only_real_architectures_become_kphi_types():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert "kphi_gpt_neox" in CONFIG_MAPPING and CONFIG_MAPPING["kphi_opt"].model_type == "kphi_opt"
    assert "kphi_no_such_architecture" not in CONFIG_MAPPING and "no_such_architecture" not in CONFIG_MAPPING
    with pytest.raises(KeyError):
        CONFIG_MAPPING["kphi_no_such_architecture"]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_converted_model_trains_with_init_from(arch, converted, prepared, tmp_path):
    out = tmp_path / "run"
    result = train(TrainSettings(preset="tiny-kphi3", init_from=str(converted[arch]), data=str(prepared), out=str(out),
                                 context_length=32, batch_size=4, max_steps=5, eval_steps=5, save_steps=5,
                                 logging_steps=1, progress=False))
    assert result.metrics["steps"] == 5
    # the trained model keeps its modeling files, as its converted source had them
    assert json.loads((out / "config.json").read_text())["auto_map"] == json.loads((converted[arch] / "config.json").read_text())["auto_map"]
    assert code_files(out) and all((out / name).is_file() for name in code_files(out))
    trained = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(converted[arch])
    assert type(trained) is type(start)
    moved = [n for n, p in trained.named_parameters() if "pointwise_conv" in n and not torch.equal(p, start.get_parameter(n))]
    assert moved, "the structured weights did not train"
    assert result.metrics["non_embedding_params"] == sum(p.numel() for p in start.parameters()) - start.get_input_embeddings().weight.numel() - (
        0 if start.get_output_embeddings().weight is start.get_input_embeddings().weight else start.get_output_embeddings().weight.numel())


def test_kphi_convert_cli_with_activation_fit_and_params(sources, prepared, tmp_path):
    out = tmp_path / "llama-act"
    run = run_cli("convert", str(sources["llama"]), "--out", str(out), "--kind", "grouped", "--min-channels-per-group", "8",
                   "--fit", "activations", "--calibration-data", str(prepared), "--calibration-tokens", "512", "--heldout-bytes", "0", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "projections as" in run.stdout and "on calibration inputs" in run.stdout
    report = json.loads((out / "kphi-convert.json").read_text())
    frob = convert(str(sources["llama"]), GROUPED, fit="frobenius", calibration=str(prepared), calibration_tokens=512)
    for name, fit in report["projections"].items():
        assert fit["method"] == "activations"
        assert fit["calibration_error"] <= frob.fits[name].calibration_error + 1e-6, name
    params = run_cli("params", str(out), "--json")
    assert params.returncode == 0, params.stderr
    counts = json.loads(params.stdout)
    assert counts["model"] == "kphi_llama" and counts["non_embedding"] == report["non_embedding_after"]
    assert counts["dense_same_shape_non_embedding"] == report["non_embedding_before"]


def test_other_kinds_convert_too(sources, tmp_path):
    for kind in ({"kind": "low_rank", "fraction": 0.25}, {"kind": "monarch", "blocks": 4, "fraction": 0.25}):
        result = convert(str(sources["mistral"]), kind)
        assert result.non_embedding_after < 0.6 * result.non_embedding_before
        assert result.fit == "frobenius" and all(0 < f.relative_error < 1 for f in result.fits.values())


@pytest.mark.parametrize("args, message", [
    (["--kind", "grouped", "--fraction", "0.5"], "projection kind 'grouped'"),  # another kind's setting
    (["--kind", "dense"], "changes nothing"),
    (["--fit", "activations"], "needs calibration data"),
    (["--kind", "monarch", "--fit", "activations", "--calibration-data", "PREPARED"], "no closed-form activation-aware fit"),
    (["--targets", "nothing_here"], "no projection of the source matches"),
    (["--targets", "(["], "target '([' is not a valid regular expression"),
    (["--override", "(v_proj=dense"], "target '(v_proj' is not a valid regular expression"),
    (["--override", "v_proj=low_rank:fraction=[0.5"], "the value of fraction is not valid"),
    (["--calibration-data", "/nonexistent"], "--calibration-data /nonexistent"),
])
def test_bad_conversions_fail_with_one_line_and_write_nothing(args, message, sources, prepared, tmp_path):
    out = tmp_path / "out"
    args = [str(prepared) if a == "PREPARED" else a for a in args]
    run = run_cli("convert", str(sources["llama"]), "--out", str(out), "--quiet", *args)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("kphi: error:") and message in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


@pytest.mark.fast
def test_the_kind_flags_are_generated_from_the_registry(capsys):
    """``--kind`` offers every registered kind and each kind setting is one flag with the kind's own type,
    choices and default: a new kind (or setting) reaches the command line without editing it."""
    import argparse
    import dataclasses

    from kphi.cli import build_parser
    from kphi.modeling.projections import PROJECTION_KINDS

    convert_parser = build_parser()._subparsers._group_actions[0].choices["convert"]
    actions = {a.dest: a for a in convert_parser._actions}
    assert actions["kind"].choices == list(PROJECTION_KINDS) and actions["kind"].default == "grouped"
    for name, kind in PROJECTION_KINDS.items():
        for field in dataclasses.fields(kind):
            action = actions[field.name]
            assert action.default is argparse.SUPPRESS and name in action.help
            assert action.choices == field.metadata.get("choices")
            assert f"(default: {field.default})" in action.help
    args = convert_parser.parse_args(["SRC", "--out", "OUT", "--kind", "monarch", "--blocks", "2"])
    assert args.blocks == 2 and not hasattr(args, "fraction")  # a setting not typed stays the kind's default
    with pytest.raises(SystemExit):
        convert_parser.parse_args(["SRC", "--out", "OUT", "--kind", "butterfly"])
    assert "invalid choice: 'butterfly'" in capsys.readouterr().err


@pytest.mark.parametrize("arch", list(GENERIC_TARGETS))
def test_an_architecture_beyond_the_five_gets_its_layer_projections_as_targets(arch, converted):
    model = AutoModelForCausalLM.from_pretrained(converted[arch])
    assert model.config.model_type == f"kphi_{arch}" and type(model).__name__.startswith("Kphi")
    assert model.config.target_modules == GENERIC_TARGETS[arch]
    assert len(replaced_names(model)) == 2 * len(GENERIC_TARGETS[arch])  # every layer, never lm_head
    assert not any(n.startswith("lm_head") for n in replaced_names(model))


def test_overrides_keep_projections_dense_or_give_them_their_own_kind(sources, tmp_path):
    from kphi.modeling.lowrank import LowRankLinear

    grouped = projection_kind(GROUPED)
    out = tmp_path / "mixed"
    run = run_cli("convert", str(sources["llama"]), "--out", str(out), "--kind", "grouped", "--min-channels-per-group", "8",
                   "--override", "v_proj=dense", "--override", r".*layers\.0\.mlp\..*=low_rank:fraction=0.5", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "v_proj as {'kind': 'dense'}" in run.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(sources["llama"])
    for layer in (0, 1):
        attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
        assert type(attn.v_proj) is torch.nn.Linear  # kept dense: the source's weights, untouched
        torch.testing.assert_close(attn.v_proj.weight, source.model.layers[layer].self_attn.v_proj.weight)
        assert grouped.owns(attn.q_proj)
        assert all(isinstance(m, LowRankLinear) if layer == 0 else grouped.owns(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    report = json.loads((out / "kphi-convert.json").read_text())
    assert len(report["projections"]) == 2 * 7 - 2 and report["overrides"][0]["targets"] == ["v_proj"]
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():  # a fresh build from the saved config lays out the same modules, and loads the fit
        torch.testing.assert_close(model(input_ids=ids).logits, convert(str(sources["llama"]), GROUPED, overrides=[
            "v_proj=dense", r".*layers\.0\.mlp\..*=low_rank:fraction=0.5"]).model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("override, message", [
    ("v_proj", "expected TARGETS=KIND"),
    ("v_proj=butterfly", "unknown projection kind 'butterfly'"),
    ("v_proj=low_rank:fraction", "is not FIELD=VALUE"),
])
def test_a_bad_override_is_one_line(override, message, sources, tmp_path):
    run = run_cli("convert", str(sources["llama"]), "--out", str(tmp_path / "out"), "--override", override, "--quiet")
    assert run.returncode == 2 and run.stderr.startswith("kphi: error:") and message in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("activation_after, frobenius_after, kept", [(5.0, 4.0, "frobenius"), (4.0, 5.0, "activations")])
def test_an_activation_fit_worse_on_heldout_text_gives_way_to_frobenius(activation_after, frobenius_after, kept, sources,
                                                                        prepared, tmp_path, monkeypatch):
    """The whole model is judged on held-out text after an activation fit: the better of the two is written."""
    from types import SimpleNamespace

    scores = iter([3.0, activation_after, frobenius_after])  # the source, the activation fit, the Frobenius fit
    def score(*_args, **_kwargs):
        return SimpleNamespace(bytes=1, tokens=1, context=8, stride=4, bits_per_byte=next(scores))

    monkeypatch.setattr("kphi.convert.heldout.heldout_score", score)
    monkeypatch.setattr("kphi.convert.to_dir.heldout_score", score)
    result = convert_to_dir(sources["llama"], tmp_path / "out", kind=GROUPED, fit="activations", calibration=str(prepared),
                            calibration_tokens=512, progress=False)
    report = json.loads((tmp_path / "out" / "kphi-convert.json").read_text())
    assert result.fit.startswith(kept) and report["fit"] == result.fit
    assert report["heldout_bits_per_byte"]["after"] == min(activation_after, frobenius_after)
    if kept == "frobenius":
        assert "activation fit was worse on held-out text: 5.0000 vs 4.0000" in result.fit
        assert all(f["method"] == "frobenius" for f in report["projections"].values())


def test_kphi_export_takes_a_converted_model(converted, tmp_path):
    out = tmp_path / "export"
    export_model(converted["gpt_neox"], out)
    assert "modeling_structured.py" in code_files(out) and all((out / name).is_file() for name in code_files(out))
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(input_ids=ids).logits
        expected = AutoModelForCausalLM.from_pretrained(converted["gpt_neox"])(input_ids=ids).logits
    torch.testing.assert_close(exported, expected)


def test_an_architecture_without_a_causal_lm_is_one_line(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path / "vit")
    run = run_cli("convert", str(tmp_path / "vit"), "--out", str(tmp_path / "out"), "--fit", "none", "--quiet")
    assert run.returncode == 2 and run.stderr.startswith("kphi: error:") and "Traceback" not in run.stderr, run.stderr
    assert "no causal LM for model_type 'vit'" in run.stderr
    assert not (tmp_path / "out").exists()


def test_converting_a_converted_model_is_refused(converted):
    with pytest.raises(ConvertError, match="already a converted model"):
        convert(str(converted["llama"]), GROUPED)


@pytest.mark.parametrize("damage, words", [
    ("config missing", "no config.json"),
    ("config truncated", "config.json"),
    ("weights truncated", "not a complete safetensors file"),
    ("weights wrong type", "model.safetensors"),
    ("tokenizer truncated", "tokenizer.json"),
])
def test_a_broken_source_is_one_line_and_nothing_written(damage, words, sources, tmp_path, capsys):
    import shutil

    from kphi.cli import main

    src = tmp_path / "src"
    shutil.copytree(sources["qwen2"], src)
    name = {"config": "config.json", "weights": "model.safetensors", "tokenizer": "tokenizer.json"}[damage.split()[0]]
    if damage.endswith("missing"):
        (src / name).unlink()
    elif damage.endswith("truncated"):
        data = (src / name).read_bytes()
        (src / name).write_bytes(data[: len(data) // 2])
    else:
        (src / name).write_text("not tensors at all")
    status = main(["convert", str(src), "--out", str(tmp_path / "out"), "--min-channels-per-group", "8", "--quiet"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kphi: error:")]
    assert status == 2 and len(errors) == 1 and words in errors[0], err
    assert not (tmp_path / "out").exists()


def _gram(x):
    return (x.T @ x).double()


@pytest.mark.parametrize("spec", [{"kind": "grouped", "min_channels_per_group": 8}, {"kind": "low_rank", "fraction": 0.3}])
def test_an_activation_fit_never_ends_worse_than_frobenius_on_held_out_inputs(spec):
    """Few, ill-conditioned calibration rows (4 samples of 32 channels: X^T X of rank 4) let a least-squares
    fit chase directions the held-out rows visit differently; the kept fit is never worse there than the
    Frobenius fit, and says which it is."""
    from kphi.convert.calibration import activation_fit_or_fallback as _activation_fit_or_fallback
    from kphi.modeling.kinds import calibration_error

    kind = projection_kind(spec)
    torch.manual_seed(0)
    weight = torch.randn(32, 32)
    fit_gram, check_gram = _gram(torch.randn(4, 32) * torch.logspace(0, 3, 32)), _gram(torch.randn(500, 32))
    module = kind.build(32, 32)
    method = _activation_fit_or_fallback(kind, module, weight, None, fit_gram, check_gram)
    kept = calibration_error(check_gram, weight, kind.dense_weight(module))
    frobenius = kind.build(32, 32)
    kind.fit(frobenius, weight)
    assert kept <= calibration_error(check_gram, weight, kind.dense_weight(frobenius)) + 1e-12
    assert method == "activations" or method.startswith("frobenius (activation fit worse on held-out calibration rows")
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("spec", [{"kind": "grouped", "min_channels_per_group": 8}, {"kind": "low_rank", "fraction": 0.3}])
def test_an_activation_fit_wins_where_the_inputs_really_are_low_dimensional(spec):
    """Inputs on an 6-dimensional subspace (fit and held-out rows alike): the activation fit, which spends the
    budget on those directions, beats the Frobenius fit on the held-out rows and is kept."""
    from kphi.convert.calibration import activation_fit_or_fallback as _activation_fit_or_fallback
    from kphi.modeling.kinds import calibration_error

    kind = projection_kind(spec)
    torch.manual_seed(1)
    weight, basis = torch.randn(32, 32), torch.randn(6, 32)
    fit_gram, check_gram = _gram(torch.randn(400, 6) @ basis), _gram(torch.randn(400, 6) @ basis)
    module = kind.build(32, 32)
    assert _activation_fit_or_fallback(kind, module, weight, None, fit_gram, check_gram) == "activations"
    frobenius = kind.build(32, 32)
    kind.fit(frobenius, weight)
    assert calibration_error(check_gram, weight, kind.dense_weight(module)) < 0.5 * calibration_error(
        check_gram, weight, kind.dense_weight(frobenius))


def test_targets_take_full_module_names_and_patterns(sources, tmp_path):
    """PEFT's target rule: a name suffix of any depth or a regular expression over the full name."""
    result = convert(sources["llama"], "grouped", min_channels_per_group=8,
                     targets=["layers.0.mlp.down_proj", r".*layers\.1\.self_attn\.[qk]_proj"])
    assert sorted(result.replaced) == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj",
                                       "model.layers.1.self_attn.q_proj"]
