"""``kphi compare``: the report's table as an experiment anyone can rerun, with controls it lacked.

A *suite* (YAML in ``kphi/suites/``) lists arms and one set of training settings. Every arm trains on the
same prepared data, in the same order (same seed), for the same number of tokens. Arms are presets, or
*controls* derived from them (:mod:`kphi.experiments.arms`) so a reader can tell whether grouping beats simply
having fewer parameters; the suite file's every key is :mod:`kphi.experiments.suites`'.

Any arm may change its preset's config (``config: {...}``; for a control, the base's), and carry its own
training settings (``training: {...}``), ``learning_rate`` or ``learning_rates``.

Outputs in ``--out``: ``results.json`` (``arms``: label, model, layers, intermediate_size,
non_embedding, percent, train/val loss mean and spread over seeds, tokens/s, each arm's config),
``results.md`` (the table), ``val_loss.png`` (validation loss against tokens, all arms) and
``params_vs_loss.png``; each arm's run directory under ``arms/``.

**Learning rates.** Each arm trains at its own ``learning_rate`` (an arm field; the suite's otherwise). A
suite's ``learning_rates: [...]`` (or ``--learning-rates``) makes a grid instead: every arm trains at
every rate on identical data and order, its row reports its best rate, ``results.json`` keeps the whole
grid per arm (``grid``: rate -> losses and runs) and ``lr_sweep.png`` plots final validation loss against
rate. Rates are compared on the first seed; with ``--seeds N`` the other seeds train only at each arm's
best rate, and the row gives their mean and spread. A best rate at the edge of the grid is flagged
(``warnings``); a suite's ``extend_grid: N`` instead grows each such arm's grid by up to N rates, one step
past that edge at a time (:func:`rate_past_edge`), until its best is interior. Runs are keyed by arm, rate and
seed (``arms/LABEL-lrRATE-seedSEED``), so a grid or a seed list can be extended in the same ``--out`` and only
the new runs train.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.prepare import PrepareSettings, prepare_dataset
from ..errors import ExperimentError
from ..files import atomic_write_text, exclusive_lock, refuse_foreign_dir, slug
from ..sources.auto import config_fields
from ..train import TrainError, resolve_settings
from ..training.plots import read_log
from ..training.train_settings import tokens_per_step, training_value
from .arms import Arm, arm_rates, non_embedding, resolve_arms, run_dir_name
from .plots import plot_compare_curves, plot_lr_sweep, plot_params_vs_loss
from .runs import command_line, finished_metrics_file, get_or_train, write_results
from .suites import Suite

__all__ = ["Comparison", "CompareError", "best_rate", "format_plan", "format_table", "rate_past_edge", "run_compare", "run_plan"]


#: A comparison cannot run as asked: the experiment layer's one error (:class:`kphi.errors.ExperimentError`), under
#: the name compare's callers have always caught.
CompareError = ExperimentError


def _machine() -> dict[str, Any]:
    """Where a comparison ran. The CPU model and torch's vector ISA are recorded because float results (and,
    through training, losses in the third decimal) differ between CPUs even at equal code, seed and threads."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
    }


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{names[0]} ({' '.join(isa)})" if names else None


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _comparison_identity(suite: Suite, data: str | None, max_tokens: int | None) -> dict[str, Any]:
    """What every run of a comparison directory shares: data and training, but not arms, rates or seeds.

    Arms, rates and seeds may be added to an existing ``--out``; each run directory checks its own settings.
    """
    training = {k: v for k, v in suite.training.items() if k != "learning_rate"}
    return {"data": {**suite.data, **({"source": data} if data else {})}, "training": training, "max_tokens": max_tokens}


def _claim_out_dir(out: Path, identity: dict[str, Any]) -> None:
    """Make ``out`` this comparison's directory (``kphi-compare.json`` records its identity): refuse a directory
    that holds another comparison or anything else."""
    marker = out / "kphi-compare.json"
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text()).get("identity")
        except (OSError, json.JSONDecodeError, AttributeError):
            raise CompareError(f"{marker} is unreadable; choose another --out") from None
        if previous != identity:
            raise CompareError(f"{out} holds a different comparison (other data or training settings); choose another --out")
    else:
        refuse_foreign_dir(out, False, "kphi comparison", "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"identity": identity}, indent=2))


def run_compare(
    suite: Suite,
    out: Path,
    seeds: int | None = None,
    data: str | None = None,
    max_tokens: int | None = None,
    learning_rates: list[float] | None = None,
    progress: bool = True,
    log=print,
    only_arms: list[str] | None = None,
    wait: bool = True,
) -> dict[str, Any] | None:
    """Train every arm of ``suite`` at each of its rates and seeds, write the results; returns ``results.json``.

    ``only_arms`` (labels) trains and reports only those arms; the others still size the controls that
    match them and the baseline still sets the percentages (e.g. to re-run the arms a code change affected).
    ``wait=False`` trains what it can and returns ``None`` instead of waiting for a run another process holds
    (:func:`run_plan` then goes on to its next comparison and comes back).
    """

    seeds = suite.seeds if seeds is None else seeds
    if seeds < 1:
        raise CompareError(f"--seeds must be at least 1, got {seeds}")
    arms = resolve_arms(suite)
    baseline_params = non_embedding(next(a.config for a in arms if a.label == suite.baseline))
    arms = select_arms(arms, only_arms, suite.name)
    out = Path(out)
    _claim_out_dir(out, _comparison_identity(suite, data, max_tokens))
    training = dict(suite.training) if max_tokens is None else training_at_budget(suite.training, max_tokens)
    data_settings = {**suite.data, **({"source": data} if data is not None else {})}
    context_length = training_value(training, "context_length")
    prepared = prepare_dataset(PrepareSettings(context_length=context_length, **data_settings), progress=progress)

    started = time.perf_counter()
    first_seed = int(training_value(training, "seed"))
    extra_seeds = list(range(first_seed + 1, first_seed + seeds))
    tuning = [(arm, rate, first_seed) for arm in arms for rate in arm_rates(arm, suite, learning_rates)]
    trainer = _Runs(out, training, prepared, progress, log, wait, total=len(tuning) + len(arms) * len(extra_seeds))
    # Every rate on the first seed (the same data order for all), the grids grown past an edge that holds an
    # arm's best (extend_grid), then the other seeds at each arm's best rate.
    tuning = _tune(trainer, arms, tuning, suite.extend_grid)
    if tuning is None:
        return None
    best = trainer.by_rate(arms, tuning)
    seeded = [(arm, best_rate(best[arm.label]), seed) for seed in extra_seeds for arm in arms]
    if not trainer.run(seeded):
        return None
    runs = trainer.by_rate(arms, tuning + seeded)

    results = _results(suite, arms, runs, seeds, time.perf_counter() - started, baseline_params)
    results["command"] = command_line()
    _write_outputs(results, out, suite)
    return results


Job = tuple[Arm, float, int]  # an arm, a learning rate, a seed: one run


@dataclass
class _Runs:
    """The runs of one comparison: numbered as they start (``[n/total]``), each trained or read back in its run
    directory, shared with other processes through their locks (:func:`_run_shared`), their metrics kept by
    ``(label, rate, seed)``."""

    out: Path
    training: dict[str, Any]
    prepared: Path
    progress: bool
    log: Callable[[str], None]
    wait: bool
    total: int
    started: int = 0
    metrics: dict[tuple[str, float, int], dict[str, Any]] = field(default_factory=dict)

    def run(self, jobs: list[Job], *, more: bool = False) -> bool:
        """Train (or read back) ``jobs``, ``more`` if ``total`` did not count them; ``False`` when some are left to
        the other processes holding them (only without ``wait``)."""
        self.total += len(jobs) if more else 0
        numbered = list(enumerate(jobs, start=self.started + 1))
        self.started += len(jobs)
        return _run_shared(self.out, numbered, self.total, self._run_one, self.log, self.wait)

    def by_rate(self, arms: list[Arm], jobs: list[Job]) -> dict[str, dict[float, list[dict[str, Any]]]]:
        return _by_rate(arms, jobs, self.metrics)

    def _run_one(self, n: int, arm: Arm, rate: float, seed: int) -> None:
        run_dir = self.out / "arms" / run_dir_name(arm, rate, seed)
        try:
            settings = resolve_settings(
                None,
                **{**self.training, **arm.training, "learning_rate": rate, "out": str(run_dir),
                   "data": str(self.prepared), "seed": seed, "progress": self.progress},
            )
        except (TrainError, ValueError) as err:
            raise CompareError(f"arm {arm.label!r}: {err}") from None
        head = f"[{n}/{self.total}] {arm.label}, lr {rate:g}, seed {seed}"
        m, reused = get_or_train(settings, arm.config, label=f"arm {arm.label!r} (lr {rate:g}, seed {seed})",
                                 log=self.log, announce=f"{head}: {non_embedding(arm.config):,} non-embedding parameters")
        if reused:
            self.log(f"{head}: already trained, reusing {run_dir}")
        elif not m.get("diverged"):
            self.log(f"    train loss {format_loss(m['train_loss'], None, 1)}, val loss {format_loss(m['val_loss'], None, 1)}, "
                     f"{m['tokens_per_second'] or 0:,.0f} tokens/s, {m['wall_seconds']:.0f} s")
        self.metrics[(arm.label, rate, seed)] = m


def _tune(trainer: _Runs, arms: list[Arm], tuning: list[Job], extend_grid: int) -> list[Job] | None:
    """Train every rate of ``tuning`` (the first seed), then grow each arm's grid past the edge that holds its best
    (:func:`rate_past_edge`), up to ``extend_grid`` rates; the jobs trained, or ``None`` when some are left to
    other processes."""
    if not trainer.run(tuning):
        return None
    first_seed = tuning[0][2]
    for _ in range(extend_grid):
        runs = trainer.by_rate(arms, tuning)
        grown = [(arm, rate, first_seed) for arm in arms if (rate := rate_past_edge(runs[arm.label])) is not None]
        if not grown:
            break
        for arm, rate, _seed in grown:
            tried = ", ".join(f"{r:g}" for r in sorted(runs[arm.label]))
            trainer.log(f"{arm.label}: the best rate is at the edge of {tried}; extending the grid to {rate:g}")
        if not trainer.run(grown, more=True):
            return None
        tuning = tuning + grown
    return tuning


def _run_shared(out: Path, jobs: list[tuple[int, Job]], total: int, run_one, log,
                wait: bool = True) -> bool:
    """``run_one(n, arm, rate, seed)`` for every job, sharing them with other processes running the same comparison;
    whether every job was run (``False`` only with ``wait=False``).

    Each run is trained under an exclusive lock (``out/.locks/RUN.lock``), so several ``kphi compare``
    processes given one ``--out`` each train different runs: a run another process holds is put off until the
    others are done, then waited for and read back (or resumed from its checkpoints if that process died) --
    unless ``wait`` is false: then a put-off run still held is left to its holder.
    """
    later = []
    for n, job in jobs:
        if not _run_unless_held(out, n, job, run_one):
            arm, rate, seed = job
            log(f"[{n}/{total}] {arm.label}, lr {rate:g}, seed {seed}: another process is training it; coming back to it")
            later.append((n, job))
    if not wait:
        return all([_run_unless_held(out, n, job, run_one) for n, job in later])  # each tried: no short circuit
    for n, (arm, rate, seed) in later:
        with exclusive_lock(_lock_file(out, run_dir_name(arm, rate, seed))):
            run_one(n, arm, rate, seed)
    return True


def _run_unless_held(out: Path, n: int, job: Job, run_one) -> bool:
    """``run_one`` for ``job`` unless another process holds its lock (``False`` then). A finished run is read back
    without taking the lock, so a held lock always means a run in training."""
    arm, rate, seed = job
    if finished_metrics_file(out / "arms" / run_dir_name(arm, rate, seed)) is not None:
        run_one(n, arm, rate, seed)
        return True
    with exclusive_lock(_lock_file(out, run_dir_name(arm, rate, seed)), wait=False) as held:
        if held:
            run_one(n, arm, rate, seed)
        return held


def _lock_file(out: Path, run_name: str) -> Path:
    """The lock a process holds while it trains ``out/arms/RUN_NAME``."""
    return out / ".locks" / f"{run_name}.lock"


def _by_rate(arms: list[Arm], jobs: list[Job], metrics: dict) -> dict[str, dict[float, list[dict[str, Any]]]]:
    """Each arm's runs by rate, in the order of ``jobs`` (whichever process trained them): label -> rate -> metrics."""
    runs: dict[str, dict[float, list[dict[str, Any]]]] = {arm.label: {} for arm in arms}
    for arm, rate, seed in jobs:
        runs[arm.label].setdefault(rate, []).append(metrics[(arm.label, rate, seed)])
    return runs


@dataclass
class Comparison:
    """One comparison of a larger experiment (a budget of a series, a width of a scaling study): the suite
    to run, the directory its runs go to, and its seeds (``None``: the suite's). Budget series and scaling
    studies are lists of these (:func:`kphi.experiments.budgets.plan_budget_series`, :func:`kphi.experiments.scaling.plan_scaling`),
    run by :func:`run_plan` and shown, untrained, by :func:`format_plan`."""

    label: str
    suite: Suite
    out: Path
    seeds: int | None = None


def run_plan(plan: list[Comparison], *, data: str | None = None, learning_rates: list[float] | None = None,
             progress: bool = True, log=print, only_arms: list[str] | None = None,
             wait: bool = True) -> list[dict[str, Any] | None]:
    """Run each comparison of ``plan`` in order (each resumes and reuses its runs as any comparison does);
    returns their ``results.json`` contents, in plan order.

    Processes sharing a plan do not wait inside it: a comparison whose next step needs a run another process is
    training is put off (after training the runs it can), and the plan is gone through again while any run
    finishes, here or elsewhere. When nothing moves, the first comparison put off is finished, waiting for
    its runs; with ``wait=False`` the process stops there instead, its place ``None``: the process that trains a
    comparison's last run writes its results."""
    results: dict[int, dict[str, Any]] = {}

    def compare(i: int, wait_here: bool) -> None:
        result = run_compare(plan[i].suite, plan[i].out, seeds=plan[i].seeds, data=data, wait=wait_here,
                             learning_rates=learning_rates, progress=progress, log=log, only_arms=only_arms)
        if result is None:
            log(f"== {plan[i].label}: runs another process holds; coming back to it after the others")
        else:
            results[i] = result

    visited: set[int] = set()
    while len(results) < len(plan):
        moved = (len(results), _finished_runs(plan))
        for i in (i for i in range(len(plan)) if i not in results):
            log(f"== {plan[i].label}" + (" (back to it)" if i in visited else ""))
            visited.add(i)
            compare(i, False)
        if len(results) == len(plan) or (len(results), _finished_runs(plan)) != moved:
            continue
        pending = [i for i in range(len(plan)) if i not in results]
        if not wait:
            log(f"== left to the processes that hold their runs: {', '.join(plan[i].label for i in pending)}")
            break
        log(f"== {plan[pending[0]].label} (waiting for its runs)")
        compare(pending[0], True)
    return [results.get(i) for i in range(len(plan))]


def _finished_runs(plan: list[Comparison]) -> int:
    """How many runs of ``plan`` have finished (or diverged), whoever trained them."""
    return sum(finished_metrics_file(run) is not None for c in plan for run in (Path(c.out) / "arms").glob("*"))


def training_at_budget(training: dict[str, Any], tokens: int) -> dict[str, Any]:
    """A suite's ``training:`` with its budget replaced by ``tokens`` per run (``max_steps`` dropped): every
    comparison of a budget series, a scaling width, and ``--max-tokens``."""
    return {**{k: v for k, v in training.items() if k != "max_steps"}, "max_tokens": tokens}


def planned_token_count(training: dict[str, Any]) -> int | None:
    """A suite's budget per run in tokens: its ``max_tokens``, else ``max_steps`` whole steps; ``None`` for a
    budget in minutes."""
    if training.get("max_tokens"):
        return int(training["max_tokens"])
    if training.get("max_steps"):
        return int(training["max_steps"]) * tokens_per_step(training)
    return None


def planned_tokens(training: dict[str, Any]) -> str:
    """A suite's budget per run in words: :func:`planned_token_count`, else minutes."""
    count = planned_token_count(training)
    if count is not None:
        return f"{count:,}"
    return f"{training.get('max_minutes')} min" if training.get("max_minutes") else "?"


def select_arms(arms: list[Arm], only_arms: list[str] | None, suite_name: str) -> list[Arm]:
    """The arms labelled in ``only_arms`` (``--arms``), in the suite's order; all of them when it is empty."""
    if not only_arms:
        return arms
    unknown = sorted(set(only_arms) - {a.label for a in arms})
    if unknown:
        raise CompareError(f"--arms: no arm {', '.join(map(repr, unknown))} in suite {suite_name} "
                           f"(arms: {', '.join(a.label for a in arms)})")
    return [a for a in arms if a.label in only_arms]


def planned_runs(comparison: Comparison, arm: Arm, learning_rates: list[float] | None = None) -> list[str]:
    """The run directory names an arm has in ``comparison``, as glob patterns: every rate on the first seed (exact
    names; with ``extend_grid``, the rates :func:`grown_rates` finds too), then one run per further seed at the
    best rate (``NAME-lr*-seedN``: the rate is known only once the first seed has finished)."""
    rates = arm_rates(arm, comparison.suite, learning_rates)
    return _run_patterns(comparison, arm, rates + grown_rates(comparison, arm, rates))


def _run_patterns(comparison: Comparison, arm: Arm, rates: list[float]) -> list[str]:
    """:func:`planned_runs` for a first-seed grid of ``rates`` already grown."""
    seeds = comparison.suite.seeds if comparison.seeds is None else comparison.seeds
    first = int(training_value(comparison.suite.training, "seed"))
    names = [run_dir_name(arm, rate, first) for rate in rates]
    return names + [f"{slug(arm.label, 'arm')}-lr*-seed{seed}" for seed in range(first + 1, first + seeds)]


def grown_rates(comparison: Comparison, arm: Arm, rates: list[float]) -> list[float]:
    """The rates ``extend_grid`` has added to ``arm``'s first-seed grid of ``rates`` so far, found as :func:`_tune`
    finds them: while every rate of the grid has a finished run in ``comparison.out``, the next is
    :func:`rate_past_edge` of their losses, up to ``extend_grid`` of them. Nothing is guessed from other run
    directories, so a run kept out of the grid is never counted."""
    first = int(training_value(comparison.suite.training, "seed"))
    runs: dict[float, list[dict[str, Any]]] = {}
    grown: list[float] = []
    for rate in rates + [None] * comparison.suite.extend_grid:
        if rate is None:  # every rate so far finished: one step past the edge, if the best is on one
            rate = rate_past_edge(runs)
            if rate is None:
                break
            grown.append(rate)
        path = finished_metrics_file(Path(comparison.out) / "arms" / run_dir_name(arm, rate, first))
        if path is None:
            break
        runs[rate] = [json.loads(path.read_text())]
    return grown


def format_plan(plan: list[Comparison], learning_rates: list[float] | None = None,
                only_arms: list[str] | None = None) -> str:
    """What ``plan`` trains, as a table, without training (``kphi compare --dry-run``): per comparison and arm
    (``only_arms`` as ``--arms`` selects them) its non-embedding parameters, tokens per run, rates (all on the
    first seed; those ``extend_grid`` has added so far named after them), seeds (the others at the best rate),
    runs, how many of those runs its directory already holds finished (they will be reused) and how many another
    process is training now (each named below the table with the tokens its ``log.csv`` has logged), so a series
    shared by several processes can be watched."""
    lines = ["| comparison | arm | non-emb. params | tokens per run | learning rates | seeds | runs | finished | in training |",
             "|:--|:--|--:|--:|:--|--:|--:|--:|--:|"]
    planned_total = finished_total = 0
    training_now: list[str] = []
    for comparison in plan:
        seeds = comparison.suite.seeds if comparison.seeds is None else comparison.seeds
        tokens, budget = planned_tokens(comparison.suite.training), planned_token_count(comparison.suite.training)
        for arm in select_arms(resolve_arms(comparison.suite), only_arms, comparison.suite.name):
            rates = arm_rates(arm, comparison.suite, learning_rates)
            grown = grown_rates(comparison, arm, rates)
            arms_dir = Path(comparison.out) / "arms"
            done = [next(iter(sorted(arms_dir.glob(pattern))), arms_dir / "-")
                    for pattern in _run_patterns(comparison, arm, rates + grown)]
            unfinished = [d for d in done if finished_metrics_file(d) is None]
            finished = len(done) - len(unfinished)
            held = [_in_training(Path(comparison.out), d, budget) for d in unfinished]
            training_now += [line for line in held if line]
            planned_total, finished_total = planned_total + len(done), finished_total + finished
            grows = (f" (+ up to {comparison.suite.extend_grid} past an edge{': ' if grown else ''}"
                     f"{', '.join(f'{r:g}' for r in grown)})") if comparison.suite.extend_grid else ""
            lines.append(f"| {comparison.label} | {arm.label} | {non_embedding(arm.config):,} | {tokens} | "
                         f"{', '.join(f'{r:g}' for r in rates)}{grows} | {seeds} | {len(done)} | {finished} | "
                         f"{sum(map(bool, held))} |")
    lines.append(f"\n{planned_total} runs, {finished_total} of them finished (reused), {len(training_now)} in training "
                 "by another process; nothing was trained.")
    return "\n".join(lines + [f"- in training: {line}" for line in training_now])


def _in_training(out: Path, run_dir: Path, budget: int | None) -> str | None:
    """``run_dir``, the tokens it has trained so far of its ``budget`` and its latest validation loss (from its
    ``log.csv``) while another process holds its lock; ``None`` when none does. Only an existing lock file is
    tried, so a dry run writes nothing; a free lock is held for an instant, and a process that finds it held then
    comes back to the run later."""
    lock = _lock_file(out, run_dir.name)
    if not lock.is_file():
        return None
    with exclusive_lock(lock, wait=False) as free:
        if free:
            return None
    try:
        log = read_log(run_dir / "log.csv")
        tokens = log["train_loss"][-1][0]
    except (OSError, IndexError, ValueError):  # not logged yet, or a row half-written this instant
        return f"{run_dir.relative_to(out.parent)}: no step logged yet"
    of = f" of {budget:,} tokens ({tokens / budget:.0%})" if budget else " tokens"
    trained = f"{tokens:,}{of} trained so far"
    if log["val_loss"]:
        at, loss = log["val_loss"][-1]
        trained += f"; validation loss {loss:.3f} at {at:,} tokens"
    return f"{run_dir.relative_to(out.parent)}: {trained}"


def _summary(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    train_mean, train_spread = _mean_spread([m["train_loss"] for m in metrics])
    val_mean, val_spread = _mean_spread([m["val_loss"] for m in metrics])
    tps, _ = _mean_spread([m.get("tokens_per_second") for m in metrics])
    return {
        "train_loss": train_mean,
        "train_loss_std": train_spread,
        "val_loss": val_mean,
        "val_loss_std": val_spread,
        "tokens_per_second": tps,
        "wall_seconds": round(sum(m.get("wall_seconds", 0.0) for m in metrics), 1),
        "tokens": metrics[0].get("tokens") if metrics else None,
        "seeds": [m.get("seed") for m in metrics],
        "runs": [{k: m.get(k) for k in ("seed", "train_loss", "val_loss", "tokens_per_second", "wall_seconds", "val_curve")} for m in metrics],
    }


def best_rate(runs_by_rate: dict[float, list[dict[str, Any]]]) -> float:
    """The rate whose first-seed run has the lowest validation loss (diverged or missing losses never win).

    Rates are compared on one seed, i.e. on identical data order and initialisation; the other seeds only
    train at the winner, to give its spread.
    """
    def key(rate):
        loss = runs_by_rate[rate][0].get("val_loss")
        return loss if loss is not None and math.isfinite(loss) else math.inf

    return min(sorted(runs_by_rate), key=key)


def rate_past_edge(runs_by_rate: dict[float, list[dict[str, Any]]]) -> float | None:
    """The next rate to try when the best (:func:`best_rate`) is the lowest or highest of two or more rates: one
    step past that edge, the step being the ratio of the two rates there (rates ``r1 < r2 < ...`` with the best at
    ``r1`` give ``r1**2 / r2``; at ``rn``, ``rn**2 / r(n-1)``), to six significant figures; ``None`` when the best
    is interior or there is no grid."""
    rates = sorted(runs_by_rate)
    if len(rates) < 2:
        return None
    best = best_rate(runs_by_rate)
    if best == rates[0]:
        edge, inner = rates[0], rates[1]
    elif best == rates[-1]:
        edge, inner = rates[-1], rates[-2]
    else:
        return None
    return float(f"{edge * edge / inner:.6g}")


def _results(suite: Suite, arms: list[Arm], runs: dict[str, dict[float, list[dict]]], seeds: int, wall: float,
             baseline_params: int) -> dict[str, Any]:
    rows, warnings = [], []
    for arm in arms:
        grid = {rate: _summary(metrics) for rate, metrics in sorted(runs[arm.label].items())}
        chosen = best_rate(runs[arm.label])
        at_edge = len(grid) > 1 and chosen in (min(grid), max(grid))
        if at_edge:
            side = "lowest" if chosen == min(grid) else "highest"
            warnings.append(f"{arm.label}: the best rate {chosen:g} is the {side} of the grid; extend the grid past it")
        params = non_embedding(arm.config)
        rows.append(
            {
                "label": arm.label,
                "model": arm.model,
                "kind": arm.kind,
                "source": arm.source,
                "layers": arm.config.num_hidden_layers,
                "hidden_size": arm.config.hidden_size,
                "intermediate_size": arm.config.intermediate_size,
                "non_embedding": params,
                "percent": round(100.0 * params / baseline_params, 1),
                "learning_rate": chosen,
                "lr_at_edge": at_edge,
                **grid[chosen],
                "grid": {f"{rate:g}": {"learning_rate": rate, **summary} for rate, summary in grid.items()},
                "training": arm.training,
                "config": config_fields(arm.config),
            }
        )
    return {
        "suite": suite.name,
        "description": suite.description,
        "baseline": suite.baseline,
        "seeds": seeds,
        "machine": _machine(),
        "wall_seconds": round(wall, 1),
        "training": suite.training,
        "warnings": warnings,
        "arms": rows,
    }


def format_loss(value: float | None, spread: float | None, seeds: int) -> str:
    """``0.123 ± 0.004`` (mean ± spread over seeds), ``0.123`` for one seed, ``-`` when missing."""
    if value is None:
        return "-"
    return f"{value:.3f} ± {spread:.3f}" if seeds > 1 else f"{value:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """The report's table (markdown) with each arm's learning rate, plus throughput and time."""
    seeds = results["seeds"]
    lines = [
        "| label | model | layers | interm. dims | non-emb. params | % | lr | train loss | val loss | tokens/s | wall s |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for a in results["arms"]:
        tps = f"{a['tokens_per_second']:,.0f}" if a["tokens_per_second"] else "-"
        rate = f"{a['learning_rate']:g}" + (" (edge)" if a.get("lr_at_edge") else "")
        lines.append(
            f"| {a['label']} | {a['model']} | {a['layers']} | {a['intermediate_size']} | {a['non_embedding']:,} | "
            f"{a['percent']:.1f}% | {rate} | {format_loss(a['train_loss'], a['train_loss_std'], seeds)} | "
            f"{format_loss(a['val_loss'], a['val_loss_std'], seeds)} | {tps} | {a['wall_seconds']:.0f} |"
        )
    warnings = [f"warning: {w}" for w in results.get("warnings", [])]
    return "\n".join(lines + ([""] + warnings if warnings else []))


def _write_outputs(results: dict[str, Any], out: Path, suite: Suite) -> None:
    curves = {}
    for arm in results["arms"]:
        by_tokens: dict[int, list[float]] = {}
        for run in arm["runs"]:
            for tokens, loss in run.get("val_curve") or []:
                by_tokens.setdefault(int(tokens), []).append(loss)
        curves[arm["label"]] = sorted((t, statistics.fmean(v)) for t, v in by_tokens.items())
    plot_compare_curves(curves, out / "val_loss.png", f"kphi compare ({suite.name}): validation loss")
    points = [
        {"label": a["label"], "params": a["non_embedding"], "loss": a["val_loss"], "spread": a["val_loss_std"]}
        for a in results["arms"]
        if a["val_loss"] is not None and math.isfinite(a["val_loss"])
    ]
    plot_params_vs_loss(points, out / "params_vs_loss.png", f"kphi compare ({suite.name}): parameters vs loss")
    if any(len(a["grid"]) > 1 for a in results["arms"]):
        sweeps = {
            a["label"]: [(g["learning_rate"], g["val_loss"], g["val_loss_std"]) for g in a["grid"].values()]
            for a in results["arms"]
        }
        plot_lr_sweep(sweeps, out / "lr_sweep.png", f"kphi compare ({suite.name}): final validation loss vs learning rate")
    write_results(out, results, format_table(results))
