"""``kphi scale``: the power-law fit, the savings factor, and the scaling-smoke suite end to end."""

import json

import pytest

from kphi.experiments.compare import CompareError
from kphi.experiments.scaling import (
    fit_power_law,
    inverse_power_law,
    load_scaling_suite,
    power_law,
    run_scaling,
    savings_factor,
)

from corpus import write_corpus
from processes import finished_runs, run_cli

N = [1e4, 3e4, 1e5, 3e5, 1e6]


@pytest.mark.fast
def test_the_fit_recovers_a_known_power_law():
    truth = {"a": 40.0, "b": 0.3, "c": 2.0}
    fit = fit_power_law(N, [power_law(truth, n) for n in N])
    assert fit["b"] == pytest.approx(0.3, rel=0.02) and fit["c"] == pytest.approx(2.0, abs=0.01)
    assert fit["a"] == pytest.approx(40.0, rel=0.05) and fit["rmse"] < 1e-3
    for n in N:
        assert inverse_power_law(fit, power_law(fit, n)) == pytest.approx(n, rel=1e-9)


@pytest.mark.fast
def test_a_family_that_is_the_reference_with_k_times_fewer_parameters_saves_k():
    """L_family(N) = L_ref(k N): every reference point is reached with N / k parameters."""
    ref = {"a": 40.0, "b": 0.3, "c": 2.0}
    k = 3.0
    family = fit_power_law(N, [power_law(ref, k * n) for n in N])
    for n in N[1:-1]:
        assert savings_factor(n, power_law(ref, n), family) == pytest.approx(k, rel=0.02)


@pytest.mark.fast
def test_a_loss_below_the_floor_is_never_reached():
    fit = {"a": 10.0, "b": 0.5, "c": 3.0}
    assert inverse_power_law(fit, 2.9) is None and savings_factor(1e5, 3.0, fit) is None


@pytest.mark.fast
def test_a_loss_that_grows_with_size_has_no_fit():
    with pytest.raises(ValueError, match="does not fall"):
        fit_power_law(N[:3], [3.0, 3.5, 4.0])
    with pytest.raises(ValueError, match="three"):
        fit_power_law(N[:2], [4.0, 3.0])


@pytest.mark.fast
def test_budgets_grow_with_width_in_whole_steps():
    suite = load_scaling_suite("scaling-cpu")
    per_step = suite.training["batch_size"] * suite.training["context_length"]
    tokens = [suite.tokens_at(w) for w in suite.widths]
    assert tokens == sorted(tokens) and all(t % per_step == 0 for t in tokens)
    assert suite.tokens_at(128) == 716_800
    for width in suite.widths:
        arms = {a.label: a for a in suite.suite_at(width).arms}
        assert all(a.config["hidden_size"] == width for a in arms.values())


@pytest.mark.fast
def test_budgets_round_to_the_optimizer_steps_a_run_takes():
    """A step is batch x context x gradient accumulation x processes tokens, as train() counts it; a suite's
    budgets round up to whole such steps (the defaults of what a suite leaves out are TrainSettings')."""
    from kphi.training.train_settings import TrainSettings, tokens_per_step, whole_steps

    assert tokens_per_step({}) == TrainSettings().batch_size * TrainSettings().context_length
    training = {"batch_size": 4, "context_length": 100, "gradient_accumulation_steps": 3}
    assert tokens_per_step(training) == 1200 and tokens_per_step(training, world_size=2) == 2400
    assert whole_steps(1201, training) == 2400 and whole_steps(1200, training) == 1200
    assert whole_steps(1201, training, world_size=2) == 2400
    suite = load_scaling_suite("scaling-cpu")
    suite.training = {**suite.training, "gradient_accumulation_steps": 3}
    per_step = 3 * suite.training["batch_size"] * suite.training["context_length"]
    assert all(suite.tokens_at(w) % per_step == 0 for w in suite.widths)


@pytest.mark.parametrize(
    "text,message",
    [
        ("arms: []\n", "kind: scaling"),
        ("kind: scaling\nfamilies: [{label: a, preset: tiny-phi3}]\nwidths: [16, 32]\nbudget: {reference_width: 16, reference_tokens: 99}\n", "two entries"),
        ("kind: scaling\nfamilies: [{label: a, preset: tiny-phi3}, {label: b, preset: tiny-kphi3}]\nwidths: [16]\nbudget: {reference_width: 16, reference_tokens: 99}\n", "widths"),
        ("kind: scaling\nfamilies: [{label: a, preset: tiny-phi3}, {label: b, preset: tiny-kphi3}]\nwidths: [16, 32]\n", "budget"),
        ("kind: scaling\nfamilies: [{label: a, preset: tiny-phi3}, {label: b, preset: tiny-kphi3}]\nwidths: [16, 30]\nbudget: {reference_width: 16, reference_tokens: 99}\n", "width 30"),
        ("kind: scaling\nfamilies: [{label: a, preset: tiny-phi3}, {label: b, preset: tiny-kphi3}]\nwidths: [16, 32]\nbudgets: {reference_width: 16, reference_tokens: 99}\n", "no setting 'budgets'"),
        ("kind: scaling\nfamilies: [{label: a, preset: tiny-phi3, learning_rat: 0.1}, {label: b, preset: tiny-kphi3}]\nwidths: [16, 32]\nbudget: {reference_width: 16, reference_tokens: 99}\n", "arm 'a': no setting 'learning_rat'"),
    ],
)
def test_bad_scaling_suites_name_the_problem(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(CompareError, match=message):
        load_scaling_suite(str(path))


@pytest.fixture(scope="module")
def smoke_scaling(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    corpus = write_corpus(tmp / "pairs.jsonl", pairs=200)
    result = run_cli("scale", "--suite", "scaling-smoke", "--data", str(corpus), "--out", str(tmp / "out"), "--quiet", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, corpus, result.stdout


def test_scaling_smoke_writes_points_fits_savings_and_a_plot(smoke_scaling):
    tmp, _, stdout = smoke_scaling
    out = tmp / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results["families"]) == {"phi-3", "kphi-3"} and results["seeds"] == [42]
    for label, family in results["families"].items():
        assert [p["width"] for p in family["points"]] == [16, 24, 32]
        for p in family["points"]:
            per_width = json.loads((out / f"w{p['width']}" / "results.json").read_text())
            arm = next(a for a in per_width["arms"] if a["label"] == label)
            assert p["val_loss"] == arm["val_loss"] and p["learning_rate"] == arm["learning_rate"]
            assert p["tokens"] == results["budget_tokens"][str(p["width"])]
    assert [s["reference_width"] for s in results["savings"]] == [16, 24, 32]
    fit = results["families"]["kphi-3"]["fit_by_seed"]["42"]
    assert fit is not None, "three widths must give kphi-3 a fitted curve"
    for s in results["savings"]:
        # the reported factor is the one the fit gives: a number, or None where the curve never reaches the loss
        expected = savings_factor(s["reference_non_embedding"], s["reference_val_loss"], fit)
        assert s["factor"] is None if expected is None else s["factor"] == pytest.approx(expected)
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "times fewer parameters" in stdout and "times fewer parameters" in (out / "results.md").read_text()


def test_a_rerun_reuses_every_width(smoke_scaling, monkeypatch):
    tmp, corpus, _ = smoke_scaling
    monkeypatch.setenv("KPHI_CACHE", str(tmp / "cache"))
    before = json.loads((tmp / "out" / "results.json").read_text())
    runs = finished_runs(tmp / "out")
    again = run_scaling(load_scaling_suite("scaling-smoke"), tmp / "out", data=str(corpus), progress=False, log=lambda _: None)
    assert len(runs) == 3 * 2 * 2 and finished_runs(tmp / "out") == runs  # 3 widths x 2 families x 2 rates, none retrained
    assert again["families"] == before["families"]


def test_bad_widths_flag_is_one_line(tmp_path):
    result = run_cli("scale", "--suite", "scaling-smoke", "--widths", "16,x", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.returncode == 2 and "--widths" in result.stderr and "Traceback" not in result.stderr
