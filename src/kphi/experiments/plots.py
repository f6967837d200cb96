"""PNG figures of experiments (matplotlib, headless): comparisons, rate sweeps, budget series, scaling,
compression and the structure study."""

from __future__ import annotations

import math
from pathlib import Path

from ..training.plots import finish, pyplot, save_figure, save_panels

__all__ = [
    "plot_compare_curves", "plot_params_vs_loss", "plot_lr_sweep", "plot_scaling", "plot_budgets", "plot_compute",
    "plot_differences", "plot_compress", "plot_structure",
]


def plot_compare_curves(curves: dict[str, list[tuple[int, float]]], out_png: Path, title: str) -> Path:
    """Validation loss against tokens, one line per arm (``label -> [(tokens, loss)]``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", label=label, markersize=3)
    return finish(fig, ax, out_png, title, "training tokens", "validation loss", legend_size=8)


def plot_params_vs_loss(points: list[dict], out_png: Path, title: str) -> Path:
    """Non-embedding parameters (log x) against final validation loss; ``points`` have label, params, loss, spread."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for p in points:
        ax.errorbar(p["params"], p["loss"], yerr=p.get("spread") or 0.0, fmt="o", capsize=3, label=p["label"])
        ax.annotate(p["label"], (p["params"], p["loss"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)  # room for the labels beside the outermost points
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("final validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_lr_sweep(sweeps: dict[str, list[tuple[float, float, float]]], out_png: Path, title: str) -> Path:
    """Final validation loss against learning rate (log x), one line per arm; its best rate ringed.

    ``sweeps``: ``label -> [(learning_rate, val_loss, spread), ...]``; non-finite losses (diverged runs) are left out.
    """

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, points in sweeps.items():
        points = sorted(p for p in points if p[1] is not None and math.isfinite(p[1]))
        if not points:
            continue
        xs, ys, spread = zip(*points)
        line = ax.errorbar(xs, ys, yerr=[s or 0.0 for s in spread], fmt="o-", capsize=3, markersize=4, label=label)
        best = min(points, key=lambda p: p[1])
        ax.plot([best[0]], [best[1]], "o", markersize=11, markerfacecolor="none", color=line[0].get_color())
    return finish(fig, ax, out_png, title, "peak learning rate", "final validation loss", log_x=True, legend_size=8)


def plot_scaling(curves: dict[str, dict], out_png: Path, title: str) -> Path:
    """Final validation loss against non-embedding parameters (log x): measured points and fitted curves.

    ``curves``: ``label -> {"points": [(N, loss, spread), ...], "curve": callable N -> loss or None}``.
    """
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, c in curves.items():
        if not c["points"]:
            continue
        xs, ys, spread = zip(*sorted(c["points"]))
        line = ax.errorbar(xs, ys, yerr=[s or 0.0 for s in spread], fmt="o", capsize=3, label=label)
        if c.get("curve") is not None:  # drawn over the family's measured range only: no extrapolation
            grid = np.geomspace(min(xs) / 1.15, max(xs) * 1.15, 100)
            ax.plot(grid, [c["curve"](n) for n in grid], "--", color=line[0].get_color(), alpha=0.8)
    return finish(fig, ax, out_png, title, "non-embedding parameters N", "final validation loss (dashed: fit a·N^-b + c)",
                   log_x=True, legend_size=8)


def plot_budgets(series: dict[str, list[tuple[int, float, float]]], out_png: Path, title: str) -> Path:
    """Final validation loss against the training budget in tokens (log x), one line per arm."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, points in series.items():
        if points:
            xs, ys, spread = zip(*sorted(points))
            ax.errorbar(xs, ys, yerr=[s or 0.0 for s in spread], fmt="o-", capsize=3, markersize=4, label=label)
    return finish(fig, ax, out_png, title, "training tokens (each point: a run planned for that budget)",
                   "final validation loss", log_x=True, legend_size=8)


def plot_compute(results: dict, out_png: Path) -> Path:
    """Two panels: final validation loss against training FLOPs (analytic) and against the runs' wall-clock
    seconds (median over seeds), log x, one line per arm: the equal-compute view of a budget series."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, arm in results["arms"].items():
        points = [p for p in arm["points"] if p["val_loss"] is not None]
        flops = sorted((p["train_flops"], p["val_loss"]) for p in points if p.get("train_flops"))
        walls = sorted((p["run_wall_seconds"], p["val_loss"]) for p in points if p.get("run_wall_seconds"))
        if flops:
            left.plot(*zip(*flops), "o-", markersize=4, label=label)
        if walls:
            right.plot(*zip(*walls), "o-", markersize=4, label=label)
    from matplotlib.ticker import NullFormatter

    for ax, xlabel in ((left, "training FLOPs (analytic, kphi.params)"), (right, "wall-clock seconds per run (median over seeds)")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks of a short log range overlap
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final validation loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_panels(fig, out_png, f"{results['suite']}: loss against compute")


def plot_differences(results: dict, out_png: Path) -> Path:
    """The subject arm minus every other arm (final validation loss) against the budget, with the combined
    seed spread as error bars and zero drawn: below the line the subject is better."""
    plt = pyplot()
    diff = results["differences"]
    per_parameter = bool(results.get("tokens_per_parameter"))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, rows in diff["against"].items():
        if rows:
            xs = [r["tokens_per_parameter"] if per_parameter else r["budget"] for r in rows]
            ax.errorbar(xs, [r["difference"] for r in rows], yerr=[r["spread"] for r in rows], fmt="o-", capsize=3,
                        markersize=4, label=f"{diff['subject']} minus {label}")
    ax.axhline(0.0, color="black", linewidth=1)
    xlabel = "training tokens per dense non-embedding parameter" if per_parameter else "training tokens"
    return finish(fig, ax, out_png, f"{results['suite']}: {diff['subject']}'s lead (below zero: lower loss)", xlabel,
                   "difference in final validation loss", log_x=True, legend_size=8)


def plot_leads(series: dict[str, dict], out_png: Path, title: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Several series' leads on one plot (e.g. one per width): each series' subject minus each other arm
    against tokens per dense non-embedding parameter (training tokens where a series has no such ratios), one
    colour per series and one line style per other arm, zero drawn. Returns the points drawn,
    ``{series: {arm: [(x, difference), ...]}}``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles, colours = ["o-", "s--", "^:", "d-."], plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for n, (name, results) in enumerate(series.items()):
        diff = results.get("differences") or {}
        for m, (label, rows) in enumerate((diff.get("against") or {}).items()):
            points = [(r["tokens_per_parameter"] or r["budget"], r["difference"]) for r in rows]
            if points:
                drawn.setdefault(name, {})[label] = points
                ax.plot(*zip(*points), styles[m % len(styles)], color=colours[n % len(colours)], markersize=4,
                        label=f"{name}: {diff['subject']} minus {label}")
    ax.axhline(0.0, color="black", linewidth=1)
    finish(fig, ax, out_png, title, "training tokens per dense non-embedding parameter",
           "difference in final validation loss (below zero: lower)", log_x=True, legend_size=7)
    return drawn


def plot_compress(results: dict, out_png: Path) -> Path:
    """Two panels: validation loss right after each fit; after healing (plain and distilled), with the dense
    teacher and the from-scratch model as reference lines."""
    plt = pyplot()
    arms = dict(results["arms"])
    arms.update(results.get("other_architecture") or {})
    labels = list(arms)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = range(len(labels))
    left.bar(xs, [arms[a]["val_loss_after_fit"] for a in labels], color="tab:gray")
    left.axhline(results["teacher"]["val_loss"], color="black", linestyle="--", linewidth=1, label="dense teacher")
    left.legend(fontsize=8)
    left.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("validation loss")
    left.set_title("right after the fit")
    width = 0.38
    right.bar([x - width / 2 for x in xs], [arms[a]["healed"]["plain"]["val_loss"] for a in labels], width, label="healed (plain)")
    right.bar([x + width / 2 for x in xs], [arms[a]["healed"]["distill"]["val_loss"] for a in labels], width, label="healed (distillation)")
    right.axhline(results["teacher"]["val_loss"], color="black", linestyle="--", linewidth=1, label="dense teacher")
    if results.get("scratch"):
        right.axhline(results["scratch"]["val_loss"], color="tab:red", linestyle=":", linewidth=1.5, label=results["scratch"]["label"])
    healed = [arms[a]["healed"][m]["val_loss"] for a in labels for m in ("plain", "distill")]
    refs = [results["teacher"]["val_loss"]] + ([results["scratch"]["val_loss"]] if results.get("scratch") else [])
    low, high = min(healed + refs), max(healed + refs)
    right.set_ylim(low - 0.1 * (high - low + 0.1), high + 0.1 * (high - low + 0.1))
    right.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    right.set_title(f"after healing ({results['heal_tokens']:,} tokens)")
    right.legend(fontsize=8)
    return save_panels(fig, out_png, f"{results['suite']}: compressing a trained dense model")


def plot_structure(results: dict, out_png: Path) -> Path:
    """Bits per byte on held-out text against the share of non-embedding parameters kept (log y), one line per
    kind and fit (fits of every projection only), with the source model and a uniform guess as reference lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results["fits"]:
        if not r["targets"]:
            series.setdefault(f"{r['kind']['kind']} ({r['fit']})", []).append((r["percent_kept"], r["bits_per_byte"]))
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "o-", markersize=4, label=label)
    ax.axhline(results["source"]["bits_per_byte"], color="black", linestyle="--", linewidth=1, label="source (dense)")
    ax.axhline(results["uniform_bits_per_byte"], color="grey", linestyle=":", linewidth=1.5, label="uniform guess")
    ax.set_yscale("log")
    return finish(fig, ax, out_png, f"{results['suite']}: structured projections fitted to a pretrained model",
                   "non-embedding parameters kept (%)", "bits per byte on held-out text", legend_size=8)


def plot_heal_curves(healed: list[dict], out_png: Path, title: str, source: float | None = None) -> Path:
    """Bits per byte on the healing text's validation rows against healing tokens, one line per healed fit, and
    the source model's on the same rows as a reference line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if source:
        ax.axhline(source, color="black", linestyle="--", linewidth=1, label="source (dense)")
    for h in healed:
        if h.get("curve"):
            ax.plot([p["tokens"] for p in h["curve"]], [p["bits_per_byte"] for p in h["curve"]], "o-", markersize=4,
                    label=h["label"])
    return finish(fig, ax, out_png, title, "healing tokens", "bits per byte (healing text, validation rows)", legend_size=8)
