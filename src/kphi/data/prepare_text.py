"""Prepare a text corpus (:mod:`kphi.data.corpora`) into the same directory layout as instruction pairs.

Documents stream from the corpus twice: once to train the BPE tokenizer on the training documents (a
``tokenizers`` trainer fed by an iterator), once to tokenise and pack both splits. Each split is written by
:func:`write_rows`, which turns every ``_ROWS_PER_BATCH`` rows into one Arrow record batch on disk, so peak
memory is one batch of documents and of rows plus the trainer's word counts, never the corpus.

Splits: ``validation`` is the corpus's held-out documents (fixed by file name, see
:class:`~kphi.data.corpora.TextCorpus`), ``train`` the rest; ``validation_rows`` of the settings does not
apply. Packing is token packing: each document's tokens, then ``<|endoftext|>``, concatenated and cut into rows
of ``context_length`` (the last partial row dropped); the loss is on every position. ``stats.json`` records,
per split, the SHA-256 of the packed token ids (int32, little-endian, row after row): the content hash that
says two preparations hold the same data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from . import recipe
from .corpora import TextCorpus
from .recipe import FORMAT_VERSION, packed_features
from .sources import DataError

_BATCH_DOCUMENTS = 64  # documents encoded per call: the tokenizer's Rust batch encoder spreads them over threads
_ROWS_PER_BATCH = 1024  # rows per Arrow record batch


def pack_texts(texts: Iterable[str], tokenizer: Any, eos: int, context_length: int,
               counts: dict[str, Any]) -> Iterator[list[int]]:
    """Rows of ``context_length`` token ids from ``texts``: each text's tokens then ``eos``, concatenated and cut
    (the last partial row dropped); the labels of a row are its ids. Texts are encoded ``_BATCH_DOCUMENTS`` at a time.
    Fills ``counts``: documents, bytes, rows, tokens, dropped_tokens and sha256 (of the ids, int32 little-endian,
    row after row)."""
    packer = recipe.TokenPacker(context_length)
    digest = hashlib.sha256()
    counts.update(documents=0, bytes=0)
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        # the Rust encoder's own batch call: transformers' wrapper would only add a conversion of every id list
        encoded = tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False)
        batch.clear()
        for encoding in encoded:
            for ids, _ in packer.add([*encoding.ids, eos]):
                digest.update(np.asarray(ids, dtype="<i4").tobytes())
                yield ids

    for text in texts:
        batch.append(text)
        counts["documents"] += 1
        counts["bytes"] += len(text.encode("utf-8"))
        if len(batch) >= _BATCH_DOCUMENTS:
            yield from flush()
    if batch:
        yield from flush()
    counts.update(rows=packer.rows, tokens=packer.rows * context_length, dropped_tokens=packer.dropped_tokens,
                  sha256=digest.hexdigest())


def _split_rows(corpus: TextCorpus, heldout: bool, tokenizer: Any, eos: int, context_length: int,
                max_documents: int | None, counts: dict[str, Any], bar: Any) -> Iterator[list[int]]:
    """:func:`pack_texts` over one split of the corpus (the held-out documents or the others)."""
    def texts() -> Iterator[str]:
        for doc in corpus.documents(max_documents):
            bar.update(1)
            if doc.heldout == heldout:
                yield doc.text

    yield from pack_texts(texts(), tokenizer, eos, context_length, counts)


def _train_tokenizer(corpus: TextCorpus, settings: Any, total: int, progress: bool) -> Any:
    from tqdm import tqdm

    from .tokenizers import build_tokenizer  # here: the command line reads data.prepare without transformers

    if settings.tokenizer != "bpe":
        return build_tokenizer(settings.tokenizer)
    bar = tqdm(total=total, desc=f"training the BPE tokenizer on {corpus.name}", unit="file", disable=not progress)

    def training_texts() -> Iterator[str]:
        for doc in corpus.documents(settings.max_rows):
            bar.update(1)
            if not doc.heldout:
                yield doc.text

    tokenizer = build_tokenizer("bpe", training_texts=training_texts(), vocab_size=settings.vocab_size)
    bar.close()
    return tokenizer


def write_rows(rows: Iterable[list[int]], path: Path) -> Any:
    """Write rows of token ids as a packed split (``input_ids`` and equal ``labels``, int32 lists) to the Arrow
    file ``path``, ``_ROWS_PER_BATCH`` rows per record batch, and open it as a ``datasets.Dataset``.

    Written with pyarrow directly, in the stream format and schema (features in its metadata) that
    ``datasets`` itself writes: ``Dataset.from_generator`` would encode every example through Python, which
    costs more than tokenising.
    """
    import datasets
    import pyarrow as pa

    schema = packed_features().arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        block: list[list[int]] = []
        for row in itertools.chain(rows, [None]):
            if row is not None:
                block.append(row)
            if block and (row is None or len(block) == _ROWS_PER_BATCH):
                ids = np.asarray(block, dtype=np.int32)
                offsets = np.arange(0, ids.size + 1, ids.shape[1], dtype=np.int32)
                column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.ravel()))
                writer.write_batch(pa.record_batch([column, column], schema=schema))
                block = []
    return datasets.Dataset.from_file(str(path))


def build_text_corpus(settings: Any, corpus: TextCorpus, key: str, work: Path, progress: bool) -> dict[str, Any]:
    """Fill ``work`` with ``train/``, ``validation/``, ``tokenizer/``, ``settings.json`` and ``stats.json`` for
    ``corpus`` (``settings``: a :class:`kphi.data.prepare.PrepareSettings`); returns the stats."""
    from tqdm import tqdm

    started = time.monotonic()
    if settings.packing != "tokens" or settings.loss_on != "all":
        raise DataError(f"a text corpus ({corpus.name!r}) is packed by tokens with the loss on every position; "
                        "use packing 'tokens' and loss_on 'all'")
    total = settings.max_rows or len(corpus.members())  # files read per pass, for the progress bars
    tokenizer = _train_tokenizer(corpus, settings, total, progress)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {settings.tokenizer!r} has no end-of-text token to separate documents with")
    split_counts: dict[str, dict[str, Any]] = {}
    for name, heldout in (("train", False), ("validation", True)):
        counts = split_counts[name] = {}
        bar = tqdm(total=total, desc=f"tokenizing and packing {name}", unit="file", disable=not progress)
        rows = _split_rows(corpus, heldout, tokenizer, eos, settings.context_length, settings.max_rows, counts, bar)
        packed = write_rows(rows, work / f".{name}.arrow")
        bar.close()
        if not len(packed):
            raise DataError(f"corpus {corpus.name!r}: the {name} split ({counts['documents']} documents) is too "
                            f"small for one row of context_length={settings.context_length}")
        packed.save_to_disk(str(work / name))
        del packed
    for scratch in work.glob(".*.arrow"):
        scratch.unlink()
    tokenizer.save_pretrained(str(work / "tokenizer"))
    stats = _stats(settings, corpus, split_counts, len(tokenizer), time.monotonic() - started)
    meta = settings.to_dict()
    meta.update(cache_key=key, source_fingerprint=corpus.fingerprint, format_version=FORMAT_VERSION)
    (work / "settings.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def _stats(settings: Any, corpus: TextCorpus, split: dict[str, dict[str, Any]], vocab: int, seconds: float) -> dict:
    tr, va = split["train"], split["validation"]
    return {
        "source": settings.source, "corpus": corpus.name, "kind": "text",
        "packages": [p.requirement for p in corpus.packages],
        "train_documents": tr["documents"], "validation_documents": va["documents"],
        "train_bytes": tr["bytes"], "validation_bytes": va["bytes"],
        "train_rows": tr["rows"], "validation_rows": va["rows"],
        "train_tokens": tr["tokens"], "validation_tokens": va["tokens"],
        "train_loss_tokens": tr["tokens"], "validation_loss_tokens": va["tokens"],
        "train_tokens_dropped": tr["dropped_tokens"], "validation_tokens_dropped": va["dropped_tokens"],
        "train_sha256": tr["sha256"], "validation_sha256": va["sha256"],
        "context_length": settings.context_length, "packing": "tokens", "loss_on": "all",
        "tokenizer": settings.tokenizer, "vocab_size": vocab, "seconds": round(seconds, 2),
    }


def format_text_stats(stats: dict[str, Any]) -> str:
    """A one-paragraph summary of a text corpus's ``stats.json``."""
    g = stats.get
    return (f"Prepared {g('source')}: {g('train_documents', 0):,} training and {g('validation_documents', 0):,} "
            f"held-out documents ({g('train_bytes', 0) / 1e6:,.1f} + {g('validation_bytes', 0) / 1e6:,.1f} MB), "
            f"packed into {g('train_rows', 0):,} + {g('validation_rows', 0):,} rows of {g('context_length')} tokens "
            f"({g('train_tokens', 0):,} + {g('validation_tokens', 0):,} tokens) with the {g('tokenizer')} tokenizer "
            f"({g('vocab_size', 0):,} tokens) in {g('seconds', 0):.1f} s; content SHA-256 "
            f"{str(g('train_sha256'))[:12]} (train), {str(g('validation_sha256'))[:12]} (held out).")


