"""Checks of what a comparison's ``results.json`` says about an arm, derived by hand from its runs."""

import math

import pytest


def assert_two_seed_summary(arm: dict) -> None:
    """An arm's loss over two seeds is their mean and sample spread, |a - b| / sqrt(2), of its runs' losses."""
    a, b = (run["val_loss"] for run in arm["runs"])
    assert a != b  # two seeds train two different models
    assert arm["val_loss"] == pytest.approx((a + b) / 2)
    assert arm["val_loss_std"] == pytest.approx(abs(a - b) / math.sqrt(2))
