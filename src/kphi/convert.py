"""``kphi convert``: a transformers causal LM (Llama, Mistral, Qwen2, Phi-3, GPT-2, kphi-3) with structured projections.

:func:`convert` takes a model directory, a model or a config and returns the same architecture with every
targeted projection replaced by a projection kind (:mod:`kphi.projections`), the rest of the weights copied:

* ``fit="frobenius"`` (the default when the source has weights): each projection is the kind's closest
  module to the trained dense weight (closed form per kind; ``FitResult.relative_error`` says what is left);
* ``fit="activations"``: the closest module *on calibration inputs*: one pass of the dense model over
  ``calibration`` tokens collects ``C = X^T X`` of every projection's input, and each kind solves
  ``min ||X W^T - module(X)||`` from ``C`` (per group for the grouped block). Every projection sees the dense
  model's activations (not those of already-compressed layers), so all fits come from the same single pass;
* ``fit="none"``: the projections are initialised afresh (as the model's own init does).

:func:`convert_to_dir` writes the result as a model directory that loads with ``AutoModelForCausalLM``
after ``import kphi``, and with ``trust_remote_code=True`` where kphi is not installed (the modeling files are
copied beside the weights by transformers' custom-code mechanism), plus ``kphi-convert.json``: the kind, the
targets, the parameter counts and each projection's fit error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import KphiError
from .files import refuse_foreign_dir, staged_dir
from .modeling.kinds import DenseKind, FitResult
from .modeling.projections import linear_weight, projection_kind

__all__ = ["ConvertError", "ConvertResult", "FITS", "convert", "convert_to_dir", "non_embedding_parameters", "calibration_grams"]

FITS = ("auto", "frobenius", "activations", "none")
#: Calibration tokens read for an activation-aware fit unless told otherwise.
CALIBRATION_TOKENS = 4096
CONVERT_MARKER = "kphi-convert.json"


class ConvertError(KphiError, ValueError):
    """The source cannot be converted as asked (unsupported architecture, bad kind or settings, no data)."""


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

    def describe(self, src, out) -> str:
        """A few lines for people: what was replaced, the parameter counts, the mean fit errors."""
        summary = self.summary()
        lines = [
            f"converted {src} -> {out}: {summary['replaced']} projections as {self.kind}"
            + "".join(f"; {', '.join(o['targets'])} as {o['projection']}" for o in summary["overrides"] or [])
            + f", fit {self.fit}",
            f"non-embedding parameters: {self.non_embedding_before:,} -> {self.non_embedding_after:,} "
            f"({summary['percent_of_source']}%)",
        ]
        if self.fits and self.fit != "none":
            line = f"relative weight error (mean over projections): {summary['mean_relative_error']:.4f}"
            if summary["mean_calibration_error"] is not None:
                line += f"; on calibration inputs: {summary['mean_calibration_error']:.4f}"
            lines.append(line + f" (per projection: {out}/kphi-convert.json)")
        if self.heldout:
            h = self.heldout
            lines.append(f"bits per byte on {h['bytes']:,} bytes of held-out text: {h['before']:.4f} before, "
                         f"{h['after']:.4f} after ({h['after'] / h['before']:.2f}x)")
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
        }


def non_embedding_parameters(model) -> int:
    """All parameters minus the input embedding and the output head (counted once if tied), as the report counts."""
    from .params import model_parameter_counts

    total, embedding = model_parameter_counts(model)
    return total - embedding


def _target_config(source_config, kind, targets: list[str] | None, overrides: list[dict] | None = None):
    """The structured config for ``source_config``'s architecture, with ``kind`` and ``targets``."""
    from .modeling.configuration_kphi3 import BOOKKEEPING_KEYS, KPhi3Config, config_fields
    from .sources.auto import register_structured

    model_type = source_config.model_type
    if model_type == "kphi3":
        from .modeling.modeling_kphi3 import PROJECTION_TARGETS

        if overrides:
            raise ConvertError("a kphi-3 model has one projection kind; --override applies to other architectures")
        if targets and tuple(targets) != PROJECTION_TARGETS:
            raise ConvertError(f"a kphi-3 model's targets are fixed ({', '.join(PROJECTION_TARGETS)}); drop --targets")
        if source_config.projection_kind().name != "dense":
            raise ConvertError(f"the source is already structured ({source_config.projection_kind().describe()}); convert a dense model")
        config = KPhi3Config(**{**config_fields(source_config), "projection": kind.to_dict()})
        config.validate_architecture()
        return config, list(PROJECTION_TARGETS)
    if model_type.startswith("kphi_"):
        raise ConvertError(f"the source is already a converted model (model_type {model_type!r}); convert a dense model")
    try:
        cls, _ = register_structured(model_type)
    except KeyError as err:
        raise ConvertError(f"kphi convert handles transformers' causal LMs; {err.args[0]}") from None
    if not targets and not cls.default_target_modules:
        targets = layer_projection_names(source_config)
    fields = {k: v for k, v in source_config.to_dict().items() if k not in BOOKKEEPING_KEYS}
    config = cls(**{**fields, "projection": kind.to_dict(), "target_modules": list(targets) if targets else None,
                    "projection_overrides": _override_dicts(overrides)})
    config.validate_projection()
    return config, list(config.projection_targets)


def parse_override(text: str) -> dict:
    r"""``--override`` text, ``TARGETS=KIND[:FIELD=VALUE,...]``, as ``{"targets": [...], "projection": {...}}``.

    ``TARGETS`` is a comma-free name or pattern (several: separate ``--override`` options), e.g.
    ``v_proj=dense``, ``.*layers\.(0|1)\..*=low_rank:fraction=0.9``, ``down_proj=grouped:min_channels_per_group=128``.
    """
    import yaml

    targets, sep, spec = text.partition("=")
    kind_name, _, fields = spec.partition(":")
    if not sep or not targets or not kind_name:
        raise ConvertError(f"--override {text!r}: expected TARGETS=KIND[:FIELD=VALUE,...], e.g. v_proj=dense")
    projection = {"kind": kind_name}
    for item in filter(None, fields.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConvertError(f"--override {text!r}: {item!r} is not FIELD=VALUE")
        projection[key] = yaml.safe_load(value)
    return {"targets": [targets], "projection": projection}


def _override_dicts(overrides: list | None) -> list[dict] | None:
    """Overrides as data, each kind checked (a bad one is one :class:`ConvertError`)."""
    if not overrides:
        return None
    result = []
    for override in overrides:
        override = parse_override(override) if isinstance(override, str) else dict(override)
        try:
            override["projection"] = projection_kind(override.get("projection")).to_dict()
        except (ValueError, TypeError) as err:
            raise ConvertError(f"override {override!r}: {err}") from None
        result.append(override)
    return result


def layer_projection_names(source_config) -> list[str]:
    """The projections of an architecture kphi has no target list for: the distinct last names of every
    ``nn.Linear`` / ``Conv1D`` inside a repeated block (a ``ModuleList`` entry such as ``layers.0``), so
    attention and MLP projections but never ``lm_head`` or embeddings. Built on the meta device (no memory).

    Raises :class:`ConvertError` naming what is missing when the architecture has no causal LM or no such
    projection."""
    import re

    from transformers import AutoModelForCausalLM

    from .modeling.projections import is_dense_projection

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(source_config)
    except (ValueError, KeyError) as err:
        raise ConvertError(f"transformers has no causal LM for model_type {source_config.model_type!r}: {err}") from None
    names: list[str] = []
    for name, module in skeleton.named_modules():
        if re.search(r"\.\d+\.", f".{name}") and is_dense_projection(module):
            leaf = name.rpartition(".")[2]
            if leaf not in names:
                names.append(leaf)
    if not names:
        raise ConvertError(
            f"a {source_config.model_type!r} model has no nn.Linear or Conv1D projection inside its repeated "
            "blocks; kphi convert has nothing to replace (name the modules with --targets)"
        )
    return names


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


def _calibration_ids(calibration, tokens: int, vocab_size: int) -> torch.Tensor:
    """``[rows, length]`` token ids from a tensor, or from a prepared data directory's training split."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration
    else:
        from .data.prepare import load_prepared

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
    or ``{"targets": [...], "projection": {...}}``; ``{"kind": "dense"}`` keeps a projection dense). ``fit``: see the module docstring (``"auto"``: frobenius when ``source``
    has weights). ``calibration``: token ids ``[rows, length]`` or a prepared data directory (``fit="activations"``).
    The source is never modified.
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    from .sources import auto as _registers  # noqa: F401  (kphi3 and the structured types with the Auto classes)

    if fit not in FITS:
        raise ConvertError(f"--fit must be one of {', '.join(FITS)}, got {fit!r}")
    try:
        if isinstance(kind, str):
            kind = {"kind": kind}
        if isinstance(kind, dict):
            kind = projection_kind({**kind, **settings})
        else:
            kind = projection_kind(kind)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    if isinstance(kind, DenseKind):
        raise ConvertError("converting to the dense kind changes nothing; choose a structured kind")

    dense = None
    if isinstance(source, (str, os.PathLike)):
        from .sources.model_dir import load_config, load_model, read_model_config
        from .sources import resolve_model_dir

        source = resolve_model_dir(source)  # a directory, a .gguf, a known model, a hub id
        read_model_config(source)  # one clear error for a missing or broken config.json
        if Path(source, "model.safetensors").is_file() or Path(source, "model.safetensors.index.json").is_file():
            dense = load_model(source, dtype=torch.float32)
            source_config = dense.config
        else:
            source_config = load_config(source)
    elif isinstance(source, PretrainedConfig):
        source_config = source
    else:
        dense, source_config = source, source.config
    if fit == "auto":
        fit = "frobenius" if dense is not None else "none"
    if fit != "none" and dense is None:
        raise ConvertError(f"--fit {fit} needs a source with weights; this one is a config only (use --fit none)")

    try:
        target_config, target_names = _target_config(source_config, kind, targets, overrides)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConvertError):
            raise
        raise ConvertError(f"cannot build the converted config: {err}") from None
    model = AutoModelForCausalLM.from_config(target_config)
    result = ConvertResult(model=model, kind=kind.to_dict(), targets=target_names, fit=fit)
    result.non_embedding_after = non_embedding_parameters(model)
    if dense is None:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(source_config)
        result.non_embedding_before = non_embedding_parameters(plain)
        result.replaced = _replaced_names(model, kind)
        return result

    result.non_embedding_before = non_embedding_parameters(dense)
    result.replaced = _replaced_names(model, kind)
    if not result.replaced:
        raise ConvertError(f"no projection of the source matches the targets {', '.join(target_names)}")
    _copy_untouched_weights(dense, model, result.replaced)
    grams = {}
    if fit == "activations" and calibration is None:
        raise ConvertError("--fit activations needs calibration data (--calibration-data DIR of kphi data prepare)")
    fit_grams, check_grams = {}, {}
    if calibration is not None:  # with any fit: the calibration error is reported for every fit
        ids = _calibration_ids(calibration, calibration_tokens, source_config.vocab_size)
        # the activation fit sees the even rows; the odd rows judge it against the Frobenius fit
        fit_ids, check_ids = (ids[0::2], ids[1::2]) if len(ids) > 1 else (ids, ids)
        fit_grams = calibration_grams(dense, result.replaced, fit_ids, progress=progress)
        check_grams = calibration_grams(dense, result.replaced, check_ids, progress=progress) if len(ids) > 1 else fit_grams
        grams = {name: fit_grams[name] + check_grams[name] if len(ids) > 1 else fit_grams[name] for name in fit_grams}
    from tqdm.auto import tqdm

    for name in tqdm(result.replaced, desc=f"fit ({fit})", unit="proj", disable=not progress or fit == "none", leave=False):
        weight, bias = linear_weight(dense.get_submodule(name))
        module, gram = model.get_submodule(name), grams.get(name)
        kind = _kind_of(model, name, result)
        method = fit
        try:
            if fit == "activations":
                method = _activation_fit_or_fallback(kind, module, weight.float(), bias, fit_grams[name], check_grams[name])
            elif fit != "none":
                kind.fit(module, weight.float(), bias)
        except ValueError as err:
            raise ConvertError(f"{name}: {err}") from None
        result.fits[name] = kind.result(module, weight, gram, method)
    return result


def _activation_fit_or_fallback(kind, module, weight, bias, fit_gram, check_gram) -> str:
    """Fit ``module`` on ``fit_gram``'s calibration inputs, unless the Frobenius fit is better on held-out
    calibration inputs (``check_gram``, other rows): an activation fit that overfits its rows (few tokens,
    ill-conditioned ``X^T X``) must never leave the model worse than the plain fit. Returns the method kept."""
    from .modeling.kinds import calibration_error

    kind.fit(module, weight, bias)
    frobenius_state = {k: v.clone() for k, v in module.state_dict().items()}
    frobenius_error = calibration_error(check_gram, weight, kind.dense_weight(module))
    kind.fit(module, weight, bias, gram=fit_gram)
    activation_error = calibration_error(check_gram, weight, kind.dense_weight(module))
    if activation_error <= frobenius_error:
        return "activations"
    module.load_state_dict(frobenius_state)
    return f"frobenius (activation fit worse on held-out calibration rows: {activation_error:.4f} vs {frobenius_error:.4f})"


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


def _heldout_score(model, tokenizer, size: int):
    """``model`` scored on the first ``size`` bytes of kphi's held-out text (:mod:`kphi.evaluate`; context up to
    256 tokens, stride 128)."""
    from .eval.evaluate import evaluate_text, heldout_sample

    return evaluate_text(model.eval(), tokenizer, [heldout_sample(size)], "heldout", context=256)


def heldout_bits_per_byte(src, converted, tokenizer, size: int) -> dict[str, Any]:
    """Bits per byte of the source model and of ``converted`` on the first ``size`` bytes of kphi's held-out
    text: whether the model survived."""
    from .sources.model_dir import load_model

    before = _heldout_score(load_model(src, dtype=torch.float32), tokenizer, size)
    after = _heldout_score(converted, tokenizer, size)
    return {"bytes": before.bytes, "tokens": before.tokens, "context": before.context, "stride": before.stride,
            "before": before.bits_per_byte, "after": after.bits_per_byte}


def _better_on_heldout_text(src, result: ConvertResult, tokenizer, heldout_bytes: int, progress: bool,
                            kwargs: dict[str, Any]) -> ConvertResult:
    """The activation-aware conversion, or the Frobenius one where that is better on held-out text.

    The per-projection check (:func:`_activation_fit_or_fallback`) judges on held-out rows of the calibration
    data, which share its distribution: a fit can pass that check and still be far worse than the Frobenius fit
    on other text. So the whole model is judged once more on kphi's held-out text, and the better one kept,
    saying so."""
    plain = convert(src, progress=progress, **{**kwargs, "fit": "frobenius", "calibration": None})
    # same text, same source score: only the Frobenius model is scored
    plain.heldout = {**result.heldout, "after": _heldout_score(plain.model, tokenizer, heldout_bytes).bits_per_byte}
    if plain.heldout["after"] >= result.heldout["after"]:
        return result
    plain.fit = (f"frobenius (the activation fit was worse on held-out text: {result.heldout['after']:.4f} vs "
                 f"{plain.heldout['after']:.4f} bits per byte)")
    return plain


def convert_to_dir(src: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True, heldout_bytes: int = 8192,
                   keep_better_on_heldout: bool = True, **kwargs: Any) -> ConvertResult:
    """:func:`convert` any model source (:mod:`kphi.sources`) and write the result to ``out`` (a model
    directory with its modeling code, tokenizer, generation config and ``kphi-convert.json``), written whole or
    not at all. With a tokenizer, the source's and the result's bits per byte on ``heldout_bytes`` bytes of
    held-out text are measured and reported (0: skip), and an activation-aware conversion that is worse there
    than the Frobenius one gives way to it (``fit`` says so; ``keep_better_on_heldout=False``, for experiments
    that measure each fit as asked, keeps it)."""
    from .export import registered_for_auto_classes
    from .sources.model_dir import has_tokenizer, load_tokenizer

    from .sources import resolve_model_dir

    src, out = resolve_model_dir(src), Path(out)
    refuse_foreign_dir(out, (out / CONVERT_MARKER).is_file(), "kphi convert output", "choose another --out")
    if out.resolve() == src.resolve():
        raise ConvertError("--out must differ from the source directory")
    result = convert(src, progress=progress, **kwargs)
    tokenizer = load_tokenizer(src) if has_tokenizer(src) else None
    if tokenizer is not None and heldout_bytes and result.fit != "none":
        result.heldout = heldout_bits_per_byte(src, result.model, tokenizer, heldout_bytes)
        if result.fit == "activations" and keep_better_on_heldout:
            result = _better_on_heldout_text(src, result, tokenizer, heldout_bytes, progress, kwargs)
    from . import __version__

    with staged_dir(out) as staging:
        with registered_for_auto_classes(result.model):
            result.model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        marker = {"kphi_version": __version__, "source": str(src.resolve()), **result.summary()}
        (staging / CONVERT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return result
