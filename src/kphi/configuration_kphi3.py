"""The configuration of kphi-3 models (``model_type: kphi3``).

This file and ``modeling_kphi3.py`` (with ``block.py`` and ``lowrank.py``, which it imports relatively) are
what ``kphi export --standalone`` ships beside the weights, through transformers' own custom-code mechanism:
they import nothing from kphi but each other, so the checkpoint loads with ``trust_remote_code=True`` where
kphi is not installed.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Phi3Config

from .block import GROUPED_INIT_SCHEMES

__all__ = ["KPhi3Config", "GROUPED_INIT_SCHEMES", "PHI3_PROJECTION_TARGETS", "BOOKKEEPING_KEYS", "config_fields"]

#: The projections of a phi-3 decoder layer that kphi-3 makes structured (and LoRA targets by default).
PHI3_PROJECTION_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@strict
class KPhi3Config(Phi3Config):
    r"""Configuration of a kphi-3 model: every field of [`Phi3Config`] plus the grouping settings.

    embed_size (`int`, *optional*):
        Width of the token embedding and of ``lm_head``'s input. ``None`` means ``hidden_size``. When it
        differs from ``hidden_size`` the model adds the blocks ``embed_to_hidden`` and ``hidden_to_embed``.
    min_channels_per_group (`int`, defaults to 256):
        ``m`` in the group rule of :func:`kphi.block.group_count`. A negative value means no grouping:
        dense ``nn.Linear`` projections, i.e. the phi-3 baseline.
    grouped_init (`str`, defaults to ``"scaled_normal"``):
        Initialisation of grouped weights: ``"scaled_normal"`` (``N(0, (initializer_range*sqrt(G/2))^2)``,
        matching a dense layer's output scale) or ``"kaiming_uniform"`` (the reference implementation's).
    low_rank_fraction (`float`, *optional*):
        Only with dense projections (``min_channels_per_group < 0``): factorise every projection
        ``in -> out`` through rank ``r = round(f * in * out / (in + out))``, keeping about a fraction ``f``
        of its parameters (:class:`kphi.lowrank.LowRankLinear`). A control for experiments.
    projection (`dict`, *optional*):
        Any registered projection kind as data (:mod:`kphi.projections`), e.g.
        ``{"kind": "monarch", "blocks": 4, "fraction": 0.24}``; it overrides the three fields above.
        ``None`` (the default, and every report checkpoint) derives the kind from them: grouped when
        ``min_channels_per_group > 0``, else low-rank when ``low_rank_fraction`` is set, else dense.

    Fields that reference checkpoints carry and transformers 5 renamed or dropped (``rope_theta``,
    ``rope_scaling``, ``ffn_dim``, ``do_layer_norm_before``, ``torch_dtype``, ...) are accepted; the rope
    fields are folded into ``rope_parameters``, the rest are kept as plain attributes.
    """

    model_type = "kphi3"

    embed_size: int | None = None
    min_channels_per_group: int = 256
    grouped_init: str = "scaled_normal"
    low_rank_fraction: float | None = None
    projection: dict | None = None

    def __post_init__(self, **kwargs):
        if self.embed_size is None:
            self.embed_size = self.hidden_size
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Raise ``ValueError`` with the offending fields when the shapes cannot build a model."""
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.embed_size is not None and self.embed_size <= 0:
            raise ValueError(f"embed_size must be a positive integer, got {self.embed_size!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.min_channels_per_group == 0:
            raise ValueError("min_channels_per_group must be positive (grouped) or negative (dense), not 0")
        if self.low_rank_fraction is not None:
            if not 0 < self.low_rank_fraction <= 1:
                raise ValueError(f"low_rank_fraction must be in (0, 1], got {self.low_rank_fraction!r}")
            if self.min_channels_per_group > 0:
                raise ValueError("low_rank_fraction needs dense projections (min_channels_per_group < 0)")
        if self.grouped_init not in GROUPED_INIT_SCHEMES:
            raise ValueError(f"grouped_init must be one of {GROUPED_INIT_SCHEMES}, got {self.grouped_init!r}")
        self.projection_kind()  # raises ValueError naming a bad projection setting

    @property
    def is_grouped(self) -> bool:
        return self.projection_kind().name == "grouped"

    def projection_kind(self):
        """The :class:`~kphi.kinds.ProjectionKind` of the decoder's projections (see ``projection``)."""
        from .projections import projection_kind

        if self.projection is not None:
            return projection_kind(self.projection)
        if self.min_channels_per_group > 0:
            return projection_kind({"kind": "grouped", "min_channels_per_group": self.min_channels_per_group, "init": self.grouped_init})
        if self.low_rank_fraction is not None:
            return projection_kind({"kind": "low_rank", "fraction": self.low_rank_fraction})
        return projection_kind("dense")


#: Keys ``config.json`` carries that describe the file, not the model (not ``KPhi3Config`` arguments).
BOOKKEEPING_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


def with_overrides(config: KPhi3Config | dict, overrides: dict | None) -> dict:
    """``config_fields(config)`` updated by ``overrides``, where a new ``hidden_size`` carries the embedding
    width with it when that width was the old hidden size (so ``{hidden_size: 64}`` on a width-256 preset is a
    width-64 model, not a width-64 core behind width-256 embeddings and adapters); an explicit ``embed_size``
    in ``overrides`` wins."""
    fields = config_fields(config)
    overrides = dict(overrides or {})
    if "hidden_size" in overrides and "embed_size" not in overrides and fields.get("embed_size") in (None, fields.get("hidden_size")):
        fields["embed_size"] = None  # derived again from the new hidden size
    return {**fields, **overrides}


def config_fields(config: KPhi3Config | dict) -> dict:
    """The arguments that rebuild ``config`` (``KPhi3Config(**config_fields(c))``): its dict without bookkeeping keys."""
    fields = dict(config) if isinstance(config, dict) else config.to_dict()
    for key in BOOKKEEPING_KEYS:
        fields.pop(key, None)
    return fields
