"""Checks shared by the commands that read a model directory (``kphi generate``, ``chat``, ``export``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TOKENIZER_FILES", "has_tokenizer", "read_model_config"]

#: Any of these beside ``config.json`` means the directory carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_model_config(model_dir: str | Path, error: type[Exception]) -> dict:
    """``config.json`` of ``model_dir`` as a dict; raises ``error`` with one message when it is not a model dir."""
    path = Path(model_dir)
    if not path.is_dir():
        raise error(f"{path} is not a directory (expected a model directory, e.g. the --out of kphi train)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise error(f"{path} is not a model directory: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise error(f"{config_file} is unreadable ({err})") from None
    if not isinstance(config, dict):
        raise error(f"{config_file} does not hold a JSON object")
    return config


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)
