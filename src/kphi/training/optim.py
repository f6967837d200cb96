"""Per-parameter learning rates for grouped weights (structure-aware parametrisation).

Adam's update has a size set by the learning rate alone, whatever a weight's fan-in. A grouped linear layer
``in -> out`` with ``G`` groups has fan-in ``in / G`` per output, ``G`` times smaller than the dense layer it
replaces; μP-style reasoning for Adam (Yang et al. 2022; Qiu et al., *Compute Better Spent*, 2024) gives a
learning rate proportional to ``1 / fan_in``, so a grouped weight gets ``G`` times the dense rate. The rule
``groups`` applies exactly that; ``none`` keeps one rate for every parameter (the report's training).

The scaling is done on the optimizer that ``Trainer`` builds (its weight-decay groups are kept), before its
scheduler is created, so schedulers scale every group's own base rate and checkpoints resume as usual.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.block import GroupedLinear

__all__ = ["grouped_lr_multipliers", "scale_grouped_learning_rates"]


def grouped_lr_multipliers(model: nn.Module, rule: str) -> dict[int, float]:
    """``id(parameter) -> multiplier`` for the parameters whose rate ``rule`` changes (others keep 1): none for
    ``"none"``, ``G`` for each grouped weight of ``G > 1`` groups under ``"groups"``."""
    if rule == "none":
        return {}
    if rule != "groups":
        raise ValueError(f"grouped_lr_scale must be none or groups, got {rule!r}")
    return {id(m.weight): float(m.groups) for m in model.modules() if isinstance(m, GroupedLinear) and m.groups > 1}


def scale_grouped_learning_rates(optimizer: torch.optim.Optimizer, model: nn.Module, rule: str) -> None:
    """Split each param group of ``optimizer`` by multiplier and scale the new groups' ``lr`` in place."""
    multipliers = grouped_lr_multipliers(model, rule)
    if not multipliers:
        return
    new_groups = []
    for group in optimizer.param_groups:
        by_multiplier: dict[float, list] = {}
        for p in group["params"]:
            by_multiplier.setdefault(multipliers.get(id(p), 1.0), []).append(p)
        for multiplier, params in sorted(by_multiplier.items()):
            new_groups.append({**group, "params": params, "lr": group["lr"] * multiplier, "lr_multiplier": multiplier})
    optimizer.param_groups.clear()
    for group in new_groups:
        optimizer.param_groups.append(group)
