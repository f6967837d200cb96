"""``kphi compare``: the report's table as an experiment anyone can rerun, with controls it lacked.

A *suite* (YAML in ``kphi/suites/``) lists arms and one set of training settings. Every arm trains on the
same prepared data, in the same order (same seed), for the same number of tokens. Arms are presets, or
*controls* derived from them so a reader can tell whether grouping beats simply having fewer parameters:

* ``control: dense`` — the ``base`` preset with smaller widths (hidden and intermediate size scaled
  together, head count kept), sized to the non-embedding parameter count of the arm named in ``match``;
* ``control: low_rank`` — the ``base`` preset with every projection factorised through a thin bottleneck
  (:mod:`kphi.lowrank`), sized the same way.

Outputs in ``--out``: ``results.json`` (``arms``: label, model, layers, intermediate_size,
non_embedding, percent, train/val loss mean and spread over seeds, tokens/s, each arm's config),
``results.md`` (the table), ``val_loss.png`` (validation loss against tokens, all arms) and
``params_vs_loss.png``; each arm's run directory under ``arms/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from .callbacks import atomic_write_text
from .model import KPhi3Config, config_fields
from .params import count_parameters
from .presets import load_preset

__all__ = ["Arm", "Suite", "CompareError", "list_suites", "load_suite", "resolve_arms", "run_compare", "format_table"]


class CompareError(RuntimeError):
    """A comparison cannot run as asked; the message says why."""


@dataclass
class Arm:
    """One row of the table: a label and the model configuration it trains."""

    label: str
    config: KPhi3Config
    model: str
    kind: str = "preset"  # preset | dense control | low-rank control
    source: str = ""  # the preset, or how the control was derived


@dataclass
class Suite:
    name: str
    description: str
    arms: list[dict[str, Any]]
    baseline: str
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1


def _suite_dir() -> Path:
    return Path(str(resources.files("kphi") / "suites"))


def list_suites() -> list[str]:
    return sorted(p.stem for p in _suite_dir().glob("*.yaml"))


def load_suite(name_or_path: str) -> Suite:
    """A bundled suite (``cpu``, ``smoke``, ``paper``) or a suite YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _suite_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise CompareError(f"unknown suite {name_or_path!r}; available: {', '.join(list_suites())}")
    elif not path.is_file():
        raise CompareError(f"suite file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CompareError(f"cannot read suite {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("arms"), list) or not data["arms"]:
        raise CompareError(f"suite {path} needs a non-empty 'arms' list")
    labels = [a.get("label") for a in data["arms"]]
    if len(set(labels)) != len(labels) or not all(labels):
        raise CompareError(f"suite {path}: every arm needs a unique label")
    baseline = data.get("baseline", labels[0])
    if baseline not in labels:
        raise CompareError(f"suite {path}: baseline {baseline!r} is not an arm label")
    return Suite(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        arms=data["arms"],
        baseline=baseline,
        data=dict(data.get("data") or {}),
        training=dict(data.get("training") or {}),
        seeds=int(data.get("seeds", 1)),
    )


# --------------------------------------------------------------------------- controls of equal size


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
    fields.update(min_channels_per_group=-1, low_rank_fraction=None, embed_size=None)
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
    fields.update(min_channels_per_group=-1)
    lo, hi = 1e-4, 1.0
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        candidate = KPhi3Config(**{**fields, "low_rank_fraction": mid})
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
        if "preset" in spec:
            preset = load_preset(spec["preset"])
            fields = {**config_fields(preset.config), **(spec.get("config") or {})}
            config = KPhi3Config(**fields)
            arms[spec["label"]] = Arm(spec["label"], config, spec.get("model", preset.model), "preset", preset.name)
    for spec in suite.arms:
        if "preset" in spec:
            continue
        kind, base_name, match = spec.get("control"), spec.get("base"), spec.get("match")
        if kind not in ("dense", "low_rank") or not base_name or match not in arms:
            raise CompareError(
                f"arm {spec['label']!r}: a control needs control: dense|low_rank, base: PRESET and match: LABEL of a preset arm"
            )
        base = load_preset(base_name).config
        target = non_embedding(arms[match].config)
        if kind == "dense":
            config = dense_control(base, target)
            source = f"{base_name} shrunk to width {config.hidden_size}/{config.intermediate_size} to match {match}"
            model = "phi-3 (smaller)"
        else:
            config = low_rank_control(base, target)
            source = f"{base_name} factorised, low_rank_fraction {config.low_rank_fraction:.4f}, to match {match}"
            model = "low-rank phi-3"
        arms[spec["label"]] = Arm(spec["label"], config, spec.get("model", model), f"{kind} control", source)
    return [arms[spec["label"]] for spec in suite.arms]


# --------------------------------------------------------------------------- running


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-") or "arm"


def _write_arm_preset(arm: Arm, path: Path) -> Path:
    fields = config_fields(arm.config)
    fields = {k: v for k, v in fields.items() if not k.startswith("_") and k not in ("dtype", "torch_dtype")}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"name": arm.label, "model": arm.model, "description": arm.source, "config": fields}, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def _machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }


def _mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_compare(
    suite: Suite,
    out: Path,
    seeds: int | None = None,
    data: str | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train every arm of ``suite`` for each seed and write the results; returns ``results.json``'s content."""
    from .data.prepare import PrepareSettings, prepare_dataset
    from .train import TrainError, resolve_settings, train

    seeds = seeds or suite.seeds
    if seeds < 1:
        raise CompareError(f"--seeds must be at least 1, got {seeds}")
    arms = resolve_arms(suite)
    out = Path(out)
    marker = out / "kphi-compare.json"
    identity = {"suite": dataclasses.asdict(suite), "data": data, "max_tokens": max_tokens}
    if marker.is_file():
        if json.loads(marker.read_text()).get("identity") != identity:
            raise CompareError(f"{out} holds a different comparison; choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise CompareError(f"{out} is not empty and holds no kphi comparison; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"identity": identity}, indent=2))

    training = dict(suite.training)
    if max_tokens is not None:
        training.pop("max_steps", None)
        training["max_tokens"] = max_tokens
    data_settings = {**suite.data}
    if data is not None:
        data_settings["source"] = data
    context_length = training.get("context_length", 256)
    prepared = prepare_dataset(PrepareSettings(context_length=context_length, **data_settings), progress=progress)

    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {arm.label: [] for arm in arms}
    total = len(arms) * seeds
    for k in range(seeds):
        seed = training.get("seed", 42) + k
        for i, arm in enumerate(arms):
            run_dir = out / "arms" / f"{_slug(arm.label)}-seed{seed}"
            preset_path = _write_arm_preset(arm, out / "arms" / f"{_slug(arm.label)}.yaml")
            n = k * len(arms) + i + 1
            metrics_file = run_dir / "metrics.json"
            if metrics_file.is_file():
                log(f"[{n}/{total}] {arm.label} (seed {seed}): already trained, reusing {run_dir}")
                runs[arm.label].append(json.loads(metrics_file.read_text()))
                continue
            log(f"[{n}/{total}] {arm.label} (seed {seed}): {non_embedding(arm.config):,} non-embedding parameters")
            settings = resolve_settings(
                str(preset_path), **{**training, "out": str(run_dir), "data": str(prepared), "seed": seed, "progress": progress}
            )
            try:
                result = train(settings, resume=(run_dir / "kphi-run.json").is_file())
            except TrainError as err:
                raise CompareError(f"arm {arm.label!r} (seed {seed}) failed: {err}") from None
            m = result.metrics
            log(f"    train loss {_fmt(m['train_loss'], None, 1)}, val loss {_fmt(m['val_loss'], None, 1)}, "
                f"{m['tokens_per_second'] or 0:,.0f} tokens/s")
            runs[arm.label].append(m)

    results = _results(suite, arms, runs, seeds, time.perf_counter() - started)
    results["command"] = "kphi " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("kphi") else None
    _write_outputs(results, out, suite)
    return results


def _results(suite: Suite, arms: list[Arm], runs: dict[str, list[dict]], seeds: int, wall: float) -> dict[str, Any]:
    baseline_params = non_embedding(next(a.config for a in arms if a.label == suite.baseline))
    rows = []
    for arm in arms:
        metrics = runs[arm.label]
        params = non_embedding(arm.config)
        train_mean, train_spread = _mean_spread([m["train_loss"] for m in metrics])
        val_mean, val_spread = _mean_spread([m["val_loss"] for m in metrics])
        tps, _ = _mean_spread([m.get("tokens_per_second") for m in metrics])
        rows.append(
            {
                "label": arm.label,
                "model": arm.model,
                "kind": arm.kind,
                "source": arm.source,
                "layers": arm.config.num_hidden_layers,
                "hidden_size": arm.config.hidden_size,
                "intermediate_size": arm.config.intermediate_size,
                "non_embedding": params,
                "percent": round(100.0 * params / baseline_params, 1),
                "train_loss": train_mean,
                "train_loss_std": train_spread,
                "val_loss": val_mean,
                "val_loss_std": val_spread,
                "tokens_per_second": tps,
                "wall_seconds": round(sum(m.get("wall_seconds", 0.0) for m in metrics), 1),
                "tokens": metrics[0]["tokens"] if metrics else None,
                "seeds": [m.get("seed") for m in metrics],
                "runs": [{k: m.get(k) for k in ("train_loss", "val_loss", "tokens_per_second", "wall_seconds", "val_curve")} for m in metrics],
                "config": config_fields(arm.config),
            }
        )
    return {
        "suite": suite.name,
        "description": suite.description,
        "baseline": suite.baseline,
        "seeds": seeds,
        "machine": _machine(),
        "wall_seconds": round(wall, 1),
        "training": suite.training,
        "arms": rows,
    }


def _fmt(value: float | None, spread: float | None, seeds: int) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ± {spread:.3f}" if seeds > 1 else f"{value:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """The report's table (markdown), plus throughput and time."""
    seeds = results["seeds"]
    lines = [
        "| label | model | layers | interm. dims | non-emb. params | % | train loss | val loss | tokens/s | wall s |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for a in results["arms"]:
        tps = f"{a['tokens_per_second']:,.0f}" if a["tokens_per_second"] else "-"
        lines.append(
            f"| {a['label']} | {a['model']} | {a['layers']} | {a['intermediate_size']} | {a['non_embedding']:,} | "
            f"{a['percent']:.1f}% | {_fmt(a['train_loss'], a['train_loss_std'], seeds)} | "
            f"{_fmt(a['val_loss'], a['val_loss_std'], seeds)} | {tps} | {a['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _write_outputs(results: dict[str, Any], out: Path, suite: Suite) -> None:
    from .plots import plot_compare_curves, plot_params_vs_loss

    curves = {}
    for arm in results["arms"]:
        by_tokens: dict[int, list[float]] = {}
        for run in arm["runs"]:
            for tokens, loss in run.get("val_curve") or []:
                by_tokens.setdefault(int(tokens), []).append(loss)
        curves[arm["label"]] = sorted((t, statistics.fmean(v)) for t, v in by_tokens.items())
    plot_compare_curves(curves, out / "val_loss.png", f"kphi compare ({suite.name}): validation loss")
    points = [
        {"label": a["label"], "params": a["non_embedding"], "loss": a["val_loss"], "spread": a["val_loss_std"]}
        for a in results["arms"]
        if a["val_loss"] is not None and math.isfinite(a["val_loss"])
    ]
    plot_params_vs_loss(points, out / "params_vs_loss.png", f"kphi compare ({suite.name}): parameters vs loss")
    atomic_write_text(out / "results.md", format_table(results) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
