"""Carry a budget series' finished runs across machines that keep only what git holds.

    python scripts/seed-runs.py docs/results/cpu-text-w64 runs/cpu-text-w64             # before resuming
    kphi compare --suite cpu-text-w64 --out runs/cpu-text-w64
    python scripts/seed-runs.py --collect runs/cpu-text-w64 docs/results/cpu-text-w64   # then git add, commit

Each finished run of a series is committed as two small files beside its budget's results: NAME.json (the
run's metrics.json; NAME.diverged.json for a run that diverged, its diverged.json) and NAME.run.json (its
kphi-run.json: settings, identity and initial-weight hash).
Each budget's comparison marker (kphi-compare.json: the data and training settings its runs share) is committed
beside them, so that compare accepts the seeded directory as its own.
Seeding copies them into OUT/tokens-N/arms/NAME/ and OUT/tokens-N/; what is already there is left as it is.
Nothing is trusted on the copy's word: before reusing a run, compare checks its recorded identity against the
suite's settings, rebuilds its initial weights to compare their hash, and refuses a run that differs.

``--collect`` goes the other way: every finished run not yet committed, and each finished budget's
results.json, results.md and plots when its table changed, unless the new table lacks an arm the committed one
has (a pass over some arms, ``kphi compare --arms``, rewrites each budget's table with those arms only).
"""
import filecmp
import json
import shutil
import sys
from pathlib import Path

RECORD = "kphi-run.json"
MARKER = "kphi-compare.json"
#: What marks a run finished (as kphi.experiments.runs reads it) -> its committed name's suffix.
FINISHED = {"metrics.json": ".json", "diverged.json": ".diverged.json"}


def seed(results: Path, out: Path) -> int:
    copied = 0
    for record in sorted(results.glob("tokens-*/*.run.json")):
        name = record.name.removesuffix(".run.json")
        run_dir = out / record.parent.name / "arms" / name
        finished = [(record.with_name(name + suffix), marker) for marker, suffix in FINISHED.items()
                    if record.with_name(name + suffix).is_file()]
        if not finished or run_dir.exists():
            continue
        run_dir.mkdir(parents=True)
        shutil.copyfile(record, run_dir / RECORD)
        shutil.copyfile(finished[0][0], run_dir / finished[0][1])
        copied += 1
    for marker in sorted(results.glob(f"tokens-*/{MARKER}")):
        if (out / marker.parent.name).is_dir() and not (out / marker.parent.name / MARKER).exists():
            shutil.copyfile(marker, out / marker.parent.name / MARKER)
    return copied


def collect(out: Path, results: Path) -> list[str]:
    changed = []
    for record in sorted(out.glob(f"tokens-*/arms/*/{RECORD}")):
        run_dir = record.parent
        budget = results / run_dir.parent.parent.name
        finished = [marker for marker in FINISHED if (run_dir / marker).is_file()]
        if not finished or (budget / f"{run_dir.name}.run.json").exists():
            continue
        budget.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / finished[0], budget / (run_dir.name + FINISHED[finished[0]]))
        shutil.copyfile(record, budget / f"{run_dir.name}.run.json")
        changed.append(f"{budget.name}/{run_dir.name}")
    for marker in sorted(out.glob(f"tokens-*/{MARKER}")):
        budget = results / marker.parent.name
        if not (budget / MARKER).is_file() or not filecmp.cmp(marker, budget / MARKER, shallow=False):
            budget.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(marker, budget / MARKER)
            changed.append(f"{budget.name}/{MARKER}")
    for table in sorted(out.glob("tokens-*/results.md")):
        budget = results / table.parent.name
        if (budget / table.name).is_file() and filecmp.cmp(table, budget / table.name, shallow=False) \
                and _same_runs(table.with_name("results.json"), budget / "results.json"):
            continue
        dropped = _dropped_arms(table.with_name("results.json"), budget / "results.json")
        if dropped:  # written by a pass over some arms (kphi compare --arms): the committed table has more
            print(f"{budget.name}/results: kept; the new table lacks {', '.join(dropped)}", file=sys.stderr)
            continue
        budget.mkdir(parents=True, exist_ok=True)
        for made in [table, table.with_name("results.json"), *sorted(table.parent.glob("*.png"))]:
            shutil.copyfile(made, budget / made.name)
        changed.append(f"{budget.name}/results")
    return changed


def _arms(results_json: Path) -> list[dict]:
    return json.loads(results_json.read_text())["arms"]


def _dropped_arms(made: Path, committed: Path) -> list[str]:
    """The arms of the committed table that the new one lacks (none when either cannot be read)."""
    try:
        kept = {arm["label"] for arm in _arms(made)}
        return [arm["label"] for arm in _arms(committed) if arm["label"] not in kept]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _same_runs(made: Path, committed: Path) -> bool:
    """Whether two comparisons' results hold the same arms and runs (a rate added to a grid changes them even
    where the table of best rates stays the same; wall times and commands do not count)."""
    try:
        return _arms(made) == _arms(committed)
    except (OSError, ValueError, KeyError):
        return False


if __name__ == "__main__":
    args = sys.argv[1:]
    collecting = args[:1] == ["--collect"]
    args = args[1:] if collecting else args
    if len(args) != 2 or not Path(args[0]).is_dir():
        sys.exit(__doc__)
    source, target = map(Path, args)
    if collecting:
        print("\n".join(collect(source, target)) or "nothing new")
    else:
        print(f"{seed(source, target)} runs copied into {target}")
