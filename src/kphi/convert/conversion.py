"""The conversion itself: a source model, the same architecture with structured projections, each fitted."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError
from ..modeling.kinds import DenseKind, FitResult
from ..modeling.projections import linear_weight, projection_kind
from ..params import model_parameter_counts
from ..sources import resolve_model_dir
from ..sources.model_dir import load_config, load_model, read_model_config
from .calibration import CALIBRATION_TOKENS, activation_fit_or_fallback, calibration_grams, calibration_ids
from .targets import allocation_table, target_config

__all__ = ["FITS", "ConvertResult", "convert", "load_source", "non_embedding_parameters"]

FITS = ("auto", "frobenius", "activations", "none")


@dataclass
class ConvertResult:
    """The converted model, what was replaced, and how well each projection was fitted."""

    model: Any
    kind: dict[str, Any]
    targets: list[str]
    fit: str
    replaced: list[str] = field(default_factory=list)
    fits: dict[str, FitResult] = field(default_factory=dict)
    non_embedding_before: int = 0
    non_embedding_after: int = 0
    heldout: dict[str, Any] | None = None  # bits per byte before/after on a slice of held-out text
    allocation: dict[str, Any] | None = None  # the sensitivity-guided choice per projection (--keep)
    reconstruction: list[dict[str, Any]] | None = None  # per layer, its output error before/after (--reconstruct-steps)

    def describe(self, src, out) -> str:
        """A few lines for people: what was replaced, the parameter counts, the mean fit errors."""
        summary = self.summary()
        if self.allocation:
            a = self.allocation
            first = (f"converted {src} -> {out}: {summary['replaced']} projections, each kind chosen by {a['method']} "
                     f"allocation to keep {a['keep']:g} of the non-embedding parameters (predicted damage "
                     f"{a['predicted_damage']:+.4f} bits per byte), fit {self.fit}:\n{allocation_table(a['choices'])}")
        else:
            first = (f"converted {src} -> {out}: {summary['replaced']} projections as {self.kind}"
                     + "".join(f"; {', '.join(o['targets'])} as {o['projection']}" for o in summary["overrides"] or [])
                     + f", fit {self.fit}")
        lines = [
            first,
            f"non-embedding parameters: {self.non_embedding_before:,} -> {self.non_embedding_after:,} "
            f"({summary['percent_of_source']}%)",
        ]
        if self.fits and self.fit != "none":
            line = f"relative weight error (mean over projections): {summary['mean_relative_error']:.4f}"
            if summary["mean_calibration_error"] is not None:
                line += f"; on calibration inputs: {summary['mean_calibration_error']:.4f}"
            lines.append(line + f" (per projection: {out}/kphi-convert.json)")
        if self.reconstruction:
            improved = [r for r in self.reconstruction if r["improved"]]
            lines.append(f"layer-wise reconstruction lowered {len(improved)} of {len(self.reconstruction)} layers' output "
                         f"error (mean {_mean(r['error_before'] for r in self.reconstruction):.4f} -> "
                         f"{_mean(r['error_after'] for r in self.reconstruction):.4f})")
        if self.heldout:
            h = self.heldout
            fitted = f" ({h['after_fit']:.4f} after the fit alone)" if "after_fit" in h else ""
            lines.append(f"bits per byte on {h['bytes']:,} bytes of held-out text: {h['before']:.4f} before, "
                         f"{h['after']:.4f} after ({h['after'] / h['before']:.2f}x){fitted}")
        fallbacks = [name for name, f in self.fits.items() if f.method.startswith("frobenius (")]
        if fallbacks:
            lines.append(f"{len(fallbacks)} projection(s) kept the Frobenius fit: the activation fit was worse on "
                         f"held-out calibration rows (e.g. {fallbacks[0]})")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        errors = [f.relative_error for f in self.fits.values()]
        calibration = [f.calibration_error for f in self.fits.values() if f.calibration_error is not None]
        return {
            "kind": self.kind,
            "targets": self.targets,
            "overrides": getattr(self.model.config, "projection_overrides", None),
            "fit": self.fit,
            "replaced": len(self.replaced),
            "non_embedding_before": self.non_embedding_before,
            "non_embedding_after": self.non_embedding_after,
            "percent_of_source": round(100.0 * self.non_embedding_after / max(self.non_embedding_before, 1), 2),
            "mean_relative_error": sum(errors) / len(errors) if errors else None,
            "mean_calibration_error": sum(calibration) / len(calibration) if calibration else None,
            "projections": {name: asdict(f) for name, f in self.fits.items()},
            "heldout_bits_per_byte": self.heldout,
            "allocation": self.allocation,
            "reconstruction": self.reconstruction,
        }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def non_embedding_parameters(model) -> int:
    """All parameters minus the input embedding and the output head (counted once if tied), as the report counts."""
    total, embedding = model_parameter_counts(model)
    return total - embedding


def convert(
    source,
    kind: str | dict | Any = "grouped",
    *,
    targets: list[str] | None = None,
    overrides: list | None = None,
    fit: str = "auto",
    calibration=None,
    calibration_tokens: int = CALIBRATION_TOKENS,
    progress: bool = False,
    **settings: Any,
) -> ConvertResult:
    """``source`` (a model directory, a ``PreTrainedModel`` or a config) with structured projections.

    ``kind``: a projection kind's name, data form or instance; ``settings`` are its fields (e.g.
    ``min_channels_per_group=32``). ``targets``: module-name suffixes to replace (default: the architecture's
    attention and MLP projections). ``overrides``: other kinds for some targets (:func:`parse_override` text
    or ``{"targets": [...], "projection": {...}}``; ``{"kind": "dense"}`` keeps a projection dense). ``fit``: see
    the package docstring (``"auto"``: frobenius when ``source`` has weights). ``calibration``: token ids
    ``[rows, length]`` or a prepared data directory (``fit="activations"``). The source is never modified.
    """
    from transformers import AutoModelForCausalLM

    if fit not in FITS:
        raise ConvertError(f"--fit must be one of {', '.join(FITS)}, got {fit!r}")
    kind = _structured_kind(kind, settings)
    dense, source_config = load_source(source)
    if fit == "auto":
        fit = "frobenius" if dense is not None else "none"
    if fit != "none" and dense is None:
        raise ConvertError(f"--fit {fit} needs a source with weights; this one is a config only (use --fit none)")
    config, target_names = target_config(source_config, kind, targets, overrides)
    model = AutoModelForCausalLM.from_config(config)
    result = ConvertResult(model=model, kind=kind.to_dict(), targets=target_names, fit=fit)
    result.non_embedding_after = non_embedding_parameters(model)
    result.replaced = _replaced_names(model, kind)
    if dense is None:
        with torch.device("meta"):
            result.non_embedding_before = non_embedding_parameters(AutoModelForCausalLM.from_config(source_config))
        return result
    result.non_embedding_before = non_embedding_parameters(dense)
    if not result.replaced:
        raise ConvertError(f"no projection of the source matches the targets {', '.join(target_names)}")
    _copy_untouched_weights(dense, model, result.replaced)
    if fit == "activations" and calibration is None:
        raise ConvertError("--fit activations needs calibration data (--calibration-data DIR of kphi data prepare)")
    _fit_projections(result, dense, calibration, calibration_tokens, progress)
    return result


def _structured_kind(kind, settings: dict[str, Any]):
    """The kind object from its name, data form or instance (``settings`` are its fields); never dense."""
    try:
        if isinstance(kind, str):
            kind = {"kind": kind}
        kind = projection_kind({**kind, **settings} if isinstance(kind, dict) else kind)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    if isinstance(kind, DenseKind):
        raise ConvertError("converting to the dense kind changes nothing; choose a structured kind")
    return kind


def load_source(source):
    """``(dense model or None, config)`` of a source: a model source (:mod:`kphi.sources`: a directory, a
    ``.gguf``, a known model, a hub id; the model only when it has weights), a ``PreTrainedModel`` or a config."""
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return None, source
    if not isinstance(source, (str, os.PathLike)):
        return source, source.config

    source = resolve_model_dir(source)
    read_model_config(source)  # one clear error for a missing or broken config.json
    if Path(source, "model.safetensors").is_file() or Path(source, "model.safetensors.index.json").is_file():
        dense = load_model(source, dtype=torch.float32)
        return dense, dense.config
    return None, load_config(source)


def _fit_projections(result: ConvertResult, dense, calibration, calibration_tokens: int, progress: bool) -> None:
    """Fit every replaced projection of ``result.model`` to ``dense``'s weights as ``result.fit`` says, and record
    how close each came (on calibration inputs too, when there are any: reported for every fit)."""
    from tqdm.auto import tqdm

    fit, model = result.fit, result.model
    grams, fit_grams, check_grams = {}, {}, {}
    if calibration is not None:
        ids = calibration_ids(calibration, calibration_tokens, dense.config.vocab_size)
        # the activation fit sees the even rows; the odd rows judge it against the Frobenius fit
        fit_ids, check_ids = (ids[0::2], ids[1::2]) if len(ids) > 1 else (ids, ids)
        fit_grams = calibration_grams(dense, result.replaced, fit_ids, progress=progress)
        check_grams = calibration_grams(dense, result.replaced, check_ids, progress=progress) if len(ids) > 1 else fit_grams
        grams = {name: fit_grams[name] + check_grams[name] if len(ids) > 1 else fit_grams[name] for name in fit_grams}
    for name in tqdm(result.replaced, desc=f"fit ({fit})", unit="proj", disable=not progress or fit == "none", leave=False):
        weight, bias = linear_weight(dense.get_submodule(name))
        module, kind, method = model.get_submodule(name), _kind_of(model, name, result), fit
        try:
            if fit == "activations":
                method = activation_fit_or_fallback(kind, module, weight.float(), bias, fit_grams[name], check_grams[name])
            elif fit != "none":
                kind.fit(module, weight.float(), bias)
        except ValueError as err:
            raise ConvertError(f"{name}: {err}") from None
        result.fits[name] = kind.result(module, weight, grams.get(name), method)


def _replaced_names(model, kind) -> list[str]:
    """The structured projections of ``model``, in model order (each override's kind included)."""
    kinds = [k for k in getattr(model.config, "projection_kinds", lambda: [kind])() if not isinstance(k, DenseKind)]
    return [name for name, module in model.named_modules()
            if name and any(k.owns(module) and _is_projection_root(model, name, k) for k in kinds)]


def _kind_of(model, name: str, result: ConvertResult):
    """The kind the projection ``name`` was built with (its override's, or the conversion's)."""
    kind_for = getattr(model.config, "projection_kind_for", None)
    return kind_for(name) if kind_for is not None else projection_kind(result.kind)


def _is_projection_root(model, name: str, kind) -> bool:
    parent, _, _ = name.rpartition(".")
    return not (parent and kind.owns(model.get_submodule(parent)))


def _copy_untouched_weights(dense, model, replaced: list[str]) -> None:
    """Every tensor outside the replaced projections, from ``dense`` into ``model`` (biases of the replaced
    projections too: they keep their names). Anything else that does not match is an error, not a skip."""
    state = dense.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    inside = tuple(f"{name}." for name in replaced)
    stray_missing = [k for k in missing if not k.startswith(inside)]
    stray_unexpected = [k for k in unexpected if not k.startswith(inside)]
    if stray_missing or stray_unexpected:  # pragma: no cover - the structured classes mirror the dense ones
        raise ConvertError(f"converted model does not mirror the source: missing {stray_missing[:3]}, unexpected {stray_unexpected[:3]}")
