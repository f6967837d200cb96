"""``kphi compress`` at smoke scale: every step of the experiment runs, lands in results, and is reused."""

import json

import pytest

from processes import finished_runs, run_cli

from kphi.experiments.compare import CompareError
from kphi.experiments.suites import load_suite
from kphi.experiments.compress import load_compress_suite




@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "out"
    run = run_cli("compress", "--suite", "compress-smoke", "--out", str(out), "--quiet", cache=out.parent / "cache")
    assert run.returncode == 0, run.stderr
    return out, run.stdout


def test_compress_runs_every_step_and_reports_it(smoke_run):
    out, stdout = smoke_run
    results = json.loads((out / "results.json").read_text())
    suite = load_compress_suite("compress-smoke")
    assert set(results["arms"]) == {c["label"] for c in suite.compressions}
    for label, arm in results["arms"].items():
        assert arm["non_embedding"] < results["teacher"]["non_embedding"], label
        assert arm["val_loss_after_fit"] > 0 and arm["mean_calibration_error"] is not None
        for mode in ("plain", "distill"):
            healed = arm["healed"][mode]
            assert set(healed["grid"]) == {f"{r:g}" for r in suite.heal_learning_rates}
            assert healed["val_loss"] == min(healed["grid"].values())
    by_label = results["arms"]
    # on the calibration data the activation-aware fit is never worse than the Frobenius fit of the same kind
    assert by_label["grouped (activations)"]["mean_calibration_error"] <= by_label["grouped (frobenius)"]["mean_calibration_error"]
    assert results["scratch"]["tokens"] == suite.teacher["tokens"] + suite.heal_tokens
    assert results["other_architecture"]["llama"]["model_type"] == "llama"
    assert (out / "fits" / "llama" / "modeling_structured.py").is_file()
    assert json.loads((out / "fits" / "llama" / "config.json").read_text())["model_type"] == "kphi_llama"
    for name in ("results.md", "compress.png"):
        assert (out / name).is_file()
    assert "| grouped (frobenius) |" in stdout and "Another architecture: llama" in stdout


def test_a_second_run_reuses_every_finished_run(smoke_run):
    out, _ = smoke_run
    before, runs = (out / "results.json").read_text(), finished_runs(out)
    run = run_cli("compress", "--suite", "compress-smoke", "--out", str(out), cache=out.parent / "cache")
    assert run.returncode == 0, run.stderr
    assert len(runs) >= 10 and finished_runs(out) == runs  # nothing retrained
    after = json.loads((out / "results.json").read_text())
    previous = json.loads(before)
    assert after["arms"] == previous["arms"] and after["teacher"] == previous["teacher"]


@pytest.mark.fast
def test_compress_and_compare_suites_are_not_interchangeable():
    with pytest.raises(CompareError, match="kphi compress --suite compress-smoke"):
        load_suite("compress-smoke")
    with pytest.raises(CompareError, match="not a compress suite"):
        load_compress_suite("smoke")


def test_a_structure_study_fits_a_pretrained_model_and_resumes(tmp_path):
    """kind: structure on a GGUF file: every fit converted and scored in bits per byte beside the source, each
    result kept as it is measured, a rerun reusing them all."""
    from tiny_gguf import write_tiny_llama_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf)
    suite = tmp_path / "structure.yaml"
    suite.write_text(
        f"kind: structure\nname: tiny-structure\nsource: {gguf}\nheldout_bytes: 2048\ncontext: 64\nstride: 32\n"
        "data: {source: default, max_rows: 120, validation_rows: 8, context_length: 128}\n"
        "fits:\n"
        "  - {label: low-rank 50%, kind: {kind: low_rank, fraction: 0.5}}\n"
        "  - {label: grouped m=8, kind: {kind: grouped, min_channels_per_group: 8}, targets: [down_proj]}\n"
        "heal: {fits: [grouped m=8], tokens: 1024, learning_rate: 0.01,"
        " training: {batch_size: 2, eval_rows: 4, eval_steps: 2, save_steps: 1000}}\n")
    command = ["compress", "--suite", suite, "--out", tmp_path / "out", "--quiet"]
    first = run_cli(*command, cache=tmp_path / "cache", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [f["label"] for f in results["fits"]] == ["low-rank 50%", "grouped m=8"]
    low_rank, grouped = results["fits"]
    assert 45 < low_rank["percent_kept"] < 55 and grouped["replaced"] == 2 and grouped["targets"] == ["down_proj"]
    for fit in results["fits"]:
        assert fit["relative_bits_per_byte"] == fit["bits_per_byte"] / results["source"]["bits_per_byte"]
    assert (tmp_path / "out" / "structure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (tmp_path / "out" / "fits" / "low-rank-50.json").stat().st_mtime_ns
    # healing: the fit written as a model, trained with distillation from the source, scored on the same text
    (healed,) = results["healed"]
    assert healed["label"] == "grouped m=8" and healed["tokens"] == 1024 and healed["steps"] == 4
    assert healed["seconds_per_step"] > 0 and healed["wall_seconds"] > 0
    assert healed["bits_per_byte_before"] == grouped["bits_per_byte"] != healed["bits_per_byte"]
    run = json.loads((tmp_path / "out" / "heal" / "grouped-m-8" / "run" / "kphi-run.json").read_text())
    assert run["settings"]["distill_from"] == str(gguf) and run["settings"]["init_from"].endswith("fit")
    assert "healed by distillation" in (tmp_path / "out" / "results.md").read_text()
    heal_stamp = (tmp_path / "out" / "heal" / "grouped-m-8.json").stat().st_mtime_ns
    again = run_cli(*command, cache=tmp_path / "cache", timeout=600)
    assert again.returncode == 0 and (tmp_path / "out" / "fits" / "low-rank-50.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "out" / "heal" / "grouped-m-8.json").stat().st_mtime_ns == heal_stamp


def test_a_structure_fit_can_be_allocated_reconstructed_and_healed(tmp_path, monkeypatch):
    """A fit with ``keep``: each projection's kind chosen by sensitivity, every layer reconstructed, then healed;
    the healed model directory is the model the fit measured (the sensitivity is measured once, cached; the
    conversion and reconstruction run once)."""
    from tiny_gguf import write_tiny_llama_gguf

    def converted_again(*args, **kwargs):
        raise AssertionError("the healed fit was converted a second time")

    monkeypatch.setattr("kphi.experiments.structure.convert_to_dir", converted_again)

    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf)
    suite = tmp_path / "structure.yaml"
    suite.write_text(
        f"kind: structure\nname: tiny-allocated\nsource: {gguf}\nheldout_bytes: 2048\ncontext: 64\nstride: 32\n"
        "calibration_tokens: 512\ndata: {source: default, max_rows: 120, validation_rows: 8, context_length: 128}\n"
        "fits:\n"
        "  - {label: allocated 70%, keep: 0.7, sensitivity_bytes: 1024, reconstruct_steps: 4, fit: activations}\n"
        "heal: {fits: [allocated 70%], tokens: 512, learning_rate: 0.01,"
        " data: {source: default, max_rows: 100, validation_rows: 8, context_length: 64},"
        " training: {batch_size: 2, eval_rows: 4, eval_steps: 2, save_steps: 1000}}\n")
    done = run_cli("compress", "--suite", suite, "--out", tmp_path / "out", "--quiet", cache=tmp_path / "cache", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())["fits"]
    assert row["percent_kept"] <= 70 and row["allocation"]["keep"] == 0.7
    assert len(row["reconstruction"]) == 2 and row["reconstruction_tokens_per_layer"] > 0
    assert all(r["error_after"] <= r["error_before"] for r in row["reconstruction"])
    assert row["bits_per_byte_fit"] > 0 and "sensitivity allocation" in (tmp_path / "out" / "results.md").read_text()
    (scores,) = (tmp_path / "out" / "sensitivity").iterdir()  # kept in the suite's output; healing found the same file
    assert len(json.loads(scores.read_text())["scores"]) > 0
    written = json.loads((tmp_path / "out" / "heal" / "allocated-70" / "fit" / "kphi-convert.json").read_text())
    assert written["allocation"]["choices"] == row["allocation"]["choices"]
    assert [r["error_after"] for r in written["reconstruction"]] == [r["error_after"] for r in row["reconstruction"]]
    run = json.loads((tmp_path / "out" / "heal" / "allocated-70" / "run" / "kphi-run.json").read_text())
    assert run["settings"]["context_length"] == 64 and "ctx64" in run["settings"]["data"]  # heal's own data
    _the_healing_curve_is_in_bits_per_byte_of_the_validation_rows(tmp_path, suite, run["settings"]["data"])


def suite_source(suite_file) -> str:
    import yaml

    return yaml.safe_load(suite_file.read_text())["source"]


def _the_healing_curve_is_in_bits_per_byte_of_the_validation_rows(tmp_path, suite, heal_data):
    """Each evaluation of the healing run, as bits per byte of the 4 validation rows it scored: the loss in nats
    per predicted token over ln 2 and the bytes each predicted token decodes to; the source scored on the same
    rows the same way; a row measured before curves were kept gets its curve on the next run, nothing
    retrained."""
    import math

    import torch

    from kphi.data.prepare import load_prepared

    out = tmp_path / "out"
    (healed,) = json.loads((out / "results.json").read_text())["healed"]
    _, validation, tokenizer, _ = load_prepared(heal_data)
    predicted = [[t for t, label in zip(r["input_ids"][1:], r["labels"][1:]) if label != -100] for r in validation.select(range(4))]
    bytes_per_token = sum(len(tokenizer.decode(ids, skip_special_tokens=True).encode()) for ids in predicted) / sum(map(len, predicted))
    assert [p["step"] for p in healed["curve"]] == [2, 4] and healed["curve"][-1]["val_loss"] == pytest.approx(healed["val_loss"])
    for point in healed["curve"]:
        assert point["bits_per_byte"] == pytest.approx(point["val_loss"] / math.log(2) / bytes_per_token)
    assert (out / "heal.png").read_bytes()[:4] == b"\x89PNG"
    # the source on the same rows, through transformers' own loss (labels shifted inside the model)
    from kphi.sources.model_dir import load_model

    source = load_model(suite_source(suite)).eval()
    rows = validation.select(range(4))
    with torch.no_grad():
        nats = sum(source(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item() * len(ids)
                   for r, ids in zip(rows, predicted))
    expected = nats / sum(map(len, predicted)) / math.log(2) / bytes_per_token
    assert json.loads((out / "source.json").read_text())["healing_text_bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert "bits per byte on the healing text's validation rows" in (out / "results.md").read_text()

    cached = out / "heal" / "allocated-70.json"
    cached.write_text(json.dumps({k: v for k, v in json.loads(cached.read_text()).items() if k != "curve"}))
    trained = (out / "heal" / "allocated-70" / "run" / "metrics.json").read_bytes()
    wall = json.loads((out / "results.json").read_text())["wall_seconds"]
    again = run_cli("compress", "--suite", suite, "--out", out, "--quiet", cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(cached.read_text())["curve"] == healed["curve"]
    assert (out / "heal" / "allocated-70" / "run" / "metrics.json").read_bytes() == trained
    assert json.loads((out / "results.json").read_text())["wall_seconds"] >= wall  # the rerun adds its seconds, keeps the study's


def test_a_structure_suite_heals_only_fits_it_names(tmp_path):
    from kphi.experiments.structure import load_structure_suite

    suite = tmp_path / "s.yaml"
    suite.write_text("kind: structure\nname: s\nsource: x\nfits:\n  - {label: a, kind: {kind: low_rank}}\n"
                     "heal: {fits: [b], tokens: 10, learning_rate: 0.1}\n")
    with pytest.raises(CompareError, match="heal names fits that are not in fits: b"):
        load_structure_suite(str(suite))
    suite.write_text("kind: structure\nname: s\nsource: x\nfits:\n  - {label: a, kind: {kind: low_rank}}\n"
                     "heal: {fits: [a], tokens: 10}\n")
    with pytest.raises(CompareError, match="heal takes fits, tokens, learning_rate"):
        load_structure_suite(str(suite))


class _GridRunner:
    """Stands in for compress's runner in the healing grid: a rate of 1 or more diverges, lower rates finish
    with a loss equal to the rate (so the best rate is the lowest that finished)."""

    def __init__(self, tmp_path, rates):
        from types import SimpleNamespace

        self.out = tmp_path
        self.suite = SimpleNamespace(distill={}, heal_learning_rates=rates, heal_tokens=64)
        self.trained = []

    def train(self, run_dir, label, preset, learning_rate, **_):
        self.trained.append(learning_rate)
        return {"val_loss": None, "diverged": "loss became nan"} if learning_rate >= 1 else {"val_loss": learning_rate}


def test_healing_reports_the_best_rate_that_converged_and_records_the_diverged_one(tmp_path):
    from kphi.experiments.compress import _heal

    runner = _GridRunner(tmp_path, [0.5, 10.0, 0.25])
    healed = _heal(runner, "fit", tmp_path / "fit", tmp_path / "teacher", "tiny-kphi3")
    for mode in ("plain", "distill"):
        assert healed[mode]["learning_rate"] == 0.25 and healed[mode]["val_loss"] == 0.25
        assert healed[mode]["grid"] == {"0.5": 0.5, "10": None, "0.25": 0.25}
    assert runner.trained == [0.5, 10.0, 0.25] * 2


def test_healing_that_diverges_at_every_rate_is_one_clear_error(tmp_path):
    from kphi.experiments.compress import _heal

    with pytest.raises(CompareError, match=r"^fit: healing \(plain\) diverged at every rate of heal_learning_rates; lower them$"):
        _heal(_GridRunner(tmp_path, [1.0, 10.0]), "fit", tmp_path / "fit", tmp_path / "teacher", "tiny-kphi3")
