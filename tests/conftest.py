"""Shared fixtures: tiny configurations and a deterministic seed for every test."""

import pytest
import torch

import kphi  # noqa: F401  (registers the kphi3 model type with the Auto classes)
from kphi import KPhi3Config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> KPhi3Config:
    """A small kphi-3 config with G > 1 everywhere (m = 16: qkv/o/gate_up G=4, down_proj G=8)."""
    fields = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=97,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        min_channels_per_group=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return KPhi3Config(**fields)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A model directory exactly as ``kphi train`` leaves it (3 steps of the tiny preset), shared by test files."""
    import os
    import subprocess
    import sys

    from corpus import prepare_small

    root = tmp_path_factory.mktemp("trained")
    out = root / "model"
    args = ["train", "--preset", "tiny-kphi3", "--context-length", "32", "--batch-size", "4", "--logging-steps", "1",
            "--data", str(prepare_small(root)), "--out", str(out), "--max-steps", "3", "--quiet"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "kphi", *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return out
