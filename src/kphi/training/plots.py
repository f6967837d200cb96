"""PNG figures of one training run (matplotlib, headless), and the figure helpers the experiments' plots use."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..files import atomic_write_bytes

__all__ = ["finish", "plot_loss_curve", "pyplot", "read_log", "save_figure", "save_panels"]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: Path) -> Path:
    """Write ``fig`` to ``out_png`` as a 120-dpi PNG, atomically (two processes finishing one comparison
    may both draw it; a reader sees one whole figure), and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    pyplot().close(fig)
    atomic_write_bytes(out_png, buffer.getvalue())
    return out_png


def finish(fig, ax, out_png: Path, title: str, xlabel: str, ylabel: str, log_x: bool = False, legend_size=None) -> Path:
    """Labels, grid, legend; save as PNG and close the figure."""
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both" if log_x else "major")
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return save_figure(fig, out_png)


def save_panels(fig, out_png: Path, title: str) -> Path:
    """A figure of several panels: one title above them all; save as PNG and close the figure."""
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png)


def read_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``log.csv`` -> ``{"train_loss": [(tokens, loss), ...], "val_loss": [...]}``."""
    series: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key in series:
                if row.get(key):
                    series[key].append((int(row["tokens"]), float(row[key])))
    return series


def plot_loss_curve(log_csv: Path, out_png: Path, title: str) -> Path:
    """Train and validation loss against tokens seen, for one run."""
    plt = pyplot()
    series = read_log(log_csv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        if series[key]:
            xs, ys = zip(*series[key])
            ax.plot(xs, ys, style, label=key.replace("_", " "), markersize=3)
    return finish(fig, ax, out_png, title, "tokens", "cross-entropy loss")
