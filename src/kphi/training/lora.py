"""LoRA adapters (PEFT) on kphi models, whatever the kind of their projections.

PEFT's LoRA knows ``nn.Linear`` (and a few other layers); kphi's structured projections (the grouped block,
low-rank and Monarch modules) are custom modules, which PEFT supports through its custom-module mapping
(``LoraConfig._register_custom_module``, documented as experimental in PEFT's "custom models" guide).
:class:`StructuredLoraLayer` is that mapping's layer: ``y = base(x) + (alpha / r) * B(A(dropout(x)))`` with
PEFT's own ``lora_A``/``lora_B``, scaling, dropout, adapter switching and saving.

Merging: a dense projection's adapter merges into its weight as usual (PEFT's own layer). A structured
projection has no dense weight to merge into: ``B A`` is a dense ``[out, in]`` update that no grouped block
represents exactly, so :meth:`StructuredLoraLayer.merge` refuses with a clear error instead of silently
approximating; keep the adapter unmerged (it costs ``r (in + out)`` multiply-adds per token).

Usage::

    from kphi.training.lora import add_lora, load_lora
    peft_model = add_lora(model, r=8, lora_alpha=16)          # targets: the decoder's projections
    ...train with Trainer..., peft_model.save_pretrained(DIR)
    peft_model = load_lora(fresh_model, DIR)
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import KphiError
from ..modeling.block import GroupedPointwiseBlock
from ..modeling.configuration_kphi3 import PHI3_PROJECTION_TARGETS
from ..modeling.lowrank import LowRankLinear
from ..modeling.monarch import MonarchLinear

__all__ = ["StructuredLoraLayer", "lora_config", "add_lora", "load_lora", "DEFAULT_TARGETS"]

#: kphi-3's projections; converted models use their ``config.projection_targets``.
DEFAULT_TARGETS = PHI3_PROJECTION_TARGETS


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment

        raise KphiError("LoRA needs PEFT: pip install 'kphi[peft]'") from err
    return peft


def _structured_module_types() -> tuple[type, ...]:
    return (GroupedPointwiseBlock, LowRankLinear, MonarchLinear)


@functools.cache
def _layer_class():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class StructuredLoraLayer(LoraLinear):
        """PEFT's LoRA ``Linear`` around a kphi structured projection (which has no ``weight``)."""

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise ValueError(
                f"cannot merge a LoRA adapter into a {type(self.get_base_layer()).__name__}: the update B·A is a dense "
                "matrix that the structured projection cannot hold exactly; keep the adapter unmerged"
            )

        def get_delta_weight(self, adapter) -> Any:
            """The dense ``[out, in]`` update ``scaling * B A`` (for inspection; it is never merged)."""
            return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    return StructuredLoraLayer


def __getattr__(name: str):
    if name == "StructuredLoraLayer":  # built lazily: PEFT is an optional dependency
        return _layer_class()
    raise AttributeError(name)


def lora_config(target_modules=None, **kwargs):
    """A ``peft.LoraConfig`` (``task_type="CAUSAL_LM"``) that also knows kphi's structured projections."""
    peft = _peft()
    config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=list(target_modules or DEFAULT_TARGETS), **kwargs)
    return _register(config)


def _register(config):
    layer = _layer_class()
    config._register_custom_module({module_type: layer for module_type in _structured_module_types()})
    return config


def _targets_of(model) -> list[str]:
    targets = getattr(model.config, "projection_targets", None)
    return list(targets) if targets else list(DEFAULT_TARGETS)


def add_lora(model, target_modules=None, **kwargs):
    """``model`` wrapped by ``peft.get_peft_model`` with LoRA on its projections (any kind); ``kwargs`` go to
    ``LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``, ...)."""
    peft = _peft()
    return peft.get_peft_model(model, lora_config(target_modules or _targets_of(model), **kwargs))


def load_lora(model, adapter_dir, is_trainable: bool = False):
    """A saved adapter (``save_pretrained`` of :func:`add_lora`'s model) on ``model``."""
    peft = _peft()
    config = _register(peft.LoraConfig.from_pretrained(str(adapter_dir)))
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
