"""A model's weights as one hash: what tells apart runs that started from different initial weights.

``weights_sha256(model)`` is the SHA-256 of every state-dict entry in name order (name, dtype, shape, then the
raw bytes), so two models hash equal exactly when their weights are bit-identical. ``kphi train`` records the
hash of the weights a run starts from (``initial_weights_sha256`` in ``kphi-run.json`` and ``metrics.json``);
``tests/test_init_hashes.py`` pins it for every preset and every arm of every bundled suite, so a refactor
that changes a seeded initialisation (and with it every committed result) fails a test instead of passing
silently.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["weights_sha256"]


def weights_sha256(model: nn.Module) -> str:
    """Hex SHA-256 over ``model.state_dict()``: for each entry in sorted name order its name, dtype, shape and
    bytes (tied weights appear once per name, as the state dict lists them)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
