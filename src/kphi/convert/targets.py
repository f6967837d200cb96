"""The converted model's configuration: the source's, with a projection kind, its targets and overrides."""

from __future__ import annotations

import re

import torch
import yaml
from huggingface_hub.errors import StrictDataclassError

from ..errors import ConvertError, first_line, validator_cause
from ..modeling.configuration_kphi3 import BOOKKEEPING_KEYS, KPhi3Config, config_fields
from ..modeling.modeling_kphi3 import PROJECTION_TARGETS
from ..modeling.projections import is_dense_projection, projection_kind
from ..sources.auto import register_structured

__all__ = ["layer_projection_names", "override_dicts", "parse_override", "target_config"]


def target_config(source_config, kind, targets: list[str] | None, overrides: list[dict] | None = None):
    """The structured config for ``source_config``'s architecture, with ``kind`` and ``targets``, and the names
    it targets; a config that cannot be built (a field, a target pattern, an override) is one :class:`ConvertError`."""
    try:
        return _target_config(source_config, kind, targets, overrides)
    except (ValueError, TypeError, StrictDataclassError) as err:
        if isinstance(err, ConvertError):
            raise
        raise ConvertError(f"cannot build the converted config: {validator_cause(err)}") from None


def _target_config(source_config, kind, targets: list[str] | None, overrides: list[dict] | None):
    model_type = source_config.model_type
    if model_type == "kphi3":
        if overrides:
            raise ConvertError("a kphi-3 model has one projection kind; --override applies to other architectures")
        if targets and tuple(targets) != PROJECTION_TARGETS:
            raise ConvertError(f"a kphi-3 model's targets are fixed ({', '.join(PROJECTION_TARGETS)}); drop --targets")
        if source_config.projection_kind().name != "dense":
            raise ConvertError(f"the source is already structured ({source_config.projection_kind().describe()}); convert a dense model")
        config = KPhi3Config(**{**config_fields(source_config), "projection": kind.to_dict()})
        config.validate_architecture()
        return config, list(PROJECTION_TARGETS)
    if model_type.startswith("kphi_"):
        raise ConvertError(f"the source is already a converted model (model_type {model_type!r}); convert a dense model")
    try:
        cls, _ = register_structured(model_type)
    except KeyError as err:
        raise ConvertError(f"kphi convert handles transformers' causal LMs; {err.args[0]}") from None
    if not targets and not cls.default_target_modules:
        targets = layer_projection_names(source_config)
    fields = {k: v for k, v in source_config.to_dict().items() if k not in BOOKKEEPING_KEYS}
    config = cls(**{**fields, "projection": kind.to_dict(), "target_modules": list(targets) if targets else None,
                    "projection_overrides": override_dicts(overrides)})
    config.validate_projection()
    return config, list(config.projection_targets)


def parse_override(text: str) -> dict:
    r"""``--override`` text, ``TARGETS=KIND[:FIELD=VALUE,...]``, as ``{"targets": [...], "projection": {...}}``.

    ``TARGETS`` is a comma-free name or pattern (several: separate ``--override`` options), e.g.
    ``v_proj=dense``, ``.*layers\.(0|1)\..*=low_rank:fraction=0.9``, ``down_proj=grouped:min_channels_per_group=128``.
    """

    targets, sep, spec = text.partition("=")
    kind_name, _, fields = spec.partition(":")
    if not sep or not targets or not kind_name:
        raise ConvertError(f"--override {text!r}: expected TARGETS=KIND[:FIELD=VALUE,...], e.g. v_proj=dense")
    projection = {"kind": kind_name}
    for item in filter(None, fields.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConvertError(f"--override {text!r}: {item!r} is not FIELD=VALUE")
        try:
            projection[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConvertError(f"--override {text!r}: the value of {key} is not valid ({first_line(err)})") from None
    return {"targets": [targets], "projection": projection}


def override_dicts(overrides: list | None) -> list[dict] | None:
    """Overrides as data, each kind checked (a bad one is one :class:`ConvertError`)."""
    if not overrides:
        return None
    result = []
    for override in overrides:
        override = parse_override(override) if isinstance(override, str) else dict(override)
        try:
            override["projection"] = projection_kind(override.get("projection")).to_dict()
        except (ValueError, TypeError) as err:
            raise ConvertError(f"override {override!r}: {err}") from None
        result.append(override)
    return result


def layer_projection_names(source_config) -> list[str]:
    """The projections of an architecture kphi has no target list for: the distinct last names of every
    ``nn.Linear`` / ``Conv1D`` inside a repeated block (a ``ModuleList`` entry such as ``layers.0``), so
    attention and MLP projections but never ``lm_head`` or embeddings. Built on the meta device (no memory).

    Raises :class:`ConvertError` naming what is missing when the architecture has no causal LM or no such
    projection."""

    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(source_config)
    except (ValueError, KeyError) as err:
        raise ConvertError(f"transformers has no causal LM for model_type {source_config.model_type!r}: {err}") from None
    names: list[str] = []
    for name, module in skeleton.named_modules():
        if re.search(r"\.\d+\.", f".{name}") and is_dense_projection(module):
            leaf = name.rpartition(".")[2]
            if leaf not in names:
                names.append(leaf)
    if not names:
        raise ConvertError(
            f"a {source_config.model_type!r} model has no nn.Linear or Conv1D projection inside its repeated "
            "blocks; kphi convert has nothing to replace (name the modules with --targets)"
        )
    return names


def allocation_table(choices: dict[str, str]) -> str:
    """One row per layer, one column per projection name: the candidate each projection got."""
    rows: dict[str, dict[str, str]] = {}
    for name, label in choices.items():
        prefix, _, leaf = name.rpartition(".")
        layer = next((part for part in reversed(prefix.split(".")) if part.isdigit()), prefix)
        rows.setdefault(layer, {})[leaf] = label
    leaves = list(dict.fromkeys(leaf for row in rows.values() for leaf in row))
    widths = [max(len(leaf), *(len(row.get(leaf, "")) for row in rows.values())) for leaf in leaves]
    lines = ["layer  " + "  ".join(leaf.ljust(w) for leaf, w in zip(leaves, widths))]
    lines += [f"{layer:<5}  " + "  ".join(row.get(leaf, "-").ljust(w) for leaf, w in zip(leaves, widths)).rstrip()
              for layer, row in rows.items()]
    return "\n".join(lines)
