"""``kphi scale``: scaling curves — families of models at several widths, each tuned, fitted and compared.

A *scaling suite* (YAML with ``kind: scaling`` in ``kphi/suites/``) names

* ``families``: arms as in a compare suite (a preset, or a control with ``base`` and ``match``), each
  rebuilt at every width: ``hidden_size = w`` and ``intermediate_size`` at the preset's ratio to its width
  (rounded to a multiple of 8); heads, depth and the projection (e.g. its ``min_channels_per_group``) are kept, so a grouped family's
  group count grows with its width by the group rule;
* ``widths``: the sizes;
* ``budget``: tokens per run as a function of width, ``reference_tokens * (w / reference_width) ** exponent``
  (rounded up to whole steps); every family trains on the same budget at a given width;
* ``learning_rates`` (a grid, tuned at every width on the first seed) and ``seeds`` (the other seeds run at
  each family's best rate).

Each width is an ordinary comparison (:func:`kphi.experiments.compare.run_compare`) in ``OUT/w{width}/``, so it resumes,
reuses finished runs and can be extended like one. Then, per family, the final validation losses at the
best rates are fitted by ``L(N) = a * N**(-b) + c`` on non-embedding parameters ``N``
(:func:`fit_power_law`), and for every width of the reference family (dense phi-3) the *parameter savings
factor* of each other family is reported: ``N_ref / N_family(L_ref)``, the number of times fewer
non-embedding parameters the family needs to reach the reference's loss on its fitted curve. The factor is
computed per seed (a curve fitted to each seed's losses) and reported as mean and spread; a factor that
needs the curve outside the family's measured range is marked as an extrapolation.

Outputs in ``OUT``: ``results.json``, ``results.md``, ``scaling.png`` (loss against ``N``, log x, with the
fits) and one comparison directory per width.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub.errors import StrictDataclassError

from ..errors import validator_cause
from ..presets import load_preset
from ..sources.auto import config_fields
from ..training.train_settings import whole_steps
from .arms import non_embedding, resolve_arms
from .compare import CompareError, Comparison, run_plan, training_at_budget
from .plots import plot_scaling
from .runs import command_line, write_results
from .suites import (ArmSpec, Suite, arm_specs, positive_rates, read_suite_yaml, suite_data, suite_training,
                     unknown_keys, whole_number)

__all__ = ["ScalingSuite", "plan_scaling", "format_dry_run", "load_scaling_suite", "run_scaling", "fit_power_law", "savings_factor", "format_scaling_table"]


@dataclass
class ScalingSuite:
    name: str
    description: str
    families: list[ArmSpec]
    reference: str
    widths: list[int]
    budget: dict[str, float]
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    learning_rates: list[float] | None = None
    seeds: int = 1

    def tokens_at(self, width: int) -> int:
        """The budget at ``width``, rounded up to whole optimizer steps (gradient accumulation counted)."""
        b = self.budget
        return whole_steps(b["reference_tokens"] * (width / b["reference_width"]) ** b.get("exponent", 1.0), self.training)

    def suite_at(self, width: int) -> Suite:
        """The comparison at one width: every family rebuilt at ``width`` with that width's budget."""
        arms = []
        for spec in self.families:
            preset = load_preset(spec.preset or spec.base).config
            ratio = preset.intermediate_size / preset.hidden_size
            overrides = {"hidden_size": width, "embed_size": None, "intermediate_size": max(8, round(ratio * width / 8) * 8)}
            arms.append(dataclass_replace(spec, config={**(spec.config or {}), **overrides}))
        training = training_at_budget(self.training, self.tokens_at(width))
        return Suite(
            name=f"{self.name}-w{width}",
            description=f"{self.description} (width {width})",
            arms=arms,
            baseline=self.reference,
            data=self.data,
            training=training,
            seeds=self.seeds,
            learning_rates=self.learning_rates,
        )


#: The keys a scaling suite's YAML may hold: ``kind: scaling`` and the fields of :class:`ScalingSuite`.
SCALING_KEYS = frozenset({"kind", *(f.name for f in dataclass_fields(ScalingSuite))})


def load_scaling_suite(name_or_path: str) -> ScalingSuite:
    """A bundled scaling suite (``kind: scaling``) or a YAML file of one."""
    path, data = read_suite_yaml(name_or_path)
    if not isinstance(data, dict) or data.get("kind") != "scaling":
        raise CompareError(f"{path} is not a scaling suite (it needs kind: scaling); use kphi compare for it")
    families, widths, budget = data.get("families"), data.get("widths"), data.get("budget")
    if not isinstance(families, list) or len(families) < 2 or not all(isinstance(f, dict) and f.get("label") for f in families):
        raise CompareError(f"suite {path}: 'families' needs at least two entries with a label")
    unknown_keys(data, SCALING_KEYS, f"suite {path}", "a scaling suite")  # a misspelt key first: it explains the rest
    families = arm_specs(families, f"suite {path}")
    if not isinstance(widths, list) or len(widths) < 2 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise CompareError(f"suite {path}: 'widths' needs at least two positive integers")
    needed = ("reference_width", "reference_tokens")
    if not isinstance(budget, dict) or not all(isinstance(budget.get(k), (int, float)) and budget[k] > 0 for k in needed):
        raise CompareError(f"suite {path}: 'budget' needs positive reference_width and reference_tokens (and an exponent)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in budget.values()):
        raise CompareError(f"suite {path}: every value of 'budget' must be a number, got {budget!r}")
    budget = {k: float(v) for k, v in budget.items()}
    labels = [f.label for f in families]
    reference = data.get("reference", labels[0])
    if reference not in labels or len(set(labels)) != len(labels):
        raise CompareError(f"suite {path}: family labels must be unique and 'reference' one of them")
    suite = ScalingSuite(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        families=families,
        reference=reference,
        widths=sorted(widths),
        budget=budget,
        data=suite_data(data.get("data"), f"suite {path}"),
        training=suite_training(data.get("training"), f"suite {path}"),
        learning_rates=positive_rates(data.get("learning_rates"), f"suite {path}"),
        seeds=whole_number(data.get("seeds", 1), f"suite {path}: seeds", 1),
    )
    for width in suite.widths:  # fail before training when a width cannot build every family
        try:
            resolve_arms(suite.suite_at(width))
        except (CompareError, ValueError, TypeError, StrictDataclassError) as err:
            raise CompareError(f"suite {path}: width {width} does not build: {validator_cause(err)}") from None
    return suite


# --------------------------------------------------------------------------- the fit


def fit_power_law(n: list[float], loss: list[float]) -> dict[str, float]:
    """Least-squares fit of ``L(N) = a * N**(-b) + c`` (``a, b > 0``, ``0 <= c < min L``).

    For a fixed ``c`` the model is linear in log space (``log(L - c) = log a - b log N``), so the fit profiles
    ``c`` over a fine grid on ``[0, min L)``, solves ``a, b`` in closed form for each and keeps the ``c`` with
    the smallest squared error in loss. Written out (instead of calling an optimiser) because it is a few
    lines, has no starting point to choose and gives the same answer on every machine. With three or four
    points ``c`` is weakly determined: read the fitted curve as an interpolation of the measurements.
    Returns ``a, b, c`` and ``rmse``.
    """
    x, y = np.log(np.asarray(n, dtype=np.float64)), np.asarray(loss, dtype=np.float64)
    if len(x) < 3 or not np.all(np.isfinite(y)):
        raise ValueError("a power-law fit needs at least three finite losses")
    best = None
    for c in np.linspace(0.0, y.min(), 4001, endpoint=False):
        slope, intercept = np.polyfit(x, np.log(y - c), 1)
        if slope >= 0:
            continue
        pred = np.exp(intercept + slope * x) + c
        error = float(np.sum((pred - y) ** 2))
        if best is None or error < best[0]:
            best = (error, math.exp(float(intercept)), float(-slope), float(c))
    if best is None:
        raise ValueError("the loss does not fall with N: no power law with b > 0 fits")
    error, a, b, c = best
    return {"a": a, "b": b, "c": c, "rmse": math.sqrt(error / len(y))}


def power_law(fit: dict[str, float], n: float) -> float:
    return fit["a"] * n ** (-fit["b"]) + fit["c"]


def inverse_power_law(fit: dict[str, float], loss: float) -> float | None:
    """The ``N`` at which the fitted curve reaches ``loss``; ``None`` when ``loss`` is at or below ``c``."""
    if loss <= fit["c"]:
        return None
    return ((loss - fit["c"]) / fit["a"]) ** (-1.0 / fit["b"])


def savings_factor(reference_n: float, reference_loss: float, family_fit: dict[str, float]) -> float | None:
    """``reference_n / N_family``, with ``N_family`` where the family's curve reaches ``reference_loss``."""
    needed = inverse_power_law(family_fit, reference_loss)
    return None if needed is None else reference_n / needed


# --------------------------------------------------------------------------- running


def run_scaling(
    suite: ScalingSuite,
    out: Path,
    seeds: int | None = None,
    learning_rates: list[float] | None = None,
    data: str | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run every width's comparison, fit each family, write the results; returns ``results.json``'s content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_width = dict(zip(suite.widths, run_plan(plan_scaling(suite, out, seeds), data=data, learning_rates=learning_rates,
                                                progress=progress, log=log)))
    results = scaling_results(suite, per_width, time.perf_counter() - started)
    write_scaling_outputs(results, out)
    return results


def plan_scaling(suite: ScalingSuite, out: Path, seeds: int | None = None) -> list[Comparison]:
    """The comparisons a scaling study is made of: one per width (:meth:`ScalingSuite.suite_at`), in ``OUT/wW/``."""
    return [Comparison(f"width {width}: {suite.tokens_at(width):,} tokens per run", suite.suite_at(width),
                       Path(out) / f"w{width}", seeds) for width in suite.widths]


def scaling_results(suite: ScalingSuite, per_width: dict[int, dict[str, Any]], wall: float) -> dict[str, Any]:
    """Points per family, fits (on the seed mean and per seed) and the savings factors against the reference."""
    families: dict[str, dict[str, Any]] = {f.label: {"points": []} for f in suite.families}
    for width, result in sorted(per_width.items()):
        for arm in result["arms"]:
            seed_losses = {str(r["seed"]): r["val_loss"] for r in arm["runs"]}
            families[arm["label"]]["points"].append({
                "width": width,
                "non_embedding": arm["non_embedding"],
                "tokens": arm["tokens"],
                "learning_rate": arm["learning_rate"],
                "lr_at_edge": arm["lr_at_edge"],
                "val_loss": arm["val_loss"],
                "val_loss_std": arm["val_loss_std"],
                "val_loss_by_seed": seed_losses,
            })
    seeds = sorted(set.intersection(*(set(p["val_loss_by_seed"]) for f in families.values() for p in f["points"])), key=int)
    for family in families.values():
        pts = family["points"]
        family["fit"] = _try_fit([p["non_embedding"] for p in pts], [p["val_loss"] for p in pts])
        family["fit_by_seed"] = {
            s: _try_fit([p["non_embedding"] for p in pts], [p["val_loss_by_seed"][s] for p in pts]) for s in seeds
        }
    reference = families[suite.reference]
    savings = []
    for point in reference["points"]:
        for label, family in families.items():
            if label == suite.reference:
                continue
            lo, hi = min(p["non_embedding"] for p in family["points"]), max(p["non_embedding"] for p in family["points"])
            per_seed = []
            for s in seeds:
                fit = family["fit_by_seed"][s]
                factor = None if fit is None else savings_factor(point["non_embedding"], point["val_loss_by_seed"][s], fit)
                per_seed.append(factor)
            finite = [f for f in per_seed if f is not None]
            needed = [point["non_embedding"] / f for f in finite]
            savings.append({
                "family": label,
                "reference_width": point["width"],
                "reference_non_embedding": point["non_embedding"],
                "reference_val_loss": point["val_loss"],
                "factor_by_seed": dict(zip(seeds, per_seed)),
                "factor": statistics.fmean(finite) if finite else None,
                "factor_std": statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else None),
                "needed_non_embedding": statistics.fmean(needed) if needed else None,
                "extrapolated": any(not lo <= n <= hi for n in needed) or len(finite) < len(per_seed),
            })
    return {
        "suite": suite.name,
        "description": suite.description,
        "reference": suite.reference,
        "widths": suite.widths,
        "budget": suite.budget,
        "budget_tokens": {str(w): suite.tokens_at(w) for w in suite.widths},
        "learning_rates": suite.learning_rates,
        "seeds": [int(s) for s in seeds],
        "wall_seconds": round(wall, 1),
        "command": command_line(),
        "families": families,
        "savings": savings,
        "warnings": [f"width {width}: {w}" for width, r in sorted(per_width.items()) for w in r.get("warnings", [])],
    }


def _try_fit(n, loss):
    """The fit, or ``None`` where a point has no loss (every rate diverged) or no power law fits."""
    if any(value is None for value in loss):
        return None
    try:
        return fit_power_law(n, loss)
    except ValueError:
        return None


def format_scaling_table(results: dict[str, Any]) -> str:
    """Markdown: the measured points, the fits, and the savings factors against the reference family."""
    lines = ["| family | width | non-emb. params | tokens | lr | val loss |", "|:--|--:|--:|--:|--:|--:|"]
    for label, family in results["families"].items():
        for p in family["points"]:
            spread = f" ± {p['val_loss_std']:.3f}" if len(results["seeds"]) > 1 and p["val_loss_std"] is not None else ""
            edge = " (edge)" if p["lr_at_edge"] else ""
            loss = "-" if p["val_loss"] is None else f"{p['val_loss']:.3f}{spread}"
            lines.append(f"| {label} | {p['width']} | {p['non_embedding']:,} | {p['tokens']:,} | {p['learning_rate']:g}{edge} | {loss} |")
    lines += ["", "| family | fit L(N) = a·N^(−b) + c | rmse |", "|:--|:--|--:|"]
    for label, family in results["families"].items():
        fit = family["fit"]
        text = "no fit" if fit is None else f"a = {fit['a']:.4g}, b = {fit['b']:.3f}, c = {fit['c']:.3f}"
        lines.append(f"| {label} | {text} | {'-' if fit is None else format(fit['rmse'], '.4f')} |")
    lines += [
        "",
        f"| family | at {results['reference']} width | {results['reference']} params | its val loss | params needed | "
        "times fewer parameters |",
        "|:--|--:|--:|--:|--:|--:|",
    ]
    for s in results["savings"]:
        if s["factor"] is None:
            factor, needed = "never reaches it on its fit", "-"
        else:
            factor = f"{s['factor']:.2f}" + (f" ± {s['factor_std']:.2f}" if len(results["seeds"]) > 1 else "")
            factor += " (extrapolated)" if s["extrapolated"] else ""
            needed = f"{s['needed_non_embedding']:,.0f}"
        lines.append(
            f"| {s['family']} | {s['reference_width']} | {s['reference_non_embedding']:,} | "
            f"{s['reference_val_loss']:.3f} | {needed} | {factor} |"
        )
    if results.get("warnings"):
        lines += [""] + [f"warning: {w}" for w in results["warnings"]]
    return "\n".join(lines)


def write_scaling_outputs(results: dict[str, Any], out: Path) -> None:
    curves = {}
    for label, family in results["families"].items():
        pts = [(p["non_embedding"], p["val_loss"], p["val_loss_std"]) for p in family["points"] if p["val_loss"] is not None]
        fit = family["fit"]
        curves[label] = {"points": pts, "curve": None if fit is None else (lambda n, f=fit: power_law(f, n))}
    plot_scaling(curves, out / "scaling.png", f"kphi scale ({results['suite']}): validation loss vs parameters")
    write_results(out, results, format_scaling_table(results))


def scaling_config_summary(suite: ScalingSuite) -> list[dict[str, Any]]:
    """Every (width, family): non-embedding parameters and budget, without training (``kphi scale --dry-run``)."""
    rows = []
    for width in suite.widths:
        for arm in resolve_arms(suite.suite_at(width)):
            fields = config_fields(arm.config)
            rows.append({
                "width": width, "family": arm.label, "non_embedding": non_embedding(arm.config),
                "intermediate_size": fields["intermediate_size"], "tokens": suite.tokens_at(width),
            })
    return rows


def format_dry_run(suite: ScalingSuite) -> str:
    """:func:`scaling_config_summary` as one line per (width, family)."""
    return "\n".join(
        f"width {row['width']:>5}  {row['family']:<28} {row['non_embedding']:>12,} non-embedding  "
        f"interm. {row['intermediate_size']:>5}  {row['tokens']:>11,} tokens"
        for row in scaling_config_summary(suite)
    )
