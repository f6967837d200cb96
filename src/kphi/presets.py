"""Presets: named model (and experiment) settings stored as YAML files in ``kphi/presets/``.

A preset file holds::

    name: JP47D55C                # the label used in tables
    description: ...              # one line for humans
    model: kphi-3                 # the model family shown in tables (phi-3 / kphi-3 / ...)
    baseline: JP47D54C            # the preset the parameter percentage is measured against
    config: {...}                 # KPhi3Config fields
    training: {...}               # optional training defaults (see kphi.train)

:func:`resolve_config` also accepts a YAML file path, a ``config.json`` or a model directory, so every
command that takes a preset takes a model too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.errors import StrictDataclassError

from .errors import KphiError, validator_cause
from .modeling.configuration_kphi3 import KPhi3Config, config_fields

__all__ = ["Preset", "PresetError", "build_config", "list_presets", "load_preset", "resolve_config"]


class PresetError(KphiError, ValueError):
    """A preset or configuration could not be found or is invalid (message names what and where)."""


@dataclass
class Preset:
    """A named configuration read from a YAML file."""

    name: str
    config: KPhi3Config
    description: str = ""
    model: str = ""
    baseline: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _preset_dir() -> Path:
    return Path(str(resources.files("kphi") / "presets"))


def list_presets() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def build_config(fields: dict[str, Any], what: str, error: type[KphiError] = PresetError) -> KPhi3Config:
    """``KPhi3Config(**fields)``, or one ``error`` whose message starts with ``what`` (where the fields came
    from): a value the config's checks refuse, or a key naming one of its derived, read-only properties
    (``use_return_dict``), which the config cannot take."""
    derived = sorted(k for k in fields if isinstance(getattr(KPhi3Config, k, None), property)
                     and getattr(KPhi3Config, k).fset is None)
    if derived:
        raise error(f"{what}: {', '.join(map(repr, derived))} is derived from the config's other fields, not set")
    try:
        return KPhi3Config(**fields)
    except (TypeError, ValueError, StrictDataclassError) as err:
        raise error(f"{what}: {validator_cause(err)}") from None


def _read_yaml(path: Path) -> Preset:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise PresetError(f"cannot read preset {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise PresetError(f"preset {path} must be a mapping with a 'config' mapping")
    if not isinstance(data.get("training") or {}, dict):
        raise PresetError(f"preset {path}: 'training' must be a mapping of training settings")
    if not isinstance(data.get("baseline"), (str, type(None))):
        raise PresetError(f"preset {path}: 'baseline' must be a preset name")
    return Preset(
        name=str(data.get("name", path.stem)),
        config=build_config(dict(data["config"]), f"invalid model configuration in {path}"),
        description=str(data.get("description", "")),
        model=str(data.get("model", "")),
        baseline=data.get("baseline"),
        training=dict(data.get("training") or {}),
        path=path,
    )


def load_preset(name_or_path: str | Path) -> Preset:
    """A bundled preset by name (``"JP47D55C"``, ``"tiny-kphi3"``), or a YAML preset file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise PresetError(f"preset file not found: {path}")
        return _read_yaml(path)
    bundled = _preset_dir() / f"{name_or_path}.yaml"
    if bundled.is_file():
        return _read_yaml(bundled)
    raise PresetError(f"unknown preset {str(name_or_path)!r}; available: {', '.join(list_presets())}")


def resolve_config(spec: str | Path) -> Preset:
    """A preset name, a preset YAML, a ``config.json`` or a model directory -> :class:`Preset`."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PresetError(f"{spec} is not a model directory: it has no config.json")
    if path.suffix == ".json":
        if not path.is_file():
            raise PresetError(f"config file not found: {path}")
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PresetError(f"cannot read {path}: {err}") from None
        if not isinstance(fields, dict):
            raise PresetError(f"{path} must hold a JSON object")
        model_type = fields.pop("model_type", "kphi3")
        if model_type not in ("kphi3", "phi3"):
            raise PresetError(f"{path}: model_type {model_type!r} is not kphi3 or phi3")
        if model_type == "phi3":
            fields.setdefault("projection", {"kind": "dense"})
        config = build_config(config_fields(fields), f"invalid model configuration in {path}")
        return Preset(name=path.parent.name, config=config, model="kphi-3" if config.is_grouped else "phi-3", path=path)
    if path.suffix not in (".yaml", ".yml") and len(path.parts) > 1 and not path.exists():
        raise PresetError(f"{spec} does not exist (expected a preset name, a preset YAML, a config.json or a model directory)")
    return load_preset(spec)
