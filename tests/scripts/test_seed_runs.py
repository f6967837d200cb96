"""scripts/seed-runs.py carries a series' finished runs through git: --collect copies each finished run (its
metrics or its divergence, and its run record), each budget's comparison marker and each changed budget table
into the committed results; seeding puts the runs and markers back into a fresh output directory, leaving what is
already there untouched."""

import json
from pathlib import Path

import pytest

from scripts_loader import load_script

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def seed_runs():
    return load_script("seed-runs")


def finished_series(out: Path) -> None:
    """Two budgets: at the first one run finished, one diverged, one interrupted and one without its record (not
    a run kphi can check, so not carried); the table written at the second."""
    arms = out / "tokens-100" / "arms"
    for name, marker, body in [("phi-3-lr0.001-seed42", "metrics.json", {"final_val_loss": 3.5}),
                               ("phi-3-lr0.032-seed42", "diverged.json", {"diverged": True})]:
        (arms / name).mkdir(parents=True)
        (arms / name / marker).write_text(json.dumps(body))
        (arms / name / "kphi-run.json").write_text(json.dumps({"identity": {"seed": 42}}))
    (arms / "kphi-3-lr0.002-seed42").mkdir()  # interrupted: a record, no metrics
    (arms / "kphi-3-lr0.002-seed42" / "kphi-run.json").write_text("{}")
    (arms / "kphi-3-lr0.004-seed42").mkdir()  # metrics without a record
    (arms / "kphi-3-lr0.004-seed42" / "metrics.json").write_text("{}")
    (out / "tokens-100" / "kphi-compare.json").write_text(json.dumps({"identity": {"max_tokens": 100}}))
    (out / "tokens-200").mkdir()
    (out / "tokens-200" / "results.md").write_text("| arm | loss |\n")
    (out / "tokens-200" / "results.json").write_text(json.dumps({"arms": [{"label": "phi-3", "grid": {"0.001": 3.5}}], "wall_seconds": 9}))
    (out / "tokens-200" / "val_loss.png").write_bytes(b"png")


def test_collect_copies_finished_runs_and_tables_once(tmp_path, seed_runs):
    out, results = tmp_path / "runs", tmp_path / "results"
    finished_series(out)
    assert seed_runs.collect(out, results) == ["tokens-100/phi-3-lr0.001-seed42", "tokens-100/phi-3-lr0.032-seed42",
                                               "tokens-100/kphi-compare.json", "tokens-200/results"]
    assert json.loads((results / "tokens-100" / "phi-3-lr0.001-seed42.json").read_text()) == {"final_val_loss": 3.5}
    assert json.loads((results / "tokens-100" / "phi-3-lr0.032-seed42.diverged.json").read_text()) == {"diverged": True}
    assert (results / "tokens-100" / "phi-3-lr0.001-seed42.run.json").is_file()
    assert not list((results / "tokens-100").glob("kphi-3*"))
    assert json.loads((results / "tokens-100" / "kphi-compare.json").read_text()) == {"identity": {"max_tokens": 100}}
    assert sorted(p.name for p in (results / "tokens-200").iterdir()) == ["results.json", "results.md", "val_loss.png"]
    assert seed_runs.collect(out, results) == []  # nothing new the second time
    (out / "tokens-200" / "results.md").write_text("| arm | loss |\n| phi-3 | 3.5 |\n")
    assert seed_runs.collect(out, results) == ["tokens-200/results"]
    # rewritten by a rerun that trained nothing (only its wall time differs): not collected
    (out / "tokens-200" / "results.json").write_text(json.dumps({"arms": [{"label": "phi-3", "grid": {"0.001": 3.5}}], "wall_seconds": 1}))
    assert seed_runs.collect(out, results) == []
    # a rate added to the grid that is not the best: the table of best rates is the same, the results are not
    (out / "tokens-200" / "results.json").write_text(json.dumps({"arms": [{"label": "phi-3", "grid": {"0.001": 3.5, "0.002": 3.6}}]}))
    assert seed_runs.collect(out, results) == ["tokens-200/results"]


def test_collect_keeps_a_committed_table_that_a_pass_over_fewer_arms_rewrote(tmp_path, seed_runs, capsys):
    out, results = tmp_path / "runs", tmp_path / "results"
    finished_series(out)
    two_arms = {"arms": [{"label": "phi-3", "grid": {"0.001": 3.5}}, {"label": "control", "grid": {"0.002": 3.7}}]}
    (out / "tokens-200" / "results.json").write_text(json.dumps(two_arms))
    seed_runs.collect(out, results)
    (out / "tokens-200" / "results.md").write_text("| arm | loss |\n| phi-3 | 3.5 |\n")  # kphi compare --arms phi-3
    (out / "tokens-200" / "results.json").write_text(json.dumps({"arms": two_arms["arms"][:1]}))
    assert seed_runs.collect(out, results) == []
    assert "tokens-200/results: kept; the new table lacks control" in capsys.readouterr().err
    assert json.loads((results / "tokens-200" / "results.json").read_text()) == two_arms
    assert (results / "tokens-200" / "results.md").read_text() == "| arm | loss |\n"
    # the whole comparison again, with one arm more: collected
    (out / "tokens-200" / "results.json").write_text(json.dumps({"arms": [*two_arms["arms"], {"label": "kphi-3"}]}))
    assert seed_runs.collect(out, results) == ["tokens-200/results"]


def test_seeding_restores_the_runs_and_keeps_what_is_there(tmp_path, seed_runs):
    out, results = tmp_path / "runs", tmp_path / "results"
    finished_series(out)
    seed_runs.collect(out, results)
    fresh = tmp_path / "fresh"
    assert seed_runs.seed(results, fresh) == 2
    assert sorted(p.name for p in (fresh / "tokens-100" / "arms" / "phi-3-lr0.032-seed42").iterdir()) == [
        "diverged.json", "kphi-run.json"]
    run = fresh / "tokens-100" / "arms" / "phi-3-lr0.001-seed42"
    assert json.loads((run / "metrics.json").read_text()) == {"final_val_loss": 3.5}
    assert json.loads((run / "kphi-run.json").read_text()) == {"identity": {"seed": 42}}
    assert json.loads((fresh / "tokens-100" / "kphi-compare.json").read_text()) == {"identity": {"max_tokens": 100}}
    (run / "metrics.json").write_text(json.dumps({"final_val_loss": 3.4}))
    assert seed_runs.seed(results, fresh) == 0
    assert json.loads((run / "metrics.json").read_text()) == {"final_val_loss": 3.4}
