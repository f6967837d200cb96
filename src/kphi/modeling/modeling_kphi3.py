"""KPhi-3: transformers' Phi-3 decoder with its dense projections replaced by grouped pointwise blocks.

Everything except the four projections of each decoder layer (``self_attn.qkv_proj``, ``self_attn.o_proj``,
``mlp.gate_up_proj``, ``mlp.down_proj``) is transformers' own Phi-3 code: attention (eager/SDPA/flash),
RoPE, KV cache, gradient checkpointing and ``generate()``. The model is built the way PEFT injects
adapters: construct Phi-3's modules, then :func:`replace_projections` swaps each targeted ``nn.Linear``
for the module :func:`make_projection` chooses.

Data flow (``E`` = ``embed_size``, ``H`` = ``hidden_size``; ``embed_to_hidden``/``hidden_to_embed`` exist
only when ``E != H``)::

    input_ids [B, T] -> embed_tokens [B, T, E] -> dropout(embd_pdrop) -> embed_to_hidden [B, T, H]
      -> decoder layers -> final RMSNorm -> hidden_to_embed [B, T, E] -> lm_head [B, T, vocab]

``projection: {kind: dense}`` gives plain ``nn.Linear`` projections: the phi-3 baseline, with the same
parameter names (and logits) as ``transformers.Phi3ForCausalLM``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.phi3.modeling_phi3 import (
    Phi3DecoderLayer,
    Phi3ForCausalLM,
    Phi3Model,
    Phi3PreTrainedModel,
    Phi3RMSNorm,
    Phi3RotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .block import GroupedKind
from .configuration_kphi3 import PHI3_PROJECTION_TARGETS, KPhi3Config
from .kinds import DenseKind
from .projections import replace_projections

__all__ = [
    "KPhi3Model",
    "KPhi3ForCausalLM",
    "KPhi3PreTrainedModel",
    "PROJECTION_TARGETS",
    "make_projection",
    "make_width_adapter",
]

#: Names of the dense projections (module-name suffixes) that kphi-3 replaces in every decoder layer.
PROJECTION_TARGETS = PHI3_PROJECTION_TARGETS


def make_projection(in_features: int, out_features: int, config: KPhi3Config) -> nn.Module:
    """The module that maps ``in_features -> out_features`` in a model built from ``config``: the build of
    ``config.projection_kind()`` (a :class:`GroupedPointwiseBlock` with ``G = group_count(in, out, m)`` for
    the report's block, ``nn.Linear`` without bias for the dense kind)."""
    return config.projection_kind().build(in_features, out_features)


def make_width_adapter(in_features: int, out_features: int, config: KPhi3Config) -> nn.Module:
    """``embed_to_hidden`` / ``hidden_to_embed``: a projection between ``embed_size`` and ``hidden_size``.

    Unlike the decoder's projections, whose outputs enter a residual stream that the next RMSNorm rescales,
    these sit in series with the whole network: initialised at ``initializer_range`` they would shrink the
    signal (and every gradient through them) by ``0.02 * sqrt(in)`` each. They are therefore initialised
    as norm-preserving maps, with the dense-equivalent std ``1 / sqrt(in)`` (a grouped block scales it by
    ``sqrt(G / 2)`` as usual, see :func:`kphi.modeling.block.init_grouped_weight`), whatever the grouped kind's ``init`` says:
    the reference ``kaiming_uniform`` would give them a gain of ``sqrt(in / (3 * G * out))`` instead.
    """
    adapter = make_projection(in_features, out_features, config)
    for module in adapter.modules():
        module.dense_init_std = in_features**-0.5
    return adapter


class _RebuiltDense(DenseKind):
    """The dense kind, but :func:`replace_projections` swaps each projection for a new ``nn.Linear`` (whose
    construction draws from the RNG) rather than leaving it: the construction order of kphi before the
    projection-kind registry, which the committed dense results depend on."""


_REBUILT_DENSE = _RebuiltDense()


class KPhi3PreTrainedModel(Phi3PreTrainedModel):
    config_class = KPhi3Config
    config: KPhi3Config
    _no_split_modules = ["Phi3DecoderLayer"]

    def _init_weights(self, module):
        """Phi-3's init for everything, then each projection by its kind (:meth:`ProjectionKind.initialize`)
        with the dense-equivalent std ``initializer_range`` (the width adapters carry their own)."""
        super()._init_weights(module)
        std = getattr(module, "dense_init_std", self.config.initializer_range)
        if isinstance(module, nn.Linear) and hasattr(module, "dense_init_std"):
            init.normal_(module.weight, mean=0.0, std=std)
        kind = self.config.projection_kind()
        if isinstance(kind, DenseKind) or not kind.owns(module):
            return
        if isinstance(kind, GroupedKind) and hasattr(module, "dense_init_std"):
            kind = GroupedKind(kind.min_channels_per_group, "scaled_normal", kind.branches)
        kind.initialize(module, std)


class KPhi3Model(KPhi3PreTrainedModel, Phi3Model):
    """Phi-3's decoder stack with grouped projections and an optional ``embed_to_hidden`` block.

    ``forward`` embeds the tokens, applies ``embd_pdrop`` dropout and ``embed_to_hidden``, then runs
    Phi-3's own forward on the embeddings (``inputs_embeds`` given by a caller are ``embed_size`` wide).
    """

    def __init__(self, config: KPhi3Config):
        # Phi3Model.__init__ is skipped on purpose: it would allocate and initialise dense layers only to
        # throw them away. The modules below are the same ones, built by Phi-3's own classes.
        KPhi3PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < config.vocab_size else None
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_size, self.padding_idx)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        if config.embed_size != config.hidden_size:
            self.embed_to_hidden = make_width_adapter(config.embed_size, config.hidden_size, config)
        else:
            self.embed_to_hidden = None
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        kind = config.projection_kind()
        # A dense kind leaves Phi-3's projections in place, but every dense result in RESULTS.md was made by
        # code that built them a second time (a fresh nn.Linear per projection): building them again keeps
        # the seeded RNG sequence, hence the initial weights, of those runs (tests/test_init_hashes.py).
        replace_projections(self.layers, _REBUILT_DENSE if isinstance(kind, DenseKind) else kind, PROJECTION_TARGETS)
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden = self.embed_dropout(inputs_embeds)
        if self.embed_to_hidden is not None:
            hidden = self.embed_to_hidden(hidden)
        return super().forward(
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=hidden,
            use_cache=use_cache, **kwargs,
        )


class KPhi3ForCausalLM(KPhi3PreTrainedModel, Phi3ForCausalLM, GenerationMixin):
    """Causal LM head on :class:`KPhi3Model`; generation, caching and loss come from ``Phi3ForCausalLM``.

    ``logits = lm_head(hidden_to_embed(model(...)))`` with ``hidden_to_embed`` only when
    ``embed_size != hidden_size``. Shapes: ``input_ids [B, T]`` -> ``logits [B, T, vocab_size]``.
    """

    def __init__(self, config: KPhi3Config):
        KPhi3PreTrainedModel.__init__(self, config)
        self.model = KPhi3Model(config)
        self.vocab_size = config.vocab_size
        if config.embed_size != config.hidden_size:
            self.hidden_to_embed = make_width_adapter(config.hidden_size, config.embed_size, config)
        else:
            self.hidden_to_embed = None
        self.lm_head = nn.Linear(config.embed_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        if self.hidden_to_embed is not None:
            hidden = self.hidden_to_embed(hidden)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
