"""``kphi eval``: perplexity and bits per byte of any causal LM on held-out text, and lm-evaluation-harness tasks.

The scoring (strided windows, bits per byte) is :mod:`kphi.eval.bits`'s. Text comes from plain-text files (one
document per file), JSON-lines files (one document per line, its ``text`` field), the validation split of a
prepared corpus (``--data``: token rows of that corpus's tokenizer, which must be the model's), or, by default,
kphi's held-out English text.

``--tasks`` runs lm-evaluation-harness tasks through its Python API (``pip install "kphi[eval]"``); kphi's own
offline task ``kphi_next_sentence`` picks the true next sentence of a held-out paragraph among four.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.prepare import DataError, load_prepared
from ..errors import EvalError
from ..sources import describe_source
from ..sources.model_dir import load_model, load_tokenizer
from .bits import (
    TextScore,
    default_text_path,
    evaluate_text,
    first_bytes,
    prefix_id,
    read_documents,
    score_documents,
    window_context,
)
from .harness import KPHI_TASKS, run_tasks

__all__ = ["EvalError", "EvalReport", "KPHI_TASKS", "evaluate_prepared", "format_eval_table", "run_eval"]


def evaluate_prepared(model, data: str | Path, context: int | None, stride: int | None, progress: bool) -> TextScore:
    """The validation split of a prepared corpus: each row scored as a document of its own token ids (the
    rows are the corpus tokenizer's ids, so that tokenizer must be the model's); bytes are the decoded rows'."""
    try:
        _, validation, tokenizer, _ = load_prepared(data)
    except DataError as err:
        raise EvalError(str(err)) from None
    if len(tokenizer) > model.config.vocab_size:
        raise EvalError(f"{data} was prepared with a {len(tokenizer)}-token vocabulary, the model has "
                        f"{model.config.vocab_size}: prepare it with the model's tokenizer (kphi data prepare --tokenizer MODEL)")
    rows = [list(r["input_ids"]) for r in validation]
    context, stride = window_context(model, context, stride)
    nats, tokens = score_documents(model, rows, prefix_id(tokenizer), context, stride, progress, desc=Path(data).name)
    size = sum(len(tokenizer.decode(r).encode("utf-8")) for r in rows)
    return TextScore(f"{Path(data).name} (validation)", len(rows), size, tokens, nats, context, stride)


@dataclass
class EvalReport:
    """Everything ``kphi eval`` measured for one model."""

    model: str
    parameters: int
    texts: list[TextScore] = field(default_factory=list)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "parameters": self.parameters, "texts": [t.to_dict() for t in self.texts],
                "tasks": self.tasks}


def run_eval(models: list[str], texts: list[str] | None = None, data: str | None = None, tasks: list[str] | None = None,
             context: int | None = None, stride: int | None = None, limit: int | None = None,
             max_bytes: int | None = None, progress: bool = True) -> list[EvalReport]:
    """Evaluate every model (any source, :mod:`kphi.sources`) on the texts (default: kphi's held-out text),
    the prepared corpus and the lm-evaluation-harness tasks given. ``max_bytes`` scores only the first that
    many bytes of each text (:func:`first_bytes`)."""

    if not models:
        raise EvalError("give at least one model")
    text_sets = [(Path(t).name, read_documents(t)) for t in (texts or [])]
    if not text_sets and data is None and not tasks:
        text_sets = [("heldout: python-reference", read_documents(default_text_path()))]
    if max_bytes is not None:
        if max_bytes < 1:
            raise EvalError(f"--max-bytes must be at least 1, got {max_bytes}")
        text_sets = [(name, first_bytes(documents, max_bytes)) for name, documents in text_sets]
    reports = []
    for spec in models:
        model = load_model(spec, dtype=torch.float32)
        report = EvalReport(describe_source(spec), sum(p.numel() for p in model.parameters()))
        if text_sets:
            tokenizer = load_tokenizer(spec)
            if len(tokenizer) > model.config.vocab_size:
                raise EvalError(f"{spec}: its tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}")
            for name, documents in text_sets:
                report.texts.append(evaluate_text(model, tokenizer, documents, name, context, stride, progress))
        if data is not None:
            report.texts.append(evaluate_prepared(model, data, context, stride, progress))
        if tasks:
            report.tasks = run_tasks(spec, tasks, limit=limit)
        reports.append(report)
        del model
    return reports


def format_eval_table(reports: list[EvalReport]) -> str:
    """Markdown: one row per model and text (bits per byte, perplexity, tokens), then one per task metric."""
    lines = ["| model | text | bytes | tokens | context/stride | loss (nats/token) | perplexity | bits per byte |",
             "|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for report in reports:
        for t in report.texts:
            lines.append(f"| {report.model} | {t.name} | {t.bytes:,} | {t.tokens:,} | {t.context}/{t.stride} | "
                         f"{t.loss:.4f} | {t.perplexity:,.2f} | **{t.bits_per_byte:.4f}** |")
    task_rows = [(r.model, task, metric, value) for r in reports for task, metrics in r.tasks.items()
                 for metric, value in metrics.items()]
    if task_rows:
        lines += ["", "| model | task | metric | value |", "|:--|:--|:--|--:|"]
        lines += [f"| {m} | {task} | {metric} | {value:.4f} |" for m, task, metric, value in task_rows]
    return "\n".join(lines)
