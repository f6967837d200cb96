"""Causal LMs of transformers architectures with their projections replaced by any kphi projection kind.

Each class is the architecture's own ``*ForCausalLM`` (attention, RoPE, cache, generation, loss: all
transformers' code); after building it, :func:`kphi.modeling.projections.replace_projections` swaps the projections
named by ``config.projection_targets`` for ``config.projection_kind()``'s modules — the PEFT-style walk that
also builds kphi-3. Parameter names of the untouched modules are the architecture's own, so a converted
checkpoint differs from the dense one only in the replaced projections.

Five classes are written out; for any other architecture :func:`structured_model_class` builds
``Kphi<Base>ForCausalLM`` on first use from transformers' own causal LM (and the module hands it out by
name, so an ``auto_map`` naming it resolves under ``trust_remote_code=True``).

For ``kphi3`` (the report's models) see ``modeling_kphi3.py``; this file serves ``kphi convert``.
"""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM

from .configuration_structured import (
    KphiGPT2Config,
    KphiLlamaConfig,
    KphiMistralConfig,
    KphiPhi3Config,
    KphiQwen2Config,
    structured_config_class,
)
from .kinds import DenseKind
from .projections import is_dense_projection, replace_projections

__all__ = [
    "KphiLlamaForCausalLM",
    "KphiMistralForCausalLM",
    "KphiQwen2ForCausalLM",
    "KphiPhi3ForCausalLM",
    "KphiGPT2LMHeadModel",
    "STRUCTURED_MODELS",
    "structured_model_class",
]


class _StructuredCausalLM:
    """Build the architecture, then replace its projections; initialise them by their kind."""

    def __init__(self, config):
        super().__init__(config)  # builds and initialises the dense architecture (or builds it empty, under from_pretrained)
        with torch.no_grad():
            if not config.projection_overrides:
                replaced = replace_projections(self, config.projection_kind(), config.projection_targets)
            else:  # each projection by its own kind, in model order
                replaced = []
                for name, module in list(self.named_modules()):
                    kind = config.projection_kind_for(name) if name and is_dense_projection(module) else None
                    if kind is not None:
                        replaced += replace_projections(self, kind, [name])
            for name in replaced:
                for module in self.get_submodule(name).modules():
                    self._init_weights(module)

    def _init_weights(self, module):
        for kind in self.config.projection_kinds():
            if not isinstance(kind, DenseKind) and kind.owns(module):
                # initializer_range in most configs; OPT calls it init_std
                std = getattr(self.config, "initializer_range", None) or getattr(self.config, "init_std", 0.02)
                kind.initialize(module, std)
                return
        proj = getattr(module, "c_proj", None)
        if proj is not None and not is_dense_projection(proj):
            # GPT-2's attention/MLP init rescales c_proj.weight, which a structured c_proj does not have;
            # its own kind initialises it (at initializer_range, without GPT-2's 1/sqrt(2 n_layer) factor)
            return
        super()._init_weights(module)


class KphiLlamaForCausalLM(_StructuredCausalLM, LlamaForCausalLM):
    config_class = KphiLlamaConfig


class KphiMistralForCausalLM(_StructuredCausalLM, MistralForCausalLM):
    config_class = KphiMistralConfig


class KphiQwen2ForCausalLM(_StructuredCausalLM, Qwen2ForCausalLM):
    config_class = KphiQwen2Config


class KphiPhi3ForCausalLM(_StructuredCausalLM, Phi3ForCausalLM):
    config_class = KphiPhi3Config


class KphiGPT2LMHeadModel(_StructuredCausalLM, GPT2LMHeadModel):
    config_class = KphiGPT2Config


#: config class -> causal LM class, for the Auto registration in ``kphi.sources.auto``.
STRUCTURED_MODELS = {
    KphiLlamaConfig: KphiLlamaForCausalLM,
    KphiMistralConfig: KphiMistralForCausalLM,
    KphiQwen2Config: KphiQwen2ForCausalLM,
    KphiPhi3Config: KphiPhi3ForCausalLM,
    KphiGPT2Config: KphiGPT2LMHeadModel,
}


def structured_model_class(config_class):
    """The causal LM for a structured config class (one of the five above, or built once from the causal LM
    transformers maps the config's base class to). Raises ``KeyError`` when transformers has none."""
    if config_class in STRUCTURED_MODELS:
        return STRUCTURED_MODELS[config_class]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_config = config_class.__mro__[2]  # (Kphi<Base>Config, _StructuredConfig, <Base>Config, ...)
    if base_config not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise KeyError(f"transformers has no causal LM for model_type {base_config.model_type!r}")
    base = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    cls = type(f"Kphi{base.__name__}", (_StructuredCausalLM, base), {"__module__": __name__, "config_class": config_class})
    STRUCTURED_MODELS[config_class] = cls
    return cls


def __getattr__(name: str):
    """``Kphi<Base>`` for any transformers causal LM class ``<Base>`` (see the module docstring)."""
    if name.startswith("Kphi"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        for model_type, class_names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
            names = class_names if isinstance(class_names, (list, tuple)) else (class_names,)
            if name[len("Kphi"):] in names and model_type in CONFIG_MAPPING:
                return structured_model_class(structured_config_class(model_type))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
