"""Run records written by older kphi, read in today's form: a run's identity (``kphi-run.json``) migrated
version by version, then compared with the settings at hand. The legacy fields of model configs are folded where
configs are read (:mod:`kphi.modeling.configuration_kphi3`: report checkpoints carry them, so that stays in the
files a standalone export ships); everything else that reads the past lives here."""

from __future__ import annotations

from typing import Any

from ..errors import KphiError
from ..modeling.configuration_kphi3 import (
    LEGACY_GROUPED_INIT,
    KPhi3Config,
    canonical_projection,
    fold_legacy_projection,
    pin_legacy_init,
)
from .train_settings import TrainSettings, model_fields

__all__ = ["IDENTITY_VERSION", "identity_differences", "recorded_identity", "recorded_version"]


#: The form of run identity this code writes (``identity_version`` in ``kphi-run.json``). Older records are
#: brought to it by :func:`recorded_identity`, one explicit step per version, and then compared:
#:
#: * 1 -> 2: ``preset`` + ``config_overrides`` became ``model``, the whole model config;
#: * 2 -> 3: ``model``'s legacy projection fields (``min_channels_per_group``, ``grouped_init``,
#:   ``low_rank_fraction``) folded into ``projection``, spelled out with every setting of its kind.
IDENTITY_VERSION = 3


def recorded_version(record: dict[str, Any]) -> int:
    """The identity version of a run record (``kphi-run.json``): its ``identity_version``, else (records made
    before versions were written) 1 when the identity names a preset, 2 when it holds the model."""
    version = record.get("identity_version")
    if version is not None:
        return int(version)
    return 1 if "preset" in (record.get("identity") or {}) else 2


def recorded_identity(identity: dict[str, Any], version: int | None = None) -> dict[str, Any]:
    """A run's recorded identity (of ``version``, inferred as :func:`recorded_version` does when ``None``)
    migrated to today's form (:data:`IDENTITY_VERSION`), so runs recorded by older kphi stay resumable and
    reusable.

    Version 1 stored only a preset name (or a YAML path) and overrides, not the model: it is the one step that
    resolves a preset as it is today (a preset that no longer resolves gives ``model: None``, which matches
    nothing). Version 2 -> 3 is pure data: :func:`~kphi.modeling.configuration_kphi3.fold_legacy_projection`. Both
    predate ``kaiming_uniform`` as the default init, so a grouped projection they leave unspelled gets the init
    it had then (:data:`~kphi.modeling.configuration_kphi3.LEGACY_GROUPED_INIT`); version 3 spells every init.
    """
    if version is None:
        version = recorded_version({"identity": identity})
    upgraded = dict(identity)
    if version < 2 and "preset" in upgraded:
        overrides = dict(upgraded.pop("config_overrides", None) or {})
        if overrides.get("projection") is not None:
            overrides["projection"] = pin_legacy_init(overrides["projection"])
        elif overrides.get("grouped_init") is None:
            overrides["grouped_init"] = LEGACY_GROUPED_INIT  # (ignored when the preset is not grouped)
        old = TrainSettings(preset=upgraded.pop("preset"), config_overrides=overrides)
        try:
            upgraded["model"] = model_fields(old)
        except (KphiError, TypeError, ValueError):
            upgraded["model"] = None
    if version < 3 and isinstance(upgraded.get("model"), dict):
        try:
            model = fold_legacy_projection(upgraded["model"])
        except ValueError:  # legacy fields no config could be built from: a run that matches nothing
            model = {**upgraded["model"], "projection": None}
        model["projection"] = canonical_projection(pin_legacy_init(model["projection"]))
        upgraded["model"] = model
    return upgraded


def identity_differences(recorded: dict[str, Any] | None, settings: TrainSettings, config: KPhi3Config | None = None,
                         version: int | None = None) -> list[str]:
    """The identity fields in which ``settings`` (training ``config``) differ from a run recorded with identity
    ``version`` (:func:`recorded_identity`); ``[]``: the same run."""
    previous = recorded_identity(recorded or {}, version)
    current = settings.identity(config)
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
