"""scripts/plan-series.py counts the runs a series has left the way compare plans them: every rate on the first
seed, one run per further seed at the best rate; a committed run (NAME.json) is finished."""

import json
import re

import pytest

from scripts_loader import load_script

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def plan_series():
    return load_script("plan-series")


def test_runs_left_match_compares_plan_and_shrink_as_runs_are_committed(tmp_path, plan_series):
    from kphi.experiments.arms import resolve_arms, run_dir_name
    from kphi.experiments.budgets import plan_budget_series
    from kphi.experiments.compare import format_plan
    from kphi.experiments.suites import load_suite

    suite = load_suite("cpu-text-w96")
    plan = plan_budget_series(suite, tmp_path / "out")
    planned = int(re.search(r"(\d+) runs, 0 of them finished", format_plan(plan)).group(1))
    arms = resolve_arms(suite)

    def left(committed):
        return [tokens for c in plan for arm in arms for tokens, done in plan_series._runs(arm, c, committed / c.out.name) if not done]

    committed = tmp_path / "committed"
    assert len(left(committed)) == planned == 54  # 4 budgets x 12 rates, 2 budgets x 3 arms of seed 43
    largest = plan[-1]
    kphi = next(a for a in arms if a.label == "kphi-3")
    (committed / largest.out.name).mkdir(parents=True)
    (committed / largest.out.name / f"{run_dir_name(kphi, 0.008, 42)}.json").write_text(json.dumps({}))
    (committed / largest.out.name / f"{run_dir_name(kphi, 0.016, 43)}.diverged.json").write_text(json.dumps({}))
    assert len(left(committed)) == planned - 2
    assert sum(left(committed)) == sum(left(tmp_path / "none")) - 2 * largest.suite.training["max_tokens"]
