"""Generation speed of several models side by side: what a converted model buys at inference.

Each model greedily generates exactly ``new_tokens`` tokens after the same prompt (its own tokenizer and chat
template), through transformers' ``generate`` with the KV cache. After one warm-up each, the models take turns
for ``repeats`` rounds (so a slow stretch of the machine hits all of them alike) and each reports its median
tokens per second and its speed relative to the first model; the first repeat's reply is shown too.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from ..generate import GenerationError, encode_prompt, load_for_generation

__all__ = ["format_generation_speed", "time_generation"]

PROMPT = "What is the capital of France?"


def time_generation(models: list[str], *, prompt: str = PROMPT, new_tokens: int = 64, repeats: int = 5,
                    device: str | None = None, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """``{"prompt", "new_tokens", "repeats", "models": [{model, parameters, tokens_per_second, seconds, relative,
    reply}]}`` for every model (a directory, .gguf, known model or hub id), timed in turns."""
    import torch

    if new_tokens < 1 or repeats < 1:
        raise GenerationError(f"--new-tokens and repeats must be at least 1, got {new_tokens} and {repeats}")
    loaded = []
    for name in models:
        progress(f"loading {name}")
        model, tokenizer = load_for_generation(name, device=device)
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)
        loaded.append((name, model, tokenizer, ids))

    def generate(model, tokenizer, ids):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    replies = {name: tokenizer.decode(generate(model, tokenizer, ids)[0, ids.shape[1]:], skip_special_tokens=True)
               for name, model, tokenizer, ids in loaded}  # the warm-up, and what each model says
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats):
        progress(f"round {r + 1}/{repeats}")
        for name, model, tokenizer, ids in loaded:
            started = time.perf_counter()
            generate(model, tokenizer, ids)
            seconds[name].append(time.perf_counter() - started)
    rows = []
    for name, model, _tokenizer, _ids in loaded:
        median = statistics.median(seconds[name])
        rows.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()), "seconds": median,
                     "tokens_per_second": new_tokens / median, "reply": replies[name]})
    for row in rows:
        row["relative"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]
    return {"prompt": prompt, "new_tokens": new_tokens, "repeats": repeats, "models": rows}


def format_generation_speed(report: dict[str, Any]) -> str:
    lines = [f"greedy generation of {report['new_tokens']} tokens after {report['prompt']!r}, median of "
             f"{report['repeats']} turns", "",
             "| model | parameters | tokens/s | x first | reply (first 80 characters) |", "|:--|--:|--:|--:|:--|"]
    for row in report["models"]:
        reply = " ".join(row["reply"].split())[:80].replace("|", "\\|")
        lines.append(f"| {row['model']} | {row['parameters']:,} | {row['tokens_per_second']:.1f} | "
                     f"{row['relative']:.2f} | {reply} |")
    return "\n".join(lines)
