"""Fixtures of the data-layer tests: an isolated cache, a tiny tokenizer, small corpora."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Iterable

import pytest

_SRC = Path(__file__).resolve().parents[2] / "src"
if importlib.util.find_spec("kphi") is None and _SRC.is_dir():  # not installed: test the checkout
    sys.path.insert(0, str(_SRC))

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]


def make_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A tiny byte-level BPE trained on ``texts``, wrapped for transformers, with the chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(SPECIALS)),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )


@pytest.fixture
def isolated_caches(tmp_path_factory, monkeypatch):
    """Keep ``datasets`` and kphi caches out of the home directory; never touch the hub.

    Used by the data-layer test modules (``pytestmark``); not autouse, so other
    modules in this folder keep their own cache settings.
    """
    import datasets

    root = tmp_path_factory.getbasetemp()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KPHI_CACHE", str(root / "kphi-cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


class TokenizerCalls:
    """Stand-in for ``build_tokenizer``: records its calls, builds :func:`make_tokenizer`."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, spec, training_texts=None, vocab_size=4096):
        texts = list(training_texts) if training_texts is not None else None
        self.calls.append({"spec": spec, "training_texts": texts, "vocab_size": vocab_size})
        return make_tokenizer(texts or ["<|user|>hello<|end|><|assistant|>hi<|end|>"], vocab_size=min(vocab_size, 400))


@pytest.fixture
def fake_builder(monkeypatch) -> TokenizerCalls:
    """Route ``prepare``'s tokenizer construction to the tiny test tokenizer."""

    calls = TokenizerCalls()
    monkeypatch.setattr("kphi.data.tokenizers.build_tokenizer", calls)
    return calls


def corpus_rows(n: int = 240) -> list[dict]:
    """Deterministic instruction/response rows; every 10th response holds a filter phrase."""
    topics = ["apples", "rivers", "engines", "poems", "stars", "bridges", "coffee", "maps"]
    rows = []
    for i in range(n):
        topic = topics[i % len(topics)]
        instruction = f"Tell me fact number {i} about {topic}."
        response = f"Fact {i}: {topic} are remarkable in {i % 7 + 1} ways, and " + "quite " * (i % 5) + "interesting."
        if i % 10 == 3:
            response = f"I cannot talk about {topic}."
        elif i % 10 == 7:
            response = f"As a model, I don't have opinions on {topic}."
        if i % 4 == 0:
            response = "\n" + response  # a newline after <|assistant|> that normalisation removes
        rows.append({"instruction": instruction, "response": response})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", corpus_rows())


@pytest.fixture
def tokenizer_factory():
    """:func:`make_tokenizer`, for tests that need a tokenizer of their own."""
    return make_tokenizer


@pytest.fixture
def rows_factory():
    """:func:`corpus_rows`."""
    return corpus_rows


@pytest.fixture
def jsonl_writer():
    """:func:`write_jsonl`."""
    return write_jsonl
