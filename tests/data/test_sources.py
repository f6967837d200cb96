"""Sources: local files in every format, hub loading via a local parquet, packaged corpora, errors."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from kphi.data import sources
from kphi.data.sources import (
    LAMINI_NAME,
    ChatterbotSource,
    ChitchatSource,
    CompositeSource,
    DataError,
    open_source,
)

pytestmark = pytest.mark.usefixtures("isolated_caches")

PAIRS = [("Name a fruit.", "Apple."), ("Add 2 and 3.", "5"), ("Say hi\nplease", "\nHi!")]


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_all(spec, **kw):
    src = open_source(spec, **kw)
    return src, list(src)


def test_dataerror_is_valueerror():
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "csv"])
def test_each_local_format(tmp_path, fmt):
    ins = [p[0] for p in PAIRS]
    res = [p[1] for p in PAIRS]
    path = tmp_path / f"data.{fmt}"
    if fmt == "parquet":
        write_parquet(path, {"instruction": ins, "response": res, "extra": [1, 2, 3]})
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in PAIRS))
    elif fmt == "json":
        path.write_text(json.dumps([{"instruction": i, "response": r} for i, r in PAIRS]))
    else:
        write_csv(path, ["instruction", "response"], [list(p) for p in PAIRS])
    src, pairs = read_all(path)
    assert pairs == PAIRS
    assert src.pairs == 3 and src.malformed == 0
    assert src.fingerprint.startswith("files:")


def test_custom_column_names(tmp_path):
    path = write_parquet(tmp_path / "qa.parquet", {"question": ["Q1", "Q2"], "answer": ["A1", "A2"]})
    _, pairs = read_all(str(path), columns=("question", "answer"))
    assert pairs == [("Q1", "A1"), ("Q2", "A2")]


def test_directory_of_mixed_files(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_parquet(d / "a.parquet", {"instruction": ["p1"], "response": ["r1"]})
    (d / "sub" / "b.jsonl").write_text(json.dumps({"instruction": "j1", "response": "s1"}) + "\n")
    write_csv(d / "c.csv", ["instruction", "response"], [["c1", "t1"]])
    (d / "notes.txt").write_text("ignored")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.jsonl").write_text(json.dumps({"instruction": "no", "response": "no"}) + "\n")
    src, pairs = read_all(d)
    assert sorted(pairs) == [("c1", "t1"), ("j1", "s1"), ("p1", "r1")]
    assert len(src.counts) == 3


def test_missing_columns_names_found_columns(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"prompt": ["a"], "completion": ["b"], "id": [1]})
    src = open_source(path)  # opening is cheap; the check happens when reading
    with pytest.raises(DataError) as err:
        list(src)
    msg = str(err.value)
    assert "'instruction' or 'response'" in msg
    assert "columns found: prompt, completion, id" in msg
    assert msg.count("\n") == 0


def test_one_missing_column_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'response'; columns found: instruction, output"):
        list(open_source(path))


def test_malformed_rows_are_counted_not_fatal(tmp_path):
    lines = [
        {"instruction": "good", "response": "row"},
        {"instruction": None, "response": "null instruction"},
        {"instruction": "empty response", "response": ""},
        {"instruction": "   ", "response": "blank instruction"},
        {"response": "missing instruction key"},
        {"instruction": 42, "response": "number instruction"},
        {"instruction": ["a", "list"], "response": "list instruction"},
        {"instruction": "also good", "response": "yes"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    src, pairs = read_all(path)
    assert pairs == [("good", "row"), ("also good", "yes")]
    assert src.malformed == 6 and src.pairs == 2


def test_malformed_parquet_nulls(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", {"instruction": ["a", None, "c"], "response": ["x", "y", None]})
    src, pairs = read_all(path)
    assert pairs == [("a", "x")] and src.malformed == 2


def test_csv_empty_cells_are_malformed(tmp_path):
    path = write_csv(tmp_path / "e.csv", ["instruction", "response"], [["a", "b"], ["", "c"], ["d", ""]])
    src, pairs = read_all(path)
    assert pairs == [("a", "b")] and src.malformed == 2


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("no/such/file.jsonl", "does not exist"),
        ("missing.parquet", "does not exist"),
        ("not-a-source", "unknown data source 'not-a-source'"),
        ("", "empty data source"),
        ("hf:", "no dataset name"),
    ],
)
def test_bad_specs(spec, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=pattern):
        open_source(spec)


def test_unsupported_and_empty_paths(tmp_path):
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match="unsupported data file"):
        open_source(txt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        open_source(empty)


def test_corrupt_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(DataError, match=r"could not read .*bad\.parquet"):
        list(open_source(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "response": "b"}\n{broken\n')
    with pytest.raises(DataError, match=re.escape(f"{broken} line 2, column 2 is not valid JSON: Expecting property name")):
        list(open_source(broken))


def test_lamini_via_local_parquet(tmp_path, monkeypatch):
    """The real LaMini code path (hub name, split, column mapping) with the hub swapped for a parquet."""
    local = write_parquet(tmp_path / "lamini.parquet", {
        "instruction": ["Write a haiku.", None, "Define gravity."],
        "source": ["alpaca", "self_instruct", "dolly"],
        "response": ["Leaves fall softly.", "orphan", "A force of attraction."],
    })
    seen = []
    real = sources._load_hf

    def redirect(path, **kwargs):
        seen.append((path, kwargs))
        assert path == LAMINI_NAME
        return real("parquet", data_files=str(local), split=kwargs["split"])

    monkeypatch.setattr(sources, "_load_hf", redirect)
    src = open_source("lamini")
    assert src.total == 2_585_615
    assert src.fingerprint == f"hub:{LAMINI_NAME}:train"
    pairs = list(src)
    assert seen == [(LAMINI_NAME, {"split": "train"})]
    assert pairs == [("Write a haiku.", "Leaves fall softly."), ("Define gravity.", "A force of attraction.")]
    assert src.malformed == 1


def test_hub_failure_is_a_dataerror(monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(sources, "_load_hf", offline)
    with pytest.raises(DataError, match=r"could not read hub dataset MBZUAI/LaMini-instruction.*no network"):
        list(open_source("lamini"))


def test_hf_spec_with_split(tmp_path, monkeypatch):
    local = write_parquet(tmp_path / "t.parquet", {"q": ["x"], "a": ["y"]})
    seen = []
    real = sources._load_hf

    def redirect(path, **kwargs):
        seen.append((path, kwargs))
        return real("parquet", data_files=str(local), split="train")

    monkeypatch.setattr(sources, "_load_hf", redirect)
    src = open_source("hf:someone/thing:test", columns=("q", "a"))
    assert src.fingerprint == "hub:someone/thing:test"
    assert list(src) == [("x", "y")]
    assert seen == [("someone/thing", {"split": "test"})]


# ------------------------------------------------------------------ packaged corpora, hand-made files


def test_chitchat_format_joins_same_speaker(tmp_path):
    data = {
        "c1": {"messages": [
            [{"text": "Hello", "sender": "a"}, {"text": "How are you?", "sender": "a"}],
            [{"text": "Fine", "sender": "b"}],
            [{"text": "", "sender": "b"}, {"text": "and you?", "sender": "b"}],  # same speaker again: joined
            [{"text": "Great", "sender": "a"}],
        ], "start": "x"},
        "c2": {"messages": [[{"text": "alone", "sender": "z"}]]},
        "c3": {"messages": [[{"text": None, "sender": "a"}], [{"text": "hey", "sender": "b"}],
                            [{"text": "  yo  ", "sender": "a"}]]},
        "c4": {"nothing": 1},
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data))
    src = ChitchatSource(path)
    assert list(src) == [
        ("Hello\nHow are you?", "Fine\nand you?"),
        ("Fine\nand you?", "Great"),
        ("hey", "yo"),
    ]
    assert src.malformed == 3  # the empty text, the None text, the conversation without messages


def test_chatterbot_format(tmp_path):
    d = tmp_path / "english"
    d.mkdir()
    (d / "a.yml").write_text(
        "categories:\n- test\nconversations:\n"
        "- - Hi\n  - Hello there\n"
        "- - What is AI?\n  - A field of study.\n  - Tell me more.\n"
        "- - Is it on?\n  - yes\n"  # YAML turns a bare yes into a boolean
        "- just a string\n"
    )
    (d / "b.yml").write_text("categories: [x]\n")
    src = ChatterbotSource(d)
    assert list(src) == [
        ("Hi", "Hello there"),
        ("What is AI?", "A field of study."),
        ("A field of study.", "Tell me more."),
    ]
    assert src.malformed == 3  # the boolean, the string conversation, the file without conversations


def test_missing_package_names_pip_install(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **kw):
        return None if name in ("chitchat_dataset", "chatterbot_corpus") else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match="pip install chitchat-dataset"):
        open_source("chitchat")
    with pytest.raises(DataError, match="pip install chatterbot-corpus"):
        open_source("chatterbot")
    with pytest.raises(DataError, match="pip install chitchat-dataset"):
        open_source("default")


needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("chitchat_dataset") is None or importlib.util.find_spec("chatterbot_corpus") is None,
    reason="the offline corpus needs: pip install chitchat-dataset chatterbot-corpus",
)


@needs_packages
def test_default_corpus_from_installed_packages():
    src = open_source("default")
    assert isinstance(src, CompositeSource)
    assert src.fingerprint.startswith("chitchat-dataset==") and "chatterbot-corpus==" in src.fingerprint
    pairs = list(src)
    assert len(pairs) == src.pairs
    assert src.counts["chitchat"].pairs > 100_000
    assert src.counts["chatterbot"].pairs > 2_000
    assert all(isinstance(i, str) and isinstance(r, str) and i.strip() and r.strip() for i, r in pairs[:5000])


@needs_packages
def test_composite_spec_with_plus(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "mine", "response": "ours"}) + "\n")
    src = open_source(f"chatterbot+{path}")
    pairs = list(src)
    assert pairs[-1] == ("mine", "ours")
    assert set(src.counts) == {"chatterbot", str(path)}
