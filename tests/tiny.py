"""Tiny model configurations shared by the model tests."""

from kphi import KPhi3Config


def tiny_config(**overrides) -> KPhi3Config:
    """A small kphi-3 config with G > 1 everywhere (m = 16: qkv/o/gate_up G=4, down_proj G=8)."""
    fields = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=97,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        min_channels_per_group=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return KPhi3Config(**fields)
