"""The registry of projection kinds, and the one function that puts them into a model.

``PROJECTION_KINDS`` maps a name to the class of a kind (:class:`kphi.modeling.kinds.ProjectionKind`); a config names
its kind as data, ``projection: {kind: grouped, min_channels_per_group: 64}``. Adding a kind is one class
(beside its module) and one line here.

:func:`replace_projections` walks ``named_modules()`` and swaps every projection whose name ends with one of
the targets (PEFT's ``target_modules`` convention, :func:`matches_target`) for the kind's module, keeping its bias if it has one.
Targets may be ``nn.Linear`` (``y = x W^T + b``, ``W: [out, in]``) or transformers' GPT-2 ``Conv1D``
(``y = x W + b``, ``W: [in, out]``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .block import GroupedKind
from .kinds import DenseKind, FitResult, ProjectionKind
from .lowrank import LowRankKind
from .monarch import MonarchKind

__all__ = [
    "PHI3_PROJECTION_TARGETS",
    "PROJECTION_KINDS",
    "FitResult",
    "ProjectionKind",
    "projection_kind",
    "replace_projections",
    "linear_weight",
    "is_dense_projection",
    "matches_target",
]

#: The projections of a phi-3 decoder layer that kphi-3 makes structured (and LoRA targets by default).
PHI3_PROJECTION_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

#: Every projection kind by name. A new kind: its class beside its module, and one entry here.
PROJECTION_KINDS: dict[str, type[ProjectionKind]] = {
    kind.name: kind for kind in (DenseKind, GroupedKind, LowRankKind, MonarchKind)
}


def projection_kind(spec: dict[str, Any] | ProjectionKind | str) -> ProjectionKind:
    """A kind from its data form: ``{"kind": "grouped", "min_channels_per_group": 64}``, a name, or a kind."""
    if isinstance(spec, ProjectionKind) or (hasattr(spec, "build") and hasattr(spec, "fit")):
        # (duck-typed too: a standalone model directory loads these files under another module name)
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"a projection is a mapping with a 'kind' ({', '.join(PROJECTION_KINDS)}), got {spec!r}")
    settings = dict(spec)
    name = settings.pop("kind")
    if name not in PROJECTION_KINDS:
        raise ValueError(f"unknown projection kind {name!r}; choose one of {', '.join(PROJECTION_KINDS)}")
    try:
        return PROJECTION_KINDS[name](**settings)
    except TypeError as err:
        raise ValueError(f"projection kind {name!r}: {err}") from None


def is_dense_projection(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), the two dense layouts a decoder uses."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is nn.Linear or isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W: [out, in], bias)`` of a dense projection in either layout (``Conv1D`` stores ``W^T``)."""
    if type(module) is nn.Linear:
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    return module.weight.detach().T, None if module.bias is None else module.bias.detach()


_PATTERN_CHARACTERS = set("*[]()|?+\\^$")


def check_target(target: str) -> None:
    """Raise ``ValueError`` when ``target`` has regex characters (so :func:`matches_target` reads it as a pattern)
    but is no valid regular expression."""
    if _PATTERN_CHARACTERS & set(target):
        try:
            re.compile(target)
        except re.error as err:
            raise ValueError(f"target {target!r} is not a valid regular expression ({err})") from None


def matches_target(name: str, target: str) -> bool:
    """PEFT's ``target_modules`` rule: ``name`` is ``target``, ends with ``"." + target`` (so ``down_proj``,
    ``mlp.down_proj`` and ``layers.0.mlp.down_proj`` all work), or — when ``target`` has regex characters —
    fully matches it as a regular expression (``layers\\.(0|1)\\..*_proj``)."""
    if name == target or name.endswith("." + target):
        return True
    return bool(_PATTERN_CHARACTERS & set(target)) and re.fullmatch(target, name) is not None


def _in_out(module: nn.Module) -> tuple[int, int]:
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D: weight [in, out]


def replace_projections(
    root: nn.Module,
    kind: ProjectionKind | dict | str,
    targets: Iterable[str],
    on_replace: Callable[[str, nn.Module, nn.Module], None] | None = None,
) -> list[str]:
    """Swap every dense projection under ``root`` whose name ends with a target for ``kind.build(in, out, bias)``.

    ``on_replace(name, old, new)`` is called for each swap before the old module is dropped (``kphi convert``
    fits the new module to the old weights there). Returns the qualified names replaced, in model order.
    A ``dense`` kind leaves the model as it is.
    """
    kind = projection_kind(kind)
    targets = tuple(targets)
    replaced = []
    if type(kind) is DenseKind:
        return replaced
    for name, child in list(root.named_modules()):
        if not name or not any(matches_target(name, t) for t in targets) or not is_dense_projection(child):
            continue
        in_features, out_features = _in_out(child)
        param = child.weight
        new = kind.build(in_features, out_features, bias=child.bias is not None)
        if param.device.type != "meta":
            new = new.to(device=param.device, dtype=param.dtype)
        if on_replace is not None:
            on_replace(name, child, new)
        parent_name, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
        replaced.append(name)
    return replaced
