"""Saving and resuming a model that FSDP (or DeepSpeed) has sharded across processes.

Trainer shards the model through accelerate (on accelerators only). Two things kphi does around Trainer must
work on a sharded model too:

* **the model directory written at the end of a run.** Under FSDP2 every parameter is a ``DTensor`` holding
  ``1/world`` of its rows on each process; ``save_pretrained`` on the main process alone cannot read the
  others' rows (it dies on the sharded storage, and the other processes wait in the next barrier). The full
  state dict is gathered by **every** process (a collective: ``get_model_state_dict(full_state_dict=True,
  cpu_offload=True)`` from ``torch.distributed.checkpoint``, or accelerate's ``get_state_dict`` when Trainer
  did the sharding, which also covers DeepSpeed ZeRO-3), and the main process writes it;
* **resuming.** FSDP's checkpoints hold the model as a ``torch.distributed.checkpoint`` directory
  (``pytorch_model_fsdp_0/`` with its ``.metadata``), not as ``model.safetensors``; they are checkpoints too.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["SHARDED_MODEL_DIR", "is_sharded", "full_state_dict", "is_sharded_checkpoint"]

#: Where accelerate writes an FSDP model's sharded state inside ``checkpoint-N`` (``SHARDED_STATE_DICT``).
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module, accelerator=None) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict, gathered when ``model`` is sharded; ``None`` when it is not (then
    ``save_pretrained`` reads the model itself).

    **Every process must call this** when the model is sharded: gathering is a collective. On the main
    process the result holds full CPU tensors; elsewhere it may be empty. ``accelerator``: the one that
    prepared the model (Trainer's), used when it sharded with FSDP or DeepSpeed.
    """
    if accelerator is not None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return accelerator.get_state_dict(model)
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded_checkpoint(folder: Path) -> bool:
    """``checkpoint-N`` written by FSDP with a sharded state dict (complete: its ``.metadata`` is there)."""
    return (Path(folder) / SHARDED_MODEL_DIR / ".metadata").is_file()
