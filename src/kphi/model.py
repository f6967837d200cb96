"""kphi-3 as a transformers model: the configuration and modeling modules, registered with the Auto classes.

The classes live in :mod:`kphi.configuration_kphi3` and :mod:`kphi.modeling_kphi3` (the files a standalone
export ships); this module re-exports them and registers ``model_type: kphi3`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM``, so ``import kphi`` is all a user needs (no ``trust_remote_code``).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_kphi3 import BOOKKEEPING_KEYS, GROUPED_INIT_SCHEMES, KPhi3Config, config_fields
from .modeling_kphi3 import (
    PROJECTION_TARGETS,
    KPhi3ForCausalLM,
    KPhi3Model,
    KPhi3PreTrainedModel,
    make_projection,
    make_width_adapter,
)
from .modeling_structured import STRUCTURED_MODELS
from .projections import replace_projections

__all__ = [
    "BOOKKEEPING_KEYS",
    "GROUPED_INIT_SCHEMES",
    "KPhi3Config",
    "KPhi3ForCausalLM",
    "KPhi3Model",
    "KPhi3PreTrainedModel",
    "PROJECTION_TARGETS",
    "config_fields",
    "make_projection",
    "make_width_adapter",
    "replace_projections",
]

AutoConfig.register("kphi3", KPhi3Config, exist_ok=True)
AutoModel.register(KPhi3Config, KPhi3Model, exist_ok=True)
AutoModelForCausalLM.register(KPhi3Config, KPhi3ForCausalLM, exist_ok=True)
for _config_class, _model_class in STRUCTURED_MODELS.items():  # kphi convert's outputs (Llama, GPT-2, ...)
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)
