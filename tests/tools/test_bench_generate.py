"""``kphi bench --generate``: models timed in turns on the same prompt, each with its reply and its speed
relative to the first."""

from __future__ import annotations

import json

from processes import run_cli


def test_two_models_are_timed_side_by_side(trained_model_dir, tmp_path):
    """A dense Llama with the trained model's tokenizer (its chat template) and its low-rank conversion."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kphi.convert import convert_to_dir

    tokenizer = AutoTokenizer.from_pretrained(trained_model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
                     ).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    convert_to_dir(tmp_path / "dense", tmp_path / "low-rank", kind="low_rank", fraction=0.5, heldout_bytes=0, progress=False)
    done = run_cli("bench", "--generate", str(tmp_path / "dense"), str(tmp_path / "low-rank"), "--new-tokens", "8",
                   "--quick", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    first, second = report["models"]
    assert report["new_tokens"] == 8 and report["repeats"] == 3
    assert first["relative"] == 1.0 and second["relative"] == second["tokens_per_second"] / first["tokens_per_second"]
    assert second["parameters"] < first["parameters"]
    assert all(row["tokens_per_second"] == 8 / row["seconds"] > 0 for row in report["models"])
    table = run_cli("bench", "--generate", str(trained_model_dir), "--new-tokens", "4", "--quick")
    assert table.returncode == 0 and "| model | parameters | tokens/s | x first |" in table.stdout


def test_a_missing_model_or_a_bad_count_is_one_clear_error(trained_model_dir, tmp_path):
    missing = run_cli("bench", "--generate", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "kphi: error:" in missing.stderr and "Traceback" not in missing.stderr
    bad = run_cli("bench", "--generate", str(trained_model_dir), "--new-tokens", "0")
    assert bad.returncode == 2 and "at least 1" in bad.stderr
