"""The tiny model, tokenizer and batches shared by the FSDP worker processes and the one-process reference."""

import torch

from tiny import tiny_config


def build_model():
    from transformers import AutoModelForCausalLM

    import kphi  # noqa: F401 - registers kphi3

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(vocab_size=300), attn_implementation="eager")


def tokenizer():
    from transformers import PreTrainedTokenizerFast

    from tiny_gguf import tiny_bpe

    return PreTrainedTokenizerFast(tokenizer_object=tiny_bpe(), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (4, 32), generator=generator) for _ in range(3)]
