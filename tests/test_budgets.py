"""Budget series: every arm of a suite at several token budgets, each an ordinary comparison."""

import json

import pytest

from kphi.budgets import run_budget_series
from kphi.compare import CompareError, load_suite

from corpus import write_corpus
from test_compare import run_kphi


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budgets")
    corpus = write_corpus(tmp / "pairs.jsonl", pairs=200)
    out = tmp / "out"
    result = run_kphi("compare", "--suite", "smoke", "--budgets", "512,1024", "--data", str(corpus), "--out", str(out), "--quiet", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, corpus, tmp, result.stdout


def test_every_arm_trains_at_every_budget_and_the_table_reads_them(series):
    out, _, _, stdout = series
    results = json.loads((out / "results.json").read_text())
    assert results["budgets"] == [512, 1024]
    for label, arm in results["arms"].items():
        assert [p["tokens"] for p in arm["points"]] == [512, 1024]
        for point in arm["points"]:
            per_budget = json.loads((out / f"tokens-{point['budget']}" / "results.json").read_text())
            row = next(a for a in per_budget["arms"] if a["label"] == label)
            assert point["val_loss"] == row["val_loss"] and point["learning_rate"] == row["learning_rate"]
    assert (out / "budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 512 tokens | 1,024 tokens |" in stdout


def test_the_largest_budget_runs_more_seeds_and_reruns_reuse_everything(series, monkeypatch):
    out, corpus, tmp, _ = series
    monkeypatch.setenv("KPHI_CACHE", str(tmp / "cache"))
    suite = load_suite("smoke")
    suite.seeds_at_largest = 2
    lines = []
    results = run_budget_series(suite, out, budgets=[512, 1024], data=str(corpus), progress=False, log=lines.append)
    trained = [line for line in lines if "non-embedding parameters" in line]
    assert len(trained) == 4 and all("seed 43" in line for line in trained)  # only the new seed, largest budget
    for arm in results["arms"].values():
        assert arm["points"][0]["seeds"] == [42] and arm["points"][1]["seeds"] == [42, 43]


def test_a_series_needs_two_budgets_and_refuses_rate_flags(tmp_path):
    with pytest.raises(CompareError, match="at least two budgets"):
        run_budget_series(load_suite("smoke"), tmp_path / "o", budgets=[512], progress=False, log=lambda *_: None)
    result = run_kphi("compare", "--suite", "smoke", "--budgets", "512,1e3", "--learning-rates", "1e-3", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.returncode == 2 and "budget series" in result.stderr and "Traceback" not in result.stderr
    result = run_kphi("compare", "--suite", "smoke", "--budgets", "512,many", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.returncode == 2 and "--budgets must be positive whole numbers" in result.stderr and "Traceback" not in result.stderr
