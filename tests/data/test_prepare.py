"""prepare_dataset end to end on tiny real files: outputs, packing, labels, cache, atomicity, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kphi.data import prepare, recipe
from kphi.data.prepare import PrepareSettings, format_stats, load_prepared, prepare_dataset
from kphi.data.recipe import EOS, IGNORE_INDEX
from kphi.data.sources import DataError
from kphi.files import OutputDirError

pytestmark = pytest.mark.usefixtures("isolated_caches")

CTX = 32


def settings_for(path, **kw) -> PrepareSettings:
    base = dict(source=str(path), context_length=CTX, validation_rows=20, vocab_size=300)
    base.update(kw)
    return PrepareSettings(**base)


def naive_split(samples, validation_rows, seed):
    """The split the preparation promises: one seeded PCG64 permutation, validation first, then training."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order[validation_rows:]], [samples[i] for i in order[:validation_rows]]


def expected_split(rows, settings):
    """The train/validation sample texts the recipe should produce for ``rows``."""
    texts = [recipe.format_sample(r["instruction"], r["response"]) for r in rows]
    kept = recipe.apply_filters(texts, settings.filters).kept
    return naive_split(kept, settings.validation_rows, settings.seed)


def col(ds, name: str) -> list:
    """A column as a plain list (``ds[name]`` is a lazy Column in recent ``datasets``)."""
    return ds[:][name] if len(ds) else []


def encode(tokenizer, texts):
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_settings_defaults_and_validation():
    s = PrepareSettings()
    assert (s.source, s.tokenizer, s.vocab_size, s.context_length, s.validation_rows, s.seed) == (
        "default", "bpe", 4096, 256, 5000, 42)
    assert s.filters == recipe.DEFAULT_FILTERS and s.packing == "tokens" and s.loss_on == "all"
    assert s.columns == ("instruction", "response") and s.max_rows is None
    assert PrepareSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for bad in ({"packing": "bytes"}, {"loss_on": "user"}, {"context_length": 1}, {"validation_rows": -1},
                {"max_rows": 0}, {"columns": ("a",)}, {"filters": ("",)}, {"vocab_size": 1.5}, {"seed": "42"}):
        (name,) = bad
        with pytest.raises(DataError, match=rf"(invalid setting )?{name}\b"):
            PrepareSettings(**bad)


def test_prepare_outputs_and_stats(tmp_path, corpus_file, fake_builder, rows_factory):
    rows = rows_factory()
    settings = settings_for(corpus_file)
    out = prepare_dataset(settings, cache_dir=tmp_path / "cache", progress=False)
    assert out.parent == tmp_path / "cache"
    assert out.stat().st_mode & 0o077 == (tmp_path / "cache").stat().st_mode & 0o077  # not private like mkdtemp
    for name in ("train", "validation", "tokenizer", "settings.json", "stats.json"):
        assert (out / name).exists()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pairs_read"] == 240 and stats["malformed"] == 0
    assert stats["dropped"] == {"I am not": 0, "I am an AI": 0, "I do not": 0, "I cannot": 24,
                                "t goes against my": 0, "t is not my": 0, "I don't have": 24}
    assert stats["train_samples"] == 240 - 48 - 20 and stats["validation_samples"] == 20
    assert stats["context_length"] == CTX
    saved = json.loads((out / "settings.json").read_text())
    assert PrepareSettings.from_dict(saved) == settings and saved["cache_key"]

    train, val, tok, loaded_stats = load_prepared(out)
    assert loaded_stats == stats
    assert train.column_names == ["input_ids", "labels"] and val.column_names == ["input_ids", "labels"]
    assert len(train) == stats["train_rows"] > 0 and len(val) == stats["validation_rows"] > 0
    assert all(len(r) == CTX for r in col(train, "input_ids") + col(val, "input_ids"))
    assert col(train, "labels") == col(train, "input_ids")  # loss_on="all"
    assert stats["train_tokens"] == len(train) * CTX and stats["train_loss_tokens"] == len(train) * CTX

    # the bpe tokenizer is trained on exactly the training split
    train_texts, val_texts = expected_split(rows, settings)
    assert len(fake_builder.calls) == 1
    call = fake_builder.calls[0]
    assert call["spec"] == "bpe" and call["vocab_size"] == 300
    assert call["training_texts"] == train_texts
    assert not set(val_texts) & set(call["training_texts"])
    assert tok.convert_tokens_to_ids(EOS) is not None


def test_token_packing_against_naive_reference(tmp_path, corpus_file, fake_builder, rows_factory):
    settings = settings_for(corpus_file)
    out = prepare_dataset(settings, cache_dir=tmp_path / "cache", progress=False)
    train, val, tok, stats = load_prepared(out)
    train_texts, val_texts = expected_split(rows_factory(), settings)
    for ds, texts, split in ((train, train_texts, "train"), (val, val_texts, "validation")):
        stream = [t for seq in encode(tok, [x + EOS for x in texts]) for t in seq]
        n_rows = len(stream) // CTX
        assert len(ds) == n_rows
        assert [t for row in col(ds, "input_ids") for t in row] == stream[: n_rows * CTX]
        assert stats[f"{split}_tokens_dropped"] == len(stream) - n_rows * CTX < CTX  # only the partial tail
        # one <|endoftext|> after every sample, except the samples ending in the dropped tail
        eos = tok.convert_tokens_to_ids(EOS)
        flat = [t for row in col(ds, "input_ids") for t in row]
        assert flat.count(eos) == len(texts) - stream[n_rows * CTX:].count(eos)


def test_reference_char_packing(tmp_path, corpus_file, fake_builder, rows_factory):
    settings = settings_for(corpus_file, packing="reference", chars_per_token=5)
    out = prepare_dataset(settings, cache_dir=tmp_path / "cache", progress=False)
    train, val, tok, stats = load_prepared(out)
    train_texts, _ = expected_split(rows_factory(), settings)
    char_rows = list(recipe.pack_characters([t + EOS for t in train_texts], 5 * CTX))
    assert len(train) == len(char_rows) == stats["train_rows"]
    pad = tok.pad_token_id
    pads = truncated = 0
    for row, labels, text in zip(col(train, "input_ids"), col(train, "labels"), char_rows):
        ids = tok.encode(text)  # reference packing keeps the tokenizer's defaults (none for this tokenizer)
        assert row == (ids + [pad] * CTX)[:CTX]
        assert labels == row  # the reference puts the loss on every position, padding included
        pads += max(0, CTX - len(ids))
        truncated += max(0, len(ids) - CTX)
    assert stats["train_pad_tokens"] == pads and stats["train_tokens_dropped"] == truncated
    assert all(len(r) <= 5 * CTX for r in char_rows if r.count(EOS) > 1)


def test_assistant_only_labels(tmp_path, jsonl_writer, fake_builder):
    path = jsonl_writer(tmp_path / "qa.jsonl", [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(30)])
    settings = settings_for(path, loss_on="assistant", validation_rows=5, context_length=16)
    out = prepare_dataset(settings, cache_dir=tmp_path / "cache", progress=False)
    train, _, tok, stats = load_prepared(out)
    special = {t: tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>", EOS)}
    # a hand-computed sample: <|user|> q 7 <|end|> <|assistant|> a 7 <|end|> <|endoftext|>
    sample = tok.encode("<|user|>q7<|end|><|assistant|>a7<|end|>" + EOS, add_special_tokens=False)
    assert sample[0] == special["<|user|>"] and sample[-1] == special[EOS]
    a_pos = sample.index(special["<|assistant|>"])
    expected = [IGNORE_INDEX] * (a_pos + 1) + sample[a_pos + 1:]
    assert recipe.assistant_labels(sample, special["<|assistant|>"], special["<|end|>"], special[EOS]) == expected
    # and the prepared rows carry exactly those labels
    flat_ids = [t for row in col(train, "input_ids") for t in row]
    flat_labels = [t for row in col(train, "labels") for t in row]
    in_resp = False
    for tok_id, label in zip(flat_ids, flat_labels):
        if tok_id == special[EOS]:
            assert label == tok_id
            in_resp = False
        elif in_resp:
            assert label == tok_id
            in_resp = tok_id != special["<|end|>"]
        else:
            assert label == IGNORE_INDEX
            in_resp = tok_id == special["<|assistant|>"]
    assert 0 < stats["train_loss_tokens"] < stats["train_tokens"]


def test_reference_packing_with_assistant_masks_padding(tmp_path, jsonl_writer, fake_builder):
    path = jsonl_writer(tmp_path / "qa.jsonl", [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(12)])
    settings = settings_for(path, packing="reference", loss_on="assistant", validation_rows=2, context_length=64)
    train, _, tok, stats = load_prepared(prepare_dataset(settings, cache_dir=tmp_path / "c", progress=False))
    assert stats["train_pad_tokens"] > 0
    eos = tok.convert_tokens_to_ids(EOS)
    assert tok.pad_token_id == eos  # as with phi-3: the last real token and the padding look alike
    for row, labels in zip(col(train, "input_ids"), col(train, "labels")):
        run = next(i for i, t in enumerate(reversed(row)) if t != eos)  # trailing eos/pad tokens
        assert run >= 2  # every row here is padded: the sample's own eos, then padding
        assert labels[len(row) - run] == eos  # the real <|endoftext|> keeps its loss
        assert labels[len(row) - run + 1:] == [IGNORE_INDEX] * (run - 1)  # padding has none


def test_cache_hit_is_fast_and_same_path(tmp_path, corpus_file, fake_builder, capsys):
    settings = settings_for(corpus_file)
    first = prepare_dataset(settings, cache_dir=tmp_path / "cache", progress=True)
    printed = capsys.readouterr().out
    assert "Prepared" in printed and str(first) in printed
    second = prepare_dataset(settings_for(corpus_file), cache_dir=tmp_path / "cache", progress=False)
    assert second == first and len(fake_builder.calls) == 1  # found in the cache: nothing was rebuilt
    # a changed setting is a different entry
    third = prepare_dataset(settings_for(corpus_file, seed=1), cache_dir=tmp_path / "cache", progress=False)
    assert third != first and len(fake_builder.calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, third.name])


def test_cache_follows_the_source_file(tmp_path, jsonl_writer, rows_factory, fake_builder):
    path = jsonl_writer(tmp_path / "c.jsonl", rows_factory(100))
    first = prepare_dataset(settings_for(path, validation_rows=5), cache_dir=tmp_path / "cache", progress=False)
    jsonl_writer(path, rows_factory(120))
    second = prepare_dataset(settings_for(path, validation_rows=5), cache_dir=tmp_path / "cache", progress=False)
    assert second != first


def test_default_cache_dir_from_env(tmp_path, monkeypatch, corpus_file, fake_builder):
    monkeypatch.setenv("KPHI_CACHE", str(tmp_path / "kc"))
    assert prepare.data_cache_dir() == tmp_path / "kc" / "data"
    out = prepare_dataset(settings_for(corpus_file), progress=False)
    assert out.parent == tmp_path / "kc" / "data"


def test_out_dir(tmp_path, corpus_file, fake_builder):
    settings = settings_for(corpus_file)
    out = prepare_dataset(settings, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert out == tmp_path / "out" and load_prepared(out)[3]["train_rows"] > 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    # the same settings again: returned as it is
    assert prepare_dataset(settings, out_dir=out, cache_dir=tmp_path / "cache", progress=False) == out
    assert len(fake_builder.calls) == 1
    # different settings into the same, non-empty directory: refused
    with pytest.raises(OutputDirError, match="not empty.*different settings"):
        prepare_dataset(settings_for(corpus_file, seed=3), out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty.*other files"):
        prepare_dataset(settings, out_dir=other, cache_dir=tmp_path / "cache", progress=False)
    assert (other / "keep.txt").read_text() == "mine"
    # an empty existing directory is fine; a cached result is copied
    cached = prepare_dataset(settings, cache_dir=tmp_path / "cache", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    copied = prepare_dataset(settings, out_dir=empty, cache_dir=tmp_path / "cache", progress=False)
    assert copied == empty and len(fake_builder.calls) == 2
    assert col(load_prepared(copied)[0], "input_ids") == col(load_prepared(cached)[0], "input_ids")


def _leftovers(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs if d.exists() for p in d.iterdir()]


def test_failure_in_tokenizer_leaves_nothing(tmp_path, corpus_file, monkeypatch):
    def broken(spec, training_texts=None, vocab_size=4096):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr("kphi.data.tokenizers.build_tokenizer", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        prepare_dataset(settings_for(corpus_file), cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(RuntimeError, match="exploded"):
        prepare_dataset(settings_for(corpus_file), out_dir=tmp_path / "w" / "out", cache_dir=tmp_path / "cache",
                        progress=False)
    assert _leftovers(tmp_path / "cache", tmp_path / "w") == []


def test_failure_after_a_split_was_written_leaves_nothing(tmp_path, corpus_file, fake_builder, monkeypatch):
    import datasets

    real_save = datasets.Dataset.save_to_disk

    def save(self, directory, **kwargs):
        if Path(directory).name == "validation":
            raise OSError("disk full")
        real_save(self, directory, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(settings_for(corpus_file), cache_dir=tmp_path / "cache", progress=False)
    out = tmp_path / "existing-empty"
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(settings_for(corpus_file), out_dir=out, cache_dir=tmp_path / "cache", progress=False)
    assert _leftovers(tmp_path / "cache", out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus.jsonl", "existing-empty"]


def test_tokenizer_without_chat_tokens_is_refused(tmp_path, corpus_file, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def plain(spec, training_texts=None, vocab_size=4096):
        tok = Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")

    monkeypatch.setattr("kphi.data.tokenizers.build_tokenizer", plain)
    with pytest.raises(DataError, match=r"does not encode <\|user\|> as one token"):
        prepare_dataset(settings_for(corpus_file), cache_dir=tmp_path / "cache", progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_empty_after_filtering(tmp_path, jsonl_writer, fake_builder):
    path = jsonl_writer(tmp_path / "refusals.jsonl",
                        [{"instruction": "Help", "response": "I cannot help."}, {"instruction": "Hi", "response": "I do not know."}])
    with pytest.raises(DataError, match="no samples left after filtering.*'I do not': 1.*'I cannot': 1"):
        prepare_dataset(settings_for(path), cache_dir=tmp_path / "cache", progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_too_few_samples_for_validation(tmp_path, jsonl_writer, fake_builder):
    path = jsonl_writer(tmp_path / "few.jsonl", [{"instruction": "a", "response": "b"}] * 3)
    with pytest.raises(DataError, match="validation_rows=20"):
        prepare_dataset(settings_for(path), cache_dir=tmp_path / "cache", progress=False)


def test_unknown_source_and_no_pairs(tmp_path, jsonl_writer, fake_builder):
    with pytest.raises(DataError, match="unknown data source"):
        prepare_dataset(settings_for("nonsense"), cache_dir=tmp_path / "cache", progress=False)
    path = jsonl_writer(tmp_path / "blank.jsonl", [{"instruction": "", "response": "x"}])
    with pytest.raises(DataError, match="no usable pairs.*1 malformed"):
        prepare_dataset(settings_for(path), cache_dir=tmp_path / "cache", progress=False)


def test_max_rows_and_malformed_in_stats(tmp_path, jsonl_writer, rows_factory, fake_builder):
    rows = rows_factory(200)
    rows.insert(5, {"instruction": None, "response": "x"})
    path = jsonl_writer(tmp_path / "m.jsonl", rows)
    out = prepare_dataset(settings_for(path, max_rows=100, validation_rows=10), cache_dir=tmp_path / "c",
                          progress=False)
    stats = load_prepared(out)[3]
    assert stats["pairs_read"] == 100 and stats["malformed"] == 1
    assert stats["train_samples"] + stats["validation_samples"] == 100 - 20


def test_load_prepared_rejects_other_directories(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        load_prepared(tmp_path / "nope")


def test_format_stats_is_one_paragraph(tmp_path, corpus_file, fake_builder):
    stats = load_prepared(prepare_dataset(settings_for(corpus_file), cache_dir=tmp_path / "c", progress=False))[3]
    text = format_stats(stats)
    assert "\n" not in text
    for value in (stats["pairs_read"], stats["train_rows"], stats["validation_rows"], stats["train_samples"]):
        assert f"{value:,}" in text
    assert "'I cannot': 24" in text
    assert format_stats({}).startswith("Prepared ?: read 0 instruction/response pairs")  # tolerant of missing keys


@pytest.mark.skipif(
    importlib.util.find_spec("chitchat_dataset") is None or importlib.util.find_spec("chatterbot_corpus") is None,
    reason="the offline corpus needs: pip install chitchat-dataset chatterbot-corpus",
)
def test_default_corpus_quick(tmp_path, fake_builder):
    settings = PrepareSettings(source="default", max_rows=1500, validation_rows=100, context_length=64,
                               vocab_size=300)
    train, val, tok, stats = load_prepared(prepare_dataset(settings, cache_dir=tmp_path / "c", progress=False))
    assert stats["pairs_read"] == 1500
    assert stats["train_samples"] + stats["validation_samples"] + sum(stats["dropped"].values()) == 1500
    assert stats["validation_samples"] == 100
    assert len(train) > 0 and len(val) > 0
    assert set(stats["per_source"]) == {"chitchat"}  # the first 1500 pairs all come from chitchat


def test_real_bpe_tokenizer_end_to_end(tmp_path, corpus_file):
    """The default "bpe" tokenizer is trained on the training split, end to end."""
    out = prepare_dataset(settings_for(corpus_file, vocab_size=512), cache_dir=tmp_path / "c", progress=False)
    train, val, tok, stats = load_prepared(out)
    assert len(train) == stats["train_rows"] > 0


def test_no_validation_split(tmp_path, corpus_file, fake_builder):
    out = prepare_dataset(settings_for(corpus_file, validation_rows=0), cache_dir=tmp_path / "c", progress=False)
    train, val, _, stats = load_prepared(out)
    assert len(val) == 0 and stats["validation_rows"] == 0 and stats["validation_samples"] == 0
    assert stats["train_samples"] == 240 - 48 and len(train) > 0


def test_tokenizer_errors_reach_the_caller_as_input_errors_and_leave_nothing(tmp_path, corpus_file):
    from kphi.errors import KphiError

    with pytest.raises(KphiError, match="vocab_size"):
        prepare_dataset(settings_for(corpus_file, vocab_size=50), cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(KphiError, match="unknown tokenizer spec"):
        prepare_dataset(settings_for(corpus_file, tokenizer="no-such-tokenizer"), cache_dir=tmp_path / "c",
                        progress=False)
    assert _leftovers(tmp_path / "c") == []


def test_split_too_small_for_one_row(tmp_path, corpus_file, fake_builder):
    with pytest.raises(DataError, match="too small for one row of context_length=100000"):
        prepare_dataset(settings_for(corpus_file, context_length=100_000), cache_dir=tmp_path / "c", progress=False)
    assert _leftovers(tmp_path / "c") == []


@pytest.mark.parametrize("validation_rows", [0, 20])
def test_split_is_the_seeded_permutation(validation_rows):
    samples = [f"sample {i}" for i in range(137)]
    split = prepare._split(samples, validation_rows, seed=42)
    assert (col(split["train"], "text"), col(split["validation"], "text")) == naive_split(samples, validation_rows, 42)
    assert col(prepare._split(samples, validation_rows, seed=7)["train"], "text") != col(split["train"], "text")


def test_split_is_independent_of_hash_seed():
    code = (
        "import json\n"
        "from kphi.data.prepare import _split\n"
        "s = sorted({f'text {i}' for i in range(300)})\n"
        "print(json.dumps(list(_split(s, 30, 42)['validation']['text'])))\n"
    )
    # two interpreters side by side (each spends most of its time importing torch and transformers): a split
    # that followed string hashing would differ between hash seeds 0 and 1
    processes = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": hash_seed},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for hash_seed in ("0", "1")]
    results = [(p.communicate(timeout=300), p.returncode) for p in processes]
    assert all(code == 0 for _, code in results), [err for (_, err), _ in results]
    outputs = {out for (out, _), _ in results}
    assert len(outputs) == 1 and len(json.loads(outputs.pop())) == 30
