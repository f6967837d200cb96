"""A healing run's validation curve in bits per byte.

``kphi train`` logs the validation loss ``L`` (nats per predicted token, the mean over the validation rows it
evaluates) every ``eval_steps`` in ``log.csv``. On the same rows, bits per byte are

    bits per byte = L / ln 2 / (bytes per predicted token),

where the bytes are those of the UTF-8 text the predicted tokens (every position of a row after its first
whose label is not -100) decode to, decoded per row with the prepared data's own tokenizer, special tokens
counting no bytes. That is the unit of :mod:`kphi.eval.bits`, on the healing text's validation rows
instead of the held-out prose.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ..data.prepare import load_prepared

__all__ = ["bytes_per_predicted_token", "heal_curve"]


def bytes_per_predicted_token(prepared: Path, rows: int | None = None) -> float:
    """UTF-8 bytes per predicted token over the first ``rows`` validation rows of a prepared dataset (all
    of them when ``None``), as the module docstring defines them."""
    _, validation, tokenizer, _ = load_prepared(prepared)
    if rows is not None:
        validation = validation.select(range(min(rows, len(validation))))
    tokens = byte_count = 0
    for row in validation:
        predicted = [t for t, label in zip(row["input_ids"][1:], row["labels"][1:]) if label != -100]
        tokens += len(predicted)
        byte_count += len(tokenizer.decode(predicted, skip_special_tokens=True).encode("utf-8"))
    if not tokens or not byte_count:
        raise ValueError(f"{prepared}: its validation rows hold no predicted text")
    return byte_count / tokens


def heal_curve(log_csv: Path, bytes_per_token: float) -> list[dict[str, Any]]:
    """``[{"step", "tokens", "val_loss", "bits_per_byte"}, ...]``: every evaluation ``log_csv`` records, in order."""
    with open(log_csv, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val_loss")]
    return [{"step": int(r["step"]), "tokens": int(r["tokens"]), "val_loss": float(r["val_loss"]),
             "bits_per_byte": float(r["val_loss"]) / math.log(2) / bytes_per_token} for r in rows]
