"""kphi-3 as a transformers model: the configuration and modeling modules, registered with the Auto classes.

The classes live in :mod:`kphi.modeling` (the files a standalone export ships); this module re-exports them and registers ``model_type: kphi3`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM``, so ``import kphi`` is all a user needs (no ``trust_remote_code``).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ..modeling.configuration_kphi3 import BOOKKEEPING_KEYS, GROUPED_INIT_SCHEMES, KPhi3Config, config_fields, with_overrides
from ..modeling.modeling_kphi3 import (
    PROJECTION_TARGETS,
    KPhi3ForCausalLM,
    KPhi3Model,
    KPhi3PreTrainedModel,
    make_projection,
    make_width_adapter,
)
from ..modeling.configuration_structured import structured_config_class
from ..modeling.modeling_structured import STRUCTURED_MODELS, structured_model_class
from ..modeling.projections import replace_projections

__all__ = [
    "BOOKKEEPING_KEYS",
    "GROUPED_INIT_SCHEMES",
    "KPhi3Config",
    "KPhi3ForCausalLM",
    "KPhi3Model",
    "KPhi3PreTrainedModel",
    "PROJECTION_TARGETS",
    "config_fields",
    "with_overrides",
    "make_projection",
    "make_width_adapter",
    "register_structured",
    "register_model_type",
    "replace_projections",
]

AutoConfig.register("kphi3", KPhi3Config, exist_ok=True)
AutoModel.register(KPhi3Config, KPhi3Model, exist_ok=True)
AutoModelForCausalLM.register(KPhi3Config, KPhi3ForCausalLM, exist_ok=True)
for _config_class, _model_class in STRUCTURED_MODELS.items():  # kphi convert's outputs (Llama, GPT-2, ...)
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)


def register_structured(source_model_type: str):
    """The structured config and causal-LM classes for a transformers architecture (``"gpt_neox"``), built on
    first use and registered with ``AutoConfig`` / ``AutoModelForCausalLM`` as ``kphi_<type>``. Raises
    ``KeyError`` when transformers has no such model type."""
    config_class = structured_config_class(source_model_type)
    model_class = structured_model_class(config_class)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return config_class, model_class


def register_model_type(model_type: str) -> bool:
    """Make ``model_type`` of a ``config.json`` loadable with the Auto classes; whether transformers now knows
    it. A converted model of an architecture beyond the five written out (``kphi_gpt_neox``) has its classes
    built and registered; any other type is left as it is (transformers knows it, or says it does not)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING._extra_content or model_type in CONFIG_MAPPING._mapping:
        return True
    if not model_type.startswith("kphi_"):
        return False
    try:
        register_structured(model_type[len("kphi_"):])
    except (KeyError, ValueError):
        return False  # transformers' own loader then names the unknown type
    return True


def _structured_types_on_demand() -> None:
    """Let ``AutoConfig`` (and through it ``AutoModelForCausalLM``) find every ``kphi_<type>``, for any
    architecture, the first time a ``config.json`` names it.

    transformers' registry has no hook for a family of model types, and building the classes of all of its
    architectures at import would import every one of them (seconds, and most are never used). So the
    registry object gets a subclass whose look-ups build a ``kphi_`` type's classes when first asked: the
    same classes, registered the same way, as :func:`register_structured` gives.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = type(CONFIG_MAPPING)
    if getattr(base, "builds_kphi_types", False):
        return

    class StructuredTypesOnDemand(base):
        builds_kphi_types = True

        def __contains__(self, item: object) -> bool:
            return base.__contains__(self, item) or (isinstance(item, str) and register_model_type(item))

        def __getitem__(self, key: str):
            if isinstance(key, str) and not base.__contains__(self, key):
                register_model_type(key)
            return base.__getitem__(self, key)

    CONFIG_MAPPING.__class__ = StructuredTypesOnDemand


_structured_types_on_demand()
