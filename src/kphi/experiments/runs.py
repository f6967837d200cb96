"""The one train-or-reuse step of every experiment: compare (and budgets and scaling through it), compress
and the healing of structure suites.

:func:`get_or_train` owns the three things each experiment used to decide for itself:

* **reuse** — a run directory holding a finished run of exactly these settings (its recorded identity and its
  initial-weight hash match what this code would train) is read back, never retrained; one trained with
  other settings is refused, so a changed arm never silently mixes with old results;
* **resume** — a run directory with a run record but no final metrics is an interrupted run, continued from
  its newest complete checkpoint;
* **divergence** — a run whose loss became NaN/inf is a *result*: it is recorded (``diverged.json``, reused
  like a finished run) and returned with ``"diverged"`` set and no losses. A learning-rate grid reports it
  as such; a step that cannot go on without that run (a teacher, a healing run) calls :func:`converged`,
  which turns it into one clear error. Before this module, compare recorded a divergence and compress
  failed on it.

Every failure a user can cause is an :class:`ExperimentError` whose message names the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import ExperimentError
from ..files import atomic_write_text
from ..train import METRICS_FILE, RUN_FILE, initial_weights_sha256, train
from ..training.run_records import identity_differences, recorded_version
from ..training.train_settings import DivergedError, TrainError

__all__ = ["DIVERGED_FILE", "finished_metrics_file", "RESULTS_JSON", "RESULTS_MD", "ExperimentError", "converged", "finished_run", "get_or_train",
           "write_results", "command_line"]

DIVERGED_FILE = "diverged.json"
#: Every experiment's results: the numbers, and the table a reader looks at.
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def finished_metrics_file(run_dir: Path) -> Path | None:
    """The file that marks ``run_dir`` finished: its metrics, or the record of its divergence; ``None`` yet."""
    return next((f for f in (Path(run_dir) / METRICS_FILE, Path(run_dir) / DIVERGED_FILE) if f.is_file()), None)


def finished_run(run_dir: Path, settings, config=None) -> dict[str, Any] | None:
    """The metrics of a finished (or diverged) run of exactly these settings; ``None`` when it has yet to
    (finish) training. A run of other settings or other initial weights is refused, not reused."""
    run_dir = Path(run_dir)
    metrics_file = finished_metrics_file(run_dir)
    if metrics_file is None:
        return None
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        recorded = record.get("identity")
        metrics = json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise ExperimentError(f"{run_dir} is damaged ({err}); move it away to retrain that run") from None

    if identity_differences(recorded, settings, config, recorded_version(record)):
        raise ExperimentError(f"{run_dir} was trained with other settings (the arm changed); choose another --out")
    # runs recorded before records carried the hash cannot be told apart and are reused as they are
    started_from = record.get("initial_weights_sha256")
    if started_from is not None and started_from != initial_weights_sha256(settings, config):
        raise ExperimentError(
            f"{run_dir} started from other initial weights than this code builds for it (the initialisation "
            f"changed since it was trained); move it away to retrain that run"
        )
    return metrics


def get_or_train(settings, config=None, *, label: str, log: Callable[[str], None] = print,
                 announce: str | None = None) -> tuple[dict[str, Any], bool]:
    """``(metrics, reused)`` of the run ``settings.out``: reused if finished, resumed if interrupted, else trained.

    ``config`` is the model configuration when the run is not built from ``settings.preset``/``init_from``;
    ``announce`` is logged when training (or resuming) starts.
    A diverged run comes back as ``{"seed", "diverged": message, "train_loss": None, "val_loss": None, ...}``
    (see the module docstring); any other training failure raises :class:`ExperimentError` naming ``label``.
    """
    run_dir = Path(settings.out)
    metrics = finished_run(run_dir, settings, config)
    if metrics is not None:
        return metrics, True
    if announce:
        log(announce)
    try:
        metrics = train(settings, resume=(run_dir / RUN_FILE).is_file(), config=config).metrics
    except DivergedError as err:
        metrics = {"seed": settings.seed, "train_loss": None, "val_loss": None, "diverged": str(err), "wall_seconds": 0.0}
        atomic_write_text(run_dir / DIVERGED_FILE, json.dumps(metrics, indent=2))
        log(f"    {label}: diverged: {err}")
    except TrainError as err:
        raise ExperimentError(f"{label} failed: {err}") from err
    return metrics, False


def converged(metrics: dict[str, Any], label: str, remedy: str) -> dict[str, Any]:
    """``metrics`` of a run the experiment cannot go on without; a diverged one is an error saying ``remedy``."""
    if metrics.get("diverged"):
        raise ExperimentError(f"{label} diverged ({metrics['diverged']}); {remedy}")
    return metrics


def write_results(out: Path, results: dict[str, Any], table: str) -> None:
    """Write an experiment's ``results.json`` (``results``, indented) and ``results.md`` (``table``) into
    ``out``, each replaced atomically: the one results writer of compare, budgets, scaling, compress and
    structure (their plots are their own)."""
    out = Path(out)
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=2))
    atomic_write_text(out / RESULTS_MD, table + "\n")


def command_line() -> str | None:
    """The ``kphi ...`` command this process runs (recorded in results files), or ``None`` from Python."""
    if sys.argv and Path(sys.argv[0]).name in ("kphi", "__main__.py"):
        return "kphi " + " ".join(sys.argv[1:])
    return None
