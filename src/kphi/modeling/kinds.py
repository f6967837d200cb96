"""Projection kinds: what a model puts where a dense projection ``in -> out`` used to be.

A *kind* is a small dataclass holding its settings (``GroupedKind(min_channels_per_group=64)``) that knows,
for any shape ``in -> out`` (with or without a bias):

* :meth:`~ProjectionKind.build` — the module (input ``[..., in]``, output ``[..., out]``), weights empty;
* :meth:`~ProjectionKind.num_parameters` — its parameter count, from the shape alone;
* :meth:`~ProjectionKind.initialize` — an initialisation whose output has the variance of a dense layer with
  weights ``N(0, std^2)`` (so every kind starts from the signal scale of the model it replaces);
* :meth:`~ProjectionKind.fit` — the weights closest to a trained dense weight ``W: [out, in]`` (``y = x W^T``):
  in Frobenius norm (``gram=None``), or on calibration inputs ``X`` given their Gram matrix ``C = X^T X``
  (``min ||X W^T - module(X)||``, the activation-aware fit).

The kinds themselves live beside their modules (``block.py``: grouped, ``lowrank.py``: low-rank,
``monarch.py``: Monarch); :mod:`kphi.modeling.projections` is the one registry that names them. This file holds the
base class and the dense kind, and imports only torch, so it ships in standalone model directories.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["ProjectionKind", "DenseKind", "FitResult", "calibration_error", "dense_matrix"]


@dataclass
class FitResult:
    """How close a fitted module is to the dense weight it replaces.

    ``relative_error = ||W - W_fit||_F / ||W||_F`` on the weights; ``calibration_error`` the same on
    calibration outputs, ``||X (W - W_fit)^T||_F / ||X W^T||_F`` (only when a Gram matrix was given).
    """

    relative_error: float
    calibration_error: float | None = None
    method: str = "frobenius"


def calibration_error(gram: torch.Tensor, weight: torch.Tensor, fitted: torch.Tensor) -> float:
    """``||X (W - F)^T|| / ||X W^T||`` from ``C = X^T X``: ``sqrt(tr(E C E^T) / tr(W C W^T))`` with ``E = W - F``."""
    gram, weight, fitted = gram.double(), weight.double(), fitted.double()
    diff = weight - fitted
    num = torch.einsum("oi,ij,oj->", diff, gram, diff)
    den = torch.einsum("oi,ij,oj->", weight, gram, weight)
    return float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())


def dense_matrix(module: nn.Module, in_features: int) -> torch.Tensor:
    """The ``[out, in]`` matrix ``W`` with ``module(x) = x W^T (+ bias)``, read off by feeding it the identity.

    Uses the module's ``naive_forward`` (the reference path) when it has one. Only meaningful for linear
    modules, which every kind is.
    """
    param = next(module.parameters())
    eye = torch.eye(in_features, dtype=param.dtype, device=param.device)
    forward = getattr(module, "naive_forward", module)
    with torch.no_grad():
        y = forward(eye)
        bias = getattr(module, "bias", None)
        if bias is not None:
            y = y - bias
    return y.T.contiguous()


class ProjectionKind:
    """Base class of a projection kind. Subclasses are dataclasses; their fields are the kind's settings."""

    #: The name the registry, configs (``projection: {kind: NAME, ...}``) and the CLI use.
    name: ClassVar[str] = ""

    def build(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        raise NotImplementedError

    def num_parameters(self, in_features: int, out_features: int, bias: bool = False) -> int:
        raise NotImplementedError

    def initialize(self, module: nn.Module, std: float) -> None:
        """Initialise the parameters ``module`` itself holds (a module :meth:`owns`), for a projection of
        dense-equivalent std ``std``; biases to 0. Called per module, as transformers' ``_init_weights`` is:
        transformers skips modules that hold no parameters of their own."""
        raise NotImplementedError

    def fit(
        self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None, gram: torch.Tensor | None = None
    ) -> FitResult:
        """Set ``module``'s weights from a dense ``weight: [out, in]`` (and copy ``bias``); see the module docstring."""
        raise NotImplementedError

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        """The ``[out, in]`` matrix the module computes (reference path)."""
        return dense_matrix(module, module.in_features)

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is (part of) a projection this kind builds and initialises."""
        raise NotImplementedError

    # --- settings as data -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, **dataclasses.asdict(self)}

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())
        return f"{self.name}({settings})"

    def result(self, module, weight, gram=None, method: str = "frobenius") -> FitResult:
        """How far ``module`` is from ``weight: [out, in]`` (and on calibration inputs, given their Gram)."""
        fitted = self.dense_weight(module).double()
        w = weight.double()
        rel = float(torch.linalg.norm(w - fitted) / torch.linalg.norm(w).clamp_min(1e-300))
        cal = calibration_error(gram, w, fitted) if gram is not None else None
        return FitResult(relative_error=rel, calibration_error=cal, method=method)


def copy_bias(module: nn.Module, bias: torch.Tensor | None) -> None:
    if getattr(module, "bias", None) is not None:
        with torch.no_grad():
            if bias is None:
                module.bias.zero_()
            else:
                module.bias.copy_(bias)


@dataclass
class DenseKind(ProjectionKind):
    """A plain ``nn.Linear``: the baseline every other kind is measured against."""

    name: ClassVar[str] = "dense"

    def build(self, in_features, out_features, bias=False):
        return nn.Linear(in_features, out_features, bias=bias)

    def num_parameters(self, in_features, out_features, bias=False):
        return in_features * out_features + (out_features if bias else 0)

    def initialize(self, module, std):
        from transformers import initialization as init

        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)

    def fit(self, module, weight, bias=None, gram=None):
        with torch.no_grad():
            module.weight.copy_(weight)
        copy_bias(module, bias)
        return self.result(module, weight, gram, "exact")

    def dense_weight(self, module):
        return module.weight.detach().clone()

    def owns(self, module):
        return type(module) is nn.Linear
