"""The instruction-corpus recipe as small, pure, separately testable steps.

The steps reproduce the data preparation of the report "Saving 77% of the
Parameters in Large Language Models", with every step configurable:

1. :func:`format_pair` -- ``<|user|>{instruction}<|end|><|assistant|>{response}<|end|>``.
2. :func:`normalise` -- drop a newline right after a special token (``|>\\n`` -> ``|>``)
   and right before one (``\\n<|`` -> ``<|``), then strip.
3. :func:`apply_filters` -- drop samples containing any refusal phrase of
   :data:`DEFAULT_FILTERS`; a dropped sample is counted once, for the first phrase
   (in list order) that it contains.
4. A seeded validation split: ``datasets.Dataset.train_test_split(test_size=k,
   seed=seed)`` (in :mod:`kphi.data.prepare`; a PCG64 permutation from
   ``numpy.random.default_rng(seed)``), so it depends only on the number of samples
   and the seed, never on hash seeds.
5. Tokenisation and packing:

   * :class:`TokenPacker` (``packing="tokens"``, the default): the token streams of
     the samples (each ending in ``<|endoftext|>``) are concatenated and cut into
     rows of exactly ``context_length`` tokens. No padding is ever written. The
     tokens after the last full row (fewer than ``context_length``) are dropped,
     and counted in :attr:`TokenPacker.dropped_tokens`.
   * :func:`pack_characters` + :func:`pad_or_truncate` (``packing="reference"``):
     the report's behaviour. Sample texts are concatenated greedily while a row
     stays within ``chars_per_token * context_length`` characters; each row is then
     tokenised, truncated or right-padded to ``context_length`` with the pad token,
     and the loss is put on every position, padding included.

   :func:`assistant_labels` builds labels for ``loss_on="assistant"``: -100
   everywhere except the response tokens (the tokens after ``<|assistant|>`` up to
   and including its ``<|end|>``) and the ``<|endoftext|>`` token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

#: Special tokens of the phi-3 chat format used by the recipe.
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SYSTEM = "<|system|>"
EOS = "<|endoftext|>"
#: Vocabulary size of the byte-level BPE tokenizer the recipe trains on a corpus (``tokenizer: bpe``).
DEFAULT_VOCAB_SIZE = 4096

#: Label value ignored by the loss of a ``transformers`` causal LM.
IGNORE_INDEX = -100
#: Bumped whenever the on-disk layout or the recipe changes output for the same settings.
FORMAT_VERSION = 1

#: Refusal / disclaimer phrases of the reference recipe. A sample whose text
#: contains any of them is dropped.
DEFAULT_FILTERS: tuple[str, ...] = (
    "I am not",
    "I am an AI",
    "I do not",
    "I cannot",
    "t goes against my",
    "t is not my",
    "I don't have",
)


def format_pair(instruction: str, response: str) -> str:
    """Format one instruction/response pair in the phi-3 chat layout (not normalised)."""
    return f"{USER}{instruction}{END}{ASSISTANT}{response}{END}"


def parse_pair(text: str) -> tuple[str, str]:
    """``(instruction, response)`` of a :func:`format_sample` text (the inverse of the phi-3 layout)."""
    if not text.startswith(USER) or ASSISTANT not in text:
        raise ValueError(f"not a formatted pair: {text[:60]!r}")
    instruction, _, response = text[len(USER):].partition(ASSISTANT)
    return instruction.removesuffix(END), response.removesuffix(END)


def normalise(text: str) -> str:
    """Remove one newline right after / right before a special token, then strip.

    Exactly the reference replacements ``"|>\\n" -> "|>"`` and ``"\\n<|" -> "<|"``
    (each applied once over the whole text, left to right), followed by ``str.strip``.
    """
    return text.replace("|>\n", "|>").replace("\n<|", "<|").strip()


def format_sample(instruction: str, response: str) -> str:
    """:func:`format_pair` followed by :func:`normalise`."""
    return normalise(format_pair(instruction, response))


def first_match(text: str, filters: Sequence[str]) -> str | None:
    """The first phrase of ``filters`` (in order) contained in ``text``, or None."""
    for phrase in filters:
        if phrase in text:
            return phrase
    return None


@dataclass
class FilterResult:
    """Outcome of :func:`apply_filters`."""

    kept: list[str]
    #: phrase -> number of samples dropped for it (every phrase present, zeros included).
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


def apply_filters(texts: Iterable[str], filters: Sequence[str]) -> FilterResult:
    """Keep the texts containing none of ``filters``; count drops per phrase.

    A dropped text counts for the first phrase of ``filters`` that it contains.
    An empty ``filters`` keeps everything.
    """
    phrases = list(dict.fromkeys(filters))  # de-duplicated, order kept
    dropped = {phrase: 0 for phrase in phrases}
    kept: list[str] = []
    for text in texts:
        hit = first_match(text, phrases) if phrases else None
        if hit is None:
            kept.append(text)
        else:
            dropped[hit] += 1
    return FilterResult(kept=kept, dropped=dropped)


def assistant_labels(ids: Sequence[int], assistant_id: int, end_id: int, eos_id: int) -> list[int]:
    """Labels for ``loss_on="assistant"``: ``ids`` on response tokens, -100 elsewhere.

    A response is every token after an ``<|assistant|>`` token up to and including
    the next ``<|end|>``; the ``<|endoftext|>`` token is always labelled too. The
    ``<|assistant|>`` token itself, the user turn and any padding get -100. A
    response cut off before its ``<|end|>`` stays labelled to the end of ``ids``
    (or to the next ``<|endoftext|>``, which closes it).
    """
    labels: list[int] = []
    in_response = False
    for tok in ids:
        if tok == eos_id:
            labels.append(tok)
            in_response = False
        elif in_response:
            labels.append(tok)
            if tok == end_id:
                in_response = False
        else:
            labels.append(IGNORE_INDEX)
            if tok == assistant_id:
                in_response = True
    return labels


class TokenPacker:
    """Concatenate token sequences and cut them into full rows of ``context_length``.

    Feed samples with :meth:`add`; it returns the rows completed by that sample as
    ``(input_ids, labels)`` pairs of lists, each exactly ``context_length`` long.
    Rows run across sample boundaries (the ``<|endoftext|>`` ending each sample
    separates them). After the last sample, the incomplete tail remains in the
    buffer: it is never emitted, and :attr:`dropped_tokens` tells its size.
    """

    def __init__(self, context_length: int):
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.context_length = context_length
        self._ids: list[int] = []
        self._labels: list[int] = []
        self.rows = 0
        self.tokens_in = 0

    def add(self, ids: Sequence[int], labels: Sequence[int] | None = None) -> list[tuple[list[int], list[int]]]:
        """Append one sample's tokens (labels default to the ids); return completed rows."""
        if labels is None:
            labels = ids
        if len(labels) != len(ids):
            raise ValueError("labels and ids differ in length")
        self._ids.extend(ids)
        self._labels.extend(labels)
        self.tokens_in += len(ids)
        n = self.context_length
        full = len(self._ids) // n
        if not full:
            return []
        out = [(self._ids[i * n:(i + 1) * n], self._labels[i * n:(i + 1) * n]) for i in range(full)]
        del self._ids[: full * n]
        del self._labels[: full * n]
        self.rows += full
        return out

    @property
    def dropped_tokens(self) -> int:
        """Tokens in the incomplete tail (dropped if no more samples come)."""
        return len(self._ids)


def pack_characters(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Greedily join texts into rows of at most ``max_chars`` characters (reference packing).

    Texts are concatenated as they come (no separator: each sample already ends in
    ``<|endoftext|>``) while the row's length stays ``<= max_chars``; the text that
    would overflow starts the next row. A single text longer than ``max_chars``
    becomes a row of its own (and is truncated later, at tokenisation). The last,
    partial row is emitted too.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    row = ""
    for text in texts:
        if row and len(row) + len(text) > max_chars:
            yield row
            row = text
        else:
            row += text
    if row:
        yield row


def pad_or_truncate(ids: Sequence[int], context_length: int, pad_id: int) -> tuple[list[int], int, int]:
    """Right-pad with ``pad_id`` or truncate ``ids`` to ``context_length``.

    Returns ``(row, real_tokens, truncated_tokens)``.
    """
    ids = list(ids)
    if len(ids) >= context_length:
        return ids[:context_length], context_length, len(ids) - context_length
    return ids + [pad_id] * (context_length - len(ids)), len(ids), 0


def packed_features():
    """The ``datasets.Features`` of a packed split: ``input_ids`` and ``labels``, int32 lists."""
    import datasets

    row = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": row, "labels": row})
