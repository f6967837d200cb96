"""Budget series: the same comparison at several token budgets — does a lead hold, shrink or reverse?

A compare suite with ``budgets: [N1, N2, ...]`` (or ``kphi compare --budgets``) trains every arm, at its
own rate, once per budget, each budget an ordinary comparison in ``OUT/tokens-N/`` (so it resumes and
reuses finished runs like one). The largest budget (the ``seeded_budgets`` largest) runs ``seeds_at_largest``
seeds, the others ``seeds``.
With the cosine schedule every budget is a separate run that ends at a learning rate of zero, so each
point is the final loss of a run planned for that many tokens (not a point on a longer run's curve).

A suite may state its budgets as **tokens per non-embedding parameter** of its baseline arm
(``budgets_per_parameter: [2.5, 5, 10]``): each becomes ``ceil(r * N / T) * T`` tokens, ``N`` the baseline's
non-embedding parameters and ``T`` the tokens of one optimizer step on one process (batch x context x
gradient accumulation), so the budget is whole steps. A budget above the training split's size would need a
second pass over the corpus; the results say so in their warnings rather than mixing epochs silently.

Outputs in ``OUT``: ``results.json`` (per arm: tokens -> final validation loss, spread, rate; analytic training
FLOPs per token and per point, measured tokens per second; the first non-baseline arm minus every other arm
per budget, with the crossover where that difference changes sign), ``results.md``, ``budgets.png`` (final
validation loss against tokens, log x, one line per arm), ``compute.png`` (the same losses against training
FLOPs and against wall-clock seconds) and ``differences.png`` (the differences against the budget).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from ..data.prepare import PrepareSettings, prepare_dataset
from ..params import training_flops_per_token
from ..training.train_settings import training_value, whole_steps
from .arms import non_embedding, resolve_arms
from .compare import CompareError, Comparison, format_loss, run_plan, training_at_budget
from .plots import plot_budgets, plot_compute, plot_differences, plot_leads
from .runs import command_line, write_results
from .suites import Suite

__all__ = ["run_budget_series", "plan_budget_series", "rebuild_series_outputs", "format_budget_table", "budgets_per_parameter", "differences", "plot_series_leads"]


def run_budget_series(
    suite: Suite,
    out: Path,
    budgets: list[int] | None = None,
    data: str | None = None,
    progress: bool = True,
    log=print,
    seeds: int | None = None,
    learning_rates: list[float] | None = None,
    max_tokens: int | None = None,
    only_arms: list[str] | None = None,
    wait: bool = True,
) -> dict[str, Any] | None:
    """Every arm of ``suite`` at every budget; returns ``results.json``'s content (``None`` when ``wait`` is false
    and a budget is left to the other processes that hold its runs: the last of them writes the series).

    ``seeds`` overrides the suite's seeds. ``learning_rates`` and ``max_tokens`` are refused (they exist so
    that a caller forwarding a single comparison's options gets a clear answer): every arm trains at its
    own rates, and the budgets are the series'.
    """
    if learning_rates or max_tokens:
        raise CompareError("a budget series takes neither --learning-rates nor --max-tokens: arms train at their own rates")
    suite = _with_seeds(suite, seeds)
    per_parameter = {}
    if not (budgets or suite.budgets):  # computed once, here, and handed to the plan
        budgets = budgets_per_parameter(suite)
        per_parameter = dict(zip(budgets, suite.budgets_per_parameter or []))
    plan = plan_budget_series(suite, out, budgets)
    budgets = [int(c.suite.training["max_tokens"]) for c in plan]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_budget = dict(zip(budgets, run_plan(plan, data=data, progress=progress, log=log, only_arms=only_arms, wait=wait)))
    if None in per_budget.values():
        return None
    results = budget_results(suite, per_budget, time.perf_counter() - started)
    results["tokens_per_parameter"] = {str(tokens): ratio for tokens, ratio in per_parameter.items()}
    _add_compute(results, suite)
    results["differences"] = differences(results)
    train_tokens = _train_tokens(suite, data)
    results["train_split_tokens"] = train_tokens
    results["warnings"] += [f"{tokens:,} tokens is more than one pass over the training split ({train_tokens:,} "
                            f"tokens): that point trained on repeated data" for tokens in budgets
                            if train_tokens is not None and tokens > train_tokens]
    _write_outputs(results, out)
    return results


def _with_seeds(suite: Suite, seeds: int | None) -> Suite:
    """``suite`` with ``seeds`` seeds (``None``: its own); fewer than one is refused."""
    if seeds is None:
        return suite
    if seeds < 1:
        raise CompareError(f"--seeds must be at least 1, got {seeds}")
    return dataclasses.replace(suite, seeds=seeds)


def plan_budget_series(suite: Suite, out: Path, budgets: list[int] | None = None, seeds: int | None = None) -> list[Comparison]:
    """The comparisons a series is made of, one per budget (``budgets``, else the suite's ``budgets`` or
    ``budgets_per_parameter``), smallest first, each in ``OUT/tokens-N/`` with ``max_tokens: N`` and the suite's
    seeds (``seeds_at_largest`` at the ``seeded_budgets`` largest); nothing is trained (``kphi compare --dry-run`` shows it)."""
    suite = _with_seeds(suite, seeds)
    budgets = sorted(set(budgets or suite.budgets or budgets_per_parameter(suite)))
    if len(budgets) < 2:
        raise CompareError("a budget series needs at least two budgets (suite 'budgets:', 'budgets_per_parameter:' or --budgets)")
    plan = []
    largest = budgets[-max(1, suite.seeded_budgets):]
    for tokens in budgets:
        at_largest = tokens in largest
        count = (suite.seeds_at_largest or suite.seeds) if at_largest else suite.seeds
        at_budget = dataclasses.replace(suite, training=training_at_budget(suite.training, tokens), budgets=None,
                                        budgets_per_parameter=None)
        plan.append(Comparison(f"{tokens:,} tokens per run, {count} seed(s)", at_budget, Path(out) / f"tokens-{tokens}", count))
    return plan


def rebuild_series_outputs(suite: Suite, out: Path, budgets: list[int] | None = None) -> dict[str, Any]:
    """Rewrite a series' ``results.json``, ``results.md`` and plots from the budgets ``out`` has finished
    (``OUT/tokens-N/results.json``) with today's summary (FLOPs, differences), training nothing: the summary
    so far of a series still running (``kphi compare --report``), or of one committed before a summary existed.
    A planned budget (``budgets``, else the suite's) not finished yet is named in the warnings. The original
    wall time, command and warnings are kept."""
    out = Path(out)
    per_budget = {}
    for path in sorted(out.glob("tokens-*/results.json")):
        result = json.loads(path.read_text())
        if result.get("suite") != suite.name:
            raise CompareError(f"{path} is a comparison of suite {result.get('suite')!r}, not {suite.name!r}")
        per_budget[int(path.parent.name.split("-", 1)[1])] = result
    if len(per_budget) < 2:
        raise CompareError(f"{out} holds fewer than two finished budgets (tokens-N/results.json): nothing to summarise yet")
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    results = budget_results(suite, per_budget, previous.get("wall_seconds", 0.0))
    for key in ("command", "train_split_tokens"):
        if key in previous:
            results[key] = previous[key]
    ratios = dict(previous.get("tokens_per_parameter") or {})
    if suite.budgets_per_parameter and not (budgets or suite.budgets):
        per_parameter = dict(zip(budgets_per_parameter(suite), suite.budgets_per_parameter))
        ratios.update({str(t): per_parameter[t] for t in per_budget if t in per_parameter})
    if ratios:
        results["tokens_per_parameter"] = ratios
    planned = sorted(set(budgets or suite.budgets or budgets_per_parameter(suite)))
    kept = [w for w in previous.get("warnings", []) if "not finished yet" not in w]
    results["warnings"] = list(dict.fromkeys(kept + results["warnings"])) + [
        f"{tokens:,} tokens: not finished yet (a series in progress)" for tokens in planned if tokens not in per_budget]
    _add_compute(results, suite)
    results["differences"] = differences(results)
    _write_outputs(results, out)
    return results


def plot_series_leads(outs: dict[str, str | Path], out_png: str | Path, title: str = "the lead over each arm") -> dict[str, Any]:
    """One plot of several series' leads (``plot_leads``), read from each series' ``OUT/results.json``
    (written when it finishes, or by ``kphi compare --report``): ``{"width 64": "runs/cpu-text-w64", ...}``.
    Returns the points drawn."""
    series = {}
    for name, out in outs.items():
        path = Path(out) / "results.json"
        try:
            series[name] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CompareError(f"{name}: cannot read {path} ({err}); run kphi compare --report on it first") from None
        if not series[name].get("differences"):
            raise CompareError(f"{name}: {path} is not a budget series' results (no differences)")
    return plot_leads(series, Path(out_png), title)


def budgets_per_parameter(suite: Suite) -> list[int]:
    """The token budgets of ``suite.budgets_per_parameter`` (see the module docstring); ``[]`` without them."""

    if not suite.budgets_per_parameter:
        return []
    baseline = next(arm for arm in resolve_arms(suite) if arm.label == suite.baseline)
    return [whole_steps(ratio * non_embedding(baseline.config), suite.training) for ratio in suite.budgets_per_parameter]


def _add_compute(results: dict[str, Any], suite: Suite) -> None:
    """Per arm its analytic training FLOPs per token (:mod:`kphi.params`); per point the training FLOPs
    (tokens x that) and the median measured tokens per second and wall seconds of its runs."""
    from statistics import median

    context = int(training_value(suite.training, "context_length"))
    configs = {arm.label: arm.config for arm in resolve_arms(suite)}
    for label, arm in results["arms"].items():
        per_token = training_flops_per_token(configs[label], context) if label in configs else None
        arm["train_flops_per_token"] = per_token
        for point in arm["points"]:
            point["train_flops"] = None if per_token is None else per_token * point["tokens"]
            runs = point.pop("runs", None) or []
            speeds = [r["tokens_per_second"] for r in runs if r.get("tokens_per_second")]
            walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds")]
            point["tokens_per_second"] = median(speeds) if speeds else None
            point["run_wall_seconds"] = median(walls) if walls else None
    results["flops_formula"] = ("training FLOPs per token = 3 x (2 x matmul weights incl. lm_head + "
                                "4 x layers x context x attention width); kphi.params")


def differences(results: dict[str, Any]) -> dict[str, Any]:
    """The subject arm (the first arm that is not the baseline: kphi-3 in every bundled suite) minus every
    other arm, per budget: ``{"subject": label, "against": {label: [{budget, tokens_per_parameter, difference,
    spread}, ...]}, "crossover": {label: ...}}``. ``spread`` is ``sqrt(s_a^2 + s_b^2)`` of the two arms' seed
    spreads (0 with one seed). A crossover is where the difference changes sign between two budgets: its
    interval, and the point where the straight line between them (in log budget) crosses zero; ``None``
    when the sign never changes inside the measured range."""

    labels = list(results["arms"])
    subject = next((label for label in labels if label != results["baseline"]), None)
    if subject is None:
        return {}
    ratios = results.get("tokens_per_parameter") or {}
    mine = {p["budget"]: p for p in results["arms"][subject]["points"]}
    against, crossover = {}, {}
    for label in labels:
        if label == subject:
            continue
        rows = []
        for point in results["arms"][label]["points"]:
            own = mine.get(point["budget"])
            if own is None or own["val_loss"] is None or point["val_loss"] is None:
                continue
            rows.append({
                "budget": point["budget"], "tokens_per_parameter": ratios.get(str(point["budget"])),
                "difference": own["val_loss"] - point["val_loss"],
                "spread": math.hypot(own["val_loss_std"] or 0.0, point["val_loss_std"] or 0.0),
            })
        against[label] = rows
        crossover[label] = None
        for before, after in zip(rows, rows[1:]):
            if (before["difference"] < 0) != (after["difference"] < 0):
                x0, x1 = math.log(before["budget"]), math.log(after["budget"])
                t = before["difference"] / (before["difference"] - after["difference"])
                at = math.exp(x0 + t * (x1 - x0))
                crossover[label] = {"between": [before["budget"], after["budget"]], "interpolated_tokens": round(at),
                                    "interpolated_tokens_per_parameter": (
                                        at / before["budget"] * before["tokens_per_parameter"]
                                        if before["tokens_per_parameter"] else None)}
                break
    return {"subject": subject, "against": against, "crossover": crossover,
            "at_equal_flops": {label: _at_equal_flops(results["arms"][subject], results["arms"][label])
                               for label in labels if label != subject}}


def _at_equal_flops(subject: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    """For each point of ``subject`` inside ``other``'s range of training FLOPs: ``other``'s loss there,
    interpolated on the straight line between its two neighbouring points in log FLOPs, and the difference.
    (Each point is a run planned for its budget, so the interpolation is between two finished runs, not a
    point on one run's curve.)"""

    theirs = sorted((p["train_flops"], p["val_loss"]) for p in other["points"] if p.get("train_flops") and p["val_loss"] is not None)
    rows = []
    for point in subject["points"]:
        flops = point.get("train_flops")
        if not flops or point["val_loss"] is None:
            continue
        for (f0, l0), (f1, l1) in zip(theirs, theirs[1:]):
            if f0 <= flops <= f1:
                t = math.log(flops / f0) / math.log(f1 / f0) if f1 > f0 else 0.0
                loss = l0 + t * (l1 - l0)
                rows.append({"budget": point["budget"], "train_flops": flops, "other_val_loss": loss,
                             "difference": point["val_loss"] - loss})
                break
    return rows


def format_differences(results: dict[str, Any]) -> str:
    """Markdown: the subject minus each other arm at every budget (negative: the subject is lower), and the
    crossover of each, or that there is none in the measured range."""
    diff = results.get("differences") or {}
    if not diff:
        return ""
    budgets = results["budgets"]
    ratios = results.get("tokens_per_parameter") or {}
    heads = [f"{ratios[str(b)]:g} tok/param" if str(b) in ratios else f"{b:,} tokens" for b in budgets]
    lines = [f"{diff['subject']} minus each arm (final validation loss; negative: {diff['subject']} is lower; ± the two "
             "arms' seed spreads combined):", "",
             "| against | " + " | ".join(heads) + " | crossover |", "|:--|" + "--:|" * len(budgets) + ":--|"]
    for label, rows in diff["against"].items():
        by_budget = {r["budget"]: r for r in rows}
        cells = [(f"{by_budget[b]['difference']:+.3f}" + (f" ± {by_budget[b]['spread']:.3f}" if by_budget[b]["spread"] else ""))
                 if b in by_budget else "-" for b in budgets]
        cross = diff["crossover"].get(label)
        where = "none in range" if cross is None else (
            f"between {cross['between'][0]:,} and {cross['between'][1]:,} tokens (~{cross['interpolated_tokens']:,}"
            + (f", {cross['interpolated_tokens_per_parameter']:.1f} tok/param" if cross["interpolated_tokens_per_parameter"] else "")
            + ")")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {where} |")
    equal = {label: rows for label, rows in (diff.get("at_equal_flops") or {}).items() if rows}
    if equal:
        lines += ["", f"At equal training FLOPs ({diff['subject']}'s budgets; the other arm interpolated in log FLOPs "
                  "between its two neighbouring runs):", "",
                  "| against | " + f"{diff['subject']}'s budget | training FLOPs | {diff['subject']} | other | difference |",
                  "|:--|--:|--:|--:|--:|--:|"]
        subject_points = {p["budget"]: p for p in results["arms"][diff["subject"]]["points"]}
        for label, rows in equal.items():
            for row in rows:
                mine = subject_points[row["budget"]]["val_loss"]
                lines.append(f"| {label} | {row['budget']:,} | {row['train_flops']:.3g} | {mine:.3f} | "
                             f"{row['other_val_loss']:.3f} | {row['difference']:+.3f} |")
    return "\n".join(lines)


def _train_tokens(suite: Suite, data: str | None) -> int | None:
    """Tokens in the prepared training split the series trained on (prepared already: a cache hit)."""
    settings = {**suite.data, **({"source": data} if data else {})}
    prepared = prepare_dataset(PrepareSettings(context_length=training_value(suite.training, "context_length"), **settings), progress=False)
    stats = json.loads((Path(prepared) / "stats.json").read_text())
    return stats.get("train_tokens")


def budget_results(suite: Suite, per_budget: dict[int, dict[str, Any]], wall: float) -> dict[str, Any]:
    arms: dict[str, dict[str, Any]] = {}
    for tokens, result in sorted(per_budget.items()):
        for arm in result["arms"]:
            entry = arms.setdefault(arm["label"], {"non_embedding": arm["non_embedding"], "points": []})
            entry["points"].append({
                "budget": tokens,
                "tokens": arm["tokens"],
                "learning_rate": arm["learning_rate"],
                "val_loss": arm["val_loss"],
                "val_loss_std": arm["val_loss_std"],
                "seeds": arm["seeds"],
                "wall_seconds": arm["wall_seconds"],
                "runs": arm.get("runs"),
            })
    return {
        "suite": suite.name,
        "description": suite.description,
        "baseline": suite.baseline,
        "budgets": sorted(per_budget),
        "wall_seconds": round(wall, 1),
        "command": command_line(),
        "arms": arms,
        "warnings": [f"{tokens:,} tokens: {w}" for tokens, r in sorted(per_budget.items()) for w in r.get("warnings", [])],
    }


def format_budget_table(results: dict[str, Any]) -> str:
    """Markdown: one row per arm, one column per budget (final validation loss, mean ± spread over seeds)."""
    budgets = results["budgets"]
    lines = [
        "| arm | non-emb. params | train MFLOPs/token | lr | " + " | ".join(f"{b:,} tokens" for b in budgets) + " |",
        "|:--|--:|--:|--:|" + "--:|" * len(budgets),
    ]
    for label, arm in results["arms"].items():
        by_budget = {p["budget"]: p for p in arm["points"]}
        rates = sorted({f"{p['learning_rate']:g}" for p in arm["points"]})
        cells = [
            format_loss(by_budget[b]["val_loss"], by_budget[b]["val_loss_std"], len(by_budget[b]["seeds"])) if b in by_budget else "-"
            for b in budgets
        ]
        per_token = arm.get("train_flops_per_token")
        flops = f"{per_token / 1e6:.2f}" if per_token else "-"
        lines.append(f"| {label} | {arm['non_embedding']:,} | {flops} | {', '.join(rates)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    differences_table = format_differences(results)
    return table + ("\n\n" + differences_table if differences_table else "")


def _write_outputs(results: dict[str, Any], out: Path) -> None:
    series = {
        label: [(p["tokens"], p["val_loss"], p["val_loss_std"]) for p in arm["points"] if p["val_loss"] is not None]
        for label, arm in results["arms"].items()
    }
    plot_budgets(series, out / "budgets.png", f"kphi compare ({results['suite']}): final validation loss vs budget")
    plot_compute(results, out / "compute.png")
    if results.get("differences"):
        plot_differences(results, out / "differences.png")
    write_results(out, results, format_budget_table(results))
