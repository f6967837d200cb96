"""The whole model under ``torch.compile``: one graph for a training step. Tens of seconds of compilation on a
CPU, so outside the fast subset."""

import pytest
import torch


def _converted_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from kphi.convert import convert

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=512)
    return convert(LlamaForCausalLM(config), {"kind": "grouped", "min_channels_per_group": 16}).model


@pytest.mark.parametrize("which", ["kphi-3", "converted llama"])
def test_a_training_step_compiles_to_one_graph(which):
    """torch.compile(fullgraph=True) captures a tiny kphi-3's, and a converted Llama's, forward and backward
    with no graph break (the block switches to its one-GEMM formulation while compiling); same loss and
    gradients as eager."""
    from transformers import AutoModelForCausalLM

    from kphi.presets import load_preset

    torch.manual_seed(0)
    if which == "kphi-3":
        model = AutoModelForCausalLM.from_config(load_preset("tiny-kphi3").config, attn_implementation="eager")
    else:
        model = _converted_llama()
        model.config._attn_implementation = "eager"
    ids = torch.randint(0, model.config.vocab_size, (2, 300))  # 600 rows: eager takes the per-group GEMM path

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = step()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager_loss, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
