"""Causal LMs of transformers architectures with their projections replaced by any kphi projection kind.

Each class is the architecture's own ``*ForCausalLM`` (attention, RoPE, cache, generation, loss: all
transformers' code); after building it, :func:`kphi.projections.replace_projections` swaps the projections
named by ``config.projection_targets`` for ``config.projection_kind()``'s modules — the PEFT-style walk that
also builds kphi-3. Parameter names of the untouched modules are the architecture's own, so a converted
checkpoint differs from the dense one only in the replaced projections.

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
]


class _StructuredCausalLM:
    """Build the architecture, then replace its projections; initialise them by their kind."""

    def __init__(self, config):
        super().__init__(config)  # builds and initialises the dense architecture (or builds it empty, under from_pretrained)
        with torch.no_grad():
            for name in replace_projections(self, config.projection_kind(), config.projection_targets):
                for module in self.get_submodule(name).modules():
                    self._init_weights(module)

    def _init_weights(self, module):
        kind = self.config.projection_kind()
        if not isinstance(kind, DenseKind) and kind.owns(module):
            kind.initialize(module, self.config.initializer_range)
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


#: config class -> causal LM class, for the Auto registration in ``kphi.model``.
STRUCTURED_MODELS = {
    KphiLlamaConfig: KphiLlamaForCausalLM,
    KphiMistralConfig: KphiMistralForCausalLM,
    KphiQwen2Config: KphiQwen2ForCausalLM,
    KphiPhi3Config: KphiPhi3ForCausalLM,
    KphiGPT2Config: KphiGPT2LMHeadModel,
}
