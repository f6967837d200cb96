"""``kphi eval``: perplexity and bits per byte of any causal LM on held-out text, and lm-evaluation-harness tasks.

**Bits per byte** compares models whose tokenizers differ, on the same text: a document of ``B`` UTF-8 bytes
tokenised into ``t_1 .. t_N`` costs ``sum_i -log p(t_i | t_<i)`` nats, and

    bits per byte = (total nats / ln 2) / B,        perplexity = exp(total nats / N)   (per token, tokenizer-bound)

Every token of the text is scored: each document is preceded by the tokenizer's end-of-text token (as
lm-evaluation-harness's rolling log-likelihood does), so ``t_1`` is predicted too. A document longer than the
context is scored in **strided windows**: windows of ``context`` tokens start every ``stride`` tokens, and each
window scores only the tokens no earlier window scored, each with at least ``context - stride`` tokens of
history (except at the start). ``stride == context`` gives windows that overlap by one token (fastest, least
context).

Text comes from plain-text files (one document per file), JSON-lines files (one document per line, its
``text`` field), the validation split of a prepared corpus (``--data``: token rows of that corpus's
tokenizer, which must be the model's), or, by default, kphi's held-out English text (``kphi/data/heldout``:
the Python Language Reference's prose, which CPython ships; see ``scripts/make-heldout.py``).

``--tasks`` runs lm-evaluation-harness tasks through its Python API (``pip install "kphi[eval]"``); kphi's own
offline task ``kphi_next_sentence`` picks the true next sentence of a held-out paragraph among four.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import EvalError
from .harness import KPHI_TASKS, run_tasks

__all__ = ["EvalError", "TextScore", "score_documents", "evaluate_text", "default_text_path", "read_documents",
           "run_eval", "format_eval_table", "KPHI_TASKS", "heldout_sample"]

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


def _prefix_id(tokenizer) -> int:
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise EvalError("the tokenizer has neither an end-of-text nor a beginning-of-text token to start documents with")


def _context(model, context: int | None, stride: int | None) -> tuple[int, int]:
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    context = min(context or 1024, limit)
    stride = stride or max(1, context // 2)
    if context < 2 or not 1 <= stride <= context:
        raise EvalError(f"need 2 <= context and 1 <= stride <= context, got context {context}, stride {stride}")
    return context, stride


def evaluate_text(model, tokenizer, documents: list[str], name: str, context: int | None = None,
                  stride: int | None = None, progress: bool = False) -> TextScore:
    """Bits per byte and perplexity of ``documents`` (see the module docstring)."""
    context, stride = _context(model, context, stride)
    token_lists = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]
    nats, tokens = score_documents(model, token_lists, _prefix_id(tokenizer), context, stride, progress, desc=name)
    size = sum(len(doc.encode("utf-8")) for doc in documents)
    return TextScore(name, len(documents), size, tokens, nats, context, stride)


def evaluate_prepared(model, data: str | Path, context: int | None, stride: int | None, progress: bool) -> TextScore:
    """The validation split of a prepared corpus: each row scored as a document of its own token ids (the
    rows are the corpus tokenizer's ids, so that tokenizer must be the model's); bytes are the decoded rows'."""
    from ..data.prepare import DataError, load_prepared

    try:
        _, validation, tokenizer, _ = load_prepared(data)
    except DataError as err:
        raise EvalError(str(err)) from None
    if len(tokenizer) > model.config.vocab_size:
        raise EvalError(f"{data} was prepared with a {len(tokenizer)}-token vocabulary, the model has "
                        f"{model.config.vocab_size}: prepare it with the model's tokenizer (kphi data prepare --tokenizer MODEL)")
    rows = [list(r["input_ids"]) for r in validation]
    context, stride = _context(model, context, stride)
    nats, tokens = score_documents(model, rows, _prefix_id(tokenizer), context, stride, progress, desc=Path(data).name)
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
    from ..sources.model_dir import load_model, load_tokenizer
    from ..sources import describe_source

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
