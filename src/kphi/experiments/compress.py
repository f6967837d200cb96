"""``kphi compress``: can a trained dense model be compressed into structured projections and healed?

One suite (``kind: compress``, e.g. ``suites/compress-cpu.yaml``) runs the whole experiment:

1. **teacher** — the dense model trained for ``teacher.tokens`` (B) at its tuned rate;
2. **fits** — the teacher converted (:mod:`kphi.convert`) by every entry of ``compressions`` (a projection kind
   and a fit: ``frobenius``, ``activations`` on ``calibration_tokens`` of training data, or ``none``), each
   evaluated right away on the validation rows;
3. **healing** — every fit trained ``heal_tokens`` (B/4) more, plainly and with distillation from the teacher
   (:mod:`kphi.training.distill`), at each of ``heal_learning_rates`` (the best rate is reported);
4. **scratch** — the same structured architecture trained from a fresh initialisation for B + B/4 tokens;
5. **other_architecture** (optional) — a dense decoder of another family (e.g. Llama) built at random,
   trained for B tokens with ``kphi train --init-from``, converted and healed the same way: the path end to end.

Every training run is an ordinary run directory under ``OUT`` (``teacher/``, ``heal/``, ``scratch/``, ...);
finished runs are reused, interrupted ones resume. Results: ``results.json``, ``results.md`` and
``compress.png`` (validation loss of every arm after the fit, healed plainly and with distillation).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..convert import CONVERT_MARKER, convert_to_dir
from ..data.prepare import PrepareSettings, load_prepared, prepare_dataset
from ..errors import ExperimentError
from ..files import atomic_write_text, slug
from ..modeling.projections import projection_kind
from ..sources.model_dir import load_model
from ..train import resolve_settings, trainer_arguments
from ..training.train_settings import training_value
from .plots import plot_compress
from .runs import command_line, converged, get_or_train, write_results
from .suites import read_suite_yaml, suite_data, suite_training

__all__ = ["CompressSuite", "load_compress_suite", "run_compress", "format_compress_table"]

HEAL_MODES = ("plain", "distill")


@dataclass
class CompressSuite:
    name: str
    description: str
    teacher: dict[str, Any]
    compressions: list[dict[str, Any]]
    heal_tokens: int
    heal_learning_rates: list[float]
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    calibration_tokens: int = 16384
    distill: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] | None = None
    other_architecture: dict[str, Any] | None = None


def load_compress_suite(name_or_path: str) -> CompressSuite:
    path, data = read_suite_yaml(name_or_path)
    if not isinstance(data, dict) or data.get("kind") != "compress":
        raise ExperimentError(f"{path} is not a compress suite (it needs kind: compress)")
    fields = {k: v for k, v in data.items() if k != "kind"}
    try:
        suite = CompressSuite(**fields)
    except TypeError as err:
        raise ExperimentError(f"compress suite {path}: {err}") from None
    suite.training = suite_training(suite.training, f"compress suite {path}")
    suite.data = suite_data(suite.data, f"compress suite {path}")
    if (not isinstance(suite.compressions, list) or not suite.compressions
            or not all(isinstance(c, dict) and c.get("label") and c.get("kind") for c in suite.compressions)):
        raise ExperimentError(f"compress suite {path}: every compression needs a label and a kind")
    if not isinstance(suite.teacher, dict) or not {"preset", "tokens", "learning_rate"} <= set(suite.teacher):
        raise ExperimentError(f"compress suite {path}: teacher needs preset, tokens and learning_rate")
    return suite


class _Runner:
    """Trains (or reuses) the suite's runs with shared data and training settings."""

    def __init__(self, suite: CompressSuite, out: Path, prepared: Path, progress: bool, log):
        self.suite, self.out, self.prepared, self.progress, self.log = suite, out, prepared, progress, log

    def settings(self, run_dir: Path, preset: str, **overrides):
        return resolve_settings(preset, **{**self.suite.training, "data": str(self.prepared), "out": str(run_dir),
                                           "progress": self.progress, **overrides})

    def train(self, run_dir: Path, label: str, preset: str, **overrides) -> dict[str, Any]:
        """The run's metrics (see :func:`kphi.experiments.runs.get_or_train`); a diverged run comes back with ``diverged`` set."""
        settings = self.settings(run_dir, preset, **overrides)
        metrics, reused = get_or_train(settings, label=label, log=self.log,
                                       announce=f"{label}: training {settings.max_tokens:,} tokens at lr {settings.learning_rate:g}")
        if reused:
            self.log(f"{label}: already trained, reusing {run_dir}")
        elif not metrics.get("diverged"):
            self.log(f"    val loss {metrics['val_loss']:.4f} ({metrics['wall_seconds']:.0f} s)")
        return metrics

    def evaluate(self, model_dir: Path) -> float:
        """Validation loss of a model directory, computed exactly as a training run's evaluation is."""
        cached = model_dir / "kphi-eval.json"
        if cached.is_file():
            return json.loads(cached.read_text())["val_loss"]
        import torch
        from transformers import Trainer, default_data_collator

        settings = self.settings(model_dir / "eval", self.suite.teacher["preset"], max_steps=1)
        val = load_prepared(self.prepared)[1]
        if settings.eval_rows is not None:
            val = val.select(range(min(settings.eval_rows, len(val))))
        model = load_model(model_dir, dtype=torch.float32)
        from transformers.trainer_callback import PrinterCallback

        trainer = Trainer(model=model, args=trainer_arguments(settings, model_dir / "eval", max_steps=1),
                          eval_dataset=val, data_collator=default_data_collator)
        trainer.remove_callback(PrinterCallback)
        loss = trainer.evaluate()["eval_loss"]
        atomic_write_text(cached, json.dumps({"val_loss": loss}))
        return loss


def _fit(runner: _Runner, teacher_dir: Path, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    fit = spec.get("fit", "frobenius")
    marker = out / CONVERT_MARKER
    summary = json.loads(marker.read_text()) if marker.is_file() and (out / "model.safetensors").is_file() else None
    if summary is None or summary.get("kind") != projection_kind(dict(spec["kind"])).to_dict() or summary.get("fit") != fit:
        if summary is not None:
            raise ExperimentError(f"{out} holds another fit ({summary.get('kind')}, {summary.get('fit')}); choose another --out")
        # calibration data with every fit, so that the calibration error is reported for each
        result = convert_to_dir(teacher_dir, out, kind=dict(spec["kind"]), fit=fit, calibration=runner.prepared,
                                calibration_tokens=runner.suite.calibration_tokens, progress=runner.progress,
                                keep_better_on_heldout=False)  # the experiment measures each fit as it asks
        summary = result.summary()
    return {
        "fit": fit,
        "kind": summary["kind"],
        "non_embedding": summary["non_embedding_after"],
        "percent_of_teacher": summary["percent_of_source"],
        "mean_relative_error": summary["mean_relative_error"],
        "mean_calibration_error": summary["mean_calibration_error"],
        "val_loss_after_fit": runner.evaluate(out),
    }


def _heal(runner: _Runner, label: str, fit_dir: Path, teacher_dir: Path, preset: str) -> dict[str, Any]:
    healed: dict[str, Any] = {}
    distill = runner.suite.distill
    for mode in HEAL_MODES:
        grid = {}
        for rate in runner.suite.heal_learning_rates:
            run_dir = runner.out / "heal" / f"{slug(label, 'fit')}-{mode}-lr{rate:g}"
            extra = {"distill_from": str(teacher_dir.resolve()), "distill_alpha": distill.get("alpha", 0.5),
                     "distill_temperature": distill.get("temperature", 1.0)} if mode == "distill" else {}
            metrics = runner.train(run_dir, f"{label}, healed ({mode}), lr {rate:g}", preset, init_from=str(fit_dir.resolve()),
                                   learning_rate=rate, max_tokens=runner.suite.heal_tokens, **extra)
            grid[rate] = metrics["val_loss"]  # None where that rate diverged: a result of the grid
        finite = [rate for rate, loss in grid.items() if loss is not None]
        if not finite:
            raise ExperimentError(f"{label}: healing ({mode}) diverged at every rate of heal_learning_rates; lower them")
        best = min(finite, key=grid.get)
        healed[mode] = {"val_loss": grid[best], "learning_rate": best, "grid": {f"{r:g}": v for r, v in grid.items()}}
    return healed


def _other_architecture_teacher(runner: _Runner, spec: dict[str, Any]) -> Path:
    """A dense model of another family, built at random with the data's tokenizer, trained for B tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    init_dir = runner.out / f"{spec['label']}-init"
    if not (init_dir / "model.safetensors").is_file():
        tokenizer = load_prepared(runner.prepared)[2]
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = AutoConfig.for_model(spec["model_type"], vocab_size=len(tokenizer), **ids, **spec.get("config", {}))
        torch.manual_seed(int(training_value(runner.suite.training, "seed")))
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
    teacher_dir = runner.out / f"{spec['label']}-teacher"
    label = f"{spec['label']} (dense)"
    converged(runner.train(teacher_dir, label, runner.suite.teacher["preset"], init_from=str(init_dir.resolve()),
                           learning_rate=spec.get("learning_rate", runner.suite.teacher["learning_rate"]),
                           max_tokens=runner.suite.teacher["tokens"]), label, "lower its learning_rate")
    return teacher_dir


def run_compress(suite: CompressSuite, out: Path, progress: bool = True, log=print) -> dict[str, Any]:
    """Run every step of the suite (see the module docstring); returns ``results.json``'s content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    context_length = training_value(suite.training, "context_length")
    prepared = prepare_dataset(PrepareSettings(context_length=context_length, **suite.data), progress=progress)
    runner = _Runner(suite, out, prepared, progress, log)
    teacher = suite.teacher
    teacher_dir = out / "teacher"
    teacher_metrics = converged(runner.train(teacher_dir, "dense teacher", teacher["preset"], learning_rate=teacher["learning_rate"],
                                             max_tokens=teacher["tokens"], config_overrides=teacher.get("config", {})),
                                "the dense teacher", "lower teacher.learning_rate")
    results: dict[str, Any] = {
        "suite": suite.name,
        "description": suite.description,
        "command": command_line(),
        "teacher": {"preset": teacher["preset"], "tokens": teacher["tokens"], "learning_rate": teacher["learning_rate"],
                    "val_loss": teacher_metrics["val_loss"], "non_embedding": teacher_metrics["non_embedding_params"]},
        "heal_tokens": suite.heal_tokens,
        "arms": {},
    }
    for spec in suite.compressions:
        label = spec["label"]
        log(f"== {label}")
        fit_dir = out / "fits" / slug(label, "fit")
        arm = _fit(runner, teacher_dir, spec, fit_dir)
        log(f"    after the fit: val loss {arm['val_loss_after_fit']:.4f}, weight error {arm['mean_relative_error']:.3f}")
        arm["healed"] = _heal(runner, label, fit_dir, teacher_dir, teacher["preset"])
        results["arms"][label] = arm
    if suite.scratch:
        scratch = suite.scratch
        total = teacher["tokens"] + suite.heal_tokens
        metrics = converged(runner.train(out / "scratch" / slug(scratch["label"], "scratch"), scratch["label"],
                                         scratch.get("preset", teacher["preset"]), learning_rate=scratch["learning_rate"],
                                         max_tokens=total, config_overrides=scratch.get("config", {})),
                            scratch["label"], "lower scratch.learning_rate")
        results["scratch"] = {"label": scratch["label"], "tokens": metrics["tokens"], "learning_rate": scratch["learning_rate"],
                              "val_loss": metrics["val_loss"], "non_embedding": metrics["non_embedding_params"]}
    if suite.other_architecture:
        spec = suite.other_architecture
        log(f"== {spec['label']} (another architecture)")
        other_teacher = _other_architecture_teacher(runner, spec)
        other_metrics = json.loads((other_teacher / "metrics.json").read_text())
        fit_dir = out / "fits" / slug(spec["label"], "fit")
        arm = _fit(runner, other_teacher, {"label": spec["label"], "kind": spec["kind"], "fit": spec.get("fit", "frobenius")}, fit_dir)
        arm["healed"] = _heal(runner, spec["label"], fit_dir, other_teacher, teacher["preset"])
        arm["teacher_val_loss"] = other_metrics["val_loss"]
        arm["teacher_non_embedding"] = other_metrics["non_embedding_params"]
        arm["model_type"] = spec["model_type"]
        results["other_architecture"] = {spec["label"]: arm}
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    _write_outputs(results, out)
    return results


def format_compress_table(results: dict[str, Any]) -> str:
    t = results["teacher"]
    lines = [
        f"Dense teacher ({t['preset']}, {t['tokens']:,} tokens, lr {t['learning_rate']:g}): "
        f"{t['non_embedding']:,} non-embedding parameters, val loss {t['val_loss']:.4f}. Healing: {results['heal_tokens']:,} tokens.",
        "",
        "| arm | non-emb. params | % of teacher | weight error | calib. error | val loss after fit | healed (plain) | healed (distill) |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def row(label, arm):
        cal = arm.get("mean_calibration_error")
        healed = arm["healed"]
        return (f"| {label} | {arm['non_embedding']:,} | {arm['percent_of_teacher']:.1f}% | {arm['mean_relative_error']:.3f} | "
                f"{'-' if cal is None else f'{cal:.3f}'} | {arm['val_loss_after_fit']:.4f} | "
                f"{healed['plain']['val_loss']:.4f} (lr {healed['plain']['learning_rate']:g}) | "
                f"{healed['distill']['val_loss']:.4f} (lr {healed['distill']['learning_rate']:g}) |")

    lines += [row(label, arm) for label, arm in results["arms"].items()]
    if results.get("scratch"):
        s = results["scratch"]
        lines.append(f"| {s['label']} ({s['tokens']:,} tokens, lr {s['learning_rate']:g}) | {s['non_embedding']:,} | "
                     f"{100 * s['non_embedding'] / t['non_embedding']:.1f}% | - | - | - | {s['val_loss']:.4f} | - |")
    for label, arm in (results.get("other_architecture") or {}).items():
        lines += ["", f"Another architecture: {arm['model_type']} dense teacher {arm['teacher_non_embedding']:,} non-embedding "
                  f"parameters, val loss {arm['teacher_val_loss']:.4f}.", "", lines[2], lines[3], row(label, arm)]
    return "\n".join(lines)


def _write_outputs(results: dict[str, Any], out: Path) -> None:
    write_results(out, results, format_compress_table(results))
    plot_compress(results, out / "compress.png")
