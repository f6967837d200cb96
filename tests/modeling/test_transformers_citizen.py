"""KPhi3 behaves like a model of transformers itself: the checks of its common model tests, written out.

transformers' ``CausalLMModelTest`` (ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin) is not in
its source distribution, so each behaviour it found broken is specified here, for a model whose every
projection is grouped, with ``embed_size == hidden_size`` and with ``embed_size = 16`` (width adapters).
"""

import inspect

import pytest
import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache

from kphi.sources.auto import KPhi3Config, KPhi3ForCausalLM, KPhi3Model

BASE = dict(
    vocab_size=99, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
    num_hidden_layers=2, min_channels_per_group=8, max_position_embeddings=64, original_max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
VARIANTS = {"same-width": {}, "embed-16": {"embed_size": 16}}


def make(cls=KPhi3ForCausalLM, **overrides):
    torch.manual_seed(0)
    return cls(KPhi3Config(**{**BASE, **overrides})).eval()


def ids(batch=2, length=12):
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.fast
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_projection_is_grouped(variant):
    from kphi.modeling.block import GroupedPointwiseBlock

    model = make(**VARIANTS[variant])
    blocks = [m for m in model.modules() if isinstance(m, GroupedPointwiseBlock)]
    assert len(blocks) == 4 * BASE["num_hidden_layers"] + (2 if VARIANTS[variant] else 0)
    assert all(b.groups > 1 for b in blocks)


@pytest.mark.fast
@pytest.mark.parametrize("variant", VARIANTS)
def test_return_dict_false_returns_the_same_tensors_as_a_tuple(variant):
    x = ids()
    for cls in (KPhi3ForCausalLM, KPhi3Model):
        model = make(cls, **VARIANTS[variant])
        kwargs = {"labels": x} if cls is KPhi3ForCausalLM else {}
        as_dict = model(x, output_hidden_states=True, use_cache=True, **kwargs)
        as_tuple = model(x, output_hidden_states=True, use_cache=True, return_dict=False, **kwargs)
        assert isinstance(as_tuple, tuple)
        expected = [v for v in as_dict.to_tuple()]
        assert len(as_tuple) == len(expected)
        for got, want in zip(as_tuple, expected):
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want)
            elif isinstance(want, tuple):
                assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.fast
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_kwargs_reach_the_loss(variant):
    """``num_items_in_batch`` (what Trainer passes with gradient accumulation) turns the mean into sum / n."""
    model = make(**VARIANTS[variant])
    x = ids()
    mean_loss = model(x, labels=x).loss
    tokens = x[:, 1:].numel()
    summed = model(x, labels=x, num_items_in_batch=torch.tensor(2 * tokens)).loss
    assert summed.item() == pytest.approx(mean_loss.item() / 2, rel=1e-5)


@pytest.mark.fast
def test_the_causal_lm_lists_generation_mixin_among_its_bases():
    assert GenerationMixin in KPhi3ForCausalLM.__bases__ and issubclass(KPhi3ForCausalLM, GenerationMixin)


@pytest.mark.fast
@pytest.mark.parametrize("cls", [KPhi3Model, KPhi3ForCausalLM])
def test_forward_signatures_name_the_cache_like_phi3(cls):
    params = inspect.signature(cls.forward).parameters
    for name in ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "use_cache"):
        assert name in params, name


@pytest.mark.fast
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_deprecated_past_key_values_name_still_works(variant):
    model = make(**VARIANTS[variant])
    x = ids(length=8)
    full = model(x).logits
    cache = DynamicCache(config=model.config)
    model(x[:, :6], cache=cache, use_cache=True)
    with pytest.warns(FutureWarning, match="past_key_values"):
        step = model(x[:, 6:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(step, full[:, 6:], atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("scheme", ["scaled_normal", "kaiming_uniform"])
def test_width_adapters_keep_the_gradient_scale_at_initialisation(scheme):
    """Without norm-preserving adapters the gradient norm fell about 10x below the same-width model's."""
    def grad_norm(**overrides):
        model = make(grouped_init=scheme, **overrides).train()
        x = ids()
        model(x, labels=x).loss.backward()
        return torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()

    same, adapted = grad_norm(), grad_norm(embed_size=16)
    assert 0.5 < adapted / same < 2.0


# Overfitting one batch (loss and gradient norm down 90%) is transformers' own test_training_overfit, run
# for both variants by tests/modeling/test_transformers_common.py.
