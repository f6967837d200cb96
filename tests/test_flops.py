"""Training FLOPs per token (``kphi.params``) against torch's own FLOP counter on real forward/backward passes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kphi.params import forward_flops_per_token, training_flops_per_token
from kphi.sources.auto import KPhi3ForCausalLM
from kphi.presets import load_preset


@pytest.mark.parametrize("preset", ["tiny-phi3", "tiny-kphi3"])
def test_the_analytic_count_equals_torchs_flop_counter_forward_and_backward(preset):
    config = load_preset(preset).config
    config._attn_implementation = "eager"  # attention as plain matmuls, which the counter sees
    model = KPhi3ForCausalLM(config)
    context = 32
    ids = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(input_ids=ids)
    assert forward.get_total_flops() == forward_flops_per_token(model, context) * context
    with FlopCounterMode(display=False) as training:
        model(input_ids=ids, labels=ids).loss.backward()
    assert training.get_total_flops() == training_flops_per_token(config, context) * context


def test_kphi3_costs_less_per_token_than_phi3_by_its_projection_saving():
    dense, grouped = (load_preset(name).config for name in ("cpu-phi3", "cpu-kphi3"))
    from kphi.experiments.arms import non_embedding

    saving = training_flops_per_token(dense, 256) - training_flops_per_token(grouped, 256)
    # both have the same norms, so the non-embedding difference is all projection weights
    assert saving == 6 * (non_embedding(dense) - non_embedding(grouped))
