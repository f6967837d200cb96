"""Text corpora from pinned wheels: what is read, in which order, what is held out, and what preparing gives.

The wheels here are small zip files written by the test into the wheel cache, so nothing is downloaded.
"""

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from kphi.cli import main
from kphi.data import corpora
from kphi.data.corpora import open_corpus
from kphi.data.prepare import PrepareSettings, load_prepared, prepare_dataset
from kphi.data.sources import DataError

FILES = {
    "pkg/b.py": "def b():\n    return 'bee'\n" * 40,
    "pkg/a.py": "# the first file\nimport os\n\nprint(os.sep)\n" * 40,
    "pkg/copy_of_a.py": "# the first file\nimport os\n\nprint(os.sep)\n" * 40,   # same bytes as a.py: read once
    "pkg/empty.py": "\n\n",                                                  # blank: skipped
    "pkg/data.txt": "not a python file",                                    # other suffix: skipped
    **{f"pkg/mod{i:02d}.py": f"VALUE_{i} = {i}\n\ndef f{i}(x):\n    return x * {i}\n" * 30 for i in range(40)},
}


def _wheel(directory: Path, name: str = "toy", version: str = "1.0", files: dict = FILES) -> tuple[Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def corpus_file(tmp_path):
    wheel, digest = _wheel(Path(os.environ["KPHI_CACHE"]) / "wheels")
    spec = tmp_path / "toy.yaml"
    spec.write_text(f"name: toy\nsuffixes: ['.py']\nheldout_every: 4\n"
                    f"packages:\n  - {{requirement: toy==1.0, sha256: {digest}, licence: MIT}}\n")
    return spec, wheel


def _heldout_by_rule(name: str, every: int) -> bool:
    """The split rule written out: the first 8 bytes of the name's SHA-256, big-endian, modulo ``every``."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % every == 0


def test_documents_are_the_wheels_python_files_sorted_once_each(corpus_file):
    spec, wheel = corpus_file
    docs = list(open_corpus(str(spec)).documents())
    members = sorted(m for m in FILES if m.endswith(".py") and m not in ("pkg/copy_of_a.py", "pkg/empty.py"))
    assert [d.name for d in docs] == [f"{wheel.name}/{m}" for m in members]
    assert [d.text for d in docs] == [FILES[m] for m in members]
    assert [d.heldout for d in docs] == [_heldout_by_rule(d.name, 4) for d in docs]
    assert 0 < sum(d.heldout for d in docs) < len(docs)


def test_max_documents_stops_early(corpus_file):
    assert len(list(open_corpus(str(corpus_file[0])).documents(max_documents=3))) == 3


def test_a_cached_wheel_with_other_bytes_is_not_used(corpus_file, monkeypatch, tmp_path):
    spec, wheel = corpus_file
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    served, _ = _wheel(tmp_path / "served", files={"x.py": "x = 1\n"})  # what the registry would hand out
    monkeypatch.setattr(corpora, "pip_download", lambda *a, **k: served)
    with pytest.raises(DataError, match="SHA-256 .* the corpus pins"):
        open_corpus(str(spec)).wheels()


@pytest.mark.parametrize("text, problem", [
    ("name: x\n", "needs name and packages"),
    ("name: x\npackages: []\n", "at least one package"),
    ("name: x\npackages:\n  - {requirement: toy, sha256: ab}\n", "name==version"),
    ("{", "not a valid corpus definition"),
])
def test_a_malformed_definition_is_one_clear_error(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=problem):
        open_corpus(str(path))


def test_the_shipped_corpus_pins_every_wheel():
    corpus = open_corpus("python-source")
    assert "python-source" in corpora.corpus_names()
    assert len(corpus.packages) >= 10
    assert all("==" in p.requirement and len(p.sha256) == 64 and p.licence for p in corpus.packages)


def test_prepare_writes_both_splits_deterministically(corpus_file, tmp_path):
    spec, _ = corpus_file
    settings = PrepareSettings(source=str(spec), vocab_size=300, context_length=16)
    first = prepare_dataset(settings, out_dir=tmp_path / "one", progress=False)
    second = prepare_dataset(settings, out_dir=tmp_path / "two", progress=False)
    stats = [json.loads((d / "stats.json").read_text()) for d in (first, second)]
    assert stats[0]["train_sha256"] == stats[1]["train_sha256"]
    assert stats[0]["validation_sha256"] == stats[1]["validation_sha256"]
    train, validation, tokenizer, _ = load_prepared(first)
    docs = list(open_corpus(str(spec)).documents())
    assert stats[0]["validation_documents"] == sum(d.heldout for d in docs)
    assert len(validation) == stats[0]["validation_rows"] > 0
    assert len(train) == stats[0]["train_rows"] > 0
    # the packed rows are the training documents, in order, each ended by <|endoftext|>, cut into rows
    ids = [t for row in train["input_ids"] for t in row]
    joined = "".join(d.text + "<|endoftext|>" for d in docs if not d.heldout)
    assert joined.startswith(tokenizer.decode(ids))
    assert len(ids) == stats[0]["train_tokens"] == len(train) * 16
    assert hashlib.sha256(b"".join(int(t).to_bytes(4, "little", signed=True) for t in ids)).hexdigest() \
        == stats[0]["train_sha256"]


def test_the_cli_prepares_a_corpus_and_refuses_a_broken_one(corpus_file, tmp_path, capsys):
    spec, _ = corpus_file
    assert main(["data", "prepare", "--source", str(spec), "--vocab-size", "300", "--context-length", "16",
                 "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    assert (tmp_path / "ok" / "stats.json").is_file()
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\n")
    assert main(["data", "prepare", "--source", str(broken), "--out", str(tmp_path / "no"), "--quiet"]) == 2
    assert "not a valid corpus definition" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
