"""``kphi train``: one model, one run directory, on transformers' ``Trainer`` (accelerate underneath).

The loop, optimizer (AdamW), schedulers, mixed precision, DDP/FSDP/DeepSpeed and checkpoint contents
(weights, optimizer, scheduler, RNG states, data position) are Trainer's. kphi adds what a run directory
needs around it:

* settings resolved from a preset's ``training:`` section plus overrides (:class:`TrainSettings`);
* a run directory that refuses to mix runs (``kphi-run.json``), checkpoints marked complete only once
  fully written, ``--resume`` from the newest complete one;
* a divergence guard (NaN/inf loss stops the run, the last good checkpoint stays), a time limit;
* at the end ``DIR`` is a self-contained model directory (config, safetensors, tokenizer with chat
  template, generation config) plus ``metrics.json``, ``log.csv`` and ``loss.png``.

Layout of ``DIR``::

    kphi-run.json  log.csv  checkpoint-*/  runs/ (TensorBoard)  config.json  model.safetensors
    generation_config.json  tokenizer.json ...  metrics.json  loss.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.prepare import CorpusSettings, PrepareSettings, load_prepared, prepare_dataset
from .errors import first_line
from .export import registered_for_auto_classes
from .files import atomic_write_text, refuse_foreign_dir
from .generate import REPORT_SAMPLING, stop_token_ids
from .params import model_parameter_counts
from .sources.auto import KPhi3Config, KPhi3ForCausalLM, config_fields
from .sources.model_dir import load_model
from .training.callbacks import (
    CheckpointMarker,
    CsvLogger,
    DivergenceGuard,
    ProgressLine,
    StepsBegun,
    TimeLimit,
    is_complete_checkpoint,
)
from .training.distill import distillation_trainer_class
from .training.fingerprint import weights_sha256
from .training.optim import scale_grouped_learning_rates
from .training.plots import plot_loss_curve
from .training.run_records import IDENTITY_VERSION, identity_differences, recorded_version
from .training.sharding import full_state_dict, is_sharded_checkpoint
from .training.train_settings import (  # TrainError, TrainSettings and resolve_settings stay importable from here
    DivergedError,
    check_model_config,
    TrainError,
    TrainSettings,
    model_config_fields,
    resolve_settings,
    tokens_per_step,
)

__all__ = ["TrainError", "DivergedError", "TrainSettings", "TrainResult", "resolve_settings", "train"]

RUN_FILE = "kphi-run.json"
METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- run directory


def _check_run_dir(out: Path, settings: TrainSettings, resume: bool, config: KPhi3Config | None = None) -> None:
    """Refuse to mix runs: a directory holds one run, identified by ``kphi-run.json``."""
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TrainError(f"{run_file} is unreadable ({err}); move the directory away or choose another --out")
        if not resume:
            state = "a finished" if (out / METRICS_FILE).is_file() else "an unfinished"
            raise TrainError(
                f"{out} already holds {state} run; pass --resume to continue it or choose another --out"
            )
        changed = identity_differences(previous.get("identity"), settings, config, recorded_version(previous))
        if changed:
            raise TrainError(f"{out} holds a different run (settings differ: {', '.join(changed)}); choose another --out")
    else:
        refuse_foreign_dir(out, False, "kphi run", "choose another --out")
    if resume and not run_file.is_file():
        raise TrainError(f"nothing to resume in {out}: it holds no kphi run")


def _newest_complete_checkpoint(out: Path) -> Path | None:
    """The highest-numbered complete ``checkpoint-N``; incomplete ones (killed mid-save) are removed."""
    complete = _complete_checkpoints(out)
    return complete[-1][1] if complete else None


def _complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete ``checkpoint-N``, oldest first; incomplete ones are removed."""
    complete = []
    for folder in out.glob("checkpoint-*"):
        suffix = folder.name.split("-", 1)[1]
        if not folder.is_dir() or not suffix.isdigit():
            continue
        if is_complete_checkpoint(folder):
            complete.append((int(suffix), folder))
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return sorted(complete)


def _resume_point(out: Path, max_steps: int) -> Path | None:
    """The checkpoint a resume toward ``max_steps`` starts from: the newest complete one before the budget's end.

    Trainer resumed from a checkpoint at its last step takes one step more before it checks the budget, so a
    run killed after its final checkpoint (while writing its outputs) is replayed from the checkpoint before
    that one, whose last segment recreates the same final state on a deterministic run; the final checkpoint
    is removed first, to be written again. A checkpoint past the budget is refused: the run is longer already.
    """
    complete = _complete_checkpoints(out)
    if complete and complete[-1][0] > max_steps:
        raise TrainError(f"{complete[-1][1]} is past the budget of {max_steps:,} steps; resume with a budget of at "
                         f"least {complete[-1][0]:,} steps, or train the shorter run in another --out")
    if complete and complete[-1][0] == max_steps:
        shutil.rmtree(complete.pop()[1])
    return complete[-1][1] if complete else None


def _validate_checkpoint(folder: Path, model) -> None:
    """A resume target must hold a trainer state and weights of the same architecture (``model.safetensors``
    with its config, or FSDP's sharded model directory, whose shapes accelerate checks as it loads)."""
    from safetensors import safe_open

    if is_sharded_checkpoint(folder):
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except Exception as err:  # noqa: BLE001 - any failure means the checkpoint is unusable
            raise TrainError(f"checkpoint {folder} is corrupt or incomplete ({type(err).__name__}: {err})") from None
        return
    try:
        json.loads((folder / "trainer_state.json").read_text())
        saved = json.loads((folder / "config.json").read_text())
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as err:  # noqa: BLE001 - any failure means the checkpoint is unusable
        raise TrainError(f"checkpoint {folder} is corrupt or incomplete ({type(err).__name__}: {err})") from None
    config = model.config
    try:  # read back as the model's own config class: defaults filled in, legacy projection fields folded
        saved = type(config)(**config_fields(saved))
    except Exception as err:  # noqa: BLE001 - any failure means the checkpoint is unusable
        raise TrainError(f"checkpoint {folder} has an unreadable config.json ({type(err).__name__}: {err})") from None
    expected = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    fields = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "projection")
    mismatched = [f for f in fields if getattr(saved, f, None) != getattr(config, f, None)]
    if mismatched or not expected <= keys | tied:
        raise TrainError(f"checkpoint {folder} does not match this model ({', '.join(mismatched) or 'weights differ'})")


# --------------------------------------------------------------------------- data and model


def _load_data(settings: TrainSettings):
    data_path = Path(settings.data)
    if data_path.is_dir() and (data_path / "stats.json").is_file():
        return load_prepared(data_path)
    corpus = {f.name: getattr(settings, f.name) for f in dataclasses.fields(CorpusSettings)}
    prepared = prepare_dataset(PrepareSettings(source=settings.data, **corpus), progress=settings.progress)
    return load_prepared(prepared)


def build_model_config(settings: TrainSettings, tokenizer, config: KPhi3Config | None = None) -> KPhi3Config:
    """The model's config (:func:`model_config_fields`), sized to the tokenizer and the context length."""
    base = model_config_fields(settings, config)
    base["vocab_size"] = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        base[name] = getattr(tokenizer, name, None)
    if base["pad_token_id"] is None:
        base["pad_token_id"] = base["eos_token_id"]
    base["max_position_embeddings"] = max(base.get("max_position_embeddings") or 0, settings.context_length)
    base["original_max_position_embeddings"] = max(base.get("original_max_position_embeddings") or 0, settings.context_length)
    return KPhi3Config(**base)


def initial_model(settings: TrainSettings, tokenizer, config: KPhi3Config | None = None):
    """The model a run starts from: ``--init-from``'s weights, else a new model built after
    ``torch.manual_seed(settings.seed)`` (so the same settings give bit-identical initial weights)."""
    torch.manual_seed(settings.seed)
    if settings.init_from is not None:
        return _load_model_dir(settings.init_from, "--init-from", len(tokenizer))
    return KPhi3ForCausalLM(build_model_config(settings, tokenizer, config))


def initial_weights_sha256(settings: TrainSettings, config: KPhi3Config | None = None) -> str:
    """:func:`kphi.training.fingerprint.weights_sha256` of :func:`initial_model` for ``settings`` (the prepared data in
    ``settings.data`` supplies the tokenizer): what a recorded run's ``initial_weights_sha256`` is checked against."""
    tokenizer = load_prepared(settings.data)[2]
    return weights_sha256(initial_model(settings, tokenizer, config))


def _load_model_dir(path: str, flag: str, vocab_size: int):
    """A model directory's causal LM (float32, checked loading) whose vocabulary is the data's."""
    model = load_model(path, dtype=torch.float32)
    if model.config.vocab_size != vocab_size:
        raise TrainError(
            f"{flag} {path}: its vocabulary has {model.config.vocab_size} tokens, the prepared data's tokenizer "
            f"{vocab_size}; prepare the data with that model's tokenizer"
        )
    return model


def effective_precision(precision: str, environ=None) -> str:
    """The precision a run trains in: ``precision``, or for ``auto`` the launcher's choice (``accelerate
    launch`` with ``mixed_precision`` in its config sets ``ACCELERATE_MIXED_PRECISION``), else bf16 where the
    GPU supports it and fp32 elsewhere. A launcher that asks for another precision than an explicit
    ``--precision`` is an error: accelerate would silently override kphi's setting otherwise."""
    environ = os.environ if environ is None else environ
    launcher = {"no": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}.get(environ.get("ACCELERATE_MIXED_PRECISION", ""))
    if precision == "auto":
        if launcher:
            return launcher
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if launcher and launcher != precision:
        raise TrainError(f"the accelerate config asks for mixed_precision {environ['ACCELERATE_MIXED_PRECISION']} and "
                         f"--precision is {precision}: make them agree (or use --precision auto to follow the config)")
    return precision


def _precision_flags(precision: str) -> dict[str, bool]:
    precision = effective_precision(precision)
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _has_accelerator() -> bool:
    """Any device torch can train on besides the CPU (CUDA, ROCm, MPS, XPU, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def check_sharding_enabled(trainer, environ=None) -> None:
    """FSDP or DeepSpeed asked for by the launcher (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``) but
    not enabled by Trainer (accelerate only shards on an accelerator) is an error, not plain data parallelism
    in disguise."""
    environ = os.environ if environ is None else environ
    for name, variable, enabled in (("FSDP", "ACCELERATE_USE_FSDP", "is_fsdp_enabled"),
                                    ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", "is_deepspeed_enabled")):
        if environ.get(variable, "").lower() in ("1", "true") and not getattr(trainer, enabled, False):
            raise TrainError(f"the launcher asked for {name} but Trainer did not enable it "
                             f"({'no accelerator here' if not _has_accelerator() else 'see the accelerate log'}); "
                             "launch without that config file, or on GPUs")


# --------------------------------------------------------------------------- the run


def trainer_arguments(settings: TrainSettings, out: Path, max_steps: int):
    """``TrainingArguments`` from kphi's settings, plus ``settings.training_arguments`` passed through."""
    from transformers import TrainingArguments

    ours = dict(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else [],
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not _has_accelerator(),
        activation_checkpointing=settings.gradient_checkpointing,
        disable_tqdm=True,  # kphi's ProgressLine replaces Trainer's bars (see train())
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
        **_precision_flags(settings.precision),
    )
    extra = settings.training_arguments
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown, taken = sorted(set(extra) - known), sorted(set(extra) & set(ours) - {"optim"})
    if unknown:
        raise TrainError(f"training_arguments: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                         "transformers.TrainingArguments fields")
    if taken:
        raise TrainError(f"training_arguments: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set from "
                         "kphi's own settings; use those (kphi train --help)")
    try:
        return TrainingArguments(**{**ours, **extra})
    except (TypeError, ValueError) as err:
        raise TrainError(f"training_arguments: {err}") from None


def _main_process_first(is_main: bool, on_main, on_others=None):
    """Run ``on_main`` on the main process, then ``on_others`` elsewhere; a failure reaches every process.

    With several processes (``torchrun``/``accelerate launch``), checks and writes that touch the run
    directory or the data cache must happen once; the other processes wait for the verdict instead of
    racing or hanging in a collective when the main process has refused to start.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return on_main()
    verdict: list[Any] = [None, None]
    if is_main:
        try:
            verdict[1] = on_main()
        except Exception as err:  # noqa: BLE001 - forwarded to every process below
            verdict[0] = f"{err}"
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise TrainError(verdict[0])
    return verdict[1] if is_main or on_others is None else on_others(verdict[1])


def _fit(trainer, checkpoint: str | None, watch: _RunWatch, out: Path, found_before: set[Path] | None) -> float:
    """Run ``trainer`` to its last step (from ``checkpoint`` when given) and evaluate there; returns the run's
    wall-clock seconds, earlier invocations of a resumed run included.

    An error before the first step is explained (:func:`_before_first_step`, which removes what this call
    created when ``found_before`` lists what was there); a loss that became nan/inf is a :class:`DivergedError`
    naming the last good checkpoint.
    """
    start = time.perf_counter()
    try:
        with _without_hub_progress_bars():  # "Writing model shards" at every checkpoint
            trainer.train(resume_from_checkpoint=checkpoint)
    except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as err:
        if watch.steps_begun.begun:
            raise
        raise _before_first_step(err, checkpoint, out, found_before) from err
    wall = watch.csv_logger.resumed_seconds + time.perf_counter() - start

    if watch.guard.diverged_at is not None:
        last_good = _newest_complete_checkpoint(out)
        raise DivergedError(
            f"training loss became {watch.guard.value} at step {watch.guard.diverged_at}; stopped. "
            + (f"The last good checkpoint is {last_good}." if last_good else "No checkpoint was saved before it.")
            + " Lower the learning rate or use fp32."
        )

    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if not evals or evals[-1]["step"] != trainer.state.global_step:  # Trainer evaluates at the last step itself
        trainer.evaluate()
    return wall


def train(settings: TrainSettings, resume: bool = False, config: KPhi3Config | None = None) -> TrainResult:
    """Train one model as ``settings`` say; returns the run directory and its metrics.

    The model is ``config`` when given (e.g. a comparison's arm), else the preset's config; either way
    ``settings.config_overrides`` apply on top, and the vocabulary and token ids are the tokenizer's.
    Steps: check the settings and the run directory, load the data, build the model (and a teacher), claim the
    run directory (run record), train with Trainer (resuming from the newest complete checkpoint), then write
    the model directory and ``metrics.json``.
    """
    settings.validate()
    if settings.preset is None and settings.init_from is None and config is None:
        raise TrainError("give --preset (a model to build) or --init-from MODEL (a model to start from)")
    check_model_config(settings, config)
    out = Path(settings.out)
    args = trainer_arguments(settings, out, max_steps=1)  # also joins the process group when launched distributed
    is_main = args.process_index == 0
    step_tokens = tokens_per_step(settings, args.world_size)
    args.max_steps = _step_budget(settings, step_tokens)

    def load_and_check():
        _check_run_dir(out, settings, resume, config)
        return _load_data(settings)

    train_rows, val_rows, tokenizer, data_stats = _main_process_first(is_main, load_and_check, lambda _: _load_data(settings))
    eval_rows = _evaluation_rows(train_rows, val_rows, settings, args)
    model = initial_model(settings, tokenizer, config)
    initial_weights = weights_sha256(model)
    teacher = None
    if settings.distill_from is not None:
        teacher = _load_model_dir(settings.distill_from, "--distill-from", len(tokenizer))

    def claim_run_dir():
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = _resume_point(out, args.max_steps) if resume else None
        if checkpoint is not None:
            _validate_checkpoint(checkpoint, model)
            _check_same_horizon(checkpoint, settings.lr_scheduler, args.max_steps)
        record = {"identity_version": IDENTITY_VERSION, "identity": settings.identity(config),
                  "settings": dataclasses.asdict(settings),
                  "initial_weights_sha256": initial_weights}
        atomic_write_text(out / RUN_FILE, json.dumps(record, indent=2))
        return str(checkpoint) if checkpoint else None

    found_before = set(out.iterdir()) if out.is_dir() else set()
    checkpoint = _main_process_first(is_main, claim_run_dir, lambda found: found)

    watch = _RunWatch(out, step_tokens, settings.max_minutes)
    trainer = _make_trainer(settings, model, teacher, args, train_rows, eval_rows, watch, step_tokens)
    wall = _fit(trainer, checkpoint, watch, out, found_before if is_main else None)

    state_dict = full_state_dict(trainer.model_wrapped, trainer.accelerator)  # every process: gathering is collective
    metrics: dict[str, Any] = {}
    if is_main:
        metrics = _write_run_outputs(trainer, settings, tokenizer, out, state_dict, data_stats, watch, step_tokens, wall)
        metrics["initial_weights_sha256"] = initial_weights
        atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2))
    _leave_process_group()
    return TrainResult(out=out, metrics=metrics)


#: Learning-rate schedules whose rate at step t does not depend on the run's total number of steps.
HORIZON_FREE_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")


def _check_same_horizon(checkpoint: Path, lr_scheduler: str, max_steps: int) -> None:
    """A run resumed toward another step budget continues on the schedule of the new budget from the step it
    reached: with a constant rate that is the longer run exactly; with a schedule that depends on the total
    (cosine, linear, ...) it is neither run, so that resume is refused."""
    planned = json.loads((checkpoint / "trainer_state.json").read_text()).get("max_steps")
    if lr_scheduler in HORIZON_FREE_SCHEDULES or planned in (None, max_steps):
        return
    raise TrainError(
        f"{checkpoint} was trained toward {planned:,} steps on the {lr_scheduler} schedule, whose rate depends on "
        f"the total; resuming toward {max_steps:,} steps would follow neither schedule. Resume with the budget it "
        f"had, or start the longer run in another --out (a constant schedule can be extended)"
    )


def _step_budget(settings: TrainSettings, step_tokens: int) -> int:
    """Optimizer steps a run may take: ``max_steps``, else ``ceil(max_tokens / step_tokens)``; a run limited
    only by ``max_minutes`` gets a step budget that never binds."""
    if settings.max_steps is not None:
        return settings.max_steps
    if settings.max_tokens is not None:
        return math.ceil(settings.max_tokens / step_tokens)
    return 10**9


def _evaluation_rows(train_rows, val_rows, settings: TrainSettings, args):
    """The validation rows evaluated (the first ``eval_rows``), after checking the splits fit the settings; an
    evaluation batch larger than them is shrunk (``drop_last`` would leave no batch)."""
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise TrainError("the prepared data has an empty training or validation split")
    row_length = len(train_rows[0]["input_ids"])
    if row_length != settings.context_length:
        raise TrainError(f"prepared rows have {row_length} tokens but context_length is {settings.context_length}")
    eval_rows = val_rows if settings.eval_rows is None else val_rows.select(range(min(settings.eval_rows, len(val_rows))))
    if len(eval_rows) < args.per_device_eval_batch_size * args.world_size:
        args.per_device_eval_batch_size = max(1, len(eval_rows) // args.world_size)
    return eval_rows


def _before_first_step(err: Exception, checkpoint: str | None, out: Path, found_before: set[Path] | None) -> TrainError:
    """The one-line error for a run that failed before its first step: a resume whose checkpoint would not load,
    or a new run that could not start, whose files are taken back (:func:`_release_run_dir`, on the main process:
    ``found_before`` given) so the same ``--out`` can be used again."""
    if checkpoint is not None:  # Trainer was still loading the checkpoint
        return TrainError(f"cannot resume from {checkpoint}: {first_line(err)}")
    if found_before is not None:
        _release_run_dir(out, found_before)
    return TrainError(f"cannot start training: {first_line(err)}")


def _release_run_dir(out: Path, found_before: set[Path]) -> None:
    """Remove what a new run that failed before its first step wrote to ``out`` (its record, log and TensorBoard
    folder): every entry not in ``found_before``, so ``out`` is as this call found it. An ``out`` that already held a
    run record (an earlier invocation's run, resumed or not) is left untouched."""
    if out / RUN_FILE in found_before:
        return
    for entry in set(out.iterdir()) - found_before:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class _RunWatch:
    """The callbacks kphi adds to every run, kept to read after training: the loss log, the divergence
    guard, whether a step began (a resume failing before one is a bad checkpoint) and the time limit."""

    def __init__(self, out: Path, step_tokens: int, max_minutes: float | None):
        self.csv_logger = CsvLogger(out / "log.csv", step_tokens)
        self.guard, self.steps_begun = DivergenceGuard(), StepsBegun()
        self.time_limit = TimeLimit(max_minutes) if max_minutes is not None else None

    def callbacks(self) -> list:
        return [CheckpointMarker(), self.csv_logger, self.guard, self.steps_begun,
                *([self.time_limit] if self.time_limit is not None else [])]


def _make_trainer(settings: TrainSettings, model, teacher, args, train_rows, eval_rows, watch: _RunWatch, step_tokens: int):
    """The Trainer of a run: transformers' own, with the grouped learning-rate rule and distillation from
    ``teacher`` when the settings ask, kphi's callbacks, and one progress line instead of the raw log dicts."""
    from transformers import default_data_collator
    from transformers.trainer_callback import PrinterCallback

    trainer_class = _trainer_class(settings.grouped_lr_scale)
    if teacher is not None:
        trainer_class = distillation_trainer_class(trainer_class, teacher, settings.distill_alpha, settings.distill_temperature)
    trainer = trainer_class(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                            data_collator=default_data_collator, callbacks=watch.callbacks())
    check_sharding_enabled(trainer)
    trainer.remove_callback(PrinterCallback)  # the raw log dict every logging_steps
    if settings.progress:
        trainer.add_callback(ProgressLine(Path(settings.out).name, step_tokens))
    return trainer


def _write_run_outputs(trainer, settings: TrainSettings, tokenizer, out: Path, state_dict, data_stats, watch: _RunWatch,
                       step_tokens: int, wall: float) -> dict[str, Any]:
    """On the main process: the model directory first (nothing after it may lose it), the loss plot, and the
    final metrics (returned; the caller writes ``metrics.json`` last, marking the run finished)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with _without_hub_progress_bars():
        write_model_dir(model, tokenizer, out, state_dict)
    metrics = _final_metrics(trainer, settings, model.config, data_stats, watch.csv_logger, step_tokens, wall)
    metrics["precision_effective"] = effective_precision(settings.precision)
    metrics["stopped_by_time_limit"] = watch.time_limit is not None and watch.time_limit.reached

    if (out / "log.csv").is_file():
        plot_loss_curve(out / "log.csv", out / "loss.png", f"{Path(settings.preset or out).name}: loss vs tokens")
    return metrics


@contextlib.contextmanager
def _without_hub_progress_bars():
    """transformers' own progress bars (e.g. one per checkpoint write) off for the duration, then as before."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _trainer_class(grouped_lr_scale: str):
    """``Trainer``, or a subclass whose optimizer gives grouped weights their own learning rate."""
    from transformers import Trainer

    if grouped_lr_scale == "none":
        return Trainer

    class GroupedLrTrainer(Trainer):
        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            scale_grouped_learning_rates(optimizer, self.model if model is None else model, grouped_lr_scale)
            return optimizer

    return GroupedLrTrainer


def _leave_process_group() -> None:
    """Wait for the main process to finish writing, then shut the process group down cleanly.

    Without this a non-main process exits while the group's communication threads still run, and
    the launcher reports it as aborted.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _final_metrics(trainer, settings, config, data_stats, csv_logger, step_tokens, wall) -> dict:
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    total, embedding = model_parameter_counts(trainer.model)
    steps = trainer.state.global_step
    return {
        "preset": settings.preset,
        "seed": settings.seed,
        "steps": steps,
        "tokens": steps * step_tokens,
        "train_loss": train_losses[-1] if train_losses else None,
        "val_loss": evals[-1]["eval_loss"],
        "val_curve": [(h["step"] * step_tokens, h["eval_loss"]) for h in evals],
        "tokens_per_second": csv_logger.tokens_per_second,
        "train_seconds": round(csv_logger.train_seconds, 2),
        "wall_seconds": round(wall, 2),
        "total_params": total,
        "embedding_params": embedding,
        "non_embedding_params": total - embedding,
        "layers": config.num_hidden_layers,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "hidden_size": config.hidden_size,
        "projection": config.projection_kind().to_dict() if hasattr(config, "projection_kind") else None,
        "data": {k: data_stats.get(k) for k in ("train_rows", "validation_rows", "train_tokens", "validation_tokens")},
    }


def write_model_dir(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Model, tokenizer and generation config into ``out``, each file replaced atomically.

    ``state_dict``: the full weights when the model is sharded (:func:`kphi.training.sharding.full_state_dict`, gathered
    by every process; only the main process calls this). Generation stops at ``<|end|>`` (end of an assistant
    turn) or end of text, and samples with the report's settings (top_p 0.5, repetition penalty 1.2).
    """
    from transformers import GenerationConfig

    config = model.config
    staging = out / ".final-staging"
    shutil.rmtree(staging, ignore_errors=True)
    if config.model_type.startswith("kphi_"):
        # a converted model (kphi convert) keeps its modeling files, so it loads with trust_remote_code as its
        # source did; kphi-3 outputs load after `import kphi` (or through kphi export)

        with registered_for_auto_classes(model):
            model.save_pretrained(staging, state_dict=state_dict)
    else:
        model.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    eos = stop_token_ids(tokenizer, model)  # <|end|>, then the end of text: what generation stops at
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else (eos[0] if eos else None),
        pad_token_id=config.pad_token_id,
        **REPORT_SAMPLING,
    ).save_pretrained(staging)
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
