"""The configuration of kphi-3 models (``model_type: kphi3``).

This file, ``modeling_kphi3.py`` and the sibling modules they import relatively (the projection kinds and their
registry) are what ``kphi export --standalone`` ships beside the weights, through transformers' own custom-code
mechanism: they import nothing from kphi but each other, so the checkpoint loads with
``trust_remote_code=True`` where kphi is not installed.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Phi3Config

from .block import DEFAULT_GROUPED_INIT, GROUPED_INIT_SCHEMES
from .projections import PHI3_PROJECTION_TARGETS, projection_kind

__all__ = ["KPhi3Config", "GROUPED_INIT_SCHEMES", "PHI3_PROJECTION_TARGETS", "BOOKKEEPING_KEYS", "config_fields",
           "DEFAULT_PROJECTION", "LEGACY_PROJECTION_FIELDS", "apply_legacy_fields", "fold_legacy_projection",
           "canonical_projection", "with_overrides", "LEGACY_GROUPED_INIT", "LEGACY_DEFAULT_PROJECTION",
           "pin_legacy_init"]


#: The projection of a config that names none: the report's block with ``m = 256`` and the report's init.
DEFAULT_PROJECTION = {"kind": "grouped", "min_channels_per_group": 256, "init": DEFAULT_GROUPED_INIT, "branches": 2}

#: The init every grouped projection had when its config did not name one, before ``kaiming_uniform`` became
#: the default: what the legacy fields (``grouped_init`` absent), version-2 run records and every bundled
#: suite swept before the switch mean.
LEGACY_GROUPED_INIT = "scaled_normal"

#: The projection the legacy fields were read against (:func:`apply_legacy_fields`): the old default.
LEGACY_DEFAULT_PROJECTION = {**DEFAULT_PROJECTION, "init": LEGACY_GROUPED_INIT}

#: The three fields that said what replaced a dense projection before ``projection`` alone did (every report
#: checkpoint and every run recorded before it carry them). They are read once, on the way in
#: (:func:`fold_legacy_projection`), and never kept on a config.
LEGACY_PROJECTION_FIELDS = ("min_channels_per_group", "grouped_init", "low_rank_fraction")


def apply_legacy_fields(projection: dict, legacy: dict) -> dict:
    """``projection`` changed as the legacy fields in ``legacy`` say (``None`` values count as absent).

    * ``min_channels_per_group: m`` — ``m > 0``: grouped with that ``m`` (a grouped ``projection`` keeps its
      other settings); ``m < 0``: dense; ``0`` is refused;
    * ``low_rank_fraction: f`` — low-rank keeping a fraction ``f``; refused on a grouped projection (the old
      rule: low-rank needs ``min_channels_per_group < 0``);
    * ``grouped_init: scheme`` — the init of a grouped projection (ignored by other kinds, as before).

    On :data:`LEGACY_DEFAULT_PROJECTION` this is exactly how the old config derived its kind: grouped when
    ``m > 0``, else low-rank when ``low_rank_fraction`` is set, else dense; a grouped projection made here
    from a non-grouped one gets the legacy init (:data:`LEGACY_GROUPED_INIT`) unless ``grouped_init`` says.
    """
    legacy = {k: v for k, v in legacy.items() if v is not None}
    unknown = set(legacy) - set(LEGACY_PROJECTION_FIELDS)
    if unknown:
        raise ValueError(f"not a legacy projection field: {', '.join(sorted(unknown))}")
    result = dict(projection)
    m = legacy.get("min_channels_per_group")
    if m is not None:
        if not isinstance(m, int) or isinstance(m, bool) or m == 0:
            raise ValueError(f"min_channels_per_group must be positive (grouped) or negative (dense), got {m!r}")
        if m < 0:
            result = {"kind": "dense"}
        elif result.get("kind") == "grouped":
            result["min_channels_per_group"] = m
        else:
            result = {"kind": "grouped", "min_channels_per_group": m, "init": LEGACY_GROUPED_INIT}
    fraction = legacy.get("low_rank_fraction")
    if fraction is not None:
        if result.get("kind") == "grouped":
            raise ValueError("low_rank_fraction needs dense projections (min_channels_per_group < 0)")
        result = {"kind": "low_rank", "fraction": fraction}
    scheme = legacy.get("grouped_init")
    if scheme is not None:
        if scheme not in GROUPED_INIT_SCHEMES:
            raise ValueError(f"grouped_init must be one of {GROUPED_INIT_SCHEMES}, got {scheme!r}")
        if result.get("kind") == "grouped":
            result["init"] = scheme
    return result


def fold_legacy_projection(fields: dict) -> dict:
    """``fields`` (a config's arguments, a ``config.json``, a recorded run's model) in today's form: the legacy
    fields removed and ``projection`` set when it is absent or ``None`` — from them (:func:`apply_legacy_fields`
    on :data:`LEGACY_DEFAULT_PROJECTION`) when there are any, else :data:`DEFAULT_PROJECTION`. A given
    ``projection`` is kept (it always overrode them); beside legacy fields it comes from a ``config.json``
    written before the init default changed, so a grouped one naming no init gets the legacy init
    (:func:`pin_legacy_init`)."""
    fields = dict(fields)
    legacy = {key: fields.pop(key) for key in LEGACY_PROJECTION_FIELDS if fields.get(key) is not None}
    for key in LEGACY_PROJECTION_FIELDS:
        fields.pop(key, None)
    if fields.get("projection") is None:
        fields["projection"] = apply_legacy_fields(LEGACY_DEFAULT_PROJECTION, legacy) if legacy else dict(DEFAULT_PROJECTION)
    elif legacy:
        fields["projection"] = pin_legacy_init(fields["projection"])
    return fields


def pin_legacy_init(projection):
    """``projection`` with ``init: scaled_normal`` (:data:`LEGACY_GROUPED_INIT`) when it is grouped and names
    no init: what a grouped projection spelled without one meant before ``kaiming_uniform`` became the default
    (version-2 run records). Anything else is returned unchanged."""
    if isinstance(projection, dict) and projection.get("kind") == "grouped" and "init" not in projection:
        return {**projection, "init": LEGACY_GROUPED_INIT}
    return projection


def canonical_projection(projection):
    """``projection`` with every setting of its kind spelled out (``{kind: grouped, min_channels_per_group: 32}``
    -> ``{..., init: kaiming_uniform, branches: 2}``), so one projection spelled two ways is one model;
    returned unchanged when it names no valid kind (validation reports that)."""
    try:
        return projection_kind(projection).to_dict()
    except (TypeError, ValueError):
        return projection


@strict
class KPhi3Config(Phi3Config):
    r"""Configuration of a kphi-3 model: every field of [`Phi3Config`] plus what replaces its projections.

    embed_size (`int`, *optional*):
        Width of the token embedding and of ``lm_head``'s input. ``None`` means ``hidden_size``. When it
        differs from ``hidden_size`` the model adds the blocks ``embed_to_hidden`` and ``hidden_to_embed``.
    projection (`dict`, defaults to the report's block with ``m = 256``):
        The kind of every decoder projection (and width adapter) as data (:mod:`kphi.modeling.projections`):
        ``{"kind": "grouped", "min_channels_per_group": 32}`` (the report's block, ``G`` from
        :func:`kphi.modeling.block.group_count`), ``{"kind": "dense"}`` (phi-3), ``{"kind": "low_rank", "fraction":
        0.24}``, ``{"kind": "monarch", "blocks": 4, "fraction": 0.24}``. Stored with every setting of its kind
        spelled out. The fields that said this before (``min_channels_per_group``, negative for dense;
        ``grouped_init``; ``low_rank_fraction``), which every report checkpoint carries, are still accepted as
        arguments: they are folded into ``projection`` (:func:`fold_legacy_projection`) and not kept. Given
        beside a ``projection`` they are ignored, as they always were (an older ``config.json`` holds both); to
        change a config's projection with them, use :func:`with_overrides`.

    Fields that reference checkpoints carry and transformers 5 renamed or dropped (``rope_theta``,
    ``rope_scaling``, ``ffn_dim``, ``do_layer_norm_before``, ``torch_dtype``, ...) are accepted; the rope
    fields are folded into ``rope_parameters``, the rest are kept as plain attributes.
    """

    model_type = "kphi3"

    embed_size: int | None = None
    projection: dict | None = None

    def __post_init__(self, **kwargs):
        if self.embed_size is None:
            self.embed_size = self.hidden_size
        legacy = {key: kwargs.pop(key) for key in LEGACY_PROJECTION_FIELDS if key in kwargs}
        self.projection = canonical_projection(fold_legacy_projection({"projection": self.projection, **legacy})["projection"])
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Raise ``ValueError`` with the offending fields when the shapes cannot build a model."""
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("embed_size", "num_key_value_heads"):  # optional: None means "as hidden_size" / "as heads"
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        self.projection_kind()  # raises ValueError naming a bad projection setting

    @property
    def is_grouped(self) -> bool:
        return self.projection_kind().name == "grouped"

    def projection_kind(self):
        """The :class:`~kphi.modeling.kinds.ProjectionKind` of the decoder's projections (see ``projection``)."""
        return projection_kind(self.projection)


#: Keys ``config.json`` carries that describe the file, not the model (not ``KPhi3Config`` arguments).
BOOKKEEPING_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


def with_overrides(config: KPhi3Config | dict, overrides: dict | None) -> dict:
    """``config_fields(config)`` updated by ``overrides``, where a new ``hidden_size`` carries the embedding
    width with it when that width was the old hidden size (so ``{hidden_size: 64}`` on a width-256 preset is a
    width-64 model, not a width-64 core behind width-256 embeddings and adapters); an explicit ``embed_size``
    in ``overrides`` wins. Legacy projection fields in ``overrides`` change the config's projection
    (:func:`apply_legacy_fields`: ``{min_channels_per_group: 8}`` on a grouped preset is that preset with
    ``m = 8``); an explicit ``projection`` in ``overrides`` replaces it whole."""
    fields = fold_legacy_projection(config_fields(config))
    overrides = dict(overrides or {})
    legacy = {key: overrides.pop(key) for key in LEGACY_PROJECTION_FIELDS if key in overrides}
    if overrides.get("projection") is None:  # (an explicit None keeps the config's projection)
        overrides.pop("projection", None)
        if legacy:
            overrides["projection"] = apply_legacy_fields(canonical_projection(fields["projection"]), legacy)
    if "hidden_size" in overrides and "embed_size" not in overrides and fields.get("embed_size") in (None, fields.get("hidden_size")):
        fields["embed_size"] = None  # derived again from the new hidden size
    return {**fields, **overrides}


def config_fields(config: KPhi3Config | dict) -> dict:
    """The arguments that rebuild ``config`` (``KPhi3Config(**config_fields(c))``): its dict without bookkeeping keys."""
    fields = dict(config) if isinstance(config, dict) else config.to_dict()
    for key in BOOKKEEPING_KEYS:
        fields.pop(key, None)
    return fields
