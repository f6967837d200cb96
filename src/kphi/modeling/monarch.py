"""Monarch projections (Dao et al., 2022): two block-diagonal factors with a block transpose between them.

A fourth projection kind, of the same parameter budget as the others, from the structured-matrix
literature. With ``G`` blocks, ``s = in / G``, ``o = out / G`` and a per-pair rank ``r``:

    h[:, g, j, :] = x[:, g-th block] @ first[g][:, j*r:(j+1)*r]          first:  [G, s, G*r]  (block-diagonal)
    y[:, j-th block] = sum_g h[:, g, j, :] @ second[j][g*r:(g+1)*r, :]     second: [G, G*r, o]  (block-diagonal)

i.e. the second factor's block ``j`` reads ``r`` channels from every block of the first (the "transpose"
permutation of Monarch), so every output depends on every input. Each ``[s, o]`` sub-block ``(g, j)`` of the
equivalent dense matrix ``M = W^T`` is the rank-``r`` product ``first[g][:, j] @ second[j][g]``, with its own
factors: ``G * r * (in + out)`` parameters. Dao et al.'s square Monarch is ``r = 1``, ``G = sqrt(n)``.

Because the sub-blocks share no factors, the Frobenius-closest Monarch matrix to a dense one is the truncated
SVD of each sub-block (Dao et al.'s projection, generalised to rank ``r``): :func:`monarch_fit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .kinds import ProjectionKind, copy_bias

__all__ = ["MonarchLinear", "MonarchKind", "monarch_fit", "monarch_shape"]


def monarch_shape(in_features: int, out_features: int, blocks: int, fraction: float) -> tuple[int, int]:
    """``(G, r)``: ``G`` the largest divisor of both sizes not above ``blocks``; ``r`` so that
    ``G * r * (in + out)`` is closest to ``fraction * in * out`` (at least 1)."""
    groups = max(d for d in range(1, min(blocks, in_features, out_features) + 1) if in_features % d == 0 == out_features % d)
    rank = max(1, round(fraction * in_features * out_features / (groups * (in_features + out_features))))
    return groups, rank


class MonarchLinear(nn.Module):
    """``[..., in] -> [..., out]`` through two block-diagonal factors (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, blocks: int, rank: int, bias: bool = False):
        super().__init__()
        if blocks < 1 or in_features % blocks or out_features % blocks or rank < 1:
            raise ValueError(f"MonarchLinear: {blocks} blocks must divide {in_features} and {out_features}; rank {rank} >= 1")
        self.in_features, self.out_features, self.blocks, self.rank = in_features, out_features, blocks, rank
        self.first = nn.Parameter(torch.empty(blocks, in_features // blocks, blocks * rank))
        self.second = nn.Parameter(torch.empty(blocks, blocks * rank, out_features // blocks))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, n, g, r = x.shape[:-1], x.shape[:-1].numel(), self.blocks, self.rank
        xg = x.reshape(n, g, -1).transpose(0, 1)  # [G, N, s]
        h = torch.bmm(xg, self.first)  # [G(g), N, G*r]: block g's contributions to every output block j
        h = h.view(g, n, g, r).permute(2, 1, 0, 3).reshape(g, n, g * r)  # [G(j), N, G(g)*r]
        y = torch.bmm(h, self.second).transpose(0, 1).reshape(*lead, self.out_features)  # [N, G*o]
        return y if self.bias is None else y + self.bias

    def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: ``y_j = sum_g x_g @ first[g][:, j] @ second[j][g]``, one rank-``r`` product per pair."""
        g, r = self.blocks, self.rank
        s = self.in_features // g
        outs = []
        for j in range(g):
            y_j = sum(x[..., a * s : (a + 1) * s] @ self.first[a][:, j * r : (j + 1) * r] @ self.second[j][a * r : (a + 1) * r] for a in range(g))
            outs.append(y_j)
        y = torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.blocks}, rank={self.rank}"


def monarch_fit(weight: torch.Tensor, blocks: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` closest to ``weight: [out, in]`` in Frobenius norm: per sub-block truncated SVD.

    ``||M - M_fit||^2 = sum_{g,j} ||M_gj - first[g][:, j] second[j][g]||^2`` with independent factors per
    ``(g, j)``, so each term is minimised alone by Eckart–Young; factors are split ``U S^(1/2)``, ``S^(1/2) V^T``.
    """
    m = weight.double().T  # [in, out]
    in_features, out_features = m.shape
    s, o = in_features // blocks, out_features // blocks
    first = m.new_zeros(blocks, s, blocks * rank)
    second = m.new_zeros(blocks, blocks * rank, o)
    k = min(rank, s, o)
    for a in range(blocks):
        for j in range(blocks):
            u, sv, vh = torch.linalg.svd(m[a * s : (a + 1) * s, j * o : (j + 1) * o], full_matrices=False)
            root = sv[:k].sqrt()
            first[a][:, j * rank : j * rank + k] = u[:, :k] * root
            second[j][a * rank : a * rank + k] = root[:, None] * vh[:k]
    return first, second


@dataclass
class MonarchKind(ProjectionKind):
    """Monarch matrices with up to ``blocks`` blocks, keeping about ``fraction`` of the dense parameters."""

    name: ClassVar[str] = "monarch"
    blocks: int = 4
    """number of blocks of each Monarch factor (at most; fewer when the shape needs it)."""
    fraction: float = 0.25
    """fraction of each projection's dense parameters to keep, in (0, 1]."""

    def __post_init__(self):
        if not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"monarch: blocks must be a positive integer, got {self.blocks!r}")
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"monarch: fraction must be in (0, 1], got {self.fraction!r}")

    def build(self, in_features, out_features, bias=False):
        return MonarchLinear(in_features, out_features, *monarch_shape(in_features, out_features, self.blocks, self.fraction), bias)

    def num_parameters(self, in_features, out_features, bias=False):
        groups, rank = monarch_shape(in_features, out_features, self.blocks, self.fraction)
        return groups * rank * (in_features + out_features) + (out_features if bias else 0)

    def initialize(self, module, std):
        """``first ~ N(0, 1/s)`` keeps the middle at the input's scale; each output sums ``G r`` middle
        channels, so ``second ~ N(0, std^2 in / (G r))`` gives a dense layer's output variance ``in std^2``."""
        from transformers import initialization as init

        s = module.in_features // module.blocks
        init.normal_(module.first, mean=0.0, std=s**-0.5)
        init.normal_(module.second, mean=0.0, std=std * math.sqrt(module.in_features / (module.blocks * module.rank)))
        if module.bias is not None:
            init.zeros_(module.bias)

    def fit(self, module, weight, bias=None, gram=None):
        if gram is not None:
            raise ValueError("monarch: no closed-form activation-aware fit (its sub-blocks share inputs); use --fit frobenius")
        first, second = monarch_fit(weight, module.blocks, module.rank)
        with torch.no_grad():
            module.first.copy_(first)
            module.second.copy_(second)
        copy_bias(module, bias)
        return self.result(module, weight, None, "frobenius")

    def owns(self, module):
        return isinstance(module, MonarchLinear)
