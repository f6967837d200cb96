"""The run engine every experiment shares: train once, reuse after, record a divergence, refuse a changed run."""

import json
from pathlib import Path

import pytest

from kphi.experiments.runs import DIVERGED_FILE, ExperimentError, converged, get_or_train
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
    assert json.loads((tmp_path / "run" / "kphi-run.json").read_text())["identity_version"] == 3
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


# --------------------------------------------------------------------------- recorded runs of older kphi

RECORDS_V2 = Path(__file__).parents[1] / "fixtures" / "run-records-v2"

#: Real ``kphi-run.json`` files written by kphi before ``projection`` became the only field (identity version 2,
#: legacy fields in ``model``), each with the suite arm that wrote it: every committed result was recorded so.
V2_RECORD_ARMS = {
    "cpu-ablations-seeds--kphi-3-lr0.004-seed42.json": ("cpu-ablations-seeds", "kphi-3"),
    "cpu-ablations-seeds--first-branch-only-G-2-lr0.004-seed42.json": ("cpu-ablations-seeds", "first branch only (G/2)"),
    "cpu-ablations-seeds--monarch-same-params-lr0.002-seed42.json": ("cpu-ablations-seeds", "monarch (same params)"),
    "cpu-tokens-per-param-w64-retune--phi-3-lr0.002-seed42.json": ("cpu-tokens-per-param-w64-retune", "phi-3"),
}


@pytest.mark.fast
@pytest.mark.parametrize("record_file", sorted(V2_RECORD_ARMS))
def test_a_run_recorded_with_the_legacy_projection_fields_is_the_same_run_today(record_file):
    """Version-2 records (``min_channels_per_group``, ``grouped_init``, ``low_rank_fraction`` and a
    ``projection`` as the suite spelled it) are migrated, not re-resolved: the arm that wrote each is the same
    run today, and another projection is still another run."""
    from kphi.experiments.arms import resolve_arms
    from kphi.experiments.suites import load_suite
    from kphi.sources.auto import KPhi3Config, config_fields
    from kphi.train import TrainSettings, identity_differences, recorded_version

    record = json.loads((RECORDS_V2 / record_file).read_text())
    assert recorded_version(record) == 2 and "min_channels_per_group" in record["identity"]["model"]
    suite, label = V2_RECORD_ARMS[record_file]
    arm = next(a for a in resolve_arms(load_suite(suite)) if a.label == label)
    settings = TrainSettings(**record["settings"])
    assert identity_differences(record["identity"], settings, arm.config, version=2) == []
    other = KPhi3Config(**{**config_fields(arm.config), "projection": {"kind": "low_rank", "fraction": 0.5}})
    assert identity_differences(record["identity"], settings, other, version=2) == ["model"]


@pytest.mark.fast
def test_records_from_before_the_init_default_changed_keep_the_init_they_trained_with():
    """Version 1 and 2 records never spelled an init unless it was not the default of their day
    (``scaled_normal``); today's default (``kaiming_uniform``) must not be read into them, else a run of the
    report's init would reuse a run that never had it."""
    from kphi.sources.auto import KPhi3Config, config_fields
    from kphi.presets import load_preset
    from kphi.train import TrainSettings, identity_differences
    from kphi.training.run_records import recorded_identity

    record = json.loads((RECORDS_V2 / "cpu-ablations-seeds--kphi-3-lr0.004-seed42.json").read_text())
    assert recorded_identity(record["identity"], 2)["model"]["projection"]["init"] == "scaled_normal"
    single_branch = json.loads((RECORDS_V2 / "cpu-ablations-seeds--first-branch-only-G-2-lr0.004-seed42.json").read_text())
    assert "init" not in single_branch["identity"]["model"]["projection"]  # spelled by the suite, without init
    assert recorded_identity(single_branch["identity"], 2)["model"]["projection"]["init"] == "scaled_normal"
    settings = TrainSettings(**record["settings"])
    today = load_preset("cpu-kphi3").config  # the preset as it is today: the report's init
    assert today.projection["init"] == "kaiming_uniform"
    assert identity_differences(record["identity"], settings, today, version=2) == ["model"]
    pinned = KPhi3Config(**{**config_fields(today), "projection": {**today.projection, "init": "scaled_normal"}})
    assert identity_differences(record["identity"], settings, pinned, version=2) == []

    version_1 = recorded_identity({"preset": "tiny-kphi3", "config_overrides": {}}, 1)
    assert version_1["model"]["projection"]["init"] == "scaled_normal"
    asked = recorded_identity({"preset": "tiny-kphi3", "config_overrides": {"grouped_init": "kaiming_uniform"}}, 1)
    assert asked["model"]["projection"]["init"] == "kaiming_uniform"


@pytest.mark.fast
def test_the_identity_version_of_a_record():
    from kphi.train import IDENTITY_VERSION, recorded_version
    from kphi.training.run_records import recorded_identity

    assert recorded_version({"identity_version": IDENTITY_VERSION, "identity": {}}) == IDENTITY_VERSION == 3
    assert recorded_version({"identity": {"preset": "tiny-kphi3"}}) == 1
    assert recorded_version({"identity": {"model": {}}}) == 2
    today = {"model": {"hidden_size": 8, "projection": {"kind": "monarch", "blocks": 4, "fraction": 0.5}}}
    assert recorded_identity(today, IDENTITY_VERSION) == today  # no migration of today's form
