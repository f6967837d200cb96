"""Put a budget series' committed runs back into a fresh output directory, so that `kphi compare` reuses them.

    python scripts/seed-runs.py docs/results/cpu-text-w64 runs/cpu-text-w64
    kphi compare --suite cpu-text-w64 --out runs/cpu-text-w64

Each finished run of a series is committed as two small files beside its budget's results: NAME.json (the
run's metrics.json) and NAME.run.json (its kphi-run.json: settings, identity and initial-weight hash). This
copies both into OUT/tokens-N/arms/NAME/. Nothing is trusted on the copy's word: before reusing a run,
compare checks its recorded identity against the suite's settings and rebuilds its initial weights to compare
their hash, and refuses a run that differs. Runs already in OUT are left as they are.
"""
import shutil
import sys
from pathlib import Path


def seed(results: Path, out: Path) -> int:
    copied = 0
    for record in sorted(results.glob("tokens-*/*.run.json")):
        metrics = record.with_name(record.name.removesuffix(".run.json") + ".json")
        run_dir = out / record.parent.name / "arms" / record.name.removesuffix(".run.json")
        if not metrics.is_file() or (run_dir / "metrics.json").exists() or (run_dir / "kphi-run.json").exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record, run_dir / "kphi-run.json")
        shutil.copyfile(metrics, run_dir / "metrics.json")
        copied += 1
    return copied


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    results, out = Path(sys.argv[1]), Path(sys.argv[2])
    if not results.is_dir():
        sys.exit(f"{results} is not a directory of committed results")
    print(f"{seed(results, out)} runs copied into {out}")
