"""Calibration for the activation-aware fit: the token ids it reads, the Gram matrices ``X^T X`` of every
projection's inputs, and the rule that keeps the Frobenius fit where the activation fit is worse."""

from __future__ import annotations

from typing import Iterable

import torch

from ..data.prepare import load_prepared
from ..errors import ConvertError, KphiError
from ..modeling.kinds import calibration_error

__all__ = ["CALIBRATION_TOKENS", "activation_fit_or_fallback", "calibration_grams", "calibration_ids"]

#: Calibration tokens read for an activation-aware fit unless told otherwise.
CALIBRATION_TOKENS = 4096


def calibration_grams(model, names: Iterable[str], input_ids: torch.Tensor, batch_size: int = 8, progress: bool = False):
    """``{name: X^T X}`` (float64 ``[in, in]``) of the inputs ``X`` that each named projection of ``model``
    receives while ``model`` reads ``input_ids: [rows, length]``; one forward pass, under ``no_grad``."""
    from tqdm.auto import tqdm

    grams: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams[name] + x.T @ x if name in grams else x.T @ x

        return accumulate

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = range(0, len(input_ids), batch_size)
            for start in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False):
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams


def calibration_ids(calibration, tokens: int, vocab_size: int) -> torch.Tensor:
    """``[rows, length]`` token ids from a tensor, or from a prepared data directory's training split."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration
    else:
        try:
            prepared = load_prepared(calibration)
        except (OSError, ValueError, KphiError) as err:
            raise ConvertError(f"--calibration-data {calibration}: {err}") from None
        train = prepared[0]
        length = len(train[0]["input_ids"])
        rows = max(1, min(len(train), -(-tokens // length)))
        ids = torch.tensor([train[i]["input_ids"] for i in range(rows)], dtype=torch.long)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ConvertError("calibration data must be token ids of shape [rows, length]")
    if int(ids.max()) >= vocab_size:
        raise ConvertError(
            f"calibration data holds token id {int(ids.max())}, outside the model's vocabulary ({vocab_size}); "
            "prepare it with the model's own tokenizer"
        )
    return ids


def activation_fit_or_fallback(kind, module, weight, bias, fit_gram, check_gram) -> str:
    """Fit ``module`` on ``fit_gram``'s calibration inputs, unless the Frobenius fit is better on held-out
    calibration inputs (``check_gram``, other rows): an activation fit that overfits its rows (few tokens,
    ill-conditioned ``X^T X``) must never leave the model worse than the plain fit. Returns the method kept."""
    kind.fit(module, weight, bias)
    frobenius_state = {k: v.clone() for k, v in module.state_dict().items()}
    frobenius_error = calibration_error(check_gram, weight, kind.dense_weight(module))
    kind.fit(module, weight, bias, gram=fit_gram)
    activation_error = calibration_error(check_gram, weight, kind.dense_weight(module))
    if activation_error <= frobenius_error:
        return "activations"
    module.load_state_dict(frobenius_state)
    return f"frobenius (activation fit worse on held-out calibration rows: {activation_error:.4f} vs {frobenius_error:.4f})"
