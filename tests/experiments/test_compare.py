"""``kphi compare``: controls of equal size, the smoke suite end to end, results and plots on disk."""

import json
import re
import math
import time

import pytest

from processes import run_cli

from kphi.experiments.compare import CompareError
from kphi.experiments.arms import dense_control, low_rank_control, non_embedding, resolve_arms
from kphi.experiments.suites import load_suite
from kphi.modeling.lowrank import LowRankLinear, rank_for_fraction
from kphi.presets import load_preset

from corpus import write_corpus
from summaries import assert_two_seed_summary


def test_low_rank_projection_counts_and_shapes():
    layer = LowRankLinear(64, 192, rank_for_fraction(64, 192, 0.25))
    assert layer.rank == round(0.25 * 64 * 192 / 256)
    assert sum(p.numel() for p in layer.parameters()) == layer.rank * (64 + 192)
    import torch

    assert layer(torch.zeros(3, 64)).shape == (3, 192)


@pytest.mark.parametrize("suite", ["smoke", "cpu", "paper"])
def test_controls_match_the_kphi_arm_size(suite):
    arms = {a.label: a for a in resolve_arms(load_suite(suite))}
    target_label = {"smoke": "kphi-3", "cpu": "kphi-3", "paper": "JP47D55C"}[suite]
    target = non_embedding(arms[target_label].config)
    for arm in arms.values():
        if arm.kind == "dense control":
            assert arm.config.projection == {"kind": "dense"}
            assert arm.config.hidden_size < load_preset(arm.source.split()[0]).config.hidden_size
            assert abs(non_embedding(arm.config) - target) / target < 0.03
        if arm.kind == "low_rank control":
            assert arm.config.projection["kind"] == "low_rank"
            assert abs(non_embedding(arm.config) - target) / target < 0.01


def test_paper_suite_reproduces_the_report_counts():
    arms = {a.label: non_embedding(a.config) for a in resolve_arms(load_suite("paper"))}
    assert arms["JP47D54C"] == 226_507_776 and arms["JP47D55C"] == 35_011_584 and arms["JP47D56C"] == 52_515_840


def test_dense_control_with_a_generous_target_keeps_the_base_width():
    base = load_preset("tiny-phi3").config
    assert dense_control(base, non_embedding(base)).hidden_size == base.hidden_size
    assert low_rank_control(base, non_embedding(base) // 4).projection["fraction"] < 0.5


def test_any_projection_kind_can_be_an_arm(tmp_path):
    suite = tmp_path / "kinds.yaml"
    suite.write_text(
        "arms:\n"
        "  - {label: dense, preset: tiny-phi3}\n"
        "  - {label: monarch, preset: tiny-phi3, config: {projection: {kind: monarch, blocks: 4, fraction: 0.25}}}\n"
        "  - {label: low-rank, preset: tiny-phi3, config: {projection: {kind: low_rank, fraction: 0.25}}}\n"
    )
    arms = {a.label: a for a in resolve_arms(load_suite(str(suite)))}
    assert arms["monarch"].config.projection_kind().name == "monarch"
    dense = non_embedding(arms["dense"].config)
    for label in ("monarch", "low-rank"):
        assert non_embedding(arms[label].config) < 0.6 * dense, label


def test_bad_suites_name_the_problem(tmp_path):
    with pytest.raises(CompareError, match="unknown suite 'nope'"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms:\n  - {label: a, preset: tiny-phi3}\n  - {label: a, preset: tiny-kphi3}\n")
    with pytest.raises(CompareError, match="unique label"):
        load_suite(str(bad))
    bad.write_text("arms:\n  - {label: a, preset: tiny-phi3}\n  - {label: b, control: dense, base: tiny-phi3, match: zzz}\n")
    with pytest.raises(CompareError, match="control needs"):
        resolve_arms(load_suite(str(bad)))


@pytest.mark.parametrize("config, message", [
    ("{hidden_size: 0}", "arm 'b': config: hidden_size must be a positive integer, got 0"),
    ("{use_return_dict: false}", "arm 'b': config: 'use_return_dict' is derived from the config's other fields, not set"),
])
def test_an_arms_config_the_model_refuses_is_named(tmp_path, config, message):
    """A preset arm's and a control's ``config:`` are both checked, each error naming its arm."""
    bad = tmp_path / "bad.yaml"
    for arm in (f"{{label: b, preset: tiny-phi3, config: {config}}}", f"{{label: b, control: dense, base: tiny-phi3, match: a, config: {config}}}"):
        bad.write_text(f"arms:\n  - {{label: a, preset: tiny-kphi3}}\n  - {arm}\n")
        with pytest.raises(CompareError, match=re.escape(message)):
            resolve_arms(load_suite(str(bad)))


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("learning_rate: 0.01\narms:\n  - {label: a, preset: tiny-phi3}\n", "no setting 'learning_rate' (a suite has"),
    ("arms:\n  - {label: a, preset: tiny-phi3, learnig_rate: 0.01}\n", "arm 'a': no setting 'learnig_rate' (an arm has"),
    ("arms:\n  - {label: a, preset: tiny-phi3, training: {sead: 1}}\n", "arm 'a': training has no setting 'sead'"),
    ("arms:\n  - tiny-phi3\n", "every arm is a mapping"),
])
def test_a_misspelt_suite_or_arm_key_is_refused_by_name(tmp_path, text, message):
    """A key no suite or arm reads would otherwise be ignored, and the run would quietly use a default."""
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    with pytest.raises(CompareError, match=re.escape(message)):
        load_suite(str(bad))


@pytest.mark.fast
def test_a_suites_training_section_is_partial_train_settings(tmp_path):
    """Unknown settings are refused when the suite loads (in every kind of suite); absent ones come from
    TrainSettings' defaults, the one place they are written."""
    from kphi.experiments.compress import load_compress_suite
    from kphi.training.train_settings import TrainSettings, training_value

    bad = tmp_path / "typo.yaml"
    bad.write_text("training: {batch_size: 4, learnig_rate: 0.01}\narms:\n  - {label: a, preset: tiny-phi3}\n")
    with pytest.raises(CompareError, match=r"typo.yaml: training has no setting 'learnig_rate'"):
        load_suite(str(bad))
    bad.write_text("kind: compress\nname: c\ndescription: d\nteacher: {preset: tiny-phi3, tokens: 64, learning_rate: 0.01}\n"
                   "compressions: [{label: g, kind: {kind: grouped, min_channels_per_group: 8}}]\nheal_tokens: 64\n"
                   "heal_learning_rates: [0.01]\ntraining: {sead: 1}\n")
    with pytest.raises(CompareError, match="training has no setting 'sead'"):
        load_compress_suite(str(bad))
    training = load_suite("smoke").training
    assert "seed" not in training and training_value(training, "seed") == TrainSettings().seed
    assert training_value(training, "batch_size") == training["batch_size"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    corpus = write_corpus(tmp / "pairs.jsonl", pairs=300)
    out = tmp / "out"
    result = run_cli("compare", "--suite", "smoke", "--data", str(corpus), "--seeds", "2", "--out", str(out), "--quiet", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout, tmp


def test_smoke_suite_writes_results_table_and_plots(smoke_run):
    out, stdout, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert [a["label"] for a in results["arms"]] == ["phi-3", "kphi-3", "phi-3 small (same params)", "low-rank (same params)"]
    required = {"label", "model", "layers", "intermediate_size", "non_embedding", "percent", "train_loss", "val_loss", "tokens_per_second", "config"}
    for arm in results["arms"]:
        assert required <= set(arm)
        assert math.isfinite(arm["train_loss"]) and math.isfinite(arm["val_loss"])
        assert arm["tokens_per_second"] > 0
        assert len(arm["runs"]) == 2
        assert_two_seed_summary(arm)
        assert arm["tokens"] == results["arms"][0]["tokens"]  # identical token budget
    assert results["arms"][0]["percent"] == 100.0
    # tiny-kphi3 has 37,184 non-embedding parameters (its hand count: tests/test_params.py), its dense phi-3 82,240:
    # 2 layers x (qkv 64x192 + o 64x64 + gate_up 64x256 + down 128x64 + 2 norms of 64) + a final norm of 64.
    assert results["arms"][1]["percent"] == pytest.approx(45.2, abs=0.1)
    for name in ("val_loss.png", "params_vs_loss.png", "results.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| kphi-3 | kphi-3 | 2 | 128 | 37,184 | 45.2% |" in stdout


def test_arms_share_data_order_and_settings(smoke_run):
    out, _, _ = smoke_run
    runs = sorted((out / "arms").glob("*-seed42/kphi-run.json"))
    settings = [json.loads(p.read_text())["settings"] for p in runs]
    assert len(settings) == 4
    for s in settings:
        for key in ("data", "seed", "batch_size", "context_length", "learning_rate", "max_steps"):
            assert s[key] == settings[0][key], key


def test_rerun_reuses_finished_arms_and_refuses_a_different_comparison(smoke_run):
    out, _, tmp = smoke_run
    before = (out / "results.json").read_text()
    again = run_cli("compare", "--suite", "smoke", "--data", str(tmp / "pairs.jsonl"), "--seeds", "2", "--out", str(out), "--quiet", cache=tmp / "cache")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["arms"] == json.loads(before)["arms"]
    other = run_cli("compare", "--suite", "smoke", "--data", str(tmp / "pairs.jsonl"), "--max-tokens", "999", "--out", str(out), "--quiet", cache=tmp / "cache")
    assert other.returncode == 2 and "different comparison" in other.stderr and "Traceback" not in other.stderr
    assert json.loads((out / "results.json").read_text())["arms"] == json.loads(before)["arms"]


def test_processes_sharing_an_out_dir_each_train_other_runs_with_the_same_results(smoke_run, tmp_path, monkeypatch):
    """Two ``kphi compare`` processes given one ``--out`` split its runs: a run another process holds (its lock
    under ``.locks/``) is put off, the rest trained, then the held one waited for; once its holder lets go it is
    trained (or read back), and every loss equals that of one process training everything alone."""
    import shutil
    import threading

    from kphi.experiments.compare import run_compare
    from kphi.files import exclusive_lock

    pytest.importorskip("fcntl", reason="processes coordinate only where fcntl exists")
    smoke, _, tmp = smoke_run
    monkeypatch.setenv("KPHI_CACHE", str(tmp / "cache"))
    out, suite = tmp_path / "shared", load_suite("smoke")
    held = "kphi-3-lr0.003-seed42"
    out.mkdir()
    shutil.copy(smoke / "kphi-compare.json", out)  # the same comparison, as the first process would have claimed it
    lines, done = [], []
    other = threading.Thread(target=lambda: done.append(run_compare(
        suite, out, data=str(tmp / "pairs.jsonl"), progress=False, log=lines.append)), daemon=True)
    with exclusive_lock(out / ".locks" / f"{held}.lock"):
        other.start()
        deadline = time.monotonic() + 600
        while len(list((out / "arms").glob("*/metrics.json"))) < 3 and other.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("kphi-3, lr 0.003, seed 42: another process is training it" in line for line in lines)
        assert sorted(p.parent.name for p in (out / "arms").glob("*/metrics.json")) == [
            "low-rank-same-params-lr0.003-seed42", "phi-3-lr0.003-seed42", "phi-3-small-same-params-lr0.003-seed42"]
        assert not (out / "arms" / held).exists() and other.is_alive()  # waiting, not training it
    other.join(timeout=600)
    assert done, "the comparison did not finish once the lock was released"
    alone = {a["label"]: a["runs"][0]["val_loss"] for a in json.loads((smoke / "results.json").read_text())["arms"]}
    assert {a["label"]: a["val_loss"] for a in done[0]["arms"]} == alone


def test_a_run_that_started_from_other_initial_weights_is_not_reused(smoke_run, tmp_path):
    """A finished run whose recorded initial-weights hash is not what today's code builds for it (the
    initialisation changed since) is refused by name, not mixed into new results (issue 16)."""
    import shutil

    out, _, tmp = smoke_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run_file = next((copy / "arms").glob("phi-3-lr*-seed42/kphi-run.json"))
    record = json.loads(run_file.read_text())
    assert len(record["initial_weights_sha256"]) == 64
    record["initial_weights_sha256"] = "0" * 64
    run_file.write_text(json.dumps(record))
    before = (copy / "results.json").read_text()
    again = run_cli("compare", "--suite", "smoke", "--data", str(tmp / "pairs.jsonl"), "--seeds", "2", "--out", str(copy), "--quiet", cache=tmp / "cache")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "other initial weights" in again.stderr and run_file.parent.name in again.stderr
    assert (copy / "results.json").read_text() == before


def test_arms_option_trains_only_the_named_arms(smoke_run, tmp_path):
    """``--arms`` re-runs part of a suite: the others still size the control and set the percentages."""
    _, _, tmp = smoke_run
    out = tmp_path / "only"
    result = run_cli("compare", "--suite", "smoke", "--data", str(tmp / "pairs.jsonl"), "--arms", "phi-3 small (same params)",
                      "--out", str(out), "--quiet", cache=tmp / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    arms = json.loads((out / "results.json").read_text())["arms"]
    assert [a["label"] for a in arms] == ["phi-3 small (same params)"]
    assert sorted(p.name.split("-lr")[0] for p in (out / "arms").iterdir()) == ["phi-3-small-same-params"]
    full = {a.label: a for a in resolve_arms(load_suite("smoke"))}
    assert arms[0]["percent"] == round(100 * non_embedding(full["phi-3 small (same params)"].config) / non_embedding(full["phi-3"].config), 1)
    bad = run_cli("compare", "--suite", "smoke", "--arms", "nope", "--out", str(tmp_path / "bad"), "--quiet", cache=tmp / "cache")
    assert bad.returncode == 2 and "no arm 'nope'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.fast
def test_an_arm_that_narrows_the_model_narrows_its_embeddings_too(tmp_path):
    """``config: {hidden_size: 64}`` on a width-256 preset is a width-64 model (embeddings follow), unless the
    arm names ``embed_size`` itself."""
    import yaml

    from kphi.experiments.arms import resolve_arms
    from kphi.experiments.suites import load_suite

    spec = {"name": "narrow", "baseline": "narrow", "data": {"source": "default"}, "training": {"max_steps": 1},
            "arms": [{"label": "narrow", "preset": "cpu-phi3", "config": {"hidden_size": 64, "intermediate_size": 192}},
                     {"label": "adapted", "preset": "cpu-phi3", "config": {"hidden_size": 64, "embed_size": 128}}]}
    (tmp_path / "narrow.yaml").write_text(yaml.safe_dump(spec))
    narrow, adapted = resolve_arms(load_suite(str(tmp_path / "narrow.yaml")))
    assert (narrow.config.hidden_size, narrow.config.embed_size) == (64, 64)
    assert (adapted.config.hidden_size, adapted.config.embed_size) == (64, 128)
