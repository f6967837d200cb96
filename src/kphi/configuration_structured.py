"""Configurations of transformers decoders whose projections are of any kphi projection kind.

One class per supported architecture, each the architecture's own config plus two fields:

projection (`dict`, *optional*):
    The projection kind as data (:mod:`kphi.projections`), e.g. ``{"kind": "grouped",
    "min_channels_per_group": 64}``. ``None`` keeps the dense projections.
target_modules (`list[str]`, *optional*):
    Names (suffixes of module names, as PEFT's ``target_modules``) of the projections to replace;
    ``None`` means the architecture's attention and MLP projections (``default_target_modules``).

Like ``configuration_kphi3.py`` this file imports only transformers and kphi files imported relatively, so it
ships beside the weights of a converted model (``kphi convert``) and loads with ``trust_remote_code=True``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

__all__ = ["KphiLlamaConfig", "KphiMistralConfig", "KphiQwen2Config", "KphiPhi3Config", "KphiGPT2Config", "STRUCTURED_CONFIGS"]

LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _StructuredConfig:
    """What every structured config adds to its architecture's config (methods only; fields are declared
    on each class, as transformers' strict dataclass configs require)."""

    default_target_modules: tuple[str, ...] = ()

    def projection_kind(self):
        from .projections import projection_kind

        return projection_kind(self.projection if self.projection is not None else "dense")

    @property
    def projection_targets(self) -> tuple[str, ...]:
        return tuple(self.target_modules) if self.target_modules else self.default_target_modules

    def validate_projection(self):
        self.projection_kind()
        if self.target_modules is not None and (
            not isinstance(self.target_modules, (list, tuple)) or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(f"target_modules must be a list of module names, got {self.target_modules!r}")


@strict
class KphiLlamaConfig(_StructuredConfig, LlamaConfig):
    model_type = "kphi_llama"
    default_target_modules = LLAMA_STYLE_TARGETS
    projection: dict | None = None
    target_modules: list[str] | None = None


@strict
class KphiMistralConfig(_StructuredConfig, MistralConfig):
    model_type = "kphi_mistral"
    default_target_modules = LLAMA_STYLE_TARGETS
    projection: dict | None = None
    target_modules: list[str] | None = None


@strict
class KphiQwen2Config(_StructuredConfig, Qwen2Config):
    model_type = "kphi_qwen2"
    default_target_modules = LLAMA_STYLE_TARGETS  # q/k/v carry biases; the structured modules keep them
    projection: dict | None = None
    target_modules: list[str] | None = None


@strict
class KphiPhi3Config(_StructuredConfig, Phi3Config):
    model_type = "kphi_phi3"
    default_target_modules = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    projection: dict | None = None
    target_modules: list[str] | None = None


@strict
class KphiGPT2Config(_StructuredConfig, GPT2Config):
    model_type = "kphi_gpt2"
    # Conv1D layers (weight [in, out], with bias); "c_proj" names both the attention and the MLP output
    default_target_modules = ("c_attn", "c_proj", "c_fc")
    projection: dict | None = None
    target_modules: list[str] | None = None


#: The structured config for each source ``model_type`` that ``kphi convert`` accepts.
STRUCTURED_CONFIGS = {
    "llama": KphiLlamaConfig,
    "mistral": KphiMistralConfig,
    "qwen2": KphiQwen2Config,
    "phi3": KphiPhi3Config,
    "gpt2": KphiGPT2Config,
}
