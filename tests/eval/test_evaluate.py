"""``kphi eval``: bits per byte and perplexity in strided windows, checked against a naive per-token reference;
lm-evaluation-harness on a tiny model, offline."""

import json
import math

import pytest

from processes import run_cli
import torch

from kphi.eval.bits import TextScore, read_documents, score_documents, window_plan
from kphi.presets import load_preset
from tiny_gguf import write_tiny_llama_gguf


@pytest.mark.parametrize("length,context,stride", [(2, 4, 2), (10, 4, 2), (11, 4, 4), (37, 8, 3), (5, 16, 8), (64, 8, 1)])
def test_windows_score_every_token_once_with_enough_history(length, context, stride):
    scored = []
    for begin, end, first in window_plan(length, context, stride):
        assert 0 <= begin < first <= end <= length and end - begin <= context
        scored += list(range(first, end))
        # every scored token sees at least context - stride earlier tokens, or all of them
        assert all(p - begin >= min(p, context - stride) for p in range(first, end))
    assert scored == list(range(1, length))


@torch.no_grad()
def naive_nats(model, tokens, prefix, context):
    """Each token scored alone: its own history truncated to the last ``context - 1`` tokens (the most any
    window gives), one forward pass per token."""
    seq = [prefix, *tokens]
    total = 0.0
    for position in range(1, len(seq)):
        history = seq[max(0, position - (context - 1)):position]
        logits = model(torch.tensor([history])).logits[0, -1]
        total -= float(torch.log_softmax(logits.float(), -1)[seq[position]])
    return total


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(load_preset("tiny-kphi3").config).eval()


def test_one_window_equals_the_naive_per_token_sum(tiny_model):
    tokens = torch.randint(3, tiny_model.config.vocab_size, (20,)).tolist()
    nats, scored = score_documents(tiny_model, [tokens], 2, context=64, stride=32)
    assert scored == 20
    assert nats == pytest.approx(naive_nats(tiny_model, tokens, 2, 64), rel=1e-5)


def test_stride_one_windows_equal_the_naive_sliding_context(tiny_model):
    """With stride 1 every token is scored with exactly ``context - 1`` tokens of history (once the document
    is that long), which is what the naive reference computes."""
    tokens = torch.randint(3, tiny_model.config.vocab_size, (30,)).tolist()
    nats, scored = score_documents(tiny_model, [tokens, tokens[:5]], 2, context=8, stride=1)
    assert scored == 35
    expected = naive_nats(tiny_model, tokens, 2, 8) + naive_nats(tiny_model, tokens[:5], 2, 8)
    assert nats == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_and_perplexity_arithmetic():
    score = TextScore("t", documents=1, bytes=100, tokens=25, nats=50 * math.log(2), context=8, stride=4)
    assert score.bits_per_byte == pytest.approx(0.5)
    assert score.perplexity == pytest.approx(math.exp(2 * math.log(2)))
    assert score.to_dict()["loss"] == pytest.approx(2 * math.log(2))


def test_documents_from_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one document\nover two lines\n")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n')
    assert read_documents(tmp_path / "a.txt") == ["one document\nover two lines\n"]
    assert read_documents(tmp_path / "b.jsonl") == ["first", "second"]




def test_eval_compares_a_kphi_run_and_a_gguf_model_on_the_same_text(trained_model_dir, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf)
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    result = run_cli("eval", str(trained_model_dir), str(gguf), "--text", str(text), "--context", "32", "--json",
                      cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout)
    assert [r["model"].split(" ")[0] for r in reports] == [str(trained_model_dir), str(gguf)]
    for report in reports:
        (score,) = report["texts"]
        assert score["bytes"] == len(text.read_bytes()) and score["context"] == 32 and score["stride"] == 16
        assert score["bits_per_byte"] == pytest.approx(score["nats"] / math.log(2) / score["bytes"])
        assert 0 < score["bits_per_byte"] < 40 and score["tokens"] > 30
    table = run_cli("eval", str(trained_model_dir), str(gguf), "--text", str(text), "--context", "32", "--quiet", cache=tmp_path / "cache")
    assert table.returncode == 0 and table.stdout.count("| heldout.txt |") == 2


def test_eval_defaults_to_the_shipped_heldout_text(trained_model_dir, tmp_path):
    result = run_cli("eval", str(trained_model_dir), "--context", "128", "--stride", "128", "--max-bytes", "12000",
                      "--json", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    (score,) = json.loads(result.stdout)[0]["texts"]
    assert score["name"].startswith("heldout") and 10_000 < score["bytes"] <= 12_000


def test_first_bytes_keeps_whole_documents_then_cuts_at_a_line_end():
    from kphi.eval.bits import first_bytes

    documents = ["ab\ncd\n", "éé\nfg\nhi\n", "never"]  # 6 bytes, then 10 bytes (é is 2 bytes)
    assert first_bytes(documents, 6) == ["ab\ncd\n"]
    assert first_bytes(documents, 14) == ["ab\ncd\n", "éé\nfg\n"]
    assert first_bytes(documents, 13) == ["ab\ncd\n", "éé\n"]
    assert first_bytes(documents, 8) == ["ab\ncd\n", "é"]  # no line end inside the limit: the bytes that fit
    assert first_bytes(documents, 100) == documents


@pytest.mark.parametrize("args,message", [
    (["--text", "missing.txt"], "cannot read"),
    (["--context", "1"], "context"),
    (["--tasks", "no_such_task_anywhere"], "no_such_task_anywhere"),
])
def test_bad_eval_input_is_one_line(trained_model_dir, tmp_path, args, message):
    if args[0] == "--tasks":
        pytest.importorskip("lm_eval")
    result = run_cli("eval", str(trained_model_dir), *[str(tmp_path / a) if a.endswith(".txt") else a for a in args],
                      cache=tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_an_lm_eval_task_runs_offline_on_a_kphi_model(trained_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    result = run_cli("eval", str(trained_model_dir), "--tasks", "kphi_next_sentence", "--limit", "8", "--json",
                      cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)[0]["tasks"]["kphi_next_sentence"]
    assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1
    assert metrics["acc"] * 8 == pytest.approx(round(metrics["acc"] * 8))  # a count out of the 8 questions
