"""``kphi train`` as a user runs it: in-process runs, real files, and real processes killed and resumed."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corpus import prepare_small
from processes import kill_after_checkpoint, kphi_env, run_cli, run_torchrun

TINY = ["--preset", "tiny-kphi3", "--context-length", "32", "--batch-size", "4", "--logging-steps", "1", "--quiet"]




def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "log.csv") as handle:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(handle) if r["train_loss"]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def full_run(prepared, tmp_path_factory):
    """12 uninterrupted steps, a checkpoint every 2, losses logged every step."""
    out = tmp_path_factory.mktemp("runs") / "full"
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "12", "--save-steps", "2", "--eval-steps", "4")
    assert result.returncode == 0, result.stderr
    return out


def test_run_dir_is_a_self_contained_model_dir(full_run):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "metrics.json", "log.csv", "loss.png"):
        assert (full_run / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(full_run)
    tokenizer = AutoTokenizer.from_pretrained(full_run)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True).endswith("<|assistant|>")
    from transformers import GenerationConfig

    end, eos = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id
    assert GenerationConfig.from_pretrained(full_run).eos_token_id == [end, eos] and end != eos  # a reply stops at either
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["tokens"] == 12 * 4 * 32 and metrics["stopped_by_time_limit"] is False
    assert metrics["val_loss"] < metrics["val_curve"][0][1] + 1e-6  # validation loss did not get worse
    assert metrics["tokens_per_second"] > 0
    assert len(losses(full_run)) == 12
    checkpoints = sorted(full_run.glob("checkpoint-*"))
    assert len(checkpoints) == 2 and all((c / "kphi-complete.json").is_file() for c in checkpoints)
    # the loss curve went down on this easy corpus
    curve = losses(full_run)
    assert curve[12] < curve[1]


def test_resume_reproduces_the_uninterrupted_loss_curve(prepared, full_run, tmp_path):
    out = tmp_path / "resumed"
    first = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "6", "--save-steps", "2", "--eval-steps", "4")
    assert first.returncode == 0, first.stderr
    second = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "12", "--save-steps", "2", "--eval-steps", "4", "--resume")
    assert second.returncode == 0, second.stderr
    expected, got = losses(full_run), losses(out)
    assert set(got) == set(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    with open(out / "log.csv") as handle:  # one clock across both invocations
        elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(handle)]
    assert elapsed == sorted(elapsed)
    assert json.loads((out / "metrics.json").read_text())["wall_seconds"] >= elapsed[-1] - 1.0


def test_sigkill_mid_run_then_resume(prepared, full_run, tmp_path):
    out = tmp_path / "killed"
    kill_after_checkpoint(["train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "12", "--save-steps", "2",
                           "--eval-steps", "4"], out, step=4)
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "12", "--save-steps", "2", "--eval-steps", "4", "--resume")
    assert result.returncode == 0, result.stderr
    expected, got = losses(full_run), losses(out)
    for step in range(5, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_grouped_lr_scale_trains_another_run_and_resumes_it_bit_for_bit(prepared, tmp_path):
    """``--grouped-lr-scale groups`` (the Trainer subclass that scales each grouped weight's rate by its G) in a
    real run: it changes the losses, and a run killed at a checkpoint resumes onto the same curve (the
    optimizer's per-group rates are rebuilt, not lost, on resume)."""
    args = [*TINY, "--data", str(prepared), "--max-steps", "8", "--save-steps", "2", "--eval-steps", "4"]
    scaled, plain = tmp_path / "scaled", tmp_path / "plain"
    assert run_cli("train", *args, "--out", str(scaled), "--grouped-lr-scale", "groups").returncode == 0
    assert run_cli("train", *args, "--out", str(plain)).returncode == 0
    assert losses(scaled)[8] != pytest.approx(losses(plain)[8], rel=1e-4)  # the rule changed the run
    killed = tmp_path / "killed"
    kill_after_checkpoint(["train", *args, "--out", str(killed), "--grouped-lr-scale", "groups"], killed, step=4)
    result = run_cli("train", *args, "--out", str(killed), "--grouped-lr-scale", "groups", "--resume")
    assert result.returncode == 0, result.stderr
    expected, got = losses(scaled), losses(killed)
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_a_run_killed_after_its_final_checkpoint_resumes_to_the_same_model(prepared, full_run, tmp_path):
    """Killed after its last checkpoint, while writing its outputs: Trainer resumed at the budget's last step
    would take one step more, so the run replays its last segment from the checkpoint before and ends where the
    uninterrupted run did, to the bit; a budget below the newest checkpoint is refused, the run untouched."""
    out = tmp_path / "killed-at-the-end"
    shutil.copytree(full_run, out)
    (out / "metrics.json").unlink()
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "12", "--save-steps", "2", "--eval-steps", "4", "--resume")
    assert result.returncode == 0, result.stderr
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, full_run))
    assert metrics["steps"] == 12 and metrics["val_loss"] == expected["val_loss"]
    assert (out / "model.safetensors").read_bytes() == (full_run / "model.safetensors").read_bytes()
    shorter = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "8", "--save-steps", "2", "--eval-steps", "4", "--resume")
    assert shorter.returncode == 2 and "past the budget of 8 steps" in shorter.stderr and "Traceback" not in shorter.stderr
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_a_run_on_a_schedule_that_depends_on_its_length_resumes_only_toward_the_same_budget(prepared, tmp_path):
    """A constant rate extends exactly (above); a cosine run resumed toward a larger budget would follow neither
    cosine, so it is refused in one line, the run untouched, and resumes toward its own budget."""
    out = tmp_path / "cosine"
    args = [*TINY, "--data", str(prepared), "--out", str(out), "--save-steps", "2", "--lr-scheduler", "cosine"]
    assert run_cli("train", *args, "--max-steps", "4").returncode == 0
    for done in (out / "checkpoint-4", out / "metrics.json"):  # as if killed after the step-2 checkpoint
        shutil.rmtree(done) if done.is_dir() else done.unlink()
    longer = run_cli("train", *args, "--max-steps", "8", "--resume")
    assert longer.returncode == 2 and "Traceback" not in longer.stderr
    assert "trained toward 4 steps on the cosine schedule" in longer.stderr and "toward 8 steps" in longer.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "metrics.json").exists()
    again = run_cli("train", *args, "--max-steps", "4", "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_incomplete_checkpoint_is_ignored_and_corrupt_one_refused(prepared, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "4", "--save-steps", "2").returncode == 0
    # a save killed half-way: a directory without the completion marker, newer than the good ones
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"partial")
    # the newest complete checkpoint is corrupt
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"\x00" * 16)
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "8", "--save-steps", "2", "--resume")
    assert result.returncode == 2
    assert "checkpoint" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoint-6").exists()


def test_a_checkpoint_trainer_cannot_load_is_one_line_whatever_the_error_says(prepared, tmp_path):
    """Weights and config intact (kphi's own check passes) but the optimizer state unreadable: Trainer fails
    while loading, before any step, and that is reported as the checkpoint's fault in one line."""
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "2", "--save-steps", "2").returncode == 0
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")
    (out / "metrics.json").unlink()
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "4", "--save-steps", "2", "--resume")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"kphi: error: cannot resume from {out / 'checkpoint-2'}") and "Traceback" not in result.stderr


def test_refuses_to_overwrite_a_run_or_a_foreign_directory(prepared, full_run, tmp_path):
    before = (full_run / "metrics.json").read_bytes()
    again = run_cli("train", *TINY, "--data", str(prepared), "--out", str(full_run), "--max-steps", "3")
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    other = run_cli("train", "--preset", "tiny-phi3", "--context-length", "32", "--quiet", "--data", str(prepared), "--out", str(full_run), "--max-steps", "3", "--resume")
    assert other.returncode == 2 and "different run" in other.stderr
    assert (full_run / "metrics.json").read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(foreign), "--max-steps", "3")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (foreign / "notes.txt").read_text() == "mine"


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    out = tmp_path / "nan"
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-steps", "30", "--save-steps", "2", "--learning-rate", "1e30")
    assert result.returncode == 2, result.stderr
    assert "loss became" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "nope", "--max-steps", "1"], "unknown preset 'nope'"),
        (["--preset", "tiny-kphi3", "--max-steps", "0"], "max_steps must be a positive integer"),
        (["--preset", "tiny-kphi3", "--max-steps", "1", "--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = run_cli("train", *args, "--out", str(tmp_path / "x"), "--quiet")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_train_with_no_data_named_uses_the_offline_corpus(tmp_path):
    """A fresh machine with no data named trains on the offline corpus, prepared once and cached."""
    pytest.importorskip("chitchat_dataset")
    out = tmp_path / "fresh"
    result = run_cli("train", "--preset", "tiny-kphi3", "--max-steps", "5", "--max-rows", "2000", "--out", str(out), "--quiet",
                  env={"KPHI_CACHE": str(tmp_path / "cache")})  # the corpus's first 2,000 rows: the whole takes 40 s
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9]])
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(prepared, tmp_path):
    """Scale-out through torchrun (gloo): 2 x batch 2 gives the losses of 1 x batch 4."""
    common = ["train", "--preset", "tiny-kphi3", "--context-length", "32", "--logging-steps", "1", "--quiet",
              "--data", str(prepared), "--max-steps", "5", "--save-steps", "5"]
    single = run_cli(*common, "--batch-size", "4", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    ddp = run_torchrun(2, ["-m", "kphi", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                       env=kphi_env({"OMP_NUM_THREADS": "1"}))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    expected, got = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert set(got) == set(expected) == {1, 2, 3, 4, 5}
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-5), step


def test_max_minutes_stops_with_a_checkpoint_and_a_model(prepared, tmp_path):
    out = tmp_path / "timed"
    result = run_cli("train", *TINY, "--data", str(prepared), "--out", str(out), "--max-minutes", "0.05", "--save-steps", "1000")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_by_time_limit"] is True and 1 <= metrics["steps"] < 1000  # the clock stopped it
    settings = json.loads((out / "kphi-run.json").read_text())["settings"]
    assert settings["max_steps"] is None and settings["max_minutes"] == 0.05  # the preset's max_steps is replaced
    assert (out / f"checkpoint-{metrics['steps']}" / "kphi-complete.json").is_file()
    assert (out / "model.safetensors").is_file()


def test_a_recorded_run_resumes_with_its_settings_and_refuses_another_model(tmp_path):
    """The stored identity is JSON; the live one is compared in the same form (a token-id list included)."""
    import dataclasses

    from kphi.train import RUN_FILE, TrainError, TrainSettings, _check_run_dir

    settings = TrainSettings(out=str(tmp_path), max_steps=1, config_overrides={"eos_token_id": [2, 7]})
    tmp_path.mkdir(exist_ok=True)
    record = {"identity": settings.identity(), "settings": dataclasses.asdict(settings)}
    (tmp_path / RUN_FILE).write_text(json.dumps(record))
    _check_run_dir(tmp_path, settings, resume=True)  # the same run: no error
    other = TrainSettings(out=str(tmp_path), max_steps=1, config_overrides={"eos_token_id": [2, 8]})
    with pytest.raises(TrainError, match="settings differ: model"):
        _check_run_dir(tmp_path, other, resume=True)


@pytest.mark.fast
def test_settings_added_later_do_not_change_a_recorded_runs_identity():
    """Runs recorded before init_from/distill_*/projection existed must stay resumable and reusable."""
    from kphi.train import TrainSettings, identity_differences
    from kphi.training.train_settings import LATER_FIELDS

    current = TrainSettings(config_overrides={"hidden_size": 64}).identity()
    assert not set(LATER_FIELDS) & set(current)
    assert identity_differences(current, TrainSettings(config_overrides={"hidden_size": 64, "projection": None})) == []
    changed = TrainSettings(config_overrides={"projection": {"kind": "monarch"}}, distill_from="teacher")
    assert identity_differences(current, changed) == ["distill_from", "model"]


def _old_style_identity(settings, preset, overrides):
    """A record as runs wrote it before identities held the whole model config: preset + overrides."""
    import dataclasses

    from kphi.training.train_settings import LATER_FIELDS

    d = dataclasses.asdict(settings)
    for key in ("out", "max_steps", "max_tokens", "max_minutes", "progress", "save_total_limit", *LATER_FIELDS):
        d.pop(key)
    d["preset"], d["config_overrides"] = preset, overrides
    return json.loads(json.dumps(d))


@pytest.mark.fast
def test_a_run_recorded_with_a_preset_is_the_same_run_as_one_given_its_config_object(tmp_path):
    """compare used to write each arm as a preset YAML and train from it; it now hands train() the config.

    Records of the old form (a preset path + the arm's fields as overrides) must still be recognised as the
    same run, so finished experiments are reused, and a different model must still be refused.
    """
    import yaml

    from kphi.sources.auto import KPhi3Config, config_fields
    from kphi.presets import load_preset
    from kphi.train import TrainSettings, identity_differences

    arm = KPhi3Config(**{**config_fields(load_preset("cpu-kphi3").config), "num_hidden_layers": 3})
    fields = {k: v for k, v in config_fields(arm).items() if k not in ("dtype", "torch_dtype")}
    arm_file = tmp_path / "arms" / "kphi-3.yaml"
    arm_file.parent.mkdir()
    arm_file.write_text(yaml.safe_dump({"name": "kphi-3", "config": fields}))
    settings = TrainSettings(preset=None, data="prepared", learning_rate=4e-3)
    old = _old_style_identity(settings, str(arm_file), fields)
    assert identity_differences(old, settings, arm) == []
    assert identity_differences(old, settings, KPhi3Config(**{**fields, "num_hidden_layers": 2})) == ["model"]
    assert identity_differences(old, TrainSettings(preset=None, data="prepared", learning_rate=2e-3), arm) == ["learning_rate"]
    # an old record naming a bundled preset with a few overrides: trained with the grouped init of its day
    # (scaled_normal), so it is that run, and not today's preset, which names none and gets kaiming_uniform
    named = TrainSettings(preset="tiny-kphi3", config_overrides={"num_hidden_layers": 1, "grouped_init": "scaled_normal"})
    recorded = _old_style_identity(named, "tiny-kphi3", {"num_hidden_layers": 1})
    assert identity_differences(recorded, named) == []
    assert identity_differences(recorded, TrainSettings(preset="tiny-kphi3", config_overrides={"num_hidden_layers": 1})) == ["model"]
    # a preset that no longer resolves matches nothing
    gone = _old_style_identity(settings, str(tmp_path / "missing.yaml"), fields)
    assert identity_differences(gone, settings, arm) == ["model"]




def test_fewer_eval_rows_than_a_batch_still_evaluates_and_keeps_the_model(prepared, tmp_path):
    """--eval-rows below --batch-size used to end (after training) in an IndexError and no model."""
    out = tmp_path / "run"
    result = run_cli("train", "--preset", "tiny-kphi3", "--data", str(prepared), "--context-length", "32", "--batch-size", "4",
                  "--eval-rows", "2", "--max-steps", "2", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss"] > 0 and metrics["steps"] == 2
    assert (out / "model.safetensors").is_file()


def test_a_new_run_failing_before_its_first_step_takes_back_only_what_it_wrote(tmp_path):
    """What the failed call wrote (record, log, TensorBoard folder) goes; what was there before stays."""
    from kphi.train import RUN_FILE, _release_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    found_before = set(out.iterdir())
    (out / RUN_FILE).write_text("{}")
    (out / "log.csv").write_text("step,tokens\n")
    (out / "runs" / "host").mkdir(parents=True)
    (out / "runs" / "host" / "events").write_text("tb")
    _release_run_dir(out, found_before)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_resumed_run_failing_before_its_first_step_is_left_as_it_was(tmp_path):
    """An earlier invocation's record and log (a run killed before its first checkpoint) are never removed."""
    from kphi.train import RUN_FILE, _release_run_dir

    out = tmp_path / "run"
    (out / "runs").mkdir(parents=True)
    (out / RUN_FILE).write_text("{}")
    (out / "log.csv").write_text("step,tokens\n1,256\n")
    found_before = set(out.iterdir())
    (out / "runs" / "second-try").mkdir()
    _release_run_dir(out, found_before)
    assert (out / "log.csv").read_text() == "step,tokens\n1,256\n" and (out / RUN_FILE).is_file()
    assert (out / "runs" / "second-try").is_dir()


@pytest.mark.parametrize("overrides", [None, {}, {"rope_theta": 5000.0}, {"attn_implementation": "eager"},
                                       {"min_channels_per_group": 8}, {"hidden_size": 64, "projection": None}])
def test_config_overrides_that_transformers_or_kphi_take_are_accepted(overrides):
    from kphi.train import resolve_settings
    from kphi.training.train_settings import check_model_config

    settings = resolve_settings("tiny-kphi3")
    settings.config_overrides = overrides
    check_model_config(settings)  # raises TrainError for a key or value it refuses
