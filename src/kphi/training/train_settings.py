"""What defines a training run: :class:`TrainSettings`, how presets and flags resolve into them, and a run's
identity (the settings a resume or a reuse must match).

Kept apart from :mod:`kphi.train` (the loop) and free of torch and transformers' modeling code at import, so
the ``kphi`` command builds its flags from these settings in a fraction of a second; what needs a model (a
preset's config, a model's fields) is imported where it is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..data.prepare import CorpusSettings
from ..errors import KphiError
from ..settings import invalid_setting, setting

# The command line reads TrainSettings for its flags without importing torch: the model code (presets, model
# sources, configurations) is imported in the functions that resolve a configuration.
if TYPE_CHECKING:
    from ..sources.auto import KPhi3Config

__all__ = ["TrainError", "DivergedError", "TrainSettings", "GROUPED_LR_SCALES", "LATER_FIELDS", "resolve_settings",
           "model_config_fields", "model_fields", "tokens_per_step", "whole_steps"]



#: ``grouped_lr_scale`` values (:func:`kphi.training.optim.grouped_lr_multipliers`).
GROUPED_LR_SCALES = ("none", "groups")


class TrainError(KphiError, RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


class DivergedError(TrainError):
    """The training loss became NaN or infinite; the last good checkpoint (if any) is kept."""


@dataclass
class TrainSettings(CorpusSettings):
    """Everything that defines a training run. Presets set defaults in their ``training:`` section.

    The data fields (``tokenizer``, ``vocab_size``, ``context_length``, ``validation_rows``, ``max_rows``)
    are inherited from :class:`kphi.data.prepare.CorpusSettings`; they apply when ``data`` names a source
    to prepare.
    """

    preset: str | None = "tiny-kphi3"
    """Preset name, preset YAML, config.json or model directory (its config; weights are not loaded). With a
    config object given to :func:`train` it may be ``None`` (no preset training defaults)."""
    out: str = "runs/train"
    """Run directory; at the end it is a model directory loadable with ``from_pretrained``."""
    data: str = "default"
    """A prepared data directory (``kphi data prepare``) or a source: ``default``, ``lamini`` or a file path."""
    max_steps: int | None = setting(None, minimum=1)
    """Optimizer steps to train; or give ``max_tokens`` / ``max_minutes``."""
    max_tokens: int | None = setting(None, minimum=1)
    """Training tokens (global); converted to steps."""
    max_minutes: float | None = setting(None, above=0)
    """Stop (with a checkpoint) after this much training time."""
    batch_size: int = setting(8, minimum=1)
    """Rows per device per step (the report: 1)."""
    gradient_accumulation_steps: int = setting(1, minimum=1)
    """Batches whose gradients are summed before each optimizer step."""
    learning_rate: float = setting(1e-3, above=0)
    """Peak learning rate (the report: 1e-4, constant)."""
    lr_scheduler: str = "constant"
    """Any ``transformers`` scheduler name: constant, constant_with_warmup, cosine, linear, ..."""
    warmup_steps: int = setting(0, minimum=0)
    """Steps of linear warm-up to the peak learning rate."""
    weight_decay: float = setting(0.0, minimum=0)
    """AdamW's decoupled weight decay (not applied to biases and norms, as in Trainer)."""
    max_grad_norm: float = setting(1.0, above=0)
    """Gradient clipping by global norm."""
    eval_steps: int = setting(50, minimum=1)
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_rows: int | None = setting(None, minimum=1)
    """Use only the first this-many validation rows for evaluation (``None``: all)."""
    save_steps: int = setting(50, minimum=1)
    """Write a complete, resumable checkpoint every this many steps."""
    save_total_limit: int = setting(2, minimum=1)
    """Checkpoints kept (the newest ones)."""
    logging_steps: int = setting(10, minimum=1)
    """Log the training loss (log.csv, TensorBoard) every this many steps."""
    seed: int = setting(42, minimum=0, maximum=2**32 - 1)
    """Seed of initialisation and data order; runs with equal seeds see the data in the same order."""
    precision: str = setting("auto", choices=("auto", "fp32", "bf16", "fp16"))
    """``auto`` (bf16 on a GPU that supports it, else float32), ``fp32``, ``bf16`` or ``fp16``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""
    grouped_lr_scale: str = setting("none", choices=GROUPED_LR_SCALES)
    """``none``, or ``groups``: the learning rate of every grouped weight is multiplied by its group count
    ``G`` (see :func:`kphi.training.optim.scale_grouped_learning_rates`)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """KPhi3Config fields to change from the preset, as a JSON object (e.g. ``{"num_hidden_layers": 3}`` or
    ``{"projection": {"kind": "low_rank", "fraction": 0.25}}``)."""
    training_arguments: dict[str, Any] = field(default_factory=dict)
    """Any other ``transformers.TrainingArguments`` field, passed through as is, as a JSON object (e.g.
    ``{"adam_beta2": 0.95, "torch_compile": true}``); the fields kphi sets from its own settings are refused."""
    progress: bool = True
    """One progress line per run on the console."""
    init_from: str | None = None
    """A model directory (e.g. ``kphi convert``'s output) whose architecture and weights start the run; the
    preset then supplies only training defaults. Its vocabulary must be the prepared data's."""
    distill_from: str | None = None
    """A teacher model directory: the loss becomes ``(1 - alpha) CE + alpha T^2 KL(teacher || student)``
    (:mod:`kphi.training.distill`). The teacher is frozen and never saved."""
    distill_alpha: float = setting(0.5, minimum=0, maximum=1)
    """Weight of the distillation term, in ``[0, 1]``."""
    distill_temperature: float = setting(1.0, above=0)
    """Softmax temperature ``T`` of the distillation term."""

    def validate(self) -> None:
        """Raise :class:`TrainError` naming the first setting that is out of bounds or inconsistent."""
        problem = invalid_setting(self)
        if problem:
            raise TrainError(problem)
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise TrainError("give one of max_steps, max_tokens or max_minutes (or set one in the preset)")
        from ..sources.model_dir import read_model_config

        for name in ("init_from", "distill_from"):
            value = getattr(self, name)
            if value is not None:  # any model source: a directory, a .gguf, a known model, a hub id
                try:
                    read_model_config(value)
                except KphiError as err:  # no model there (SourceError) or a broken one (ModelDirError)
                    raise TrainError(f"--{name.replace('_', '-')} {value}: {err}") from err

    def identity(self, config: KPhi3Config | None = None) -> dict[str, Any]:
        """The settings that make a run what it is: a resume must match them (budgets may change).

        The model enters as its whole configuration (``model``: :func:`model_fields`), not as the preset's
        name plus overrides, so one model spelled two ways (a preset, a config object) is one run.
        """
        d = dataclasses.asdict(self)
        for key in ("out", "max_steps", "max_tokens", "max_minutes", "progress", "save_total_limit",
                    "preset", "config_overrides"):
            d.pop(key)
        # fields added after the first experiments count only when set, so those runs stay resumable
        for key, default in LATER_FIELDS.items():
            if d[key] == default:
                d.pop(key)
        # a run started from a model directory with no preset is that directory's model (init_from)
        d["model"] = model_fields(self, config) if config is not None or self.preset is not None else None
        return json.loads(json.dumps(d))  # as stored: tuples become lists


#: Settings added after runs were recorded, with the default that leaves them out of a run's identity.
LATER_FIELDS = {"init_from": None, "distill_from": None, "distill_alpha": 0.5, "distill_temperature": 1.0,
                "training_arguments": {}}


def model_config_fields(settings: TrainSettings, config: KPhi3Config | None = None) -> dict[str, Any]:
    """The fields of the model a run trains: ``config`` (else the preset's config) with ``config_overrides``."""
    if config is None:
        if settings.preset is None:
            raise TrainError("give a preset, or a model config to train()")
        from ..presets import resolve_config

        config = resolve_config(settings.preset).config
    from ..sources.auto import with_overrides

    return with_overrides(config, settings.config_overrides)


def check_model_config(settings: TrainSettings, config: KPhi3Config | None = None) -> None:
    """Build the model a run trains once, before anything is written: a value its checks refuse, or a
    ``config_overrides`` key that is none of the config's fields (a typo, which transformers would keep as a
    loose attribute), is one :class:`TrainError` naming it. A run from ``--init-from`` alone (no preset, no
    config) has its model checked when it is loaded."""
    if config is None and settings.preset is None:
        return
    import inspect

    from ..modeling.configuration_kphi3 import LEGACY_PROJECTION_FIELDS
    from ..presets import build_config
    from ..sources.auto import KPhi3Config

    built = build_config(model_config_fields(settings, config), "--config-overrides", TrainError)
    fields = set(inspect.signature(KPhi3Config.__init__).parameters) | set(LEGACY_PROJECTION_FIELDS)
    fields.add("attn_implementation")  # taken by transformers' base config, kept as _attn_implementation
    folded = set(built.rope_parameters or {})  # rope_theta, partial_rotary_factor: RoPE settings it folds in
    default = KPhi3Config()
    unknown = sorted(k for k in settings.config_overrides or {} if k not in fields | folded and not hasattr(default, k))
    if unknown:
        raise TrainError(f"--config-overrides: {', '.join(map(repr, unknown))} is not a field of the model's config")


def model_fields(settings: TrainSettings, config: KPhi3Config | None = None) -> dict[str, Any]:
    """:func:`model_config_fields` rebuilt through ``KPhi3Config`` (every field, its defaults filled in) and
    stored as JSON stores it: equal models give equal dicts however they were spelled."""
    from ..sources.auto import KPhi3Config, config_fields

    fields = config_fields(KPhi3Config(**model_config_fields(settings, config)))
    return json.loads(json.dumps({k: v for k, v in fields.items() if k not in ("dtype", "torch_dtype")}))


def resolve_settings(preset: str | None, **overrides: Any) -> TrainSettings:
    """Defaults <- the preset's ``training:`` section <- ``overrides`` (``None`` values are ignored).

    ``preset=None``: no preset; the model then comes as a config object to :func:`train`.
    """
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    values: dict[str, Any] = {}
    if preset is not None:
        from ..presets import PresetError, resolve_config

        spec = resolve_config(preset)
        for key, value in spec.training.items():
            if key not in known:
                raise PresetError(f"preset {spec.name}: unknown training setting {key!r}")
            values[key] = value
    budgets = [k for k in ("max_steps", "max_tokens", "max_minutes") if overrides.get(k) is not None]
    if len(budgets) > 1:
        raise TrainError(f"give one budget, not {' and '.join(budgets)}")
    for key, value in overrides.items():
        if key not in known:
            raise TrainError(f"unknown training setting {key!r}")
        if value is not None:
            values[key] = value
    values["preset"] = preset
    if any(k in overrides and overrides[k] is not None for k in ("max_steps", "max_tokens", "max_minutes")):
        for k in ("max_steps", "max_tokens", "max_minutes"):  # an explicit budget replaces the preset's
            if overrides.get(k) is None:
                values[k] = None
    settings = TrainSettings(**values)
    settings.validate()
    return settings


def training_value(training: dict[str, Any] | TrainSettings, name: str) -> Any:
    """Setting ``name`` of ``training`` (settings, or a suite's partial ``training:`` mapping), or
    TrainSettings' default when the mapping leaves it out: experiments never restate a default."""
    if isinstance(training, TrainSettings):
        return getattr(training, name)
    if name in training:
        return training[name]
    field = next((f for f in dataclasses.fields(TrainSettings) if f.name == name), None)
    if field is None:
        raise KeyError(f"TrainSettings has no field {name!r}")
    return field.default


def unknown_training_keys(training: dict[str, Any]) -> list[str]:
    """The keys of a suite's partial ``training:`` mapping that name no TrainSettings field, sorted."""
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    return sorted(str(key) for key in training if key not in names)


def tokens_per_step(training: dict[str, Any] | TrainSettings, world_size: int = 1) -> int:
    """Tokens in one optimizer step: batch size x context length x gradient accumulation x processes, each
    from ``training`` (:func:`training_value`)."""
    return (int(training_value(training, "batch_size")) * int(training_value(training, "context_length"))
            * int(training_value(training, "gradient_accumulation_steps")) * world_size)


def whole_steps(tokens: float, training: dict[str, Any] | TrainSettings, world_size: int = 1) -> int:
    """``tokens`` rounded up to whole optimizer steps (:func:`tokens_per_step`), as a run will train them."""
    per_step = tokens_per_step(training, world_size)
    return int(math.ceil(tokens / per_step) * per_step)
