"""Prepare (and cache) a packed, tokenised instruction corpus for training.

:func:`prepare_dataset` runs the recipe of :mod:`kphi.data.recipe` on a source of
:mod:`kphi.data.sources` and writes a directory holding:

``train/``, ``validation/``
    ``datasets.Dataset.save_to_disk`` output with columns ``input_ids`` and
    ``labels`` (int32 lists of exactly ``context_length``; ``labels`` equals
    ``input_ids`` where the loss applies and is -100 elsewhere; a causal LM shifts
    them itself). ``with_format("torch")`` yields int64 tensors.
``tokenizer/``
    The tokenizer, ``save_pretrained`` format (a ``"bpe"`` tokenizer is trained on
    the training split only).
``settings.json``
    The :class:`PrepareSettings` plus ``cache_key``, ``source_fingerprint`` and
    ``format_version``.
``stats.json``
    Counts of every step (see :func:`format_stats`).

The result is cached under ``$KPHI_CACHE/data`` (default ``~/.cache/kphi/data``)
in a directory named after the source and a hash of the settings, the source's
fingerprint and the tokenizer spec; a second call with the same settings returns
that directory at once. Directories are built in a temporary sibling and renamed
into place at the end, so a failure never leaves a half-written result.
:func:`load_prepared` reads a prepared directory back for training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import cache_root, refuse_foreign_dir, slug, staged_dir, stat_fingerprint
from ..settings import invalid_setting, setting
from . import recipe
from .corpora import is_corpus, open_corpus
from .prepare_text import build_text_corpus, format_text_stats
from .recipe import DEFAULT_FILTERS, DEFAULT_VOCAB_SIZE, EOS, FORMAT_VERSION, IGNORE_INDEX, packed_features
from .sources import DEFAULT_COLUMNS, DataError, PairSource, datasets_bars, open_source

PACKINGS = ("tokens", "reference")
LOSS_ON = ("all", "assistant")
_TOKENIZE_BATCH = 1_000
_REQUIRED = ("settings.json", "stats.json", "train", "validation", "tokenizer")


@dataclass
class CorpusSettings:
    """The data settings that a training run and a preparation share (one definition for both):
    :class:`PrepareSettings` and :class:`kphi.train.TrainSettings` inherit them."""

    tokenizer: str = "bpe"
    """Tokenizer: ``bpe`` (trained on the training split), ``phi3`` (exact, offline), ``phi3-hub``, or a model:
    a model directory or a known model (``smollm2-135m``). A model whose tokenizer lacks phi-3's chat tokens
    gets its pairs in its own chat template (SmolLM2: ChatML), not phi-3's layout."""
    vocab_size: int = setting(DEFAULT_VOCAB_SIZE, minimum=1)
    """Vocabulary size of a trained BPE tokenizer."""
    context_length: int = setting(256, minimum=2)
    """Tokens per packed (training) row."""
    validation_rows: int = setting(5000, minimum=0)
    """Instruction/response pairs held out for validation (a text corpus holds out its own files instead)."""
    max_rows: int | None = setting(None, minimum=1)
    """Read at most this many pairs from the source, before filtering (quick runs); unset (``None``): all of them."""


@dataclass
class PrepareSettings(CorpusSettings):
    """Every knob of the preparation recipe (all of them enter the cache key); the data fields it shares
    with training come from :class:`CorpusSettings`. ``source`` is read by
    :func:`kphi.data.sources.open_source`."""

    source: str = "default"
    """Data source: default (offline chitchat + chatterbot corpus), lamini, chitchat, chatterbot, a text corpus (python-source, or a corpus .yaml file),
    hf:OWNER/NAME[:SPLIT], or a parquet/jsonl/json/csv file or a directory of them."""
    columns: tuple[str, str] = DEFAULT_COLUMNS
    """(instruction column, response column) for files and hub datasets."""
    seed: int = 42
    """Seed of the train/validation split."""
    filters: tuple[str, ...] = DEFAULT_FILTERS
    """Phrases whose presence drops a sample (empty: no filtering)."""
    packing: str = setting("tokens", choices=PACKINGS)
    """tokens: concatenate the samples' token streams (each ending in <|endoftext|>) and cut full rows,
    dropping the last partial row, encoded without the tokenizer's own BOS/EOS; reference: the report's
    packing by chars_per_token * context_length characters, each row then tokenised with the tokenizer's
    defaults (a phi-3 tokenizer prepends <s>) and truncated or right-padded with the pad token."""
    loss_on: str = setting("all", choices=LOSS_ON)
    """all: every position (padding included with reference packing); assistant: response tokens and
    <|endoftext|> only."""
    chars_per_token: int = setting(5, minimum=1)
    """Characters per token assumed by reference packing."""

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            self.source = os.fspath(self.source)
        if isinstance(self.columns, str):
            self.columns = tuple(c.strip() for c in self.columns.split(","))  # type: ignore[assignment]
        self.columns = tuple(self.columns)  # type: ignore[assignment]
        if isinstance(self.filters, str):
            self.filters = (self.filters,)
        self.filters = tuple(self.filters)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DataError` naming the first invalid field."""
        problem = invalid_setting(self)
        if problem:
            raise DataError(problem)
        if not self.source.strip():
            raise DataError("invalid setting source: name a data source")
        if len(self.columns) != 2 or not all(isinstance(c, str) and c for c in self.columns):
            raise DataError(f"invalid setting columns={self.columns!r}: give two column names (instruction, response)")
        if not self.tokenizer:
            raise DataError("invalid setting tokenizer: name a tokenizer spec")
        if not all(isinstance(f, str) and f for f in self.filters):
            raise DataError(f"invalid setting filters={self.filters!r}: must be non-empty strings")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["columns"] = list(self.columns)
        d["filters"] = list(self.filters)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrepareSettings":
        """Build from a dict (e.g. ``settings.json``); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def data_cache_dir() -> Path:
    """Where prepared data is cached: ``data/`` under :func:`kphi.files.cache_root`."""
    return cache_root() / "data"


def _tokenizer_fingerprint(spec: str) -> str:
    p = Path(spec).expanduser()
    if p.exists():
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        return "path:" + stat_fingerprint(files)
    return spec


def cache_key(settings: PrepareSettings, source_fingerprint: str) -> str:
    """Hex digest identifying a preparation: settings + source + tokenizer + format."""
    material = {
        "settings": settings.to_dict(),
        "source": source_fingerprint,
        "tokenizer": _tokenizer_fingerprint(settings.tokenizer),
        "format_version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
    return slug(Path(text).name if os.sep in text else text, "data", max_length=40)


def _entry_name(settings: PrepareSettings, key: str) -> str:
    return f"{_slug(settings.source)}-{_slug(settings.tokenizer)}-ctx{settings.context_length}-{key[:16]}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _prepared_key(path: Path) -> str | None:
    """The cache key of a complete prepared directory, or None if ``path`` is not one."""
    if not path.is_dir() or not all((path / name).exists() for name in _REQUIRED):
        return None
    data = _read_json(path / "settings.json")
    return data.get("cache_key") if data else None


# --------------------------------------------------------------------------- tokenizer


@dataclass
class _TokenIds:
    user: int | None  # None: the pairs are formatted with the tokenizer's own chat template
    assistant: int | None
    end: int | None
    eos: int
    pad: int


def _special_ids(tokenizer: Any, spec: str) -> _TokenIds:
    from .tokenizers import (
        encodes_phi3_chat_tokens,  # here, not at the top: the command line reads this module for its flags without transformers
    )

    if not encodes_phi3_chat_tokens(tokenizer) and getattr(tokenizer, "chat_template", None):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"tokenizer {spec!r} has no end-of-text token to separate samples with")
        pad = tokenizer.pad_token_id
        return _TokenIds(None, None, None, eos, eos if pad is None else pad)
    ids = {}
    for name, token in (("user", recipe.USER), ("assistant", recipe.ASSISTANT), ("end", recipe.END), ("eos", EOS)):
        enc = tokenizer.encode(token, add_special_tokens=False)
        if len(enc) != 1:
            raise DataError(f"tokenizer {spec!r} does not encode {token} as one token (got {enc}) and has no chat "
                            f"template of its own; it needs the special tokens {recipe.USER} {recipe.ASSISTANT} "
                            f"{recipe.END} {EOS}, or a chat template")
        ids[name] = enc[0]
    pad = getattr(tokenizer, "pad_token_id", None)
    ids["pad"] = ids["eos"] if pad is None else pad
    return _TokenIds(**ids)


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                     verbose=False)["input_ids"]


# --------------------------------------------------------------------------- packing


@dataclass
class _SplitStats:
    samples: int = 0
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens in the rows
    loss_tokens: int = 0  # positions whose label is not -100
    dropped_tokens: int = 0  # tail (tokens packing) or truncated (reference packing)
    pad_tokens: int = 0


def _pack_split(name: str, texts, tokenizer: Any, ids: _TokenIds, settings: PrepareSettings, scratch: Path):
    """Tokenise and pack one split (a ``datasets.Dataset`` with a ``text`` column) into rows of
    ``context_length``; returns the packed dataset (written to ``scratch``) and its counts.

    ``datasets.map`` does the batching, the Arrow writing and the progress bar. The packing itself is
    kphi's: token packing carries each batch's incomplete tail into the next batch (the usual
    ``group_texts`` recipe drops it at every batch), and the report's character packing cuts the text
    before tokenising, which no ``datasets`` recipe does. Both need one pass in order, hence one process,
    and no result cache (the counts are taken as the batches go by).
    """
    import datasets

    ctx = settings.context_length
    st = _SplitStats(samples=len(texts))
    if ids.user is None:
        return _pack_split_templated(name, texts, tokenizer, ids, settings, scratch, st)
    if not len(texts):  # datasets.map writes nothing at all for no rows
        return datasets.Dataset.from_dict({"input_ids": [], "labels": []}, features=packed_features()), st
    assistant = settings.loss_on == "assistant"

    def labels_for(seq: list[int]) -> list[int]:
        return recipe.assistant_labels(seq, ids.assistant, ids.end, ids.eos) if assistant else seq

    def rows_out(rows: list[tuple[list[int], list[int]]]) -> dict[str, list]:
        st.rows += len(rows)
        st.loss_tokens += sum(1 for _, labels in rows for x in labels if x != IGNORE_INDEX)
        return {"input_ids": [r for r, _ in rows], "labels": [labels for _, labels in rows]}

    if settings.packing == "tokens":
        packer = recipe.TokenPacker(ctx)

        def pack(batch):
            sequences = _encode(tokenizer, [t + EOS for t in batch["text"]])
            return rows_out([row for seq in sequences for row in packer.add(seq, labels_for(seq))])
    else:
        texts = datasets.Dataset.from_dict(
            {"text": list(recipe.pack_characters((t + EOS for t in texts["text"]), settings.chars_per_token * ctx))})

        def pack(batch):
            rows = []
            # as the reference, with the tokenizer's defaults (a phi-3 tokenizer adds <s> to each row)
            for seq in _encode(tokenizer, batch["text"], add_special_tokens=True):
                kept = seq[:ctx]
                row, real, _ = recipe.pad_or_truncate(kept, ctx, ids.pad)
                # the reference puts the loss on every position, padding included
                labels = labels_for(kept) + [IGNORE_INDEX] * (ctx - len(kept)) if assistant else row
                st.tokens += real
                st.pad_tokens += ctx - real
                st.dropped_tokens += len(seq) - len(kept)
                rows.append((row, labels))
            return rows_out(rows)

    packed = texts.map(
        pack, batched=True, batch_size=_TOKENIZE_BATCH, remove_columns=texts.column_names, features=packed_features(),
        load_from_cache_file=False, new_fingerprint=f"kphi-pack-{name}", cache_file_name=str(scratch),
        desc=f"tokenizing and packing {name}",
    )
    if settings.packing == "tokens":
        st.tokens = st.rows * ctx
        st.dropped_tokens = packer.dropped_tokens
    return packed, st


def _templated(tokenizer: Any, text: str) -> tuple[str, int]:
    """A phi-3-formatted sample as the tokenizer's own chat template writes it: ``(text, prompt_chars)``, the
    prompt being the characters up to where the assistant's reply starts (its generation prompt included)."""
    instruction, response = recipe.parse_pair(text)
    user = [{"role": "user", "content": instruction}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
    return full, len(prompt) if full.startswith(prompt) else 0


def _pack_split_templated(name: str, texts, tokenizer: Any, ids: _TokenIds, settings: PrepareSettings, scratch: Path,
                          st: _SplitStats):
    """:func:`_pack_split` for a model's own chat template: each pair rendered by ``apply_chat_template``,
    tokenised with offsets (the loss mask of ``loss_on="assistant"`` is every token that starts inside the
    prompt), followed by the tokenizer's end-of-text token, and token-packed as usual."""
    if settings.packing != "tokens":
        raise DataError("packing 'reference' is the report's phi-3 layout; a model's own chat template packs by tokens")
    packer = recipe.TokenPacker(settings.context_length)
    assistant = settings.loss_on == "assistant"

    def pack(batch):
        rendered = [_templated(tokenizer, t) for t in batch["text"]]
        encoded = tokenizer([r for r, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                            return_attention_mask=False, verbose=False)
        rows = []
        for (_, prompt_chars), seq, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
            labels = [IGNORE_INDEX if assistant and start < prompt_chars else tok for tok, (start, _) in zip(seq, offsets)]
            rows += packer.add([*seq, ids.eos], [*labels, ids.eos])
        st.rows += len(rows)
        st.loss_tokens += sum(1 for _, labels in rows for x in labels if x != IGNORE_INDEX)
        return {"input_ids": [r for r, _ in rows], "labels": [labels for _, labels in rows]}

    packed = texts.map(
        pack, batched=True, batch_size=_TOKENIZE_BATCH, remove_columns=texts.column_names, features=packed_features(),
        load_from_cache_file=False, new_fingerprint=f"kphi-pack-{name}", cache_file_name=str(scratch),
        desc=f"tokenizing and packing {name} (chat template)",
    )
    st.tokens = st.rows * settings.context_length
    st.dropped_tokens = packer.dropped_tokens
    return packed, st


# --------------------------------------------------------------------------- build


def _read_samples(source: PairSource, settings: PrepareSettings, progress: bool) -> tuple[list[str], int]:
    from tqdm import tqdm

    total = source.total if settings.max_rows is None else min(settings.max_rows, source.total or settings.max_rows)
    samples: list[str] = []
    bar = tqdm(total=total, desc=f"reading {settings.source}", unit="pair", disable=not progress)
    for instruction, response in source:
        samples.append(recipe.format_sample(instruction, response))
        bar.update(1)
        if settings.max_rows is not None and len(samples) >= settings.max_rows:
            break
    bar.close()
    return samples, len(samples)


def _split(samples: list[str], validation_rows: int, seed: int):
    """``{"train", "validation"}`` datasets with a ``text`` column: ``train_test_split``'s seeded permutation
    (validation first, the training samples after it, shuffled); with no validation rows, the same shuffle."""
    import datasets

    texts = datasets.Dataset.from_dict({"text": samples})
    if validation_rows == 0:  # train_test_split refuses an empty test split
        return datasets.DatasetDict(train=texts.shuffle(seed=seed).flatten_indices(), validation=texts.select([]))
    parts = texts.train_test_split(test_size=validation_rows, seed=seed)
    return datasets.DatasetDict(train=parts["train"].flatten_indices(), validation=parts["test"].flatten_indices())


def _filtered_split(settings: PrepareSettings, source: PairSource, progress: bool):
    """Read the source's samples, drop those the filters match, and split the rest into train / validation.

    Returns ``(split, pairs_read, per_source, filtered)``: ``split`` a ``DatasetDict`` of ``text`` columns,
    ``per_source`` each source's pair and malformed-row counts, ``filtered`` the filter result (its ``dropped``
    counts; its ``kept`` list emptied, the texts now living in ``split``).
    """
    from tqdm import tqdm

    samples, pairs_read = _read_samples(source, settings, progress)
    per_source = {name: {"pairs": c.pairs, "malformed": c.malformed} for name, c in source.counts.items()}
    if not samples:
        raise DataError(f"source {settings.source!r} gave no usable pairs "
                        f"({source.malformed} malformed rows skipped)")

    filtered = recipe.apply_filters(
        tqdm(samples, desc="filtering", unit="sample", disable=not progress), settings.filters)
    del samples
    kept = filtered.kept
    if not kept:
        raise DataError(f"no samples left after filtering: all {pairs_read} pairs read from "
                        f"{settings.source!r} contain a filter phrase "
                        f"({', '.join(f'{k!r}: {v}' for k, v in filtered.dropped.items() if v)})")
    if settings.validation_rows >= len(kept):
        raise DataError(f"only {len(kept)} samples remain after filtering, too few for "
                        f"validation_rows={settings.validation_rows} plus a training split; "
                        f"lower validation_rows (or raise max_rows)")
    split = _split(kept, settings.validation_rows, settings.seed)
    filtered.kept = []
    return split, pairs_read, per_source, filtered


def _pack_and_save(split, tokenizer: Any, ids: _TokenIds, settings: PrepareSettings, work: Path) -> dict[str, _SplitStats]:
    """Pack each split into rows of ``context_length`` token ids and save it as ``work/<split>``; returns each
    split's counts. A non-empty split too small for one row is an error."""
    split_stats = {}
    for name in ("train", "validation"):
        scratch = work / f".{name}.arrow"
        packed, st = _pack_split(name, split[name], tokenizer, ids, settings, scratch)
        if st.samples and not st.rows:
            raise DataError(f"the {name} split ({st.samples} samples, {st.dropped_tokens} tokens) is too small "
                            f"for one row of context_length={settings.context_length}")
        packed.save_to_disk(str(work / name), num_shards=1 if len(packed) == 0 else None)  # an empty split needs a shard
        del packed
        scratch.unlink(missing_ok=True)
        split_stats[name] = st
    return split_stats


def _stats_record(settings: PrepareSettings, source: PairSource, pairs_read: int, per_source: dict[str, Any],
                  filtered, split_stats: dict[str, _SplitStats], vocab_size: int, seconds: float) -> dict[str, Any]:
    """The prepared corpus's ``stats.json``: what was read, dropped and packed, per split."""
    tr, va = split_stats["train"], split_stats["validation"]
    return {
        "source": settings.source,
        "pairs_read": pairs_read,
        "malformed": source.malformed,
        "per_source": per_source,
        "dropped": filtered.dropped,
        "dropped_total": filtered.dropped_total,
        "samples_kept": tr.samples + va.samples,
        "train_samples": tr.samples,
        "validation_samples": va.samples,
        "train_rows": tr.rows,
        "validation_rows": va.rows,
        "train_tokens": tr.tokens,
        "validation_tokens": va.tokens,
        "train_loss_tokens": tr.loss_tokens,
        "validation_loss_tokens": va.loss_tokens,
        "train_tokens_dropped": tr.dropped_tokens,
        "validation_tokens_dropped": va.dropped_tokens,
        "train_pad_tokens": tr.pad_tokens,
        "validation_pad_tokens": va.pad_tokens,
        "context_length": settings.context_length,
        "packing": settings.packing,
        "loss_on": settings.loss_on,
        "tokenizer": settings.tokenizer,
        "vocab_size": vocab_size,
        "seconds": round(seconds, 2),
    }


def _build(settings: PrepareSettings, source: PairSource, key: str, work: Path, progress: bool) -> dict[str, Any]:
    """Prepare an instruction-pair source into ``work``: filter, split, train or load the tokenizer, pack each
    split, and write ``tokenizer/``, ``settings.json`` and ``stats.json`` beside the two splits."""
    started = time.monotonic()
    split, pairs_read, per_source, filtered = _filtered_split(settings, source, progress)

    from .tokenizers import build_tokenizer  # as above; its TokenizerError is a KphiError

    tokenizer = build_tokenizer(settings.tokenizer, training_texts=split["train"]["text"] if settings.tokenizer == "bpe" else None,
                                vocab_size=settings.vocab_size)
    split_stats = _pack_and_save(split, tokenizer, _special_ids(tokenizer, settings.tokenizer), settings, work)
    tokenizer.save_pretrained(str(work / "tokenizer"))
    stats = _stats_record(settings, source, pairs_read, per_source, filtered, split_stats, len(tokenizer),
                          time.monotonic() - started)
    meta = settings.to_dict()
    meta.update(cache_key=key, source_fingerprint=source.fingerprint, format_version=FORMAT_VERSION)
    (work / "settings.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def _publish(target: Path, fill) -> Path:
    """``fill`` a staged sibling of ``target`` and swap it into place (:func:`kphi.files.staged_dir`): on any
    failure or interrupt nothing appears at ``target``."""
    with staged_dir(target) as work:
        fill(work)
    return target


def _announce(path: Path, progress: bool, note: str = "") -> None:
    if not progress:
        return
    stats = _read_json(path / "stats.json") or {}
    print(f"{format_stats(stats)} Saved in {path}{f' ({note})' if note else ''}.", flush=True)


def prepare_dataset(settings: PrepareSettings, out_dir: Path | None = None, cache_dir: Path | None = None,
                    progress: bool = True) -> Path:
    """Prepare the corpus described by ``settings``; return the prepared directory.

    Without ``out_dir`` the result lives in the cache (``cache_dir``, default
    :func:`data_cache_dir`) and a repeated call returns it at once. With
    ``out_dir`` the result is written there: copied from the cache if the cache
    already has it, otherwise built in place (the cache is then not filled); an
    ``out_dir`` that already holds this very preparation is returned at once, and a
    non-empty ``out_dir`` holding anything else is refused with :class:`DataError`.
    With ``progress`` tqdm bars show the long steps and a summary
    (:func:`format_stats`) is printed at the end.
    """
    if not isinstance(settings, PrepareSettings):
        raise TypeError(f"settings must be PrepareSettings, got {type(settings).__name__}")
    settings.validate()
    if is_corpus(settings.source):
        source: Any = open_corpus(settings.source)
        builder: Any = build_text_corpus
    else:
        source, builder = open_source(settings.source, settings.columns), _build
    key = cache_key(settings, source.fingerprint)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else data_cache_dir()
    cached = cache_root / _entry_name(settings, key)

    def build(work: Path) -> None:
        with datasets_bars(progress):
            builder(settings, source, key, work, progress)

    if out_dir is None:
        if _prepared_key(cached) == key:
            _announce(cached, progress, "found in the cache, nothing rebuilt")
            return cached
        _publish(cached, build)
        _announce(cached, progress)
        return cached

    out = Path(out_dir).expanduser()
    if _prepared_key(out) == key:
        _announce(out, progress, "already prepared there, nothing rebuilt")
        return out
    holds = "one prepared with different settings" if _prepared_key(out) is not None else "other files"
    refuse_foreign_dir(out, False, f"prepared dataset of these settings (it holds {holds})",
                       "choose another directory or remove it")
    if _prepared_key(cached) == key:
        def copy(work: Path) -> None:
            for item in cached.iterdir():
                if item.is_dir():
                    shutil.copytree(item, work / item.name)
                else:
                    shutil.copy2(item, work / item.name)
        _publish(out, copy)
        _announce(out, progress, "copied from the cache")
        return out
    _publish(out, build)
    _announce(out, progress)
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """A one-paragraph, human-readable summary of a ``stats.json`` dict."""
    if stats.get("kind") == "text":
        return format_text_stats(stats)
    g = stats.get
    dropped = {k: v for k, v in (g("dropped") or {}).items() if v}
    dropped_total = sum(dropped.values())
    top = ", ".join(f"{k!r}: {v:,}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
    per_source = g("per_source") or {}
    parts = ", ".join(f"{name} {c.get('pairs', 0):,}" for name, c in per_source.items())
    ctx = g("context_length", 0)
    lines = [
        f"Prepared {g('source', '?')!s}: read {g('pairs_read', 0):,} instruction/response pairs"
        + (f" ({parts})" if len(per_source) > 1 else "")
        + f", skipped {g('malformed', 0):,} malformed rows, dropped {dropped_total:,} with the filters"
        + (f" ({top})" if top else "") + ".",
        f"{g('train_samples', 0):,} samples went to training and {g('validation_samples', 0):,} to validation,",
        f"packed ({g('packing', '?')} packing, loss on {g('loss_on', '?')}) into {g('train_rows', 0):,} training"
        f" and {g('validation_rows', 0):,} validation rows of {ctx} tokens"
        f" ({g('train_tokens', 0):,} + {g('validation_tokens', 0):,} tokens,"
        f" {g('train_loss_tokens', 0):,} + {g('validation_loss_tokens', 0):,} with loss;",
    ]
    dropped_tok = g("train_tokens_dropped", 0) + g("validation_tokens_dropped", 0)
    pads = g("train_pad_tokens", 0) + g("validation_pad_tokens", 0)
    if g("packing") == "reference":
        lines.append(f"{pads:,} padding and {dropped_tok:,} truncated tokens)")
    else:
        lines.append(f"{dropped_tok:,} tokens of the last partial rows dropped)")
    lines.append(f"with the {g('tokenizer', '?')} tokenizer ({g('vocab_size', 0):,} tokens)"
                 + (f" in {g('seconds'):.1f} s." if g("seconds") is not None else "."))
    return " ".join(lines)


def load_prepared(path: str | os.PathLike):
    """Load a directory written by :func:`prepare_dataset`.

    Returns ``(train, validation, tokenizer, stats)``: two ``datasets.Dataset``
    with columns ``input_ids`` and ``labels``, the saved tokenizer and the stats
    dict. Raises :class:`DataError` if ``path`` is not a prepared dataset.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{str(p)!r} is not a prepared dataset: no such directory")
    missing = [name for name in _REQUIRED if not (p / name).exists()]
    if missing:
        raise DataError(f"{str(p)!r} is not a prepared dataset: missing {', '.join(missing)} "
                        f"(prepare it first)")
    stats = _read_json(p / "stats.json")
    if stats is None:
        raise DataError(f"{str(p)!r} is not a prepared dataset: stats.json is unreadable")
    import datasets

    from ..sources.model_dir import pretrained_tokenizer

    try:
        train = datasets.load_from_disk(str(p / "train"))
        validation = datasets.load_from_disk(str(p / "validation"))
    except Exception as exc:
        raise DataError(f"cannot load the prepared splits in {str(p)!r}: {exc}") from exc
    for name, ds in (("train", train), ("validation", validation)):
        if not isinstance(ds, datasets.Dataset) or not {"input_ids", "labels"} <= set(ds.column_names):
            raise DataError(f"{str(p / name)!r} is not a split of a prepared dataset (no input_ids/labels)")
    tokenizer = pretrained_tokenizer(p / "tokenizer", DataError)
    return train, validation, tokenizer, stats


__all__ = [
    "DataError", "CorpusSettings", "PrepareSettings", "prepare_dataset", "load_prepared", "format_stats",
    "data_cache_dir", "cache_key", "FORMAT_VERSION",
]
