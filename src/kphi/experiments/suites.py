"""Experiment suites: the YAML files under ``kphi/suites/`` (or any suite file) read into one typed model.

A compare suite lists *arms* (:class:`ArmSpec`: a preset, or a control sized to another arm) and one set of
training settings; budget series, grids of learning rates and seeds are fields of :class:`Suite`. Every key a
suite or an arm may hold is a field here, and anything else is refused by name before anything trains. The
scaling, compress and structure suites share the reading (:func:`read_suite_yaml`) and the training section
(:func:`suite_training`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..data.prepare import PrepareSettings
from ..errors import ExperimentError
from ..training.train_settings import unknown_training_keys

__all__ = ["ARM_KEYS", "ArmSpec", "SUITE_KEYS", "Suite", "arm_specs", "list_suites", "load_suite", "parse_counts",
           "parse_learning_rates", "positive_rates", "read_suite_yaml", "suite_training", "unknown_keys"]


@dataclass(frozen=True)
class ArmSpec:
    """One arm as a suite states it: a preset arm (``preset``, with optional ``config`` overrides of its model)
    or a control sized to another arm (``control: dense|low_rank``, ``base``: the preset it shrinks or
    factorises, ``match``: the label of the arm whose non-embedding parameters it matches); each with its own
    ``learning_rate`` or grid ``learning_rates``, ``training`` settings and a ``model`` name for the table."""

    label: str
    preset: str | None = None
    model: str | None = None
    config: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    learning_rate: float | None = None
    learning_rates: list[float] | None = None
    control: str | None = None
    base: str | None = None
    match: str | None = None


@dataclass
class Suite:
    name: str
    description: str
    arms: list[ArmSpec]
    baseline: str
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1
    learning_rates: list[float] | None = None
    budgets: list[int] | None = None  # a budget series (kphi.experiments.budgets): every arm at each of these token budgets
    seeds_at_largest: int | None = None  # seeds at the largest budget(s) of a series (default: ``seeds``)
    seeded_budgets: int = 1  # how many of a series' largest budgets run ``seeds_at_largest`` seeds
    # budgets stated as tokens per non-embedding parameter of the baseline arm (kphi.experiments.budgets turns them into
    # token counts, whole optimizer steps): ``budgets_per_parameter: [2.5, 5, 10, 20, 40]``
    budgets_per_parameter: list[float] | None = None
    # how many rates each arm's grid may grow by, one at a time, while its best first-seed rate is the lowest or
    # highest it has tried (kphi.experiments.compare.rate_past_edge); 0: the grid as listed
    extend_grid: int = 0


def positive_rates(rates, where: str, what: str = "learning rates") -> list[float] | None:
    if rates is None:
        return None
    try:
        values = [float(r) for r in rates]
    except (TypeError, ValueError):
        raise ExperimentError(f"{where}: {what} must be numbers, got {rates!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ExperimentError(f"{where}: {what} must be a non-empty list of positive numbers, got {rates!r}")
    return sorted(set(values))


def parse_counts(text: str, flag: str) -> list[int]:
    """``"716800,3e6"`` -> ``[716800, 3000000]``: positive whole numbers for flags like ``--budgets``."""
    try:
        values = [float(t) for t in _list_items(text, flag)]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 0 or v != int(v) for v in values):
        raise ExperimentError(f"{flag} must be positive whole numbers separated by commas, got {text!r}")
    return sorted({int(v) for v in values})


def parse_learning_rates(text: str) -> list[float]:
    """``"1e-3,2e-3,4e-3"`` -> ``[0.001, 0.002, 0.004]`` (the ``--learning-rates`` flag)."""
    return positive_rates(_list_items(text, "--learning-rates"), "--learning-rates")


def _list_items(text: str, flag: str) -> list[str]:
    """The items of a comma-separated flag value. An empty item (``"1e-3,,2e-3"``, ``""``) is a typo, not a
    request for the default, so it is refused rather than dropped."""
    items = [t.strip() for t in text.split(",")]
    if "" in items:
        raise ExperimentError(f"{flag} has an empty item in {text!r}; separate the values by single commas")
    return items


def _suite_dir() -> Path:
    return Path(str(resources.files("kphi") / "suites"))


def list_suites() -> list[str]:
    return sorted(p.stem for p in _suite_dir().glob("*.yaml"))


def read_suite_yaml(name_or_path: str) -> tuple[Path, Any]:
    """``(path, parsed YAML)`` of a bundled suite name or a suite file; ``ExperimentError`` when neither."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _suite_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ExperimentError(f"unknown suite {name_or_path!r}; available: {', '.join(list_suites())}")
    elif not path.is_file():
        raise ExperimentError(f"suite file not found: {path}")
    try:
        return path, yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ExperimentError(f"cannot read suite {path}: {err}") from None


#: The keys a compare suite's YAML may hold (the fields of :class:`Suite`); anything else is refused by name.
SUITE_KEYS = frozenset(f.name for f in dataclasses.fields(Suite))
#: The keys of one arm: a preset arm (``preset``, optional ``config`` overrides) or a control (``control:
#: dense|low_rank``, ``base``, ``match``), each with its own rates and training settings.
ARM_KEYS = frozenset(f.name for f in dataclasses.fields(ArmSpec))


def load_suite(name_or_path: str) -> Suite:
    """A bundled suite (``cpu``, ``smoke``, ``paper``, ...) or a suite YAML file."""
    path, data = read_suite_yaml(name_or_path)
    if isinstance(data, dict) and data.get("kind") in ("scaling", "compress", "structure"):
        command = "scale" if data["kind"] == "scaling" else "compress"
        raise ExperimentError(f"{path} is a {data['kind']} suite; run it with kphi {command} --suite {name_or_path}")
    if not isinstance(data, dict) or not isinstance(data.get("arms"), list) or not data["arms"]:
        raise ExperimentError(f"suite {path} needs a non-empty 'arms' list")
    unknown_keys(data, SUITE_KEYS, f"suite {path}", "a suite")
    if not all(isinstance(a, dict) for a in data["arms"]):
        raise ExperimentError(f"suite {path}: every arm is a mapping (label, preset or control, ...)")
    labels = [a.get("label") for a in data["arms"]]
    if len(set(labels)) != len(labels) or not all(labels):
        raise ExperimentError(f"suite {path}: every arm needs a unique label")
    baseline = data.get("baseline", labels[0])
    if baseline not in labels:
        raise ExperimentError(f"suite {path}: baseline {baseline!r} is not an arm label")
    return Suite(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        arms=arm_specs(data["arms"], f"suite {path}"),
        baseline=baseline,
        data=suite_data(data.get("data"), f"suite {path}"),
        training=suite_training(data.get("training"), f"suite {path}"),
        seeds=whole_number(data.get("seeds", 1), f"suite {path}: seeds", 1),
        learning_rates=positive_rates(data.get("learning_rates"), f"suite {path}"),
        budgets=_positive_budgets(data.get("budgets"), f"suite {path}"),
        seeds_at_largest=None if data.get("seeds_at_largest") is None
        else whole_number(data["seeds_at_largest"], f"suite {path}: seeds_at_largest", 1),
        seeded_budgets=whole_number(data.get("seeded_budgets", 1), f"suite {path}: seeded_budgets", 1),
        budgets_per_parameter=positive_rates(data.get("budgets_per_parameter"), f"suite {path}", "budgets_per_parameter"),
        extend_grid=whole_number(data.get("extend_grid", 0), f"suite {path}: extend_grid", 0),
    )


def unknown_keys(mapping: dict, known: frozenset[str], where: str, what: str) -> None:
    """Refuse the keys of ``mapping`` (a suite, an arm) that nothing reads: a misspelt one would be ignored."""
    unknown = sorted(set(map(str, mapping)) - known)
    if unknown:
        raise ExperimentError(f"{where}: no setting {', '.join(map(repr, unknown))} ({what} has {', '.join(sorted(known))})")


def arm_specs(arms: list[dict[str, Any]], where: str) -> list[ArmSpec]:
    """A suite's arms (or a scaling suite's families) as :class:`ArmSpec`; a key no arm has, or a training
    setting that does not exist, is refused by name."""
    specs = []
    for arm in arms:
        unknown_keys(arm, ARM_KEYS, f"{where}, arm {arm['label']!r}", "an arm")
        training = suite_training(arm.get("training"), f"{where}, arm {arm['label']!r}")
        specs.append(ArmSpec(**{**arm, "label": str(arm["label"]), "training": training}))
    return specs


def suite_training(section: Any, where: str) -> dict[str, Any]:
    """A suite's ``training:`` section: a partial :class:`kphi.train_settings.TrainSettings` (defaults come
    from there, never restated); a key that names no setting is an error before anything trains."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ExperimentError(f"{where}: training must be a mapping of training settings, got {section!r}")
    unknown = unknown_training_keys(section)
    if unknown:
        raise ExperimentError(f"{where}: training has no setting {', '.join(map(repr, unknown))} (see kphi train --help)")
    return dict(section)


#: What a suite's ``data:`` section may set: the settings of ``kphi data prepare`` (:class:`PrepareSettings`),
#: but for ``context_length``, which the suite's training settings give.
DATA_KEYS = frozenset(f.name for f in dataclasses.fields(PrepareSettings)) - {"context_length"}


def suite_data(section: Any, where: str, keys: frozenset[str] = DATA_KEYS) -> dict[str, Any]:
    """A suite's ``data:`` section (a partial :class:`PrepareSettings`); a key that names no setting is an error
    before anything is prepared or trained."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ExperimentError(f"{where}: data must be a mapping of data settings, got {section!r}")
    unknown_keys(section, keys, f"{where}: data", "data")
    return dict(section)


def whole_number(value: Any, where: str, least: int) -> int:
    """A suite's whole-number setting (``seeds``, ``seeded_budgets``, ``extend_grid``): an integer of at least
    ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ExperimentError(f"{where} must be a whole number of at least {least}, got {value!r}")
    return value


def _positive_budgets(budgets, where: str) -> list[int] | None:
    if budgets is None:
        return None
    if not isinstance(budgets, list) or not budgets or not all(isinstance(b, int) and b > 0 for b in budgets):
        raise ExperimentError(f"{where}: budgets must be a non-empty list of positive token counts, got {budgets!r}")
    return sorted(set(budgets))
