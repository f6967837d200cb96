"""Exact behaviour of the pure recipe steps."""

from __future__ import annotations

import random

import pytest

from kphi.data.recipe import (
    DEFAULT_FILTERS,
    IGNORE_INDEX,
    TokenPacker,
    apply_filters,
    assistant_labels,
    format_pair,
    format_sample,
    normalise,
    pack_characters,
    pad_or_truncate,
)

pytestmark = [pytest.mark.usefixtures("isolated_caches"), pytest.mark.fast]


def test_default_filters_are_the_reference_phrases():
    assert DEFAULT_FILTERS == (
        "I am not", "I am an AI", "I do not", "I cannot", "t goes against my", "t is not my", "I don't have",
    )


def test_format_pair_exact():
    assert format_pair("What is 2+2?", "4.") == "<|user|>What is 2+2?<|end|><|assistant|>4.<|end|>"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("<|user|>\nHi\n<|end|>", "<|user|>Hi<|end|>"),
        ("<|user|>\n\nHi<|end|>", "<|user|>\nHi<|end|>"),  # only the newline touching the token goes
        ("Hi\n\n<|end|>", "Hi\n<|end|>"),
        ("  <|user|>a\nb<|end|> \n", "<|user|>a\nb<|end|>"),  # inner newlines stay; ends stripped
        ("x |> \n y", "x |> \n y"),  # a space in between: untouched
    ],
)
def test_normalise_exact(raw, expected):
    assert normalise(raw) == expected


def test_format_sample_removes_newlines_next_to_special_tokens():
    text = format_sample("\nList two colours.\n", "\nRed\nBlue\n")
    assert text == "<|user|>List two colours.<|end|><|assistant|>Red\nBlue<|end|>"


def test_apply_filters_counts_first_matching_phrase():
    texts = [
        "<|user|>q<|end|><|assistant|>I am not sure. I cannot say.<|end|>",  # both: first phrase in list order wins
        "<|user|>q<|end|><|assistant|>I cannot do it.<|end|>",
        "<|user|>q<|end|><|assistant|>I am an AI language model.<|end|>",
        "<|user|>q<|end|><|assistant|>That goes against my principles.<|end|>",  # "t goes against my"
        "<|user|>q<|end|><|assistant|>It is not my place.<|end|>",  # "t is not my"
        "<|user|>q<|end|><|assistant|>I don't have feelings.<|end|>",
        "<|user|>I do not know<|end|><|assistant|>Fine.<|end|>",  # instruction text counts too
        "<|user|>q<|end|><|assistant|>Paris is in France.<|end|>",
        "<|user|>q<|end|><|assistant|>i cannot (lower case passes)<|end|>",
    ]
    result = apply_filters(texts, DEFAULT_FILTERS)
    assert result.kept == [texts[7], texts[8]]
    assert result.dropped == {
        "I am not": 1, "I am an AI": 1, "I do not": 1, "I cannot": 1,
        "t goes against my": 1, "t is not my": 1, "I don't have": 1,
    }
    assert result.dropped_total == 7
    # "I am an AI" contains no earlier phrase; "I am not sure" counts for "I am not", not "I cannot"
    assert list(result.dropped) == list(DEFAULT_FILTERS)


def test_apply_filters_custom_and_empty():
    texts = ["alpha", "beta", "alphabet"]
    assert apply_filters(texts, []).kept == texts
    r = apply_filters(texts, ["bet", "alpha"])
    assert r.kept == []
    assert r.dropped == {"bet": 2, "alpha": 1}


def naive_pack(seqs, n):
    flat = [t for s in seqs for t in s]
    full = len(flat) // n
    return [flat[i * n:(i + 1) * n] for i in range(full)], len(flat) - full * n


@pytest.mark.parametrize("context_length", [1, 4, 7, 64])
def test_token_packer_matches_naive_reference(context_length):
    rng = random.Random(context_length)
    seqs = [[rng.randrange(5, 100) for _ in range(rng.randrange(1, 30))] + [0] for _ in range(60)]
    packer = TokenPacker(context_length)
    rows = []
    for s in seqs:
        rows.extend(packer.add(s))
    expected_rows, tail = naive_pack(seqs, context_length)
    assert [r for r, _ in rows] == expected_rows
    assert all(labels == r for r, labels in rows)
    assert all(len(r) == context_length for r, _ in rows)
    assert packer.dropped_tokens == tail < context_length
    assert packer.rows * context_length + tail == sum(map(len, seqs))


def test_token_packer_keeps_labels_aligned():
    packer = TokenPacker(3)
    rows = packer.add([1, 2, 0], [-100, 2, 0]) + packer.add([3, 4, 5, 0], [-100, -100, 5, 0])
    assert rows == [([1, 2, 0], [-100, 2, 0]), ([3, 4, 5], [-100, -100, 5])]
    assert packer.dropped_tokens == 1


def test_assistant_labels_hand_computed():
    U, A, E, EOS, PAD = 1, 2, 3, 0, 0
    ids = [U, 10, 11, E, A, 20, 21, E, EOS, U, 12, E, A, 22, E, EOS, PAD, PAD]
    # pad == eos here, as with phi-3; prepare masks padding itself (labels computed before padding)
    expected = [-100, -100, -100, -100, -100, 20, 21, E, EOS, -100, -100, -100, -100, 22, E, EOS, PAD, PAD]
    assert assistant_labels(ids, A, E, EOS) == expected
    # a row that starts inside a response (packing cut the sample): those tokens have no <|assistant|>
    assert assistant_labels([20, E, EOS, U, 5, E, A, 6], A, E, EOS) == [-100, -100, EOS, -100, -100, -100, -100, 6]


def test_pack_characters_greedy():
    texts = ["aaaa", "bbb", "cc", "dddddddddddd", "e", "f"]
    rows = list(pack_characters(texts, 8))
    assert rows == ["aaaabbb", "cc", "dddddddddddd", "ef"]
    assert "".join(rows) == "".join(texts)
    assert list(pack_characters(["abc", "def"], 6)) == ["abcdef"]  # exactly at the limit stays together
    assert list(pack_characters([], 5)) == []


def test_pad_or_truncate():
    assert pad_or_truncate([5, 6], 4, 0) == ([5, 6, 0, 0], 2, 0)
    assert pad_or_truncate([1, 2, 3, 4, 5], 4, 0) == ([1, 2, 3, 4], 4, 1)
    assert pad_or_truncate([], 2, 9) == ([9, 9], 0, 0)


def test_ignore_index():
    assert IGNORE_INDEX == -100
