"""Low-rank projections: the control that asks whether grouping beats simply having fewer parameters.

A dense ``in -> out`` projection factorised through a thin bottleneck of rank ``r``:
``y = (x @ A) @ B`` with ``A: [in, r]``, ``B: [r, out]`` (stored as ``down_weight: [r, in]`` and
``up_weight: [out, r]``, the ``nn.Linear`` layout; plain parameters so the model's ``_init_weights`` can
give the pair a joint initialisation), costing
``r * (in + out)`` parameters. :func:`rank_for_fraction` picks ``r`` so a projection keeps a given
fraction of its dense parameter count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LowRankLinear", "rank_for_fraction"]


def rank_for_fraction(in_features: int, out_features: int, fraction: float) -> int:
    """Rank whose ``r * (in + out)`` is closest to ``fraction * in * out`` (at least 1)."""
    return max(1, round(fraction * in_features * out_features / (in_features + out_features)))


class LowRankLinear(nn.Module):
    """``[..., in] -> [..., r] -> [..., out]`` through two bias-free linear maps (down, then up)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankLinear: rank must be at least 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down_weight = nn.Parameter(torch.empty(rank, in_features))
        self.up_weight = nn.Parameter(torch.empty(out_features, rank))

    def forward(self, x):
        return F.linear(F.linear(x, self.down_weight), self.up_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
