"""Configurations of transformers decoders whose projections are of any kphi projection kind.

One class per architecture, each the architecture's own config plus two fields. Five are written out
(Llama, Mistral, Qwen2, Phi-3, GPT-2, with their projection names as defaults); any other causal-LM
architecture of transformers gets its class on first use (:func:`structured_config_class`), named
``Kphi<Base>Config`` with ``model_type`` ``kphi_<base type>``, and this module hands it out by name too
(module ``__getattr__``), so a converted model of any architecture loads with ``trust_remote_code=True``.
Those classes have no default targets: ``kphi convert`` stores the projection names it replaced.

projection (`dict`, *optional*):
    The projection kind as data (:mod:`kphi.modeling.projections`), e.g. ``{"kind": "grouped",
    "min_channels_per_group": 64}``. ``None`` keeps the dense projections.
target_modules (`list[str]`, *optional*):
    Names (suffixes of module names, as PEFT's ``target_modules``) of the projections to replace;
    ``None`` means the architecture's attention and MLP projections (``default_target_modules``).
projection_overrides (`list[dict]`, *optional*):
    Other kinds for some of those projections, e.g. ``[{"targets": ["v_proj"], "projection": {"kind":
    "dense"}}, {"targets": [".*layers\\.0\\..*"], "projection": {"kind": "low_rank", "fraction": 0.9}}]``: a
    projection takes the first override whose targets match it, else ``projection``.

Like ``configuration_kphi3.py`` this file imports only transformers and kphi files imported relatively, so it
ships beside the weights of a converted model (``kphi convert``) and loads with ``trust_remote_code=True``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from .projections import PHI3_PROJECTION_TARGETS, check_target, matches_target, projection_kind

__all__ = [
    "KphiLlamaConfig",
    "KphiMistralConfig",
    "KphiQwen2Config",
    "KphiPhi3Config",
    "KphiGPT2Config",
    "STRUCTURED_CONFIGS",
    "structured_config_class",
]

LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _StructuredConfig:
    """What every structured config adds to its architecture's config (methods only; fields are declared
    on each class, as transformers' strict dataclass configs require)."""

    default_target_modules: tuple[str, ...] = ()

    def projection_kind(self):
        return projection_kind(self.projection if self.projection is not None else "dense")

    @property
    def projection_targets(self) -> tuple[str, ...]:
        return tuple(self.target_modules) if self.target_modules else self.default_target_modules

    def projection_kind_for(self, name: str):
        """The kind of the module called ``name``: the first override matching it, else ``projection``;
        ``None`` for a module no target names."""
        if not any(matches_target(name, t) for t in self.projection_targets):
            return None
        for override in self.projection_overrides or ():
            if any(matches_target(name, t) for t in override["targets"]):
                return projection_kind(override["projection"])
        return self.projection_kind()

    def projection_kinds(self) -> list:
        """Every kind this config uses: ``projection`` and each override's."""
        return [self.projection_kind(), *(projection_kind(o["projection"]) for o in self.projection_overrides or ())]

    def validate_projection(self):
        self.projection_kinds()
        for override in self.projection_overrides or ():
            targets = override.get("targets") if isinstance(override, dict) else None
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets) or set(override) != {"targets", "projection"}:
                raise ValueError(f"each projection override is {{targets: [names], projection: kind}}, got {override!r}")
        if self.target_modules is not None and (
            not isinstance(self.target_modules, (list, tuple)) or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        for override in self.projection_overrides or ():
            for target in override["targets"]:
                check_target(target)
        for target in self.target_modules or ():
            check_target(target)


@strict
class KphiLlamaConfig(_StructuredConfig, LlamaConfig):
    model_type = "kphi_llama"
    default_target_modules = LLAMA_STYLE_TARGETS
    projection: dict | None = None
    target_modules: list[str] | None = None
    projection_overrides: list[dict] | None = None


@strict
class KphiMistralConfig(_StructuredConfig, MistralConfig):
    model_type = "kphi_mistral"
    default_target_modules = LLAMA_STYLE_TARGETS
    projection: dict | None = None
    target_modules: list[str] | None = None
    projection_overrides: list[dict] | None = None


@strict
class KphiQwen2Config(_StructuredConfig, Qwen2Config):
    model_type = "kphi_qwen2"
    default_target_modules = LLAMA_STYLE_TARGETS  # q/k/v carry biases; the structured modules keep them
    projection: dict | None = None
    target_modules: list[str] | None = None
    projection_overrides: list[dict] | None = None


@strict
class KphiPhi3Config(_StructuredConfig, Phi3Config):
    model_type = "kphi_phi3"
    default_target_modules = PHI3_PROJECTION_TARGETS
    projection: dict | None = None
    target_modules: list[str] | None = None
    projection_overrides: list[dict] | None = None


@strict
class KphiGPT2Config(_StructuredConfig, GPT2Config):
    model_type = "kphi_gpt2"
    # Conv1D layers (weight [in, out], with bias); "c_proj" names both the attention and the MLP output
    default_target_modules = ("c_attn", "c_proj", "c_fc")
    projection: dict | None = None
    target_modules: list[str] | None = None
    projection_overrides: list[dict] | None = None


#: The structured config for each source ``model_type`` that ``kphi convert`` accepts.
STRUCTURED_CONFIGS = {
    "llama": KphiLlamaConfig,
    "mistral": KphiMistralConfig,
    "qwen2": KphiQwen2Config,
    "phi3": KphiPhi3Config,
    "gpt2": KphiGPT2Config,
}


def structured_config_class(source_model_type: str):
    """The structured config of the transformers architecture ``source_model_type`` (e.g. ``"gpt_neox"``).

    One of the five above, or a class built once from transformers' own config for that type: the same
    fields plus ``projection`` and ``target_modules``. Raises ``KeyError`` naming the type when transformers
    has no config for it.
    """
    if source_model_type in STRUCTURED_CONFIGS:
        return STRUCTURED_CONFIGS[source_model_type]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if source_model_type not in CONFIG_MAPPING:
        raise KeyError(f"transformers has no model type {source_model_type!r}")
    base = CONFIG_MAPPING[source_model_type]
    namespace = {
        "__module__": __name__,
        "__qualname__": f"Kphi{base.__name__}",
        "__annotations__": {"projection": "dict | None", "target_modules": "list[str] | None",
                            "projection_overrides": "list[dict] | None"},
        "model_type": f"kphi_{source_model_type}",
        "projection": None,
        "target_modules": None,
        "projection_overrides": None,
    }
    cls = strict(type(f"Kphi{base.__name__}", (_StructuredConfig, base), namespace))
    STRUCTURED_CONFIGS[source_model_type] = cls
    return cls


def __getattr__(name: str):
    """``Kphi<Base>Config`` for any transformers config class ``<Base>Config`` (the ``auto_map`` of a
    converted model names it; transformers' remote-code loader looks it up with ``getattr``)."""
    if name.startswith("Kphi") and name.endswith("Config"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        for model_type, base in CONFIG_MAPPING.items():
            if base.__name__ == name[len("Kphi"):]:
                return structured_config_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
