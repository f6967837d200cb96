"""Learning-rate grids in ``kphi compare``: every arm at every rate, best rate per arm, reuse when a grid grows."""

import json
import math

import pytest
import torch

from kphi.experiments.compare import Comparison, CompareError, _tune, format_plan, rate_past_edge, run_compare
from kphi.experiments.arms import resolve_arms
from kphi.experiments.suites import load_suite, parse_learning_rates
from kphi.training.optim import grouped_lr_multipliers, scale_grouped_learning_rates

from corpus import write_corpus
from processes import finished_runs, run_cli
from summaries import assert_two_seed_summary

SUITE = """
name: grid
baseline: phi-3
data: {source: default, tokenizer: bpe, vocab_size: 300, validation_rows: 20}
training: {context_length: 32, batch_size: 4, lr_scheduler: constant, max_steps: 4, eval_steps: 2, eval_rows: 8,
           save_steps: 2, logging_steps: 1, precision: fp32}
arms:
  - {label: phi-3, preset: tiny-phi3}
  - {label: kphi-3, preset: tiny-kphi3}
"""


@pytest.fixture(scope="module")
def grid_setup(tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("grid")
    monkeypatch_module.setenv("KPHI_CACHE", str(tmp / "cache"))
    (tmp / "grid.yaml").write_text(SUITE)
    corpus = write_corpus(tmp / "pairs.jsonl", pairs=200)
    return load_suite(str(tmp / "grid.yaml")), str(corpus), tmp


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def grid_run(grid_setup):
    suite, corpus, tmp = grid_setup
    out = tmp / "out"
    lines = []
    results = run_compare(suite, out, data=corpus, learning_rates=[1e-3, 1e-2, 1e30], progress=False, log=lines.append)
    return results, out, lines


def _disk_val_loss(out, label, rate, seed=42):
    run = out / "arms" / f"{label}-lr{rate:g}-seed{seed}"
    if (run / "diverged.json").is_file():
        return math.inf
    return json.loads((run / "metrics.json").read_text())["val_loss"]


def test_every_arm_trains_at_every_rate_and_reports_its_best(grid_run):
    results, out, _ = grid_run
    for arm in results["arms"]:
        assert set(arm["grid"]) == {"0.001", "0.01", "1e+30"}
        losses = {rate: _disk_val_loss(out, arm["label"], rate) for rate in (1e-3, 1e-2, 1e30)}
        assert arm["learning_rate"] == min(losses, key=losses.get)
        assert arm["val_loss"] == losses[arm["learning_rate"]]
        for key, entry in arm["grid"].items():
            assert entry["learning_rate"] == float(key)
            if math.isfinite(losses[float(key)]):
                assert entry["val_loss"] == losses[float(key)]
    assert (out / "lr_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert [a["learning_rate"] for a in saved["arms"]] == [a["learning_rate"] for a in results["arms"]]


def test_a_diverging_rate_is_a_grid_result_not_a_failure(grid_run):
    results, out, lines = grid_run
    for arm in results["arms"]:
        assert arm["grid"]["1e+30"]["val_loss"] is None
        assert arm["learning_rate"] != 1e30
        diverged = out / "arms" / f"{arm['label']}-lr1e+30-seed42" / "diverged.json"
        assert "loss became" in json.loads(diverged.read_text())["diverged"]
    assert any("diverged" in line for line in lines)


def test_extending_the_grid_and_seeds_trains_only_new_runs(grid_setup, grid_run):
    suite, corpus, _ = grid_setup
    _, out, _ = grid_run
    before = finished_runs(out)
    results = run_compare(suite, out, data=corpus, seeds=2, learning_rates=[1e-3, 3e-3, 1e-2, 1e30], progress=False, log=lambda _: None)
    after = finished_runs(out)
    assert len(before) == 6 and all(after[run] == stamp for run, stamp in before.items())  # 2 arms x 3 old rates reused
    added = sorted(set(after) - set(before))
    best = {a["label"]: a["learning_rate"] for a in results["arms"]}
    assert added == sorted([f"arms/{label}-lr0.003-seed42" for label in best] + [f"arms/{label}-lr{rate:g}-seed43" for label, rate in best.items()])
    for arm in results["arms"]:
        assert "0.003" in arm["grid"]
        second_seed = sorted(p.name for p in (out / "arms").glob(f"{arm['label']}-lr*-seed43"))
        assert second_seed == [f"{arm['label']}-lr{arm['learning_rate']:g}-seed43"]  # only at the best rate
        assert arm["seeds"] == [42, 43] and [run["seed"] for run in arm["runs"]] == [42, 43]
        assert_two_seed_summary(arm)
        assert len(arm["grid"][f"{arm['learning_rate']:g}"]["runs"]) == 2


def test_an_arm_changed_under_a_finished_run_is_refused(grid_setup, grid_run, tmp_path):
    suite, corpus, _ = grid_setup
    _, out, _ = grid_run
    changed = tmp_path / "changed.yaml"
    changed.write_text(SUITE.replace("{label: kphi-3, preset: tiny-kphi3}", "{label: kphi-3, preset: tiny-kphi3, config: {num_hidden_layers: 1}}"))
    with pytest.raises(CompareError, match="trained with other settings"):
        run_compare(load_suite(str(changed)), out, data=corpus, learning_rates=[1e-3], progress=False, log=lambda *_: None)


def test_rate_edges_are_flagged(grid_run):
    results, _, _ = grid_run
    for arm in results["arms"]:
        rates = sorted(float(r) for r in arm["grid"])
        assert arm["lr_at_edge"] == (arm["learning_rate"] in (rates[0], rates[-1]))
        assert any(w.startswith(arm["label"]) for w in results["warnings"]) == arm["lr_at_edge"]


@pytest.mark.fast
@pytest.mark.parametrize("runs, expected", [
    ({1e-3: 3.0, 2e-3: 2.9, 4e-3: 3.1}, None),     # best interior: nothing to add
    ({1e-3: 2.8, 2e-3: 2.9}, 5e-4),                 # best at the lowest: one grid step below
    ({1e-3: 3.0, 2e-3: 2.9, 4e-3: 2.7}, 8e-3),      # best at the highest: one step above
    ({1e-3: 2.0, 3e-3: 2.1}, 3.33333e-4),           # the step is the ratio at that edge, to six figures
    ({1e-3: None, 1e-2: None}, 1e-4),               # all diverged: the lowest "wins", so go lower
    ({1e-3: 2.0, 1e30: None}, 1e-36),               # a diverged highest never holds the best
    ({1e-3: 2.0}, None),                            # no grid, no edge
])
def test_the_grid_grows_one_step_past_the_edge_that_holds_the_best(runs, expected):
    assert rate_past_edge({rate: [{"val_loss": loss}] for rate, loss in runs.items()}) == expected


def _walk_reference(losses: dict[float, float], start: list[float], limit: int) -> set[float]:
    """The rates a grid grown by ``extend_grid: limit`` ends with, given every rate's loss, written out plainly."""
    rates = sorted(start)
    for _ in range(limit):
        best = min(rates, key=lambda r: (losses[r], r))
        if best == rates[0]:
            rates.insert(0, float(f"{rates[0] / (rates[1] / rates[0]):.6g}"))
        elif best == rates[-1]:
            rates.append(float(f"{rates[-1] * (rates[-1] / rates[-2]):.6g}"))
        else:
            break
    return set(rates)


def test_extend_grid_trains_past_an_edge_until_the_best_is_interior(grid_setup, tmp_path):
    _, corpus, _ = grid_setup
    (tmp_path / "walk.yaml").write_text(SUITE + "extend_grid: 2\nlearning_rates: [1.0e-3, 1.0e+30]\n")
    lines = []
    results = run_compare(load_suite(str(tmp_path / "walk.yaml")), tmp_path / "out", data=corpus, progress=False,
                          log=lines.append)
    for arm in results["arms"]:
        grid = {float(r) for r in arm["grid"]}
        assert 1e-36 in grid  # 1e30 diverges, so 1e-3 is the best and the lowest: one step (x 1e-33) below it
        losses = {r: _disk_val_loss(tmp_path / "out", arm["label"], r) for r in grid}
        assert grid == _walk_reference(losses, [1e-3, 1e30], limit=2)
        assert arm["lr_at_edge"] == (arm["learning_rate"] in (min(grid), max(grid)))
        assert any(line.startswith(f"{arm['label']}: the best rate is at the edge of 0.001, 1e+30; extending the grid to 1e-36")
                   for line in lines)
    # A dry run of the finished comparison counts the grown runs as planned and finished, and names their rates.
    suite = load_suite(str(tmp_path / "walk.yaml"))
    rows = {row.split("|")[2].strip(): row.split("|")[5:9] for row in
            format_plan([Comparison("walk", suite, tmp_path / "out")]).splitlines() if row.startswith("| walk |")}
    for arm in results["arms"]:
        rates, _seeds, runs, finished = (cell.strip() for cell in rows[arm["label"]])
        grown = sorted(float(r) for r in arm["grid"])[:-2]  # below 1e-3, which beat a diverged 1e30
        assert rates == f"0.001, 1e+30 (+ up to 2 past an edge: {', '.join(f'{r:g}' for r in reversed(grown))})"
        assert int(runs) == int(finished) == len(arm["grid"])


class _LossFallsWithRate:
    """A stand-in for a comparison's runs: every run "trains" at once to a loss that falls as the rate rises, so
    the best is always the highest rate tried."""

    def __init__(self):
        self.trained, self.lines, self.metrics = [], [], {}

    def run(self, jobs, *, more=False):
        self.trained.append([rate for _arm, rate, _seed in jobs])
        self.metrics.update({(arm.label, rate, seed): {"val_loss": -math.log(rate)} for arm, rate, seed in jobs})
        return True

    def by_rate(self, arms, jobs):
        return {arm.label: {r: [self.metrics[(a.label, r, s)]] for a, r, s in jobs if a is arm} for arm in arms}

    def log(self, line):
        self.lines.append(line)


@pytest.mark.fast
@pytest.mark.parametrize("limit", [0, 1, 3])
def test_a_grid_grows_by_at_most_extend_grid_rates_one_step_at_a_time(tmp_path, limit):
    (tmp_path / "s.yaml").write_text(SUITE)
    arm = resolve_arms(load_suite(str(tmp_path / "s.yaml")))[0]
    trainer = _LossFallsWithRate()
    jobs = _tune(trainer, [arm], [(arm, 1e-3, 42), (arm, 2e-3, 42)], extend_grid=limit)
    assert trainer.trained == [[1e-3, 2e-3]] + [[2e-3 * 2 ** k] for k in range(1, limit + 1)]
    assert [rate for _arm, rate, _seed in jobs] == [1e-3, 2e-3] + [2e-3 * 2 ** k for k in range(1, limit + 1)]
    assert len(trainer.lines) == limit and all("extending the grid to" in line for line in trainer.lines)


@pytest.mark.fast
@pytest.mark.parametrize("value", [-1, "two", True, 1.5])
def test_a_bad_extend_grid_is_refused_by_name(tmp_path, value):
    (tmp_path / "s.yaml").write_text(SUITE + f"extend_grid: {value}\n")
    with pytest.raises(CompareError, match="extend_grid must be a whole number"):
        load_suite(str(tmp_path / "s.yaml"))


@pytest.mark.fast
def test_arm_rates_come_from_the_arm_then_the_suite(tmp_path):
    (tmp_path / "s.yaml").write_text(
        SUITE.replace("{label: phi-3, preset: tiny-phi3}", "{label: phi-3, preset: tiny-phi3, learning_rate: 5.0e-3}")
        .replace("{label: kphi-3, preset: tiny-kphi3}", "{label: kphi-3, preset: tiny-kphi3, learning_rates: [1.0e-3, 2.0e-3]}")
    )
    from kphi.experiments.arms import arm_rates

    suite = load_suite(str(tmp_path / "s.yaml"))
    phi, kphi_arm = resolve_arms(suite)
    assert arm_rates(phi, suite) == [5e-3] and arm_rates(kphi_arm, suite) == [1e-3, 2e-3]
    assert arm_rates(phi, suite, [1e-4]) == [1e-4]


@pytest.mark.fast
@pytest.mark.parametrize("text", ["", "a,b", "1e-3,-1", "0"])
def test_bad_learning_rates_are_refused(text):
    with pytest.raises(CompareError, match=r"learning[ -]rates"):
        parse_learning_rates(text)


def test_bad_rate_flags_and_suites_are_one_line_errors(tmp_path):
    result = run_cli("compare", "--suite", "smoke", "--learning-rates", "1e-3,fast", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.returncode == 2 and "learning rates" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("compare", "--suite", "scaling-smoke", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.returncode == 2 and "kphi scale" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.fast
def test_grouped_learning_rates_scale_by_the_group_count():
    from kphi.modeling.block import GroupedLinear
    from kphi.presets import load_preset
    from kphi.sources.auto import KPhi3ForCausalLM

    model = KPhi3ForCausalLM(load_preset("tiny-kphi3").config)
    multipliers = grouped_lr_multipliers(model, "groups")
    grouped = [m for m in model.modules() if isinstance(m, GroupedLinear) and m.groups > 1]
    assert grouped and len(multipliers) == len(grouped)
    assert grouped_lr_multipliers(model, "none") == {}
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    scale_grouped_learning_rates(optimizer, model, "groups")
    seen = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            expected = multipliers.get(id(p), 1.0)
            assert group["lr"] == pytest.approx(1e-3 * expected)
            assert group["weight_decay"] == (0.1 if p.ndim > 1 else 0.0)
            seen += 1
    assert seen == len(list(model.parameters()))
    assert {m.groups for m in grouped} == {g["lr_multiplier"] for g in optimizer.param_groups} - {1.0}


@pytest.mark.fast
@pytest.mark.parametrize("text, words", [("x", "must be positive whole numbers"), ("512,-1", "must be positive whole numbers"),
                                         ("1.5", "must be positive whole numbers"), ("0", "must be positive whole numbers"),
                                         ("nan", "must be positive whole numbers"), ("inf", "must be positive whole numbers"),
                                         ("", "has an empty item"), ("512,,1024", "has an empty item")])
def test_bad_counts_are_refused(text, words):
    from kphi.experiments.suites import parse_counts

    with pytest.raises(CompareError, match=f"--budgets {words}"):
        parse_counts(text, "--budgets")


@pytest.mark.fast
def test_counts_accept_scientific_notation_and_sort():
    from kphi.experiments.suites import parse_counts

    assert parse_counts("3e6, 716800", "--budgets") == [716800, 3000000]
