"""Bits per byte and perplexity of a causal LM on text, in strided windows.

A document of ``B`` UTF-8 bytes tokenised into ``t_1 .. t_N`` costs ``sum_i -log p(t_i | t_<i)`` nats, and

    bits per byte = (total nats / ln 2) / B,        perplexity = exp(total nats / N)   (per token, tokenizer-bound)

Every token of the text is scored: each document is preceded by the tokenizer's end-of-text token (as
lm-evaluation-harness's rolling log-likelihood does), so ``t_1`` is predicted too. A document longer than the
context is scored in **strided windows**: windows of ``context`` tokens start every ``stride`` tokens, and each
window scores only the tokens no earlier window scored, each with at least ``context - stride`` tokens of
history (except at the start). ``stride == context`` gives windows that overlap by one token (fastest, least
context).

kphi's held-out English text (``kphi/data/heldout``) is the Python Language Reference's prose, which CPython
ships; see ``scripts/make-heldout.py``. This module needs only a model and a tokenizer: loading models by
source, prepared corpora and harness tasks are :mod:`kphi.eval.evaluate`'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import EvalError

__all__ = ["TextScore", "default_text_path", "evaluate_text", "first_bytes", "heldout_sample", "prefix_id",
           "read_documents", "score_documents", "window_context", "window_plan"]


@dataclass
class TextScore:
    """The cost of a text under a model: ``nats`` over ``tokens`` scored tokens of ``bytes`` UTF-8 bytes."""

    name: str
    documents: int
    bytes: int
    tokens: int
    nats: float
    context: int
    stride: int

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / self.tokens)

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token, in nats (a training run's validation loss on this text)."""
        return self.nats / self.tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits_per_byte": self.bits_per_byte, "perplexity": self.perplexity, "loss": self.loss}


def default_text_path() -> Path:
    return Path(str(resources.files("kphi") / "data" / "heldout" / "python-reference.txt"))


def heldout_sample(size: int) -> str:
    """The first ``size`` bytes' worth of kphi's held-out text, cut at a paragraph end (a quick survival check)."""
    text = default_text_path().read_text(encoding="utf-8")[:size]
    return text[: text.rfind("\n") + 1] or text


def first_bytes(documents: list[str], size: int) -> list[str]:
    """The documents up to ``size`` UTF-8 bytes in all: whole ones while they fit, then the next one cut at
    its last line end inside the limit (a quick look at a long text)."""
    kept, used = [], 0
    for document in documents:
        encoded = document.encode("utf-8")
        if used + len(encoded) <= size:
            kept.append(document)
            used += len(encoded)
            continue
        head = encoded[: size - used].decode("utf-8", errors="ignore")
        head = head[: head.rfind("\n") + 1] or head
        if head:
            kept.append(head)
        break
    return kept


def read_documents(path: str | Path) -> list[str]:
    """The documents of a ``.txt`` file (the whole file) or a ``.jsonl`` file (each line's ``text``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"cannot read {path} as UTF-8 text ({err})") from None
    if path.suffix != ".jsonl":
        if not text.strip():
            raise EvalError(f"{path} holds no text")
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise EvalError(f"{path}:{number} has no string field 'text'")
        if row["text"].strip():
            documents.append(row["text"])
    if not documents:
        raise EvalError(f"{path} holds no documents")
    return documents


def window_plan(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` windows over positions ``0 .. length-1`` of ``[prefix] + tokens``.

    Window ``seq[begin:end]`` predicts positions ``begin+1 .. end-1``; it scores those from ``first_scored`` on,
    so every position ``1 .. length-1`` is scored exactly once.
    """
    plan, scored_up_to, begin = [], 1, 0
    while scored_up_to < length:
        end = min(begin + context, length)
        plan.append((begin, end, scored_up_to))
        scored_up_to = end
        begin = min(begin + stride, end - 1)  # the first token a window scores needs one token before it
    return plan


@torch.no_grad()
def score_documents(model, token_lists: Iterable[list[int]], prefix_id: int, context: int, stride: int,
                    progress: bool = False, desc: str = "eval") -> tuple[float, int]:
    """``(total nats, scored tokens)`` of each ``[prefix_id] + tokens`` under ``model`` (strided windows)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sequences = [[prefix_id, *tokens] for tokens in token_lists if tokens]
    plans = [window_plan(len(seq), context, stride) for seq in sequences]
    nats, scored = 0.0, 0
    with tqdm(total=sum(map(len, plans)), desc=desc, unit="window", disable=not progress, leave=False) as bar:
        for seq, plan in zip(sequences, plans):
            ids = torch.tensor(seq, device=device)
            for begin, end, first in plan:
                logits = model(ids[begin:end].unsqueeze(0)).logits[0].float()
                targets = ids[first:end]
                logp = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
                nats -= float(logp.gather(1, targets.unsqueeze(1)).sum())
                scored += end - first
                bar.update(1)
    return nats, scored


def prefix_id(tokenizer) -> int:
    """The token that precedes every document: end-of-text, else beginning-of-text."""
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise EvalError("the tokenizer has neither an end-of-text nor a beginning-of-text token to start documents with")


def window_context(model, context: int | None, stride: int | None) -> tuple[int, int]:
    """``(context, stride)``: the context capped at the model's positions (default 1024), the stride half of it."""
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    context = min(context or 1024, limit)
    stride = stride or max(1, context // 2)
    if context < 2 or not 1 <= stride <= context:
        raise EvalError(f"need 2 <= context and 1 <= stride <= context, got context {context}, stride {stride}")
    return context, stride


def evaluate_text(model, tokenizer, documents: list[str], name: str, context: int | None = None,
                  stride: int | None = None, progress: bool = False) -> TextScore:
    """Bits per byte and perplexity of ``documents`` (see the module docstring)."""
    context, stride = window_context(model, context, stride)
    token_lists = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]
    nats, tokens = score_documents(model, token_lists, prefix_id(tokenizer), context, stride, progress, desc=name)
    size = sum(len(doc.encode("utf-8")) for doc in documents)
    return TextScore(name, len(documents), size, tokens, nats, context, stride)
