"""The arms of a suite as model configurations: presets with their overrides, and the controls sized to them.

* ``control: dense`` -- the ``base`` preset with smaller widths (hidden and intermediate size scaled together,
  head count kept), sized to the non-embedding parameter count of the arm named in ``match``;
* ``control: low_rank`` -- the ``base`` preset with every projection factorised through a thin bottleneck
  (:mod:`kphi.modeling.lowrank`), sized the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ExperimentError
from ..files import slug
from ..params import count_parameters
from ..presets import build_config, load_preset
from ..sources.auto import KPhi3Config, config_fields, with_overrides
from ..training.train_settings import training_value
from .suites import ArmSpec, Suite, positive_rates

__all__ = ["Arm", "arm_rates", "dense_control", "low_rank_control", "non_embedding", "resolve_arms", "run_dir_name"]


@dataclass
class Arm:
    """One row of the table: a label and the model configuration it trains."""

    label: str
    config: KPhi3Config
    model: str
    kind: str = "preset"  # preset | dense control | low-rank control
    source: str = ""  # the preset, or how the control was derived
    learning_rate: float | None = None  # the arm's own rate (e.g. from a sweep); None: the suite's
    learning_rates: list[float] | None = None  # the arm's own grid; None: the suite's grid, if any
    training: dict[str, Any] = field(default_factory=dict)  # training settings of this arm only




def non_embedding(config: KPhi3Config) -> int:
    total, embedding = count_parameters(config)
    return total - embedding


def dense_control(base: KPhi3Config, target: int) -> KPhi3Config:
    """The dense ``base`` shrunk in width to the non-embedding count closest to ``target``.

    The hidden size runs over multiples of ``2 * heads`` (even head dimension for RoPE) up to the base
    width, with the intermediate size at the base ratio; the closest one is then fine-tuned by moving the
    intermediate size alone (multiples of 8), since a hidden-size step is coarse.
    """
    fields = config_fields(base)
    fields.update(projection={"kind": "dense"}, embed_size=None)
    heads, ratio = base.num_attention_heads, base.intermediate_size / base.hidden_size

    def closest(candidates):
        scored = [(abs(non_embedding(c) - target), c) for c in candidates]
        return min(scored, key=lambda pair: pair[0])[1]

    def make(hidden, inter):
        return KPhi3Config(**{**fields, "hidden_size": hidden, "intermediate_size": inter})

    coarse = closest(
        make(h, max(8, round(h * ratio / 8) * 8)) for h in range(2 * heads, base.hidden_size + 1, 2 * heads)
    )
    h = coarse.hidden_size
    # non-embedding count is linear in the intermediate size: 3 * h * layers per unit
    per_unit = 3 * h * coarse.num_hidden_layers
    guess = coarse.intermediate_size + round((target - non_embedding(coarse)) / per_unit / 8) * 8
    return closest(make(h, max(8, i)) for i in (guess - 8, guess, guess + 8))


def low_rank_control(base: KPhi3Config, target: int) -> KPhi3Config:
    """``base`` with every projection factorised to rank ``round(f * in * out / (in + out))``; ``f`` by bisection."""
    fields = config_fields(base)
    lo, hi = 1e-4, 1.0
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        candidate = KPhi3Config(**{**fields, "projection": {"kind": "low_rank", "fraction": mid}})
        count = non_embedding(candidate)
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), candidate)
        if count < target:
            lo = mid
        else:
            hi = mid
    return best[1]


def resolve_arms(suite: Suite) -> list[Arm]:
    """Presets first, then controls sized to the arms they ``match``."""
    arms: dict[str, Arm] = {}
    for spec in suite.arms:
        if spec.preset is not None:
            preset = load_preset(spec.preset)
            config = build_config(with_overrides(preset.config, spec.config), f"arm {spec.label!r}: config", ExperimentError)
            arms[spec.label] = Arm(spec.label, config, spec.model or preset.model, "preset", preset.name, **_arm_training(spec))
    for spec in suite.arms:
        if spec.preset is not None:
            continue
        if spec.control not in ("dense", "low_rank") or not spec.base or spec.match not in arms:
            raise ExperimentError(
                f"arm {spec.label!r}: a control needs control: dense|low_rank, base: PRESET and match: LABEL of a preset arm"
            )
        base = build_config(with_overrides(load_preset(spec.base).config, spec.config), f"arm {spec.label!r}: config",
                            ExperimentError)
        target = non_embedding(arms[spec.match].config)
        if spec.control == "dense":
            config = dense_control(base, target)
            source = f"{spec.base} shrunk to width {config.hidden_size}/{config.intermediate_size} to match {spec.match}"
            model = "phi-3 (smaller)"
        else:
            config = low_rank_control(base, target)
            source = f"{spec.base} factorised, low-rank fraction {config.projection['fraction']:.4f}, to match {spec.match}"
            model = "low-rank phi-3"
        arms[spec.label] = Arm(spec.label, config, spec.model or model, f"{spec.control} control", source, **_arm_training(spec))
    return [arms[spec.label] for spec in suite.arms]


def _arm_training(spec: ArmSpec) -> dict[str, Any]:
    where = f"arm {spec.label!r}"
    rate = positive_rates([spec.learning_rate], where)[0] if spec.learning_rate is not None else None
    if "learning_rate" in spec.training:
        raise ExperimentError(f"{where}: give its rate as learning_rate on the arm, not under training")
    return {"learning_rate": rate, "learning_rates": positive_rates(spec.learning_rates, where), "training": dict(spec.training)}


def arm_rates(arm: Arm, suite: Suite, learning_rates: list[float] | None = None) -> list[float]:
    """The rates ``arm`` trains at: the first of ``--learning-rates``, the arm's grid, the suite's grid, the arm's
    own rate and the suite's rate that is given."""
    grid = learning_rates or arm.learning_rates or suite.learning_rates
    if grid:
        return list(grid)
    return [arm.learning_rate or float(training_value(suite.training, "learning_rate"))]


def run_dir_name(arm: Arm, learning_rate: float, seed: int) -> str:
    return f"{slug(arm.label, 'arm')}-lr{learning_rate:g}-seed{seed}"
