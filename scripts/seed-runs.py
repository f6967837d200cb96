"""Carry a budget series' finished runs across machines that keep only what git holds.

    python scripts/seed-runs.py docs/results/cpu-text-w64 runs/cpu-text-w64             # before resuming
    kphi compare --suite cpu-text-w64 --out runs/cpu-text-w64
    python scripts/seed-runs.py --collect runs/cpu-text-w64 docs/results/cpu-text-w64   # then git add, commit

Each finished run of a series is committed as two small files beside its budget's results: NAME.json (the
run's metrics.json) and NAME.run.json (its kphi-run.json: settings, identity and initial-weight hash).
Seeding copies both into OUT/tokens-N/arms/NAME/; runs already there are left as they are. Nothing is trusted
on the copy's word: before reusing a run, compare checks its recorded identity against the suite's settings,
rebuilds its initial weights to compare their hash, and refuses a run that differs.

``--collect`` goes the other way: every finished run not yet committed, and each finished budget's
results.json, results.md and plots when its table changed.
"""
import filecmp
import shutil
import sys
from pathlib import Path

RECORD, METRICS = "kphi-run.json", "metrics.json"


def seed(results: Path, out: Path) -> int:
    copied = 0
    for record in sorted(results.glob("tokens-*/*.run.json")):
        name = record.name.removesuffix(".run.json")
        metrics = record.with_name(f"{name}.json")
        run_dir = out / record.parent.name / "arms" / name
        if not metrics.is_file() or (run_dir / METRICS).exists() or (run_dir / RECORD).exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record, run_dir / RECORD)
        shutil.copyfile(metrics, run_dir / METRICS)
        copied += 1
    return copied


def collect(out: Path, results: Path) -> list[str]:
    changed = []
    for metrics in sorted(out.glob(f"tokens-*/arms/*/{METRICS}")):
        run_dir = metrics.parent
        budget = results / run_dir.parent.parent.name
        if (budget / f"{run_dir.name}.run.json").exists():
            continue
        budget.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(metrics, budget / f"{run_dir.name}.json")
        shutil.copyfile(run_dir / RECORD, budget / f"{run_dir.name}.run.json")
        changed.append(f"{budget.name}/{run_dir.name}")
    for table in sorted(out.glob("tokens-*/results.md")):
        budget = results / table.parent.name
        if (budget / table.name).is_file() and filecmp.cmp(table, budget / table.name, shallow=False):
            continue
        budget.mkdir(parents=True, exist_ok=True)
        for made in [table, table.with_name("results.json"), *sorted(table.parent.glob("*.png"))]:
            shutil.copyfile(made, budget / made.name)
        changed.append(f"{budget.name}/results")
    return changed


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
