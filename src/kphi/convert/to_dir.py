"""``kphi convert``'s output: a model directory that loads through the Auto classes, with ``kphi-convert.json``
and the source's and the result's bits per byte on held-out text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import ConvertError
from ..export import registered_for_auto_classes
from ..files import refuse_foreign_dir, staged_dir
from ..sources import resolve_model_dir
from ..sources.model_dir import has_tokenizer, load_tokenizer
from .allocate import allocate_for_source
from .calibration import CALIBRATION_TOKENS, calibration_ids
from .conversion import ConvertResult, convert, load_source
from .heldout import heldout_bits_per_byte, heldout_score
from .reconstruct import reconstruct_layers

__all__ = ["CONVERT_MARKER", "convert_to_dir", "write_converted"]

CONVERT_MARKER = "kphi-convert.json"


def _better_on_heldout_text(src, result: ConvertResult, tokenizer, heldout_bytes: int, progress: bool,
                            kwargs: dict[str, Any]) -> ConvertResult:
    """The activation-aware conversion, or the Frobenius one where that is better on held-out text.

    The per-projection check (:func:`~kphi.convert.calibration.activation_fit_or_fallback`) judges on held-out rows of the calibration
    data, which share its distribution: a fit can pass that check and still be far worse than the Frobenius fit
    on other text. So the whole model is judged once more on kphi's held-out text, and the better one kept,
    saying so."""
    plain = convert(src, progress=progress, **{**kwargs, "fit": "frobenius", "calibration": None})
    # same text, same source score: only the Frobenius model is scored
    plain.heldout = {**result.heldout, "after": heldout_score(plain.model, tokenizer, heldout_bytes).bits_per_byte}
    if plain.heldout["after"] >= result.heldout["after"]:
        return result
    plain.fit = (f"frobenius (the activation fit was worse on held-out text: {result.heldout['after']:.4f} vs "
                 f"{plain.heldout['after']:.4f} bits per byte)")
    return plain


def convert_to_dir(src: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True, heldout_bytes: int = 8192,
                   keep_better_on_heldout: bool = True, keep: float | None = None, allocate: str = "sensitivity",
                   candidates: str = "low-rank", sensitivity_bytes: int = 4096, sensitivity_cache: Path | None = None,
                   reconstruct_steps: int = 0, reconstruct_lr: float = 1e-3, **kwargs: Any) -> ConvertResult:
    """:func:`convert` any model source (:mod:`kphi.sources`) and write the result to ``out`` (a model
    directory with its modeling code, tokenizer, generation config and ``kphi-convert.json``), written whole or
    not at all. With a tokenizer, the source's and the result's bits per byte on ``heldout_bytes`` bytes of
    held-out text are measured and reported (0: skip), and an activation-aware conversion that is worse there
    than the Frobenius one gives way to it (``fit`` says so; ``keep_better_on_heldout=False``, for experiments
    that measure each fit as asked, keeps it).

    ``keep``: choose each projection's kind from ``candidates`` (:mod:`kphi.convert.allocate`, by ``allocate``)
    so that the model keeps at most that fraction of its non-embedding parameters, each candidate scored on the
    last ``sensitivity_bytes`` of the held-out text (the final score reads its first bytes), the scores kept in
    ``sensitivity_cache`` (default ``$KPHI_CACHE/sensitivity``).
    ``reconstruct_steps``: train each layer to reproduce the source's (:mod:`kphi.convert.reconstruct`) on the
    calibration data."""

    src, out = resolve_model_dir(src), Path(out)
    refuse_foreign_dir(out, (out / CONVERT_MARKER).is_file(), "kphi convert output", "choose another --out")
    if out.resolve() == src.resolve():
        raise ConvertError("--out must differ from the source directory")
    tokenizer = load_tokenizer(src) if has_tokenizer(src) else None
    allocation = None
    if keep is not None:
        allocation = _allocation(src, tokenizer, keep, allocate, candidates, sensitivity_bytes, sensitivity_cache, progress,
                                 kwargs)
        kind, allocated = allocation.overrides()
        kwargs = {**kwargs, "kind": kind, "overrides": list(kwargs.get("overrides") or []) + allocated}
    result = convert(src, progress=progress, **kwargs)
    if tokenizer is not None and heldout_bytes and result.fit != "none":
        result.heldout = heldout_bits_per_byte(src, result.model, tokenizer, heldout_bytes)
        if result.fit == "activations" and keep_better_on_heldout:
            result = _better_on_heldout_text(src, result, tokenizer, heldout_bytes, progress, kwargs)
    result.allocation = allocation.to_dict() if allocation is not None else None
    if reconstruct_steps:
        _reconstruct(src, result, kwargs, reconstruct_steps, reconstruct_lr, progress)
        if result.heldout:
            score = heldout_score(result.model, tokenizer, heldout_bytes).bits_per_byte
            result.heldout = {**result.heldout, "after_fit": result.heldout["after"], "after": score}
    write_converted(result, src, out, tokenizer)
    return result


def _allocation(src, tokenizer, keep, method, candidates, sensitivity_bytes, sensitivity_cache, progress, kwargs):
    """The allocation for ``--keep`` (:func:`~kphi.convert.allocate.allocate_for_source`), its candidates fitted
    as ``kwargs["fit"]`` says."""

    if tokenizer is None:
        raise ConvertError("--keep scores each candidate on held-out text: the source needs a tokenizer")
    if any(k not in ("kind", "targets", "overrides", "fit", "calibration", "calibration_tokens") for k in kwargs):
        raise ConvertError("--keep chooses each projection's kind from --candidates; drop the kind's own settings")
    dense, config = load_source(src)
    if dense is None:
        raise ConvertError("--keep measures what each projection costs: the source needs weights")
    calibration = kwargs.get("calibration")
    ids = (calibration_ids(calibration, kwargs.get("calibration_tokens", CALIBRATION_TOKENS), config.vocab_size)[0::2]
           if kwargs.get("fit") == "activations" and calibration is not None else None)
    return allocate_for_source(dense, tokenizer, keep, method=method, candidates=candidates, targets=kwargs.get("targets"),
                               overrides=kwargs.get("overrides"), sensitivity_bytes=sensitivity_bytes, calibration_ids=ids,
                               cache_dir=sensitivity_cache, progress=progress)


def _reconstruct(src, result: ConvertResult, kwargs, steps: int, learning_rate: float, progress: bool) -> None:
    """Layer-wise reconstruction of ``result.model`` against the source, on the calibration data."""

    calibration = kwargs.get("calibration")
    if calibration is None:
        raise ConvertError("--reconstruct-steps trains on calibration inputs: give --calibration-data")
    dense, config = load_source(src)
    ids = calibration_ids(calibration, kwargs.get("calibration_tokens", CALIBRATION_TOKENS), config.vocab_size)
    reports = reconstruct_layers(result.model, dense, ids, result.replaced, steps=steps, learning_rate=learning_rate,
                                 progress=progress)
    result.reconstruction = [r.to_dict() for r in reports]


def write_converted(result: ConvertResult, src: Path, out: Path, tokenizer) -> None:
    """``result`` as a model directory with ``kphi-convert.json`` (``src``: the source's directory), staged and
    renamed into place."""
    with staged_dir(out) as staging:
        with registered_for_auto_classes(result.model):
            result.model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        marker = {"kphi_version": __version__, "source": str(src.resolve()), **result.summary()}
        (staging / CONVERT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
