"""Sources of (instruction, response) pairs for the instruction corpus.

:func:`open_source` turns a source spec into a :class:`PairSource`. Opening is
cheap (it checks that the path / package / name exists and computes a
fingerprint for caching); the data is read when the source is iterated. Every
iteration yields ``(instruction, response)`` string pairs and refreshes the
source's :attr:`PairSource.counts` (pairs yielded and malformed rows skipped, per
part).

Specs:

``"lamini"``
    ``datasets.load_dataset("MBZUAI/LaMini-instruction", split="train")``, columns
    ``instruction`` / ``response`` (2,585,615 rows). Needs the Hugging Face hub, or
    the dataset already in the local ``datasets`` cache.
``"hf:OWNER/NAME"`` (optionally ``"hf:OWNER/NAME:SPLIT"``)
    Any hub dataset, read with the configured column names.
``PATH``
    A ``.parquet``, ``.jsonl``, ``.json`` or ``.csv`` file, or a directory holding
    such files (searched recursively; files of different formats are read format by
    format, in sorted order), read through ``datasets.load_dataset("parquet" /
    "json" / "csv", data_files=...)`` with the configured column names (default
    ``instruction`` / ``response``).
``"chitchat"``
    The Chit-Chat Challenge conversations shipped by the ``chitchat-dataset`` PyPI
    package (MIT licence): 7,168 human-human chats turned into
    (message, reply) pairs, see :class:`ChitchatSource`.
``"chatterbot"``
    The English part of the ``chatterbot-corpus`` PyPI package (BSD licence): YAML
    conversations turned into (statement, reply) pairs, see
    :class:`ChatterbotSource`.
``"default"``
    The offline corpus: ``"chitchat+chatterbot"``. Any specs can be joined with
    ``+`` into a composite source (read one after the other).

Rows whose instruction or response is missing, not a string, or blank are skipped
and counted as malformed; they never raise. Every other problem raises
:class:`DataError` with one clear message.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from ..errors import KphiError
from ..files import stat_fingerprint

#: Hub name of the LaMini instruction corpus used by the reference recipe.
LAMINI_NAME = "MBZUAI/LaMini-instruction"
DEFAULT_COLUMNS: tuple[str, str] = ("instruction", "response")
#: Builder of ``datasets.load_dataset`` for each supported file suffix.
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
#: What ``"default"`` stands for.
DEFAULT_SPEC = "chitchat+chatterbot"

_PACKAGES = {
    # source name -> (distribution on PyPI, import name)
    "chitchat": ("chitchat-dataset", "chitchat_dataset"),
    "chatterbot": ("chatterbot-corpus", "chatterbot_corpus"),
}
_READ_BATCH = 10_000


class DataError(KphiError, ValueError):
    """A data problem the user must fix; its message says what and how."""


@dataclass
class SourceCounts:
    """Counters of one part of a source, refreshed by each iteration."""

    pairs: int = 0
    malformed: int = 0


def _valid(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


class PairSource:
    """A re-iterable stream of ``(instruction, response)`` pairs.

    Attributes:
        name: short name of the source (its spec, or a part of it).
        fingerprint: a string that changes when the data changes (package version,
            file path + size + mtime, hub name); cheap, computed without reading.
        total: number of pairs (or raw rows) expected, if known before reading, for
            progress bars; None otherwise.
        counts: part name -> :class:`SourceCounts`, filled while iterating (also
            valid after an iteration stopped early).
    """

    name: str = "source"
    fingerprint: str = ""
    total: int | None = None

    def __init__(self) -> None:
        self._counts: dict[str, SourceCounts] = {}

    def __iter__(self) -> Iterator[tuple[str, str]]:
        self._counts = {}
        yield from self._generate()

    def _generate(self) -> Iterator[tuple[str, str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def counts(self) -> dict[str, SourceCounts]:
        """Part name -> counters of the last (or current, even abandoned) iteration."""
        return self._counts

    def _count(self, part: str) -> SourceCounts:
        return self._counts.setdefault(part, SourceCounts())

    @property
    def pairs(self) -> int:
        """Pairs yielded by the last (or current) iteration."""
        return sum(c.pairs for c in self.counts.values())

    @property
    def malformed(self) -> int:
        """Malformed rows skipped by the last (or current) iteration."""
        return sum(c.malformed for c in self.counts.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# --------------------------------------------------------------------------- datasets


def _load_hf(path: str, **kwargs: Any):
    """``datasets.load_dataset`` (a seam the tests redirect to local files)."""
    import datasets

    return datasets.load_dataset(path, **kwargs)


@contextlib.contextmanager
def datasets_bars(enabled: bool) -> Iterator[None]:
    """Silence the progress bars of ``datasets`` itself (``Generating train split``) when ``enabled`` is False."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    if not enabled and was_enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _quiet_json_builder():
    """Hush the log line ``datasets``' JSON reader writes before it raises: the raised error says it, once."""
    import logging

    logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_bad_json_line(path: Path) -> str | None:
    """``"PATH line N, column C is not valid JSON: ..."`` for the first line of a JSON-lines file that does not parse
    (numbered from 1, as editors number them; blank lines are allowed), ``None`` when every line parses."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{path} line {number}, column {err.colno} is not valid JSON: {err.msg}"
    return None


def _describe_error(exc: BaseException) -> str:
    parts = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip()
        parts.append(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts[:3])


class DatasetSource(PairSource):
    """Pairs from ``datasets.load_dataset(*args, **kwargs)`` columns.

    Each ``(args, kwargs, label)`` in ``loads`` is loaded in turn; each must have
    both configured columns, or :class:`DataError` names the columns it has.
    """

    def __init__(self, name: str, loads: list[tuple[str, dict, str]], columns: Sequence[str],
                 fingerprint: str, total: int | None = None):
        super().__init__()
        if len(columns) != 2 or not all(isinstance(c, str) and c for c in columns):
            raise DataError(f"columns must be two column names (instruction, response), got {list(columns)!r}")
        self.name = name
        self.loads = loads
        self.columns = (columns[0], columns[1])
        self.fingerprint = fingerprint
        self.total = total

    def _open(self, path: str, kwargs: dict, label: str):
        files = kwargs.get("data_files") or []
        local = [Path(f) for f in ([files] if isinstance(files, str) else files) if Path(f).is_file()]
        empty = [f for f in local if f.stat().st_size == 0]
        if empty:  # datasets answers an empty file with a bare StopIteration
            raise DataError(f"{empty[0]} is empty")
        try:
            with _quiet_json_builder():
                ds = _load_hf(path, **kwargs)
        except DataError:
            raise
        except Exception as exc:  # datasets / pyarrow / network errors of many kinds
            bad = next(filter(None, (_first_bad_json_line(f) for f in local if f.suffix.lower() == ".jsonl")), None)
            raise DataError(bad or f"could not read {label}: {_describe_error(exc)}") from exc
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
            raise DataError(f"{label} loaded as several splits {list(ds.keys())}; name one split")
        found = list(ds.column_names or [])
        missing = [c for c in self.columns if c not in found]
        if missing:
            raise DataError(
                f"{label} has no column {' or '.join(repr(c) for c in missing)}; "
                f"columns found: {', '.join(found) if found else 'none'} "
                f"(choose the columns with the 'columns' setting)"
            )
        return ds

    def _generate(self) -> Iterator[tuple[str, str]]:
        ins_col, res_col = self.columns
        for path, kwargs, label in self.loads:
            ds = self._open(path, kwargs, label)
            counts = self._count(label)
            if len(ds) == 0:
                continue
            for batch in ds.select_columns([ins_col, res_col]).iter(batch_size=_READ_BATCH):
                for instruction, response in zip(batch[ins_col], batch[res_col]):
                    if _valid(instruction) and _valid(response):
                        counts.pairs += 1
                        yield instruction, response
                    else:
                        counts.malformed += 1


def lamini_source(name: str = LAMINI_NAME, split: str = "train", columns: Sequence[str] = DEFAULT_COLUMNS,
                  cache_dir: str | os.PathLike | None = None) -> DatasetSource:
    """The hub corpus ``name`` (default LaMini-instruction), one split."""
    kwargs: dict[str, Any] = {"split": split}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    label = f"hub dataset {name} (split {split})"
    total = 2_585_615 if (name, split) == (LAMINI_NAME, "train") else None
    return DatasetSource(f"hf:{name}:{split}", [(name, kwargs, label)], columns,
                         fingerprint=f"hub:{name}:{split}", total=total)


def _file_fingerprint(files: Sequence[Path]) -> str:
    return "files:" + stat_fingerprint(files)


def local_files(path: str | os.PathLike) -> list[Path]:
    """The data files a local spec names (one file, or the supported files of a directory)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        try:
            files = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in FILE_BUILDERS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        except OSError as exc:
            raise DataError(f"cannot read directory {str(p)!r}: {exc}") from exc
        if not files:
            raise DataError(f"directory {str(p)!r} holds no {'/'.join(FILE_BUILDERS)} files")
        return files
    if p.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"unsupported data file {str(p)!r}: use a {', '.join(FILE_BUILDERS)} file or a directory of them")
    if not os.access(p, os.R_OK):
        raise DataError(f"data file {str(p)!r} is not readable")
    return [p]


def file_source(path: str | os.PathLike, columns: Sequence[str] = DEFAULT_COLUMNS,
                cache_dir: str | os.PathLike | None = None) -> DatasetSource:
    """Pairs from local parquet/jsonl/json/csv file(s), read through ``datasets``."""
    files = local_files(path)
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(FILE_BUILDERS[f.suffix.lower()], []).append(str(f))
    loads = []
    for builder, data_files in groups.items():
        kwargs: dict[str, Any] = {"data_files": data_files, "split": "train"}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        label = data_files[0] if len(data_files) == 1 else f"{len(data_files)} {builder} files under {path}"
        loads.append((builder, kwargs, label))
    return DatasetSource(str(path), loads, columns, fingerprint=_file_fingerprint(files))


# --------------------------------------------------------------------------- packages


def _package_dir(source: str) -> tuple[Path, str]:
    """(installed package directory, version) of a packaged corpus, or DataError."""
    dist, module = _PACKAGES[source]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"source {source!r} needs the {dist} package: pip install {dist}")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return Path(list(spec.submodule_search_locations)[0]), version


class ChitchatSource(PairSource):
    """Pairs from the Chit-Chat Challenge dataset (PyPI ``chitchat-dataset``, MIT).

    The package ships ``chitchat_dataset/dataset.json``: conversation id ->
    ``{"messages": [[{"text", "sender", "timestamp"}, ...], ...], ...}``, where each
    inner list is a run of messages from one sender. Each conversation becomes a
    list of turns: the messages are read in order, blank or non-string texts are
    skipped (counted as malformed), and *consecutive messages from the same sender
    are joined with a newline into one turn* (whether the package put them in one
    run or several). Every two consecutive turns (necessarily from different
    speakers) give one pair ``(turn, reply)``, so a conversation of k turns gives
    k - 1 pairs and each inner turn is the reply of one pair and the instruction of
    the next. Conversations with a single speaker give none.
    """

    name = "chitchat"

    def __init__(self, path: Path | None = None):
        super().__init__()
        if path is None:
            pkg, version = _package_dir("chitchat")
            path = pkg / "dataset.json"
            self.fingerprint = f"chitchat-dataset=={version}"
        else:
            self.fingerprint = _file_fingerprint([Path(path)])
        if not Path(path).is_file():
            raise DataError(f"chitchat data file {str(path)!r} is missing: pip install --force-reinstall chitchat-dataset")
        self.path = Path(path)

    def _generate(self) -> Iterator[tuple[str, str]]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read chitchat data {str(self.path)!r}: {exc}") from exc
        counts = self._count(self.name)
        conversations = data.values() if isinstance(data, dict) else data if isinstance(data, list) else []
        for conv in conversations:
            runs = conv.get("messages") if isinstance(conv, dict) else None
            if not isinstance(runs, list):
                counts.malformed += 1
                continue
            turns: list[list[str]] = []
            speakers: list[Any] = []
            for run in runs:
                for msg in run if isinstance(run, list) else [run]:
                    text = msg.get("text") if isinstance(msg, dict) else None
                    if not _valid(text):
                        counts.malformed += 1
                        continue
                    sender = msg.get("sender")
                    if turns and speakers[-1] == sender:
                        turns[-1].append(text.strip())
                    else:
                        turns.append([text.strip()])
                        speakers.append(sender)
            joined = ["\n".join(t) for t in turns]
            for instruction, response in zip(joined, joined[1:]):
                counts.pairs += 1
                yield instruction, response


class ChatterbotSource(PairSource):
    """Pairs from ``chatterbot-corpus`` (PyPI, BSD licence), English YAML files.

    Each ``chatterbot_corpus/data/english/*.yml`` file holds ``conversations:``, a
    list of conversations, each a list of statements where every statement answers
    the one before. Every two consecutive statements give a pair
    ``(statement, reply)`` (so a conversation of k statements gives k - 1 pairs).
    Statements that are not non-blank strings (YAML can turn ``yes`` into a
    boolean, for example) are skipped as malformed and break the chain there.
    Statements are stripped of surrounding whitespace.
    """

    name = "chatterbot"

    def __init__(self, data_dir: Path | None = None, language: str = "english"):
        super().__init__()
        if data_dir is None:
            pkg, version = _package_dir("chatterbot")
            data_dir = pkg / "data" / language
            self.fingerprint = f"chatterbot-corpus=={version}:{language}"
        files = sorted(Path(data_dir).glob("*.yml")) if Path(data_dir).is_dir() else []
        if not files:
            raise DataError(f"no chatterbot corpus files in {str(data_dir)!r}: pip install --force-reinstall chatterbot-corpus")
        if not self.fingerprint:
            self.fingerprint = _file_fingerprint(files)
        self.files = files

    def _generate(self) -> Iterator[tuple[str, str]]:
        counts = self._count(self.name)
        for f in self.files:
            try:
                with open(f, encoding="utf-8") as fh:
                    doc = yaml.safe_load(fh)
            except (OSError, yaml.YAMLError) as exc:
                raise DataError(f"cannot read chatterbot corpus file {str(f)!r}: {exc}") from exc
            conversations = doc.get("conversations") if isinstance(doc, dict) else None
            if not isinstance(conversations, list):
                counts.malformed += 1
                continue
            for conv in conversations:
                if not isinstance(conv, list):
                    counts.malformed += 1
                    continue
                previous: str | None = None
                for statement in conv:
                    if not _valid(statement):
                        counts.malformed += 1
                        previous = None
                        continue
                    statement = statement.strip()
                    if previous is not None:
                        counts.pairs += 1
                        yield previous, statement
                    previous = statement


# --------------------------------------------------------------------------- composite


class CompositeSource(PairSource):
    """Several sources read one after the other."""

    def __init__(self, name: str, parts: list[PairSource]):
        super().__init__()
        self.name = name
        self.parts = parts
        self.fingerprint = "+".join(p.fingerprint for p in parts)
        totals = [p.total for p in parts]
        self.total = None if any(t is None for t in totals) else sum(totals)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for part in self.parts:
            part._counts = {}
        for part in self.parts:
            yield from part

    @property
    def counts(self) -> dict[str, SourceCounts]:
        merged: dict[str, SourceCounts] = {}
        for part in self.parts:
            for key, c in part.counts.items():
                m = merged.setdefault(key, SourceCounts())
                m.pairs += c.pairs
                m.malformed += c.malformed
        return merged


KNOWN_NAMES = ("default", "lamini", "chitchat", "chatterbot", "hf:OWNER/NAME[:SPLIT]", "PATH")


def open_source(spec: str | os.PathLike, columns: Sequence[str] = DEFAULT_COLUMNS,
                cache_dir: str | os.PathLike | None = None) -> PairSource:
    """Open the source named by ``spec`` (see the module docstring).

    ``columns`` (instruction column, response column) applies to local files and
    ``hf:`` datasets; ``cache_dir`` is the ``datasets`` cache for them (default:
    the ``datasets`` default cache). Raises :class:`DataError` for an unknown name,
    a missing or unsupported path, or a corpus package that is not installed.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data source; use one of: {', '.join(KNOWN_NAMES)}")
    spec = spec.strip()
    columns = tuple(columns)
    if spec == "default":
        return CompositeSource("default", [open_source(s, columns, cache_dir) for s in DEFAULT_SPEC.split("+")])
    if spec == "lamini":
        return lamini_source(columns=columns, cache_dir=cache_dir)
    if spec == "chitchat":
        return ChitchatSource()
    if spec == "chatterbot":
        return ChatterbotSource()
    if spec.startswith("hf:"):
        rest = spec[3:]
        name, _, split = rest.partition(":")
        if not name:
            raise DataError(f"hub source {spec!r} has no dataset name; use hf:OWNER/NAME[:SPLIT]")
        return lamini_source(name=name, split=split or "train", columns=columns, cache_dir=cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return file_source(path, columns, cache_dir)
    if "+" in spec:
        parts = [p for p in spec.split("+") if p.strip()]
        return CompositeSource(spec, [open_source(p, columns, cache_dir) for p in parts])
    looks_like_path = os.sep in spec or path.suffix.lower() in FILE_BUILDERS or spec.startswith(".")
    if looks_like_path:
        raise DataError(f"data path {spec!r} does not exist")
    raise DataError(f"unknown data source {spec!r}; use one of: {', '.join(KNOWN_NAMES)}")
