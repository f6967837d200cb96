"""Training compute per token, counted analytically: what a comparison at equal tokens hides.

For a decoder with ``L`` layers, hidden size ``d``, context ``T`` and vocabulary ``V``, one token costs in a
forward pass (multiply-adds counted as 2 FLOPs, as Kaplan et al. 2020 count them)::

    2 * P_matmul                      every weight of every projection and of lm_head is used once per token
  + 2 * L * T * d_attn * 2            QK^T and AV over the context (d_attn = heads x head_dim); full T,
                                      as Kaplan et al. count it (a causal mask halves it on average)

and training costs three times the forward (backward: twice). ``P_matmul`` is every parameter of a
``nn.Linear``-like weight: the non-embedding parameters less the norms' scales, plus ``lm_head`` (``V * d``).
Embedding lookups, norms, activations, softmax and the optimizer are left out (a few percent at these
sizes). Every structured kind here (grouped block, low-rank, Monarch) uses each of its weights once per token,
so its FLOPs follow its parameter count: this is why kphi-3 costs less per token than phi-3.
"""

from __future__ import annotations

import torch

__all__ = ["forward_flops_per_token", "training_flops_per_token"]


def forward_flops_per_token(model, context_length: int) -> int:
    """Forward FLOPs per token of ``model`` (a built causal LM, the meta device is enough) at ``context_length``."""
    from .params import model_parameter_counts

    total, embedding = model_parameter_counts(model)
    head = model.get_output_embeddings()
    norms = sum(p.numel() for name, module in model.named_modules() if "norm" in type(module).__name__.lower()
                for p in module.parameters(recurse=False))
    matmul = total - embedding - norms + (head.weight.numel() if head is not None else 0)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2 * 2 * config.num_hidden_layers * context_length * heads * head_dim
    return 2 * matmul + attention


def training_flops_per_token(config, context_length: int) -> int:
    """Training FLOPs per token (3x the forward: see the module docstring) of the model ``config`` builds."""
    from transformers import AutoModelForCausalLM

    from . import model as _registers  # noqa: F401  (kphi3 and the structured types with the Auto classes)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 3 * forward_flops_per_token(model, context_length)
