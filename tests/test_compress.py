"""``kphi compress`` at smoke scale: every step of the experiment runs, lands in results, and is reused."""

import json
import os
import subprocess
import sys

import pytest

from kphi.compare import CompareError, load_suite
from kphi.compress import load_compress_suite


def kphi(*args, timeout=900):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kphi", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "out"
    run = kphi("compress", "--suite", "compress-smoke", "--out", str(out), "--quiet")
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
    before = (out / "results.json").read_text()
    run = kphi("compress", "--suite", "compress-smoke", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert " tokens at lr " not in run.stdout and run.stdout.count("already trained") >= 10  # nothing retrained
    after = json.loads((out / "results.json").read_text())
    previous = json.loads(before)
    assert after["arms"] == previous["arms"] and after["teacher"] == previous["teacher"]


@pytest.mark.fast
def test_compress_and_compare_suites_are_not_interchangeable():
    with pytest.raises(CompareError, match="kphi compress --suite compress-smoke"):
        load_suite("compress-smoke")
    with pytest.raises(CompareError, match="not a compress suite"):
        load_compress_suite("smoke")
