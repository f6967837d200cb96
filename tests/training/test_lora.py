"""LoRA (PEFT) on kphi models: adapters attach to projections of any kind, train with Trainer, save, reload,
and merge where a dense weight exists to merge into."""

import peft  # noqa: F401  (a test dependency: without it the suite fails rather than skips)
import pytest
import torch
from transformers import Trainer, TrainingArguments

from kphi import KPhi3ForCausalLM
from kphi.training.lora import add_lora, load_lora
from tiny import tiny_config


def _rows(vocab, n=16, length=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(model, tmp_path, steps=6):
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(model.config.vocab_size))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("projection", [
    None,  # the report's grouped block (min_channels_per_group 16)
    {"kind": "low_rank", "fraction": 0.3},
    {"kind": "monarch", "blocks": 4, "fraction": 0.3},
])
def test_lora_on_structured_projections_trains_saves_and_reloads(projection, tmp_path):
    torch.manual_seed(0)
    base = KPhi3ForCausalLM(tiny_config(projection=projection))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(3, 97, (2, 10))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = add_lora(base, r=4, lora_alpha=8)
    layers = [m for m in model.modules() if type(m).__name__ == "StructuredLoraLayer"]
    assert len(layers) == 2 * 4  # every projection of both decoder layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # B starts at zero
    losses = _train(model, tmp_path)
    assert losses[-1] < losses[0]
    for name, value in model.get_base_model().state_dict().items():  # the base stayed frozen
        key = name.replace("base_layer.", "")
        if key in state:
            torch.testing.assert_close(value, state[key])
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    fresh = KPhi3ForCausalLM(tiny_config(projection=projection))
    fresh.load_state_dict(state)
    reloaded = load_lora(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained)
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter"):
        reloaded.merge_and_unload()


def test_lora_on_a_dense_kphi_model_merges_exactly(tmp_path):
    torch.manual_seed(0)
    base = KPhi3ForCausalLM(tiny_config(min_channels_per_group=-1))
    model = add_lora(base, r=4, lora_alpha=8)
    _train(model, tmp_path, steps=3)
    ids = torch.randint(3, 97, (2, 10))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert type(merged.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-4)
