"""Settings dataclasses: one declaration per setting gives its check and its flag; nothing given means nothing set."""

import argparse
import dataclasses

import pytest

from kphi.data.prepare import CorpusSettings, PrepareSettings
from kphi.settings import add_settings_arguments, field_docs, invalid_setting, setting
from kphi.train import TrainError, TrainSettings

pytestmark = pytest.mark.fast


def parser():
    p = argparse.ArgumentParser()
    add_settings_arguments(p, TrainSettings, skip=("progress",), required=("preset", "out"))
    return p


def test_every_scalar_field_is_a_flag_with_its_docstring_as_help():
    p = parser()
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(TrainSettings)} - {"progress"}
    assert "Peak learning rate" in flags["learning_rate"].help
    assert field_docs(TrainSettings)["eval_rows"].startswith("Use only the first")


def test_only_the_flags_given_are_set_and_typed():
    args = vars(parser().parse_args(["--preset", "tiny-kphi3", "--out", "o", "--learning-rate", "3e-3", "--max-steps", "7",
                                     "--gradient-checkpointing"]))
    assert args == {"preset": "tiny-kphi3", "out": "o", "learning_rate": 3e-3, "max_steps": 7, "gradient_checkpointing": True}
    assert vars(parser().parse_args(["--preset", "p", "--out", "o", "--no-gradient-checkpointing"]))["gradient_checkpointing"] is False


def test_required_and_typed_flags_are_enforced():
    with pytest.raises(SystemExit):
        parser().parse_args(["--out", "o"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--preset", "p", "--out", "o", "--batch-size", "eight"])

    with pytest.raises(SystemExit):
        parser().parse_args(["--preset", "p", "--out", "o", "--config-overrides", "[1, 2]"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--preset", "p", "--out", "o", "--training-arguments", "{adam_beta2: 0.95}"])


def test_dict_settings_are_json_flags():
    args = parser().parse_args(["--preset", "p", "--out", "o", "--config-overrides", '{"hidden_size": 64}',
                                "--training-arguments", '{"adam_beta2": 0.95}'])
    assert args.config_overrides == {"hidden_size": 64} and args.training_arguments == {"adam_beta2": 0.95}


def test_the_data_fields_are_declared_once_for_training_and_preparation():
    shared = {f.name for f in dataclasses.fields(CorpusSettings)}
    assert shared == {"tokenizer", "vocab_size", "context_length", "validation_rows", "max_rows"}
    for cls in (TrainSettings, PrepareSettings):
        assert issubclass(cls, CorpusSettings)
        assert {f.name: f.default for f in dataclasses.fields(cls) if f.name in shared} == {
            f.name: f.default for f in dataclasses.fields(CorpusSettings)}
    assert field_docs(TrainSettings)["context_length"] == field_docs(PrepareSettings)["context_length"]


@dataclasses.dataclass
class Example:
    count: int = setting(1, minimum=1)
    rate: float = setting(0.5, above=0, maximum=1)
    mode: str = setting("a", choices=("a", "b"))
    limit: int | None = setting(None, minimum=0)
    flag: bool = False


@pytest.mark.parametrize("bad, message", [
    ({"count": 0}, "count must be a positive integer, got 0"),
    ({"count": 2.0}, "count must be a positive integer, got 2.0"),
    ({"count": True}, "count must be a positive integer, got True"),
    ({"rate": 0.0}, "rate must be in (0, 1], got 0.0"),
    ({"rate": float("nan")}, "rate must be in (0, 1], got nan"),
    ({"mode": "c"}, "mode must be one of a, b, got 'c'"),
    ({"limit": -1}, "limit must be an integer >= 0, got -1"),
    ({"flag": "yes"}, "flag must be true or false, got 'yes'"),
])
def test_declared_bounds_and_types_are_checked(bad, message):
    assert invalid_setting(Example()) is None  # the defaults pass
    assert invalid_setting(Example(limit=None, rate=1, count=3)) is None  # None where allowed, an int for a float
    assert invalid_setting(Example(**bad)) == message


def test_training_arguments_pass_through_to_trainer_and_kphis_own_are_refused(tmp_path):
    from kphi.train import trainer_arguments

    args = trainer_arguments(TrainSettings(training_arguments={"adam_beta2": 0.95}), tmp_path, max_steps=3)
    assert args.adam_beta2 == 0.95 and args.max_steps == 3
    with pytest.raises(TrainError, match="learning_rate is set from kphi's own settings"):
        trainer_arguments(TrainSettings(training_arguments={"learning_rate": 1.0}), tmp_path, max_steps=3)
    with pytest.raises(TrainError, match="adam_beta3 is not"):
        trainer_arguments(TrainSettings(training_arguments={"adam_beta3": 0.9}), tmp_path, max_steps=3)


@pytest.mark.fast
@pytest.mark.parametrize("preset", ["JP47D54C", "JP47D55C", "JP47D56C"])
def test_the_report_presets_carry_the_reports_training_recipe(preset, tmp_path):
    from kphi.train import resolve_settings

    settings = resolve_settings(preset, out=str(tmp_path / "run"), max_tokens=200_000_000)
    assert (settings.tokenizer, settings.context_length, settings.batch_size) == ("phi3", 4096, 1)
    assert (settings.learning_rate, settings.lr_scheduler, settings.precision) == (1e-4, "constant", "auto")
    assert settings.validation_rows == 5000 and settings.eval_rows == 500  # evaluation a small share of compute


@pytest.mark.fast
def test_settings_resolve_as_defaults_then_the_preset_then_the_flags():
    """``resolve_settings``: TrainSettings' defaults <- the preset's ``training:`` <- what the caller gives
    (``None``: not given); an explicit budget replaces the preset's; two budgets or an unknown name are refused."""
    from kphi.presets import load_preset
    from kphi.training.train_settings import TrainError, TrainSettings, resolve_settings

    preset, defaults = load_preset("cpu-kphi3").training, TrainSettings()
    assert preset["learning_rate"] != defaults.learning_rate and "weight_decay" not in preset
    settings = resolve_settings("cpu-kphi3")
    assert settings.learning_rate == preset["learning_rate"] and settings.weight_decay == defaults.weight_decay
    assert settings.max_steps == preset["max_steps"] and settings.preset == "cpu-kphi3"
    settings = resolve_settings("cpu-kphi3", learning_rate=5e-4, batch_size=None, max_tokens=4096)
    assert settings.learning_rate == 5e-4 and settings.batch_size == preset["batch_size"]
    assert settings.max_tokens == 4096 and settings.max_steps is None  # the preset's budget is replaced
    assert resolve_settings(None, max_steps=3).learning_rate == defaults.learning_rate  # no preset: the defaults
    with pytest.raises(TrainError, match="give one budget, not max_steps and max_tokens"):
        resolve_settings("cpu-kphi3", max_steps=10, max_tokens=4096)
    with pytest.raises(TrainError, match="unknown training setting 'learning_rat'"):
        resolve_settings("cpu-kphi3", learning_rat=1e-3)
