"""A small synthetic instruction corpus written to disk, so training tests need no network or packages."""

import json
import random
from pathlib import Path

CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Rome", "Accra", "Lagos", "Seoul"]
COUNTRIES = ["France", "Peru", "Norway", "Egypt", "Ecuador", "Vietnam", "Italy", "Ghana", "Nigeria", "Korea"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_corpus(path: Path, pairs: int = 400, seed: int = 0) -> Path:
    """``pairs`` instruction/response rows as JSON lines with columns ``instruction`` and ``response``."""
    rng = random.Random(seed)
    rows = []
    for i in range(pairs):
        k = rng.randrange(len(CITIES))
        colour = rng.choice(COLOURS)
        if i % 2:
            rows.append({"instruction": f"What is the capital of {COUNTRIES[k]}?", "response": f"The capital of {COUNTRIES[k]} is {CITIES[k]}."})
        else:
            rows.append({"instruction": f"Name a {colour} thing in {CITIES[k]}.", "response": f"A {colour} door in {CITIES[k]}, near the river."})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def prepare_small(tmp: Path, context_length: int = 32) -> Path:
    """The corpus prepared with a 300-token BPE, 20 validation pairs; returns the prepared directory."""
    from kphi.data.prepare import PrepareSettings, prepare_dataset

    corpus = write_corpus(tmp / "corpus.jsonl")
    settings = PrepareSettings(source=str(corpus), tokenizer="bpe", vocab_size=300, context_length=context_length, validation_rows=20)
    return prepare_dataset(settings, out_dir=tmp / "prepared", cache_dir=tmp / "cache", progress=False)
