"""Sensitivity-guided allocation (``kphi convert --keep F``): the knapsack against brute force, the measurement
against a model left as it was, and the whole command on a tiny Llama with a tokenizer."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from corpus import prepare_small
from kphi.convert import ConvertError, convert_to_dir
from kphi.convert.allocate import (
    Candidate, allocate, choose_sensitivity, choose_uniform, load_candidates, measure_sensitivity,
)
from kphi.data.prepare import load_prepared
from processes import run_cli

def brute_force(damage, parameters, budget):
    """The reference: every combination, the least damage within the budget."""
    names = list(damage)
    best = None
    for labels in itertools.product(*(list(damage[n]) for n in names)):
        cost = sum(parameters[n][label] for n, label in zip(names, labels))
        if cost <= budget:
            total = sum(damage[n][label] for n, label in zip(names, labels))
            if best is None or total < best[0]:
                best = (total, dict(zip(names, labels)))
    return best


def random_table(seed: int, names: int = 4):
    """Damage that falls as parameters grow (as structuring less costs less), per projection its own scale."""
    rng = random.Random(seed)
    damage, parameters = {}, {}
    for i in range(names):
        size, scale = rng.choice([100, 200, 400]), rng.uniform(0.01, 1.0)
        fractions = {"dense": 1.0, "75%": 0.75, "50%": 0.5, "25%": 0.25}
        parameters[f"p{i}"] = {label: int(size * f) for label, f in fractions.items()}
        damage[f"p{i}"] = {label: 0.0 if label == "dense" else scale * (1 - f) ** rng.uniform(0.8, 2.5)
                           for label, f in fractions.items()}
    return damage, parameters


def total(choice, table):
    return sum(table[name][label] for name, label in choice.items())


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("keep", [0.4, 0.6, 0.8])
def test_the_sensitivity_choice_meets_the_budget_with_the_least_damage(seed, keep):
    damage, parameters = random_table(seed)
    budget = int(keep * sum(p["dense"] for p in parameters.values()))
    choice = choose_sensitivity(damage, parameters, budget)
    optimum, _ = brute_force(damage, parameters, budget)
    assert total(choice, parameters) <= budget
    assert total(choice, damage) == pytest.approx(optimum, abs=1e-12)
    uniform = choose_uniform(damage, parameters, budget)
    assert total(choice, damage) <= total(uniform, damage) + 1e-12


@pytest.mark.fast
def test_the_sensitive_projection_stays_dense_and_the_others_pay():
    damage = {"v_proj": {"dense": 0.0, "half": 2.0}, "q_proj": {"dense": 0.0, "half": 0.01},
              "k_proj": {"dense": 0.0, "half": 0.02}}
    parameters = {name: {"dense": 100, "half": 50} for name in damage}
    assert choose_sensitivity(damage, parameters, 200) == {"v_proj": "dense", "q_proj": "half", "k_proj": "half"}
    assert choose_uniform(damage, parameters, 200) == {name: "half" for name in damage}


@pytest.mark.fast
def test_a_budget_no_candidate_reaches_is_one_clear_error():
    damage = {"a": {"dense": 0.0, "half": 1.0}}
    parameters = {"a": {"dense": 100, "half": 50}}
    with pytest.raises(ConvertError, match="over the budget"):
        choose_sensitivity(damage, parameters, 10)
    with pytest.raises(ConvertError, match="no single candidate"):
        choose_uniform(damage, parameters, 10)


def tiny_llama(seed: int = 0, vocab: int = 300):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_measuring_leaves_the_model_as_it_was_and_resumes_from_its_cache(tmp_path):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 16))

    def loss(m):
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    candidates = load_candidates("low-rank")
    cache = tmp_path / "sensitivity.json"
    table = measure_sensitivity(model, names, candidates, loss, cache)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.get_submodule(names[0])) is torch.nn.Linear
    assert table["source"] == pytest.approx(loss(model))
    for name in names:
        assert table["damage"][name]["dense"] == 0.0
        weight = model.get_submodule(name).weight
        for c in candidates:
            assert table["parameters"][name][c.label] == c.kind.num_parameters(weight.shape[1], weight.shape[0])
    assert len(json.loads(cache.read_text())["scores"]) == len(names) * (len(candidates) - 1)

    def must_not_score(_model):
        raise AssertionError("a cached score was measured again")

    def must_not_compute():
        raise AssertionError("calibration Gram matrices were computed although every score was cached")

    assert measure_sensitivity(model, names, candidates, must_not_score, cache, grams=must_not_compute) == table


def test_allocate_counts_the_whole_model_and_honours_pinned_projections():
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))]
    pinned = {"model.layers.0.self_attn.v_proj": 32 * 16}  # dense, as an override would keep it
    allocation = allocate(model, names, 0.8, lambda m: 0.0,
                          candidates=[Candidate("dense", {"kind": "dense"}), Candidate("lr", {"kind": "low_rank", "fraction": 0.25})],
                          pinned=pinned)
    assert "model.layers.0.self_attn.v_proj" not in allocation.choices
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    after = non_embedding - sum(model.get_submodule(n).weight.numel() for n in allocation.choices) + sum(allocation.parameters.values())
    assert 0.7 * non_embedding < after <= 0.8 * non_embedding


@pytest.mark.parametrize("keep", [0.0, 1.0, 1.5])
def test_allocate_refuses_a_share_outside_zero_to_one(keep):
    """From Python as from the command line (where argparse refuses it first): only 0 < keep < 1 is a budget."""
    with pytest.raises(ConvertError, match=r"--keep must be in \(0, 1\)"):
        allocate(tiny_llama(), ["model.layers.0.self_attn.q_proj"], keep, lambda m: 0.0)


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [("[1, 2", "expected a list"), ("- {kind: nope}", "expected a list")])
def test_bad_candidate_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "candidates.yaml"
    path.write_text(text)
    with pytest.raises(ConvertError, match=message):
        load_candidates(path)
    with pytest.raises(ConvertError, match="no such"):
        load_candidates("missing-list")


@pytest.mark.fast
def test_a_candidate_file_that_is_not_text_is_one_clear_error(tmp_path):
    path = tmp_path / "candidates.yaml"
    path.write_bytes(b"\xff\xfe- {kind: low_rank}")
    with pytest.raises(ConvertError, match="cannot read it as UTF-8 text"):
        load_candidates(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama directory with the prepared data's tokenizer, and the prepared data (calibration)."""
    prepared = prepare_small(tmp_path_factory.mktemp("data"))
    tokenizer = load_prepared(prepared)[2]
    model = tiny_llama(vocab=len(tokenizer))
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root, prepared


def test_convert_keep_writes_the_allocation_and_meets_the_budget(llama_dir, tmp_path):
    src, _ = llama_dir
    result = convert_to_dir(src, tmp_path / "out", keep=0.6, heldout_bytes=1024, sensitivity_bytes=512, progress=False)
    report = json.loads((tmp_path / "out" / "kphi-convert.json").read_text())
    assert result.non_embedding_after <= 0.6 * result.non_embedding_before
    assert report["allocation"]["method"] == "sensitivity" and len(report["allocation"]["choices"]) == 14
    assert report["non_embedding_after"] == result.non_embedding_after
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, label in report["allocation"]["choices"].items():
        module = loaded.get_submodule(name)
        assert (type(module) is torch.nn.Linear) == (label == "dense"), name


def test_an_override_is_kept_on_top_of_the_allocation(llama_dir, tmp_path):
    src, _ = llama_dir
    convert_to_dir(src, tmp_path / "out", keep=0.6, overrides=["v_proj=dense"], heldout_bytes=1024,
                   sensitivity_bytes=512, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(type(loaded.get_submodule(f"model.layers.{i}.self_attn.v_proj")) is torch.nn.Linear for i in range(2))
    report = json.loads((tmp_path / "out" / "kphi-convert.json").read_text())
    assert not any(name.endswith("v_proj") for name in report["allocation"]["choices"])


def test_the_command_prints_the_allocation_table_and_refuses_bad_input(llama_dir, tmp_path, capsys):
    src, _ = llama_dir
    done = run_cli("convert", str(src), "--out", str(tmp_path / "out"), "--keep", "0.6", "--allocate", "uniform",
                   "--heldout-bytes", "1024", "--sensitivity-bytes", "512", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "uniform allocation to keep 0.6" in done.stdout and "layer" in done.stdout and "q_proj" in done.stdout
    for flags, message in ((["--keep", "0.6", "--candidates", "nothing-such"], "no such bundled list"),
                           (["--keep", "0.6", "--min-channels-per-group", "8"], "drop the kind's own settings")):
        bad = run_cli("convert", str(src), "--out", str(tmp_path / "bad"), *flags, "--quiet")
        assert bad.returncode == 2 and message in bad.stderr, (flags, bad.stderr)
        assert not (tmp_path / "bad").exists()
