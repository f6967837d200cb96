"""Shared fixtures: a deterministic seed for every test and one trained model directory."""

import pytest
import torch

import kphi  # noqa: F401  (registers the kphi3 model type with the Auto classes)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A model directory exactly as ``kphi train`` leaves it (3 steps of the tiny preset), shared by test files."""
    from corpus import prepare_small
    from processes import run_kphi

    root = tmp_path_factory.mktemp("trained")
    out = root / "model"
    args = ["train", "--preset", "tiny-kphi3", "--context-length", "32", "--batch-size", "4", "--logging-steps", "1",
            "--data", str(prepare_small(root)), "--out", str(out), "--max-steps", "3", "--quiet"]
    result = run_kphi(*args, timeout=300)
    assert result.returncode == 0, result.stderr
    return out
