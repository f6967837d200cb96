"""Low-rank projections: the control that asks whether grouping beats simply having fewer parameters.

A dense ``in -> out`` projection factorised through a thin bottleneck of rank ``r``:
``y = (x @ A) @ B`` with ``A: [in, r]``, ``B: [r, out]`` (stored as ``down_weight: [r, in]`` and
``up_weight: [out, r]``, the ``nn.Linear`` layout; plain parameters so the model's ``_init_weights`` can
give the pair a joint initialisation), costing
``r * (in + out)`` parameters. :func:`rank_for_fraction` picks ``r`` so a projection keeps a given
fraction of its dense parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .kinds import ProjectionKind, copy_bias

__all__ = ["LowRankLinear", "LowRankKind", "rank_for_fraction", "low_rank_fit"]


def rank_for_fraction(in_features: int, out_features: int, fraction: float) -> int:
    """Rank whose ``r * (in + out)`` is closest to ``fraction * in * out`` (at least 1)."""
    return max(1, round(fraction * in_features * out_features / (in_features + out_features)))


class LowRankLinear(nn.Module):
    """``[..., in] -> [..., r] -> [..., out]`` through two bias-free linear maps (down, then up)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankLinear: rank must be at least 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down_weight = nn.Parameter(torch.empty(rank, in_features))
        self.up_weight = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return F.linear(F.linear(x, self.down_weight), self.up_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_fit(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damping: float = 1e-2):
    """Rank-``r`` factors ``(down: [r, in], up: [out, r])`` of a dense ``weight: [out, in]``.

    * ``gram=None``: truncated SVD ``W = U S V^T`` -> ``up = U_r S_r^(1/2)``, ``down = S_r^(1/2) V_r^T``,
      the Frobenius optimum (Eckart–Young).
    * ``gram = X^T X``: minimises ``||X W^T - X (up down)^T||_F``. With ``C = L L^T`` (Cholesky, after a ridge
      of ``damping * mean(diag C)``, 1% as GPTQ dampens and SVD-LLM regularises ill-conditioned ``X^T X``) that is ``||L^T (W^T - F^T)||_F``, so the optimum is the truncated SVD of
      ``Z = L^T W^T = U S V^T`` mapped back: ``F^T = L^(-T) U_r S_r V_r^T``.
    """
    w = weight.double()
    if gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root
    c = gram.double()
    c = c + damping * c.diagonal().mean().clamp_min(1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    chol = torch.linalg.cholesky(c)  # C = L L^T
    u, s, vh = torch.linalg.svd(chol.T @ w.T, full_matrices=False)  # Z: [in, out]
    root = s[:rank].sqrt()
    left = torch.linalg.solve_triangular(chol.T, u[:, :rank] * root, upper=True)  # L^-T U_r S_r^(1/2): [in, r]
    return left.T, (root[:, None] * vh[:rank]).T


@dataclass
class LowRankKind(ProjectionKind):
    """A dense projection factorised through rank ``r = round(fraction * in * out / (in + out))``."""

    name: ClassVar[str] = "low_rank"
    fraction: float = 0.25
    """fraction of each projection's dense parameters to keep, in (0, 1]."""

    def __post_init__(self):
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"low_rank: fraction must be in (0, 1], got {self.fraction!r}")

    def build(self, in_features, out_features, bias=False):
        return LowRankLinear(in_features, out_features, rank_for_fraction(in_features, out_features, self.fraction), bias)

    def num_parameters(self, in_features, out_features, bias=False):
        rank = rank_for_fraction(in_features, out_features, self.fraction)
        return rank * (in_features + out_features) + (out_features if bias else 0)

    def initialize(self, module, std):
        """``down ~ N(0, 1/in)`` keeps the bottleneck at unit scale; ``up ~ N(0, std^2 in / r)`` gives the
        product a dense layer's output variance (``in * std^2``)."""
        from transformers import initialization as init

        init.normal_(module.down_weight, mean=0.0, std=module.in_features**-0.5)
        init.normal_(module.up_weight, mean=0.0, std=std * (module.in_features / module.rank) ** 0.5)
        if module.bias is not None:
            init.zeros_(module.bias)

    def fit(self, module, weight, bias=None, gram=None):
        down, up = low_rank_fit(weight, module.rank, gram)
        with torch.no_grad():
            module.down_weight.copy_(down)
            module.up_weight.copy_(up)
        copy_bias(module, bias)
        return self.result(module, weight, gram, "activations" if gram is not None else "frobenius")

    def dense_weight(self, module):
        return (module.up_weight @ module.down_weight).detach()

    def owns(self, module):
        return isinstance(module, LowRankLinear)
