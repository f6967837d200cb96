"""transformers' own common model tests (``ModelTesterMixin`` and ``TrainingTesterMixin`` of the installed
version, see ``transformers_common.py``) run against KPhi3 with every projection grouped: once with
``embed_size == hidden_size``, once with ``embed_size = 16`` (grouped width adapters) and grouped-query
attention.

The tester below is kphi's: it builds the tiny configs and inputs those mixins ask for
(``prepare_config_and_inputs_for_common``, ``get_config`` and the sizes they read).
"""

from __future__ import annotations

import unittest

import torch
from transformers.models.auto import modeling_auto

from kphi import KPhi3Config, KPhi3ForCausalLM, KPhi3Model
from kphi.modeling.block import group_count
from transformers_common import import_common_tests

modeling_common, training_mixin = import_common_tests()

# The common tests sort model classes through transformers' static name tables, which a model registered from
# outside transformers is not in (the Auto classes themselves find kphi3 through `register`).
modeling_auto.MODEL_MAPPING_NAMES.setdefault("kphi3", "KPhi3Model")
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("kphi3", "KPhi3ForCausalLM")


class KPhi3Tester:
    """Tiny KPhi3 configs and inputs: hidden 32, 4 heads, intermediate 64, ``min_channels_per_group`` 8, so
    ``G = 4`` for qkv/o/gate_up and ``G = 8`` for down_proj (and 2 / 4 for the width adapters at embed 16)."""

    batch_size = 2
    seq_length = 7
    is_training = True
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    intermediate_size = 64
    base_model_class = KPhi3Model
    causal_lm_class = KPhi3ForCausalLM
    sequence_classification_class = None
    token_classification_class = None
    question_answering_class = None

    def __init__(self, parent, embed_size: int = 32, num_key_value_heads: int = 4):
        self.parent = parent
        self.embed_size = embed_size
        self.num_key_value_heads = num_key_value_heads

    def get_config(self) -> KPhi3Config:
        return KPhi3Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, embed_size=self.embed_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            min_channels_per_group=8, max_position_embeddings=512, original_max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = modeling_common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids))  # rows with left context of every length
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class KPhi3CommonTest(
    modeling_common.ModelTesterMixin, modeling_common.GenerationTesterMixin, training_mixin.TrainingTesterMixin,
    unittest.TestCase,
):
    all_model_classes = (KPhi3Model, KPhi3ForCausalLM)
    pipeline_model_mapping = {}
    # kphi3 is new: run the weight-initialisation check that the suite skips for models from before 2023
    test_can_init_all_missing_weights_before_2023 = True
    tester_arguments: dict = {}

    def setUp(self):
        self._tester = KPhi3Tester(self, **self.tester_arguments)

    @property
    def model_tester(self):
        return self._tester

    def test_every_projection_of_the_tester_is_grouped(self):
        config = self.model_tester.get_config()
        head_dim = config.hidden_size // config.num_attention_heads
        shapes = [
            (config.hidden_size, config.hidden_size + 2 * config.num_key_value_heads * head_dim),
            (config.hidden_size, config.hidden_size),
            (config.hidden_size, 2 * config.intermediate_size),
            (config.intermediate_size, config.hidden_size),
        ]
        if config.embed_size != config.hidden_size:
            shapes += [(config.embed_size, config.hidden_size), (config.hidden_size, config.embed_size)]
        for fan_in, fan_out in shapes:
            self.assertGreater(group_count(fan_in, fan_out, config.projection["min_channels_per_group"]), 1, (fan_in, fan_out))


class KPhi3NarrowEmbeddingCommonTest(KPhi3CommonTest):
    tester_arguments = {"embed_size": 16, "num_key_value_heads": 2}
