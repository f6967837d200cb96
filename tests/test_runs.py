"""The run engine every experiment shares: train once, reuse after, record a divergence, refuse a changed run."""

import json

import pytest

from kphi.runs import DIVERGED_FILE, ExperimentError, converged, get_or_train
from kphi.train import resolve_settings

from corpus import prepare_small


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("runs"))


def _settings(prepared, out, **overrides):
    return resolve_settings("tiny-kphi3", **{"data": str(prepared), "out": str(out), "context_length": 32, "batch_size": 4,
                                             "max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1,
                                             "eval_rows": 4, "progress": False, **overrides})


def test_a_run_trains_once_and_is_reused_with_identical_metrics(prepared, tmp_path):
    settings = _settings(prepared, tmp_path / "run")
    lines = []
    first, reused = get_or_train(settings, label="tiny", log=lines.append, announce="training tiny")
    assert not reused and lines == ["training tiny"] and first["steps"] == 2
    stamp = (tmp_path / "run" / "metrics.json").stat().st_mtime_ns
    again, reused = get_or_train(settings, label="tiny", log=lines.append, announce="training tiny")
    assert reused and again == json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["val_loss"] == first["val_loss"] and lines == ["training tiny"]  # nothing announced the second time
    assert (tmp_path / "run" / "metrics.json").stat().st_mtime_ns == stamp


def test_a_run_of_other_settings_in_the_directory_is_refused(prepared, tmp_path):
    get_or_train(_settings(prepared, tmp_path / "run"), label="tiny", log=lambda _: None)
    with pytest.raises(ExperimentError, match="trained with other settings"):
        get_or_train(_settings(prepared, tmp_path / "run", learning_rate=1e-2), label="tiny", log=lambda _: None)


def test_a_diverged_run_is_recorded_reused_and_an_error_only_where_the_caller_needs_it(prepared, tmp_path):
    settings = _settings(prepared, tmp_path / "run", learning_rate=1e30)
    lines = []
    metrics, reused = get_or_train(settings, label="hot", log=lines.append)
    assert not reused and metrics["val_loss"] is None and "loss became" in metrics["diverged"]
    assert json.loads((tmp_path / "run" / DIVERGED_FILE).read_text()) == metrics
    assert any("hot: diverged" in line for line in lines)
    again, reused = get_or_train(settings, label="hot", log=lines.append)
    assert reused and again == metrics  # a divergence is a result: not retrained
    with pytest.raises(ExperimentError, match=r"^the teacher diverged \(.*loss became.*\); lower its rate$"):
        converged(again, "the teacher", "lower its rate")


def test_converged_returns_a_finished_runs_metrics_unchanged():
    metrics = {"val_loss": 1.5, "train_loss": 1.6}
    assert converged(metrics, "x", "y") is metrics
