"""What structured projections do to a real pretrained model: fit, measure bits per byte, no training.

A suite of ``kind: structure`` (``suites/compress-smollm2.yaml``; run with ``kphi compress --suite NAME``)
names a pretrained ``source`` (any model source, :mod:`kphi.sources`) and a list of ``fits``, each a
projection kind, a fit (``frobenius`` or ``activations``) and optionally ``targets`` (PEFT's rule,
:func:`kphi.modeling.projections.matches_target`) and ``overrides`` (``kphi convert --override`` text, e.g.
``v_proj=dense``). For every fit the source is converted (:func:`kphi.convert.convert`)
and scored on the first ``heldout_bytes`` bytes of kphi's held-out text (:mod:`kphi.eval.bits`, windows of
``context`` tokens every ``stride``), beside the source itself, a uniform guess over the vocabulary
(``log2(V) * tokens / bytes`` bits per byte) and the fit's weight and calibration errors.

Activation-aware fits read ``calibration_tokens`` tokens of the suite's ``data`` prepared with the source's
own tokenizer (``kphi data prepare --tokenizer SOURCE``): a calibration set in another vocabulary would be
read as noise. Each fit's result is written as soon as it is measured (``OUT/fits/LABEL.json``) and reused
on a rerun, so an interrupted study resumes. Outputs: ``results.json``, ``results.md``, ``structure.png``
(bits per byte against the share of non-embedding parameters kept, one line per kind and fit).

**Healing** (optional ``heal:`` section: ``fits`` — labels of fits above, ``tokens``, ``learning_rate`` and
any other training settings under ``training``): each named fit, the model just measured, is written as a
model directory (``OUT/heal/LABEL/fit``), then trained for ``tokens`` more tokens of the same prepared data with
distillation from the source (``kphi train --init-from FIT --distill-from SOURCE``; loss
``(1 - a) CE + a T^2 KL(source || student)``, :mod:`kphi.training.distill`) in ``OUT/heal/LABEL/run`` — an ordinary
run, so a killed heal resumes — and scored again on the same held-out text. ``OUT/heal/LABEL.json`` records
bits per byte before and after, tokens, steps, seconds per step and wall time, and the healing curve: the
run's validation losses in bits per byte of the healing text's validation rows (:mod:`.heal_curve`;
``heal.png``).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..convert import CONVERT_MARKER, ConvertError, convert, convert_to_dir, write_converted
from ..convert.allocate import allocate_for_source
from ..convert.calibration import calibration_ids
from ..convert.reconstruct import reconstruct_layers
from ..data.prepare import PrepareSettings, prepare_dataset
from ..errors import ExperimentError
from ..eval.bits import evaluate_text, heldout_sample
from ..files import atomic_write_text, slug
from ..sources import describe_source, resolve_model_dir
from ..sources.model_dir import load_model, load_tokenizer
from ..train import TrainError, resolve_settings
from .heal_curve import bytes_per_predicted_token, heal_curve, validation_bits_per_byte
from .plots import plot_heal_curves, plot_structure
from .runs import command_line, converged, get_or_train, write_results
from .suites import DATA_KEYS, read_suite_yaml, suite_data, suite_training

__all__ = ["StructureSuite", "load_structure_suite", "run_structure", "format_structure_table"]


@dataclass
class StructureSuite:
    name: str
    source: str
    fits: list[dict[str, Any]]
    description: str = ""
    heldout_bytes: int = 32768
    context: int = 1024
    stride: int = 512
    calibration_tokens: int = 8192
    data: dict[str, Any] = field(default_factory=lambda: {"source": "default"})
    heal: dict[str, Any] = field(default_factory=dict)


def load_structure_suite(name_or_path: str) -> StructureSuite:
    path, data = read_suite_yaml(name_or_path)
    if not isinstance(data, dict) or data.get("kind") != "structure":
        raise ExperimentError(f"{path} is not a structure suite (it needs kind: structure)")
    try:
        suite = StructureSuite(**{k: v for k, v in data.items() if k != "kind"})
    except TypeError as err:
        raise ExperimentError(f"structure suite {path}: {err}") from None
    data_keys = DATA_KEYS | {"context_length"}  # no training settings here: the context is the data's own
    suite.data = suite_data(suite.data, f"structure suite {path}", data_keys)
    fits = suite.fits if isinstance(suite.fits, list) else []
    labels = [f.get("label") for f in fits if isinstance(f, dict)]
    if not fits or len(labels) != len(fits) or not all(labels) or len(set(labels)) != len(labels):
        raise ExperimentError(f"structure suite {path}: every fit needs a unique label")
    for spec in suite.fits:
        if spec.get("fit", "frobenius") not in ("frobenius", "activations") or ("kind" in spec) == ("keep" in spec):
            raise ExperimentError(f"structure suite {path}: fit {spec['label']!r} needs a kind or a keep (not both) and fit "
                               "frobenius|activations")
    if suite.heal is not None and not isinstance(suite.heal, dict):
        raise ExperimentError(f"structure suite {path}: heal must be a mapping (fits, tokens, learning_rate, ...)")
    if suite.heal:
        unknown = set(suite.heal) - {"fits", "tokens", "learning_rate", "training", "data"}
        if unknown or not {"fits", "tokens", "learning_rate"} <= set(suite.heal):
            raise ExperimentError(f"structure suite {path}: heal takes fits, tokens, learning_rate, training and data"
                               f"{' (unknown: ' + ', '.join(sorted(unknown)) + ')' if unknown else ''}")
        suite_training(suite.heal.get("training"), f"structure suite {path}: heal")
        suite_data(suite.heal.get("data"), f"structure suite {path}: heal", data_keys)
        if not isinstance(suite.heal["fits"], list):
            raise ExperimentError(f"structure suite {path}: heal: fits must be a list of fit labels")
        missing = [str(label) for label in suite.heal["fits"] if label not in labels]
        if missing:
            raise ExperimentError(f"structure suite {path}: heal names fits that are not in fits: {', '.join(missing)}")
    return suite


def _prepared(suite: StructureSuite, progress: bool, data: dict[str, Any] | None = None) -> Path:
    """The suite's ``data`` (or ``data``) prepared with the source's own tokenizer and chat template (cached)."""
    return Path(prepare_dataset(PrepareSettings(**_data_settings(suite, data)), progress=progress))


def _data_settings(suite: StructureSuite, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"context_length": 256, **(data or suite.data), "tokenizer": suite.source}


def _calibration_ids(suite: StructureSuite, progress: bool, vocab_size: int) -> torch.Tensor:
    """The first ``calibration_tokens`` tokens of the suite's prepared data, as :func:`kphi.convert.convert_to_dir`
    reads them, so a fit measured here and one converted to a directory see the same rows."""
    return calibration_ids(_prepared(suite, progress), suite.calibration_tokens, vocab_size)


def run_structure(suite: StructureSuite, out: Path, progress: bool = True, log=print) -> dict[str, Any]:
    """Convert and score the source by every fit of ``suite`` (see the module docstring); returns the results."""

    out = Path(out)
    (out / "fits").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dense = load_model(suite.source, dtype=torch.float32)
    tokenizer = load_tokenizer(suite.source)
    text = heldout_sample(suite.heldout_bytes)

    def score(model, name):
        return evaluate_text(model, tokenizer, [text], name, suite.context, suite.stride, progress).to_dict()

    source_file = out / "source.json"
    if source_file.is_file():
        source = json.loads(source_file.read_text())
    else:
        source = {"model": describe_source(suite.source), **score(dense, "source")}
        atomic_write_text(source_file, json.dumps(source, indent=2))
    log(f"source: {source['bits_per_byte']:.4f} bits per byte ({source['tokens']:,} tokens, {source['bytes']:,} bytes)")
    uniform = math.log2(dense.config.vocab_size) * source["tokens"] / source["bytes"]
    vocab_size = dense.config.vocab_size
    calibration = functools.cache(lambda: _calibration_ids(suite, progress, vocab_size))  # read once, when a fit needs it
    healed_labels = set(suite.heal.get("fits", []))
    source_dir = resolve_model_dir(suite.source) if healed_labels else None
    rows = []
    for n, spec in enumerate(suite.fits, start=1):
        cached = out / "fits" / f"{slug(spec['label'], 'fit')}.json"
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            log(f"[{n}/{len(suite.fits)}] {spec['label']}: measured already ({rows[-1]['bits_per_byte']:.4f})")
            continue
        # a fit that is healed next is kept as the model directory the healing starts from, not converted again
        keep_in = out / "heal" / slug(spec["label"], "fit") / "fit" if spec["label"] in healed_labels else None
        rows.append(_measure_fit(spec, dense, tokenizer, score, source, calibration, out, progress,
                                 keep_in=keep_in, source_dir=source_dir))
        atomic_write_text(cached, json.dumps(rows[-1], indent=2))
        row = rows[-1]
        log(f"[{n}/{len(suite.fits)}] {spec['label']}: {row['percent_kept']:.1f}% kept, weight error "
            f"{row['mean_relative_error']:.3f}, {row['bits_per_byte']:.4f} bits per byte ({row['seconds']:.0f} s)")
    if healed_labels and "healing_text_bits_per_byte" not in source:  # the reference for the healing curves
        heal_data = _prepared(suite, progress, suite.heal.get("data"))
        source["healing_text_bits_per_byte"] = validation_bits_per_byte(dense.eval(), heal_data, _heal_eval_rows(suite))
        atomic_write_text(source_file, json.dumps(source, indent=2))
    del dense
    healed = []
    for n, label in enumerate(suite.heal.get("fits", []), start=1):
        spec = next(s for s in suite.fits if s["label"] == label)
        before = next(r for r in rows if r["label"] == label)
        healed.append(_heal(suite, spec, before, out / "heal", score, progress, log))
        log(f"[heal {n}/{len(suite.heal['fits'])}] {label}: {before['bits_per_byte']:.4f} -> "
            f"{healed[-1]['bits_per_byte']:.4f} bits per byte after {healed[-1]['tokens']:,} tokens "
            f"({healed[-1]['seconds_per_step']:.1f} s per step)")
    results = {
        "suite": suite.name, "description": suite.description, "command": command_line(), "source": source,
        "uniform_bits_per_byte": uniform, "heldout_bytes": source["bytes"], "context": suite.context,
        "stride": suite.stride, "fits": rows, "healed": healed,
        # summed over the invocations that wrote results: a rerun that only reads finished parts adds seconds
        "wall_seconds": round(_previous_wall(out) + time.perf_counter() - started, 1),
    }
    write_results(out, results, format_structure_table(results))
    plot_structure(results, out / "structure.png")
    if any(h.get("curve") for h in healed):
        plot_heal_curves(healed, out / "heal.png", f"{suite.name}: healing", source.get("healing_text_bits_per_byte"))
    return results


def _measure_fit(spec: dict[str, Any], dense, tokenizer, score, source: dict[str, Any], calibration_rows, out: Path,
                 progress: bool, keep_in: Path | None = None, source_dir: Path | None = None) -> dict[str, Any]:
    """Convert ``dense`` as ``spec`` says (allocated when it has ``keep``; reconstructed layer by layer when it
    has ``reconstruct_steps``) and score it; the row of the results. ``calibration_rows()``: the suite's
    calibration token ids. ``keep_in``: also write the converted model there (:func:`kphi.convert.write_converted`,
    ``source_dir`` the source's directory), replacing what is there."""

    started = time.perf_counter()
    fit = spec.get("fit", "frobenius")
    calibration = calibration_rows() if fit == "activations" or spec.get("reconstruct_steps") else None
    try:
        kind, overrides, allocation = _allocated(spec, dense, tokenizer, calibration, out / "sensitivity", progress)
        result = convert(dense, kind, targets=spec.get("targets"), overrides=overrides, fit=fit,
                         calibration=calibration if fit == "activations" else None, progress=progress)
    except ConvertError as err:
        raise ExperimentError(f"fit {spec['label']!r}: {err}") from None
    summary = result.summary()
    scored = score(result.model.eval(), spec["label"])
    row = {
        "label": spec["label"], "kind": summary["kind"], "fit": fit, "targets": spec.get("targets"),
        "overrides": spec.get("overrides"), "replaced": summary["replaced"], "percent_kept": summary["percent_of_source"],
        "mean_relative_error": summary["mean_relative_error"],
        "activation_fallbacks": sum(1 for f in result.fits.values() if f.method.startswith("frobenius (")),
        "bits_per_byte": scored["bits_per_byte"], "perplexity": scored["perplexity"],
        "relative_bits_per_byte": scored["bits_per_byte"] / source["bits_per_byte"], "allocation": allocation,
    }
    if spec.get("reconstruct_steps"):
        reports = reconstruct_layers(result.model, dense, calibration, result.replaced, steps=spec["reconstruct_steps"],
                                     learning_rate=spec.get("reconstruct_lr", 1e-3), progress=progress)
        scored = score(result.model.eval(), f"{spec['label']}, reconstructed")
        row.update({"bits_per_byte_fit": row["bits_per_byte"], "bits_per_byte": scored["bits_per_byte"],
                    "perplexity": scored["perplexity"], "relative_bits_per_byte": scored["bits_per_byte"] / source["bits_per_byte"],
                    "reconstruction": [r.to_dict() for r in reports],
                    "reconstruction_tokens_per_layer": max((r.tokens for r in reports), default=0)})
        result.reconstruction = row["reconstruction"]
    result.allocation = allocation
    if keep_in is not None:  # replaced whole, so it holds the model this row measured, also after a resume
        write_converted(result, source_dir, keep_in, tokenizer)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _allocated(spec: dict[str, Any], dense, tokenizer, calibration, cache_dir: Path, progress: bool):
    """``(kind, overrides, allocation)`` of a fit: as written, or chosen under ``keep`` (:mod:`kphi.convert.allocate`;
    the sensitivity scores kept in ``cache_dir``, inside the suite's output, so the suite resumes from it)."""
    if "keep" not in spec:
        return spec["kind"], spec.get("overrides"), None

    allocation = allocate_for_source(
        dense, tokenizer, spec["keep"], method=spec.get("allocate", "sensitivity"),
        candidates=spec.get("candidates", "low-rank"), targets=spec.get("targets"), overrides=spec.get("overrides"),
        sensitivity_bytes=spec.get("sensitivity_bytes", 4096),
        calibration_ids=calibration[0::2] if spec.get("fit", "frobenius") == "activations" else None,
        cache_dir=cache_dir, progress=progress)
    kind, allocated = allocation.overrides()
    return kind, list(spec.get("overrides") or []) + allocated, allocation.to_dict()


#: The fit settings that allocate (``keep``) and reconstruct, passed on to :func:`kphi.convert.convert_to_dir`.
STAGE_SETTINGS = ("keep", "allocate", "candidates", "sensitivity_bytes", "reconstruct_steps", "reconstruct_lr")


def _stage_settings(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k in STAGE_SETTINGS}


def _heal(suite: StructureSuite, spec: dict[str, Any], before: dict[str, Any], out: Path, score, progress: bool,
          log) -> dict[str, Any]:
    """Write one fit as a model directory, train it with distillation from the source, score it again."""

    name = slug(spec["label"], "fit")
    cached = out / f"{name}.json"
    fit_dir, run_dir = out / name / "fit", out / name / "run"
    if cached.is_file():
        row = json.loads(cached.read_text())
        if "curve" not in row and (run_dir / "log.csv").is_file():  # a row measured before curves were kept
            row["curve"] = _curve(suite, _prepared(suite, progress, suite.heal.get("data")), run_dir)
            atomic_write_text(cached, json.dumps(row, indent=2))
        return row
    prepared = _prepared(suite, progress)  # the fits' calibration data
    heal_data = _prepared(suite, progress, suite.heal.get("data"))  # what healing trains on (default: the same)
    fit = spec.get("fit", "frobenius")
    if not (fit_dir / CONVERT_MARKER).is_file():
        log(f"heal {spec['label']}: writing the fit to {fit_dir}")
        try:
            needs_calibration = fit == "activations" or spec.get("reconstruct_steps")
            convert_to_dir(suite.source, fit_dir, kind=spec.get("kind"), targets=spec.get("targets"),
                           overrides=spec.get("overrides"), fit=fit, calibration=prepared if needs_calibration else None,
                           calibration_tokens=suite.calibration_tokens, heldout_bytes=0, keep_better_on_heldout=False,
                           sensitivity_cache=out.parent / "sensitivity", progress=progress, **_stage_settings(spec))
        except ConvertError as err:
            raise ExperimentError(f"heal {spec['label']!r}: {err}") from None
    try:
        settings = resolve_settings(None, **{**suite.heal.get("training", {}), "data": str(heal_data), "out": str(run_dir),
                                             "context_length": _data_settings(suite, suite.heal.get("data"))["context_length"],
                                             "init_from": str(fit_dir.resolve()), "distill_from": suite.source,
                                             "max_tokens": suite.heal["tokens"],
                                             "learning_rate": suite.heal["learning_rate"], "progress": progress})
    except TrainError as err:
        raise ExperimentError(f"heal {spec['label']!r}: {err}") from err
    label = f"heal {spec['label']!r}"
    metrics, _ = get_or_train(settings, label=label, log=log,
                              announce=f"{label}: training {settings.max_tokens:,} tokens at lr {settings.learning_rate:g} "
                                       f"with distillation from {suite.source}")
    converged(metrics, f"{label} ({run_dir})", "lower heal.learning_rate")
    scored = score(load_model(run_dir, dtype=torch.float32).eval(), f"{spec['label']}, healed")
    step_tokens = metrics["tokens"] / max(1, metrics["steps"])
    row = {
        "label": spec["label"], "bits_per_byte_before": before["bits_per_byte"], "bits_per_byte": scored["bits_per_byte"],
        "perplexity": scored["perplexity"], "tokens": metrics["tokens"], "steps": metrics["steps"],
        # the median logged stretch; with none logged, the run's mean
        "seconds_per_step": _median_seconds_per_step(run_dir / "log.csv", step_tokens) or step_tokens / metrics["tokens_per_second"],
        "wall_seconds": metrics["wall_seconds"],
        "learning_rate": settings.learning_rate, "distill_alpha": settings.distill_alpha, "val_loss": metrics["val_loss"],
        "curve": _curve(suite, heal_data, run_dir),
    }
    atomic_write_text(cached, json.dumps(row, indent=2))
    return row


def _previous_wall(out: Path) -> float:
    """The wall time a previous invocation recorded in ``out/results.json`` (0 without one)."""
    try:
        return float(json.loads((out / "results.json").read_text()).get("wall_seconds", 0.0))
    except (OSError, ValueError):
        return 0.0


def _curve(suite: StructureSuite, heal_data: Path, run_dir: Path) -> list[dict[str, Any]]:
    """The run's validation losses in bits per byte of its validation rows (:mod:`.heal_curve`)."""
    return heal_curve(run_dir / "log.csv", bytes_per_predicted_token(heal_data, _heal_eval_rows(suite)))


def _heal_eval_rows(suite: StructureSuite) -> int | None:
    """How many validation rows a healing run evaluates (``None``: all)."""
    return suite.heal.get("training", {}).get("eval_rows")


def _median_seconds_per_step(log_csv: Path, step_tokens: float) -> float | None:
    """Seconds per optimizer step from the median of a run's logged training throughput (each ``log.csv`` row
    covers the steps since the one before), so one slow stretch (a paused or contended machine) does not
    set it."""

    with open(log_csv, newline="") as handle:
        rates = [float(r["tokens_per_second"]) for r in csv.DictReader(handle) if r.get("tokens_per_second")]
    return step_tokens / statistics.median(rates) if rates else None


def format_structure_table(results: dict[str, Any]) -> str:
    source = results["source"]
    lines = [
        f"source {source['model']}: {source['bits_per_byte']:.4f} bits per byte (perplexity {source['perplexity']:.2f}) "
        f"on {results['heldout_bytes']:,} bytes; a uniform guess: {results['uniform_bits_per_byte']:.2f}",
        "",
        "| fit | kind | fit | targets | % kept | weight error | bits per byte | x source | perplexity |",
        "|:--|:--|:--|:--|--:|--:|--:|--:|--:|",
    ]
    for r in results["fits"]:
        kind = ", ".join(f"{k}={v}" for k, v in r["kind"].items() if k != "kind")
        kind = f"{r['kind']['kind']} ({kind})"
        targets = (",".join(r["targets"]) if r["targets"] else "all") + "".join(f"; {o}" for o in r.get("overrides") or [])
        if r.get("allocation"):
            dense = sum(label == "dense" for label in r["allocation"]["choices"].values())
            kind = (f"{r['allocation']['method']} allocation: {dense} of {len(r['allocation']['choices'])} dense, "
                    f"most common otherwise {kind}")
        fit = r["fit"] + (f" + reconstruction (fit alone {r['bits_per_byte_fit']:.3f})" if "bits_per_byte_fit" in r else "")
        lines.append(f"| {r['label']} | {kind} | {fit} | {targets} | {r['percent_kept']:.1f} | "
                     f"{r['mean_relative_error']:.3f} | {r['bits_per_byte']:.3f} | {r['relative_bits_per_byte']:.2f} | "
                     f"{r['perplexity']:,.1f} |")
    if results.get("healed"):
        lines += ["", "healed by distillation from the source:", "",
                  "| fit | bits per byte before | after | x source | tokens | s per step | wall |",
                  "|:--|--:|--:|--:|--:|--:|--:|"]
        for h in results["healed"]:
            lines.append(f"| {h['label']} | {h['bits_per_byte_before']:.3f} | {h['bits_per_byte']:.3f} | "
                         f"{h['bits_per_byte'] / source['bits_per_byte']:.2f} | {h['tokens']:,} | "
                         f"{h['seconds_per_step']:.1f} | {h['wall_seconds'] / 60:.0f} min |")
        reference = source.get("healing_text_bits_per_byte")
        for h in results["healed"]:
            if h.get("curve"):
                points = ", ".join(f"{p['tokens']:,}: {p['bits_per_byte']:.4f}"
                                   + (f" ({p['bits_per_byte'] / reference:.2f}x)" if reference else "") for p in h["curve"])
                lines += ["", f"{h['label']}, bits per byte on the healing text's validation rows after each number "
                          f"of healing tokens (heal.png)" + (f"; the source there: {reference:.4f}" if reference else "")
                          + f": {points}"]
    return "\n".join(lines)
