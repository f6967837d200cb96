"""Budget series: every arm of a suite at several token budgets, each an ordinary comparison."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from kphi.experiments.budgets import run_budget_series
from kphi.experiments.compare import CompareError
from kphi.experiments.suites import load_suite

from corpus import write_corpus
from processes import finished_runs, run_cli
from scripts_loader import load_script


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budgets")
    corpus = write_corpus(tmp / "pairs.jsonl", pairs=200)
    out = tmp / "out"
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024", "--data", str(corpus), "--out", str(out), "--quiet", cache=tmp / "cache")
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
    for picture in ("budgets.png", "compute.png", "differences.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert "| 512 tokens | 1,024 tokens |" in stdout
    from kphi.experiments.arms import resolve_arms
    from kphi.params import training_flops_per_token

    for arm in resolve_arms(load_suite("smoke")):
        entry = results["arms"][arm.label]
        assert entry["train_flops_per_token"] == training_flops_per_token(arm.config, 64)
        for point in entry["points"]:
            assert point["train_flops"] == point["tokens"] * entry["train_flops_per_token"]
            assert point["tokens_per_second"] > 0 and point["run_wall_seconds"] > 0
    assert results["differences"]["subject"] == "kphi-3" and set(results["differences"]["against"]) == {
        "phi-3", "phi-3 small (same params)", "low-rank (same params)"}


def test_differences_and_the_crossover_by_hand():
    from kphi.experiments.budgets import differences, format_differences

    def arm(losses, spreads=(0.0, 0.0, 0.0)):
        return {"points": [{"budget": b, "val_loss": v, "val_loss_std": s} for b, v, s in zip((100, 1000, 10000), losses, spreads)]}

    results = {"baseline": "dense", "budgets": [100, 1000, 10000],
               "tokens_per_parameter": {"100": 1, "1000": 10, "10000": 100},
               "arms": {"dense": arm([5.0, 4.0, 3.0], (0.0, 0.0, 0.03)), "subject": arm([4.8, 4.2, 3.1], (0.0, 0.0, 0.04)),
                        "small": arm([4.9, 4.3, 3.5])}}
    diff = differences(results)
    assert diff["subject"] == "subject"
    assert [round(r["difference"], 6) for r in diff["against"]["dense"]] == [-0.2, 0.2, 0.1]
    assert diff["against"]["dense"][2]["spread"] == pytest.approx(0.05)  # sqrt(0.03^2 + 0.04^2)
    # -0.2 at 100 tokens, +0.2 at 1000: the line in log budget crosses zero half way, at sqrt(100 * 1000)
    cross = diff["crossover"]["dense"]
    assert cross["between"] == [100, 1000] and cross["interpolated_tokens"] == round(1000 ** 0.5 * 10)
    assert cross["interpolated_tokens_per_parameter"] == pytest.approx(10 ** 0.5)
    assert diff["crossover"]["small"] is None  # always lower: no crossover in range
    table = format_differences({**results, "differences": diff})
    assert "| dense | -0.200 | +0.200 | +0.100 ± 0.050 | between 100 and 1,000 tokens" in table
    assert "| small | -0.100 | -0.100 | -0.400 ± 0.040 | none in range |" in table


def test_several_series_leads_share_one_plot_one_line_per_series_and_arm(tmp_path):
    from kphi.experiments.budgets import differences, plot_series_leads

    def series(subject, dense):
        arms = {name: {"points": [{"budget": b, "val_loss": v, "val_loss_std": 0.0} for b, v in zip((100, 200), losses)]}
                for name, losses in (("dense", dense), ("kphi", subject))}
        results = {"baseline": "dense", "budgets": [100, 200], "tokens_per_parameter": {"100": 10, "200": 20}, "arms": arms}
        return {**results, "differences": differences(results)}

    for name, subject in (("w64", (4.0, 3.9)), ("w96", (3.8, 3.85))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(series(subject, (4.2, 3.8))))
    drawn = plot_series_leads({"width 64": tmp_path / "w64", "width 96": tmp_path / "w96"}, tmp_path / "leads.png")
    assert drawn["width 64"]["dense"] == [(10, pytest.approx(-0.2)), (20, pytest.approx(0.1))]
    assert drawn["width 96"]["dense"] == [(10, pytest.approx(-0.4)), (20, pytest.approx(0.05))]
    assert (tmp_path / "leads.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(CompareError, match="width 128: cannot read .*kphi compare --report"):
        plot_series_leads({"width 128": tmp_path / "w128"}, tmp_path / "x.png")


def test_the_largest_budget_runs_more_seeds_and_reruns_reuse_everything(series, monkeypatch):
    out, corpus, tmp, _ = series
    monkeypatch.setenv("KPHI_CACHE", str(tmp / "cache"))
    suite = load_suite("smoke")
    suite.seeds_at_largest = 2
    before = finished_runs(out)
    results = run_budget_series(suite, out, budgets=[512, 1024], data=str(corpus), progress=False, log=lambda _: None)
    after = finished_runs(out)
    assert all(after[run] == stamp for run, stamp in before.items())
    added = sorted(set(after) - set(before))  # only the new seed, at the largest budget, for each of the 4 arms
    assert len(added) == 4 and all(run.startswith("tokens-1024/arms/") and run.endswith("-seed43") for run in added)
    for arm in results["arms"].values():
        assert arm["points"][0]["seeds"] == [42] and arm["points"][1]["seeds"] == [42, 43]


def test_a_process_sharing_a_series_goes_on_to_the_next_budget_instead_of_waiting(series, tmp_path, monkeypatch):
    """A budget whose run another process holds is put off, not waited for: the next budget is trained first,
    then the held run is waited for, and the series' results are those of one process training everything."""
    import threading
    import time

    from kphi.files import exclusive_lock

    pytest.importorskip("fcntl", reason="processes coordinate only where fcntl exists")
    out, corpus, tmp, _ = series
    monkeypatch.setenv("KPHI_CACHE", str(tmp / "cache"))
    shared = tmp_path / "shared"
    shutil.copytree(out, shared)
    held, later = shared / "tokens-512/arms/kphi-3-lr0.003-seed42", shared / "tokens-1024/arms/phi-3-lr0.003-seed42"
    shutil.rmtree(held)
    shutil.rmtree(later)
    lines, done = [], []
    other = threading.Thread(target=lambda: done.append(run_budget_series(
        load_suite("smoke"), shared, budgets=[512, 1024], data=str(corpus), progress=False, log=lines.append)), daemon=True)
    with exclusive_lock(shared / "tokens-512/.locks/kphi-3-lr0.003-seed42.lock"):
        other.start()
        deadline = time.monotonic() + 600
        while not (later / "metrics.json").is_file() and other.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (later / "metrics.json").is_file(), "the next budget was not trained while the first waited"
        assert not held.exists() and other.is_alive()  # the held run is left to its holder, then waited for
        assert "== 512 tokens per run, 1 seed(s): runs another process holds; coming back to it after the others" in lines
    other.join(timeout=600)
    assert done and "== 512 tokens per run, 1 seed(s) (back to it)" in lines
    def seed_42_losses(where):
        return {str(m.parent.relative_to(where)): json.loads(m.read_text())["val_loss"]
                for m in where.glob("tokens-*/arms/*-seed42/metrics.json")}

    assert seed_42_losses(shared) == seed_42_losses(out) and len(seed_42_losses(out)) == 8
    assert [p["val_loss"] for p in done[0]["arms"]["kphi-3"]["points"]] == [
        seed_42_losses(out)[f"tokens-{n}/arms/kphi-3-lr0.003-seed42"] for n in (512, 1024)]


def test_no_wait_trains_what_no_other_process_holds_and_leaves_the_results_to_the_last(series, tmp_path):
    """``--no-wait`` exits once only held runs are left, writing no series results; the process that later
    finishes the rest writes them."""
    from kphi.files import exclusive_lock

    pytest.importorskip("fcntl", reason="processes coordinate only where fcntl exists")
    out, corpus, tmp, _ = series
    shared = tmp_path / "shared"
    shutil.copytree(out, shared)
    (shared / "results.json").unlink()
    for run in ("tokens-512/arms/kphi-3-lr0.003-seed42", "tokens-1024/arms/phi-3-lr0.003-seed42"):
        shutil.rmtree(shared / run)
    command = ("compare", "--suite", "smoke", "--budgets", "512,1024", "--data", str(corpus), "--out", str(shared),
               "--quiet", "--no-wait")
    with exclusive_lock(shared / "tokens-512/.locks/kphi-3-lr0.003-seed42.lock"):
        result = run_cli(*command, cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left to the processes training the rest of" in result.stdout
    assert (shared / "tokens-1024/arms/phi-3-lr0.003-seed42/metrics.json").is_file()
    assert not (shared / "tokens-512/arms/kphi-3-lr0.003-seed42").exists() and not (shared / "results.json").exists()
    result = run_cli(*command, cache=tmp / "cache")  # the holder's turn: it trains the last run and writes the series
    assert result.returncode == 0 and "left to" not in result.stdout
    assert json.loads((shared / "results.json").read_text())["arms"]["kphi-3"]["points"][0]["val_loss"] == \
        json.loads((out / "tokens-512/arms/kphi-3-lr0.003-seed42/metrics.json").read_text())["val_loss"]


def test_a_finished_run_is_read_back_even_while_its_lock_is_held(series, tmp_path, monkeypatch):
    """Only a run in training holds its lock: a finished one is read back without it, so a lock left held by a
    process that is slow to let go never makes another process put a finished run off."""
    from kphi.experiments.budgets import plan_budget_series
    from kphi.experiments.compare import run_compare
    from kphi.files import exclusive_lock

    pytest.importorskip("fcntl", reason="processes coordinate only where fcntl exists")
    out, corpus, tmp, _ = series
    monkeypatch.setenv("KPHI_CACHE", str(tmp / "cache"))
    shutil.copytree(out, tmp_path / "series")
    budget = plan_budget_series(load_suite("smoke"), tmp_path / "series", [512, 1024])[0]
    shared, lines = budget.out, []
    with exclusive_lock(shared / ".locks/kphi-3-lr0.003-seed42.lock"):
        result = run_compare(budget.suite, shared, data=str(corpus), progress=False, log=lines.append, wait=False)
    assert result is not None and not any("another process" in line for line in lines)
    assert any(line.endswith(f"already trained, reusing {shared / 'arms/kphi-3-lr0.003-seed42'}") for line in lines)


@pytest.mark.fast
def test_a_series_is_a_plan_of_comparisons_one_per_budget(tmp_path):
    """``plan_budget_series`` is the series without training: one comparison per budget, smallest first, in
    ``OUT/tokens-N``, at ``max_tokens: N`` (the suite's ``max_steps`` dropped), more seeds at the largest."""
    from kphi.experiments.budgets import budgets_per_parameter, plan_budget_series

    suite = load_suite("cpu-tokens-per-param-w96")
    plan = plan_budget_series(suite, tmp_path / "out")
    budgets = budgets_per_parameter(suite)
    assert [c.suite.training["max_tokens"] for c in plan] == budgets == sorted(budgets) and len(budgets) == 3
    assert [c.seeds for c in plan] == [1, 1, 2]
    assert [c.out for c in plan] == [tmp_path / "out" / f"tokens-{b}" for b in budgets]
    assert all("max_steps" not in c.suite.training and c.suite.arms == suite.arms for c in plan)
    assert [c.seeds for c in plan_budget_series(suite, tmp_path, [10_000, 5_000], seeds=3)] == [3, 2]
    text_series = load_suite("cpu-text-w64")  # seeded_budgets: 3 -> the three largest budgets run seeds_at_largest
    assert [c.seeds for c in plan_budget_series(text_series, tmp_path / "text")] == [1, 1, 2, 2, 2]


def plan_rows(stdout: str) -> list[list[str]]:
    """The cells of each arm's row in ``kphi compare --dry-run``'s table (its first cell names the comparison)."""
    return [line.split("|")[1:-1] for line in stdout.splitlines()
            if line.startswith("| ") and "tokens per run" in line.split("|")[1]]


def test_the_dry_run_shows_the_plan_and_what_is_already_trained(series):
    """``kphi compare --dry-run`` trains nothing and counts the runs its ``--out`` already holds."""
    out, corpus, tmp, _ = series
    before = finished_runs(out)
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024,2048", "--data", str(corpus), "--out",
                      str(out), "--dry-run", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = plan_rows(result.stdout)
    assert len(rows) == 3 * len(load_suite("smoke").arms)
    finished = {(row[0].strip().split(" tokens")[0], row[1].strip()): int(row[7]) for row in rows}
    assert set(finished.values()) == {0, 1} and all((label.startswith("2,048")) == (done == 0) for (label, _), done in finished.items())
    assert finished_runs(out) == before and not (out / "tokens-2048").exists()  # nothing trained, nothing written


def test_the_dry_run_names_the_runs_another_process_is_training(series, tmp_path):
    """An unfinished run whose lock another process holds is counted as in training and named with the tokens
    its ``log.csv`` has logged, of its budget, and its latest validation loss; a free lock, or the held lock of a
    finished run, is not; nothing is written."""
    from kphi.files import exclusive_lock

    pytest.importorskip("fcntl", reason="processes coordinate only where fcntl exists")
    out, corpus, tmp, _ = series
    shared = tmp_path / "shared"
    shutil.copytree(out, shared)
    run = shared / "tokens-512/arms/kphi-3-lr0.003-seed42"
    (run / "metrics.json").unlink()
    (run / "log.csv").write_text("step,tokens,elapsed_s,train_loss,val_loss,learning_rate,tokens_per_second\n"
                                 "1,256,0.1,5.0,,0.003,100\n2,384,0.2,4.5,,0.003,100\n3,384,0.3,,4.4,,\n")
    files = sorted(shared.rglob("*"))
    command = ("compare", "--suite", "smoke", "--budgets", "512,1024", "--data", str(corpus), "--out", str(shared),
               "--dry-run")
    with exclusive_lock(shared / "tokens-512/.locks/kphi-3-lr0.003-seed42.lock"), \
            exclusive_lock(shared / "tokens-1024/.locks/phi-3-lr0.003-seed42.lock"):
        held = run_cli(*command, cache=tmp / "cache")
    free = run_cli(*command, cache=tmp / "cache")
    assert held.returncode == free.returncode == 0, held.stderr[-2000:] + free.stderr[-2000:]
    in_training = {(row[0].strip().split(" tokens")[0], row[1].strip()): int(row[8]) for row in plan_rows(held.stdout)}
    assert in_training.pop(("512", "kphi-3")) == 1 and set(in_training.values()) == {0}
    assert "1 in training by another process" in held.stdout
    assert ("- in training: tokens-512/arms/kphi-3-lr0.003-seed42: 384 of 512 tokens (75%) trained so far; "
            "validation loss 4.400 at 384 tokens") in held.stdout.splitlines()
    assert "0 in training" in free.stdout and "- in training" not in free.stdout
    assert {int(row[8]) for row in plan_rows(free.stdout)} == {0}
    assert sorted(shared.rglob("*")) == files


def test_the_dry_run_shows_only_the_arms_that_arms_selects(tmp_path):
    """``--dry-run`` lists what the same command without it would train: with ``--arms``, those arms only."""
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024", "--arms", "phi-3 small (same params)",
                      "--out", str(tmp_path / "o"), "--dry-run", cache=tmp_path / "c")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = plan_rows(result.stdout)
    assert [row[1].strip() for row in rows] == ["phi-3 small (same params)"] * 2
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024", "--arms", "phi-4",
                      "--out", str(tmp_path / "o"), "--dry-run", cache=tmp_path / "c")
    assert result.returncode != 0 and "no arm 'phi-4' in suite smoke" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_series_needs_two_budgets_and_refuses_rate_flags(tmp_path):
    with pytest.raises(CompareError, match="at least two budgets"):
        run_budget_series(load_suite("smoke"), tmp_path / "o", budgets=[512], progress=False, log=lambda *_: None)
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1e3", "--learning-rates", "1e-3", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.returncode == 2 and "budget series" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,many", "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert result.returncode == 2 and "--budgets must be positive whole numbers" in result.stderr and "Traceback" not in result.stderr


def test_budgets_per_parameter_become_whole_steps_of_the_baselines_size(tmp_path):
    import math

    from kphi.experiments.budgets import budgets_per_parameter
    from kphi.experiments.arms import non_embedding, resolve_arms

    suite_file = tmp_path / "per-param.yaml"
    suite_file.write_text(
        "budgets_per_parameter: [0.01, 0.03]\n"
        "training: {context_length: 64, batch_size: 4, gradient_accumulation_steps: 2}\n"
        "arms:\n  - {label: phi-3, preset: tiny-phi3}\n  - {label: kphi-3, preset: tiny-kphi3}\n")
    suite = load_suite(str(suite_file))
    n = non_embedding(resolve_arms(suite)[0].config)
    per_step = 4 * 64 * 2
    budgets = budgets_per_parameter(suite)
    assert budgets == [math.ceil(r * n / per_step) * per_step for r in (0.01, 0.03)]
    assert all(b % per_step == 0 and b >= r * n for b, r in zip(budgets, (0.01, 0.03)))


def test_a_series_in_tokens_per_parameter_runs_and_flags_a_second_pass(tmp_path):
    """A tiny corpus and budgets beyond one pass over it: the series runs at the computed token counts and
    its warnings say which points trained on repeated data."""
    corpus = write_corpus(tmp_path / "pairs.jsonl", pairs=100)
    suite_file = tmp_path / "per-param.yaml"
    smoke = load_suite("smoke")
    import yaml

    spec = {"name": "per-param", "baseline": "phi-3", "budgets_per_parameter": [0.01, 0.05],
            "data": smoke.data, "training": {k: v for k, v in smoke.training.items() if k != "max_steps"},
            "arms": [{k: v for k, v in dataclasses.asdict(arm).items() if v not in (None, {})} for arm in smoke.arms[:2]]}
    suite_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = run_cli("compare", "--suite", str(suite_file), "--data", str(corpus), "--out", str(out), "--quiet", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    small, large = results["budgets"]
    assert results["tokens_per_parameter"] == {str(small): 0.01, str(large): 0.05}
    assert large > results["train_split_tokens"] >= small
    assert [w for w in results["warnings"] if "more than one pass" in w] == [
        f"{large:,} tokens is more than one pass over the training split ({results['train_split_tokens']:,} tokens): "
        "that point trained on repeated data"]


def test_at_equal_flops_the_other_arm_is_interpolated_in_log_flops():
    from kphi.experiments.budgets import differences

    def arm(losses, per_token):
        return {"points": [{"budget": b, "val_loss": v, "val_loss_std": 0.0, "train_flops": b * per_token}
                           for b, v in zip((100, 1000, 10000), losses)]}

    # the subject costs a tenth of the dense arm per token: its 1000-token run spends what dense's 100-token run does
    results = {"baseline": "dense", "budgets": [100, 1000, 10000],
               "arms": {"dense": arm([5.0, 4.0, 3.0], 10), "subject": arm([4.9, 4.5, 4.1], 1)}}
    rows = differences(results)["at_equal_flops"]["dense"]
    assert [(r["budget"], r["other_val_loss"]) for r in rows] == [(1000, 5.0), (10000, 4.0)]
    assert [round(r["difference"], 6) for r in rows] == [-0.5, 0.1]
    half = {**results, "arms": {"dense": arm([5.0, 4.0, 3.0], 10), "subject": arm([4.9, 4.5, 4.1], 10 ** -0.5 * 10 / 10)}}
    # a point between two of dense's runs: half way in log FLOPs, half way in loss
    row = differences(half)["at_equal_flops"]["dense"][-1]
    assert row["budget"] == 10000 and row["other_val_loss"] == pytest.approx(4.5)


def test_report_summarises_the_budgets_a_series_has_finished_and_trains_nothing(series):
    """``--report`` rebuilds the series' results from its finished budgets: with both finished it is the series'
    own summary; with one planned budget not run yet, the finished ones and a warning naming the missing one;
    with fewer than two finished, one line and nothing written."""
    out, corpus, tmp, _ = series
    runs, original = finished_runs(out), json.loads((out / "results.json").read_text())
    report = tmp / "report"
    for budget in (512, 1024):
        (report / f"tokens-{budget}").mkdir(parents=True)
        (report / f"tokens-{budget}" / "results.json").write_bytes((out / f"tokens-{budget}" / "results.json").read_bytes())

    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024,2048", "--out", str(report), "--report", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr
    summary = json.loads((report / "results.json").read_text())
    assert summary["budgets"] == [512, 1024] and summary["arms"] == original["arms"]
    assert summary["differences"] == original["differences"]
    assert summary["warnings"] == ["2,048 tokens: not finished yet (a series in progress)"]
    assert "| 512 tokens | 1,024 tokens |" in result.stdout and "warning: 2,048 tokens: not finished yet" in result.stdout
    assert (report / "differences.png").read_bytes()[:4] == b"\x89PNG" and finished_runs(out) == runs

    # the missing budget finishes (a stand-in: 1,024's results under 2,048's name): the next report drops the warning
    (report / "tokens-2048").mkdir()
    (report / "tokens-2048" / "results.json").write_bytes((out / "tokens-1024" / "results.json").read_bytes())
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024,2048", "--out", str(report), "--report", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr
    summary = json.loads((report / "results.json").read_text())
    assert summary["budgets"] == [512, 1024, 2048] and summary["warnings"] == [] and "warning:" not in result.stdout
    shutil.rmtree(report / "tokens-2048")

    (report / "tokens-1024" / "results.json").unlink()
    (report / "results.json").unlink()
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024", "--out", str(report), "--report", cache=tmp / "cache")
    assert result.returncode == 2 and "fewer than two finished budgets" in result.stderr
    assert not (report / "results.json").exists()


def test_report_refuses_a_suite_that_is_not_a_series_and_budgets_of_another_suite(series, tmp_path):
    out, _, tmp, _ = series
    result = run_cli("compare", "--suite", "smoke", "--out", str(out), "--report", cache=tmp / "cache")
    assert result.returncode == 2 and "--report summarises a budget series" in result.stderr
    (tmp_path / "tokens-512").mkdir()
    (tmp_path / "tokens-512" / "results.json").write_text(json.dumps({"suite": "cpu", "arms": []}))
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024", "--out", str(tmp_path), "--report", cache=tmp / "cache")
    assert result.returncode == 2 and "a comparison of suite 'cpu', not 'smoke'" in result.stderr


def test_a_series_carried_through_git_resumes_elsewhere_and_trains_nothing(series, tmp_path):
    """scripts/seed-runs.py --collect keeps what a series needs in small committed files; seeding them into an
    empty directory on another machine gives a series compare accepts as its own and finishes by reusing every
    run, with the same results."""
    out, corpus, tmp, _ = series
    seed_runs = load_script("seed-runs")
    committed, fresh = tmp_path / "committed", tmp_path / "fresh"
    seed_runs.collect(out, committed)
    assert not list(committed.rglob("*.safetensors")) and not list(committed.rglob("checkpoint-*"))
    assert seed_runs.seed(committed, fresh) == len(finished_runs(out))
    seeded = finished_runs(fresh)
    assert seeded.keys() == finished_runs(out).keys()

    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024", "--data", str(corpus), "--out", str(fresh),
                     "--quiet", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert finished_runs(fresh) == seeded  # no run added, none retrained
    original = tmp_path / "original"  # the same command in a copy of the series where it ran: the same results
    shutil.copytree(out, original)
    result = run_cli("compare", "--suite", "smoke", "--budgets", "512,1024", "--data", str(corpus), "--out", str(original),
                     "--quiet", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((fresh / "results.json").read_text())["arms"] == json.loads((original / "results.json").read_text())["arms"]


def test_a_series_refuses_fewer_than_one_seed():
    from kphi.experiments.budgets import plan_budget_series

    with pytest.raises(CompareError, match="--seeds must be at least 1, got 0"):
        plan_budget_series(load_suite("smoke"), Path("unused"), [512, 1024], seeds=0)
