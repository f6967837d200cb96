"""A model scored on the first bytes of kphi's held-out English text, in bits per byte: whether a conversion
survived, and what structuring one projection costs (the sensitivity of :mod:`kphi.convert.allocate`)."""

from __future__ import annotations

from typing import Any

import torch

from ..eval.bits import default_text_path, evaluate_text, heldout_sample
from ..sources.model_dir import load_model

__all__ = ["heldout_bits_per_byte", "heldout_score", "sensitivity_text"]


def heldout_score(model, tokenizer, size: int):
    """``model`` scored on the first ``size`` bytes of kphi's held-out text (:mod:`kphi.eval.bits`; context up to
    256 tokens, stride 128)."""
    return evaluate_text(model.eval(), tokenizer, [heldout_sample(size)], "heldout", context=256)


def heldout_bits_per_byte(src, converted, tokenizer, size: int) -> dict[str, Any]:
    """Bits per byte of the source model and of ``converted`` on the first ``size`` bytes of kphi's held-out
    text: whether the model survived."""
    before = heldout_score(load_model(src, dtype=torch.float32), tokenizer, size)
    after = heldout_score(converted, tokenizer, size)
    return {"bytes": before.bytes, "tokens": before.tokens, "context": before.context, "stride": before.stride,
            "before": before.bits_per_byte, "after": after.bits_per_byte}


def sensitivity_text(size: int) -> str:
    """The *last* ``size`` bytes' worth of kphi's held-out text, from a line start: what scores each candidate of
    an allocation, so that the scores of converted models on the text's first bytes (``--heldout-bytes``, the
    structure suites' 32 KB) never read what chose their allocation."""
    text = default_text_path().read_text(encoding="utf-8")
    tail = text[-size:] if size < len(text) else text
    return tail[tail.find("\n") + 1 :] if size < len(text) and "\n" in tail else tail
