"""A healing run's validation curve in bits per byte.

``kphi train`` logs the validation loss ``L`` (nats per predicted token, the mean over the validation rows it
evaluates) every ``eval_steps`` in ``log.csv``. On the same rows, bits per byte are

    bits per byte = L / ln 2 / (bytes per predicted token),

where the bytes are those of the UTF-8 text the predicted tokens (every position of a row after its first
whose label is not -100) decode to, decoded per row with the prepared data's own tokenizer, special tokens
counting no bytes. That is the unit of :mod:`kphi.eval.bits`, on the healing text's validation rows
instead of the held-out prose. :func:`validation_bits_per_byte` scores any model (the source) on the same rows
the same way, so the curve reads as a multiple of the source.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..data.prepare import load_prepared

__all__ = ["bytes_per_predicted_token", "heal_curve", "validation_bits_per_byte"]


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


@torch.no_grad()
def validation_bits_per_byte(model: torch.nn.Module, prepared: Path, rows: int | None = None, batch_size: int = 4) -> float:
    """``model``'s cross-entropy over the predicted tokens of the first ``rows`` validation rows (the logits at
    position ``t`` scored against the label at ``t + 1``), in bits per byte as :func:`heal_curve` converts a
    logged validation loss."""
    _, validation, _, _ = load_prepared(prepared)
    if rows is not None:
        validation = validation.select(range(min(rows, len(validation))))
    total, count = 0.0, 0
    for start in range(0, len(validation), batch_size):
        batch = validation[start:start + batch_size]
        ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
        logits = model(input_ids=ids).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count / math.log(2) / bytes_per_predicted_token(prepared, rows)
