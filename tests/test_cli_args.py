"""Flags generated from a settings dataclass: one definition per setting, nothing given means nothing set."""

import argparse
import dataclasses

import pytest

from kphi.cli_args import add_settings_arguments, field_docs
from kphi.train import TrainSettings

pytestmark = pytest.mark.fast


def parser():
    p = argparse.ArgumentParser()
    add_settings_arguments(p, TrainSettings, skip=("progress",), required=("preset", "out"))
    return p


def test_every_scalar_field_is_a_flag_with_its_docstring_as_help():
    p = parser()
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    scalar = {f.name for f in dataclasses.fields(TrainSettings)} - {"progress", "config_overrides"}
    assert set(flags) == scalar
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
