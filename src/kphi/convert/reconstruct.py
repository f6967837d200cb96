"""Layer-wise reconstruction: after the closed-form fit, train each decoder layer's structured projections so
that the layer reproduces the source's hidden states, one layer at a time.

For layer ``i`` with inputs ``X_i`` and the source's outputs ``T_i`` (the source's hidden states after its layer
``i``), the structured projections of the converted layer ``f_i`` minimise the relative error

    e_i = ||f_i(X_i) - T_i||^2 / ||T_i||^2

by Adam on calibration rows; everything outside those projections stays frozen. ``X_i`` are the *converted*
model's own hidden states (``X_{i+1} = f_i(X_i)`` after layer ``i`` is reconstructed), not the source's: each
layer then learns to map what it will actually receive onto what the source's remaining layers expect, so it
repairs the error the layers before it left instead of compounding it. Both models are run one layer at a time,
so memory and time are those of one layer: the converted and the source hidden states of every calibration row
(``rows x length x hidden`` floats each) and the layer's targets are all that is kept. Even rows train, odd rows
judge: a layer whose judged error does not fall keeps its fitted weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConvertError

__all__ = ["LayerReconstruction", "decoder_layers", "reconstruct_layers"]


@dataclass
class LayerReconstruction:
    """One layer's relative output error (on the judging rows) before and after its reconstruction."""

    layer: int
    error_before: float
    error_after: float
    improved: bool  # False: training did not lower the judged error, so the fitted weights stayed
    tokens: int = 0  # calibration tokens the layer trained on (steps x tokens per batch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decoder_layers(model) -> nn.ModuleList:
    """The model's repeated decoder layers: the first ``ModuleList`` with ``num_hidden_layers`` entries."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ConvertError(f"found no list of {count} decoder layers in a {type(model).__name__}")


class _Captured(Exception):
    """Raised by a hook once it has what it needs, to stop the forward pass there."""


class _Call:
    """The other arguments a decoder layer is called with (masks, positions, rotary tables), to call it again."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]):
        self.args, self.kwargs = args, kwargs

    def __call__(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        return _hidden(layer(hidden, *self.args, **self.kwargs))


def _first_layer_inputs(model, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, _Call]]:
    """``(hidden states, the rest of the call)`` the first decoder layer receives, per batch of token ids."""
    layer, captured = decoder_layers(model)[0], []

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), _Call(tuple(args[1:]), kwargs)))
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _relative_error(layer, inputs, targets) -> float:
    with torch.no_grad():
        num = sum(float((call(layer, x) - t).pow(2).sum()) for (x, call), t in zip(inputs, targets))
        den = sum(float(t.pow(2).sum()) for t in targets)
    return num / max(den, 1e-30)


def reconstruct_layers(model, source, input_ids: torch.Tensor, structured: list[str], *, steps: int = 200,
                       learning_rate: float = 1e-3, batch_size: int = 4, progress: bool = False) -> list[LayerReconstruction]:
    """Reconstruct every decoder layer of ``model`` (converted from ``source``) in order, in place; see the module
    docstring. ``input_ids: [rows, length]`` calibration tokens (at least two rows: even rows train, odd rows
    judge); ``structured``: the names of the structured projections (only their parameters are trained)."""
    from tqdm.auto import tqdm

    if input_ids.dim() != 2 or len(input_ids) < 2:
        raise ConvertError("layer-wise reconstruction needs at least two rows of calibration tokens")
    model.eval()
    source.eval()
    train_batches = list(input_ids[0::2].split(batch_size))
    judge_batches = list(input_ids[1::2].split(batch_size))
    batches = {"train": train_batches, "judge": judge_batches}
    inputs = {split: _first_layer_inputs(model, b) for split, b in batches.items()}
    source_inputs = {split: _first_layer_inputs(source, b) for split, b in batches.items()}
    layers, source_layers, prefix = decoder_layers(model), decoder_layers(source), _layers_prefix(model)
    reports = []
    for i in tqdm(range(len(layers)), desc="reconstruct", unit="layer", disable=not progress, leave=False):
        layer = layers[i]
        with torch.no_grad():  # the source's hidden states after its layer i: the targets, then its next inputs
            targets = {split: [call(source_layers[i], x).detach() for x, call in source_inputs[split]] for split in batches}
        names = [n[len(f"{prefix}.{i}."):] for n in structured if n.startswith(f"{prefix}.{i}.")]
        reports.append(_reconstruct_layer(i, layer, names, inputs, targets, steps, learning_rate))
        with torch.no_grad():
            for split in batches:
                inputs[split] = [(call(layer, x).detach(), call) for x, call in inputs[split]]
                source_inputs[split] = [(t, call) for t, (_x, call) in zip(targets[split], source_inputs[split])]
    return reports


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def _reconstruct_layer(index: int, layer, names: list[str], inputs, targets, steps: int, learning_rate: float) -> LayerReconstruction:
    """Train the parameters of ``layer``'s projections ``names`` on the training rows; keep them only if the
    judging rows' error fell."""
    before = _relative_error(layer, inputs["judge"], targets["judge"])
    params = [p for name in names for p in layer.get_submodule(name).parameters()]
    if not params or steps <= 0:
        return LayerReconstruction(index, before, before, improved=False)
    saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    flags = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    scale = [float(t.pow(2).mean()) for t in targets["train"]]
    tokens = 0
    try:
        for step in range(steps):
            b = step % len(inputs["train"])
            x, call = inputs["train"][b]
            tokens += x.shape[0] * x.shape[1]
            loss = (call(layer, x) - targets["train"][b]).pow(2).mean() / max(scale[b], 1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    after = _relative_error(layer, inputs["judge"], targets["judge"])
    if after >= before:
        layer.load_state_dict(saved)
        return LayerReconstruction(index, before, before, improved=False, tokens=tokens)
    return LayerReconstruction(index, before, after, improved=True, tokens=tokens)
