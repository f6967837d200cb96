"""Sensitivity-guided allocation: which kind, at which size, each projection gets under a parameter budget.

Every targeted projection ``g`` (one module, e.g. ``model.layers.3.mlp.down_proj``) may become any candidate
``c`` of a list (``candidates/*.yaml``: dense, low-rank at several fractions, grouped at several group counts).
The *sensitivity* ``d(g, c) = score(source with only g as c, fitted) - score(source)`` is measured once per pair
(the score: bits per byte on held-out text), cached and resumable. Assuming the damages add up, the allocation
solves the multiple-choice knapsack

    minimise  sum_g d(g, c_g)   subject to   sum_g p(g, c_g) <= budget,

``p`` the candidate's parameter count, exactly by dynamic programming over the budget (in 20,000 steps,
each candidate's parameters rounded up to a step); the parameters the rounding leaves are then spent greedily
on the upgrades that save the most damage per parameter. ``uniform`` is the baseline: the one candidate for
every projection with the least total damage that meets the budget.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import ConvertError
from ..eval.bits import evaluate_text
from ..files import atomic_write_text, cache_root
from ..modeling.kinds import DenseKind
from ..modeling.projections import is_dense_projection, linear_weight, matches_target, projection_kind
from ..params import model_parameter_counts
from ..training.fingerprint import weights_sha256
from .calibration import calibration_grams
from .heldout import sensitivity_text
from .targets import allocation_table, override_dicts, target_config

__all__ = [
    "ALLOCATIONS", "Allocation", "Candidate", "allocate", "allocate_for_source", "allocation_table", "sensitivity_cache", "choose_sensitivity", "choose_uniform", "load_candidates",
    "measure_sensitivity",
]

ALLOCATIONS = ("sensitivity", "uniform")


@dataclass(frozen=True)
class Candidate:
    """One thing a projection may become: a label for tables and a projection kind's data form."""

    label: str
    projection: dict[str, Any]

    @property
    def kind(self):
        return projection_kind(self.projection)


def load_candidates(name_or_path: str | Path = "low-rank") -> list[Candidate]:
    """The candidates of a bundled list (``low-rank``, ``grouped``: ``kphi/convert/candidates/NAME.yaml``) or of
    a YAML file: a list of ``{label: ..., kind: ..., FIELD: VALUE}``. Dense is always a candidate."""
    path = Path(name_or_path)
    if not path.suffix:
        bundled = resources.files("kphi.convert") / "candidates" / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise ConvertError(f"--candidates {name_or_path}: no such bundled list (low-rank, grouped) or YAML file")
        text = bundled.read_text()
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConvertError(f"--candidates {name_or_path}: cannot read it as UTF-8 text ({err})") from None
    else:
        raise ConvertError(f"--candidates {name_or_path}: no such file")
    try:
        entries = yaml.safe_load(text)
        candidates = [Candidate("dense", {"kind": "dense"})]
        for entry in entries:
            entry = dict(entry)
            label = str(entry.pop("label", "") or projection_kind(entry).describe())
            if entry.get("kind") != "dense":
                candidates.append(Candidate(label, projection_kind(entry).to_dict()))
    except (yaml.YAMLError, TypeError, ValueError, AttributeError) as err:
        raise ConvertError(f"--candidates {name_or_path}: expected a list of projection kinds with labels: {err}") from None
    if len(candidates) < 2:
        raise ConvertError(f"--candidates {name_or_path}: no structured candidate in the list")
    return candidates


@dataclass
class Allocation:
    """The chosen candidate per projection, what it costs in parameters and the damage it predicts."""

    method: str
    keep: float
    budget: int
    source_score: float
    choices: dict[str, str]  # projection name -> candidate label
    parameters: dict[str, int]  # projection name -> its parameters as chosen
    predicted_damage: float
    candidates: list[Candidate] = field(default_factory=list)

    def overrides(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(main kind, overrides)`` for :func:`kphi.convert.convert`: the most common structured choice is the
        main kind, and every projection that chose otherwise (dense included) is one override naming it."""
        by_label = {c.label: c for c in self.candidates}
        structured = [label for label in self.choices.values() if label != "dense"]
        if not structured:
            raise ConvertError("the allocation keeps every projection dense: nothing to convert (lower --keep)")
        main = max(dict.fromkeys(structured), key=structured.count)  # ties: the first in model order
        overrides = [{"targets": [name], "projection": by_label[label].projection}
                     for name, label in self.choices.items() if label != main]
        return by_label[main].projection, overrides

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "keep": self.keep, "budget": self.budget, "source_score": self.source_score,
                "predicted_damage": self.predicted_damage, "choices": self.choices, "parameters": self.parameters}

    def table(self) -> str:
        return allocation_table(self.choices)


def measure_sensitivity(dense, names: list[str], candidates: list[Candidate], score: Callable[[Any], float],
                        cache: Path | None = None, grams: Callable[[], dict] | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """``{"source": score(dense), "damage": {name: {label: d}}, "parameters": {name: {label: p}}}``.

    Each structured candidate replaces one projection of ``dense`` at a time (fitted to its weights: on the
    calibration inputs' Gram matrix ``grams()[name]`` when ``grams`` is given, else in Frobenius norm),
    ``dense`` is scored, and the projection is put back. ``cache`` (a JSON file) keeps every measured score as it
    comes, so an interrupted measurement resumes where it stopped; ``grams`` is called only if a score is
    missing."""
    from tqdm.auto import tqdm

    table = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    scores = table.setdefault("scores", {})
    if "source" not in table:
        table["source"] = score(dense)
    damage: dict[str, dict[str, float]] = {}
    parameters: dict[str, dict[str, int]] = {}
    gram_of: dict | None = None
    with tqdm(total=len(names) * len(candidates), desc="sensitivity", unit="fit", disable=not progress, leave=False) as bar:
        for name in names:
            weight, bias = linear_weight(dense.get_submodule(name))
            out_features, in_features = weight.shape
            for candidate in candidates:
                kind = candidate.kind
                parameters.setdefault(name, {})[candidate.label] = kind.num_parameters(in_features, out_features, bias is not None)
                key = f"{name}|{json.dumps(candidate.projection, sort_keys=True)}"
                if not isinstance(kind, DenseKind) and key not in scores:
                    if gram_of is None:
                        gram_of = grams() if grams is not None else {}
                    scores[key] = _score_replaced(dense, name, kind, weight, bias, score, gram_of.get(name))
                    if cache is not None:
                        atomic_write_text(cache, json.dumps(table, indent=1))
                damage.setdefault(name, {})[candidate.label] = 0.0 if isinstance(kind, DenseKind) else scores[key] - table["source"]
                bar.update(1)
    return {"source": table["source"], "damage": damage, "parameters": parameters}


def _score_replaced(model, name: str, kind, weight, bias, score, gram) -> float:
    """``score(model)`` with the projection ``name`` replaced by ``kind`` fitted to ``weight``; then put back."""
    original = model.get_submodule(name)
    out_features, in_features = weight.shape
    module = kind.build(in_features, out_features, bias=bias is not None).to(weight.device, weight.dtype)
    try:
        kind.fit(module, weight.float(), bias, gram=gram)
    except ValueError as err:
        raise ConvertError(f"{name}: {err}") from None
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)
    try:
        return float(score(model))
    finally:
        setattr(parent, attr, original)


def choose_sensitivity(damage: dict[str, dict[str, float]], parameters: dict[str, dict[str, int]], budget: int,
                       bins: int = 20000) -> dict[str, str]:
    """The choice per projection that meets ``budget`` with the least summed damage: the multiple-choice
    knapsack solved exactly by dynamic programming over the budget in ``bins`` steps (each candidate's
    parameters rounded *up* to a step, so the choice always fits), then any parameters the rounding left are
    spent by :func:`_spend_the_rest`."""
    import numpy as np

    _check_feasible(parameters, budget)
    step = max(1, -(-budget // bins))
    capacity = budget // step
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0  # best[c]: least damage of the projections so far using exactly c steps
    picks = []
    for name, options in damage.items():
        labels = list(options)
        new, pick = np.full_like(best, np.inf), np.zeros(capacity + 1, dtype=np.int16)
        for i, label in enumerate(labels):
            cost = -(-parameters[name][label] // step)
            if cost > capacity:
                continue
            shifted = np.full_like(best, np.inf)
            shifted[cost:] = best[: capacity + 1 - cost] + options[label]
            better = shifted < new
            new[better], pick[better] = shifted[better], i
        best = new
        picks.append((name, labels, pick))
    used = int(np.argmin(best))
    choice = {}
    for name, labels, pick in reversed(picks):
        label = labels[pick[used]]
        choice[name] = label
        used -= -(-parameters[name][label] // step)
    return _spend_the_rest(dict(reversed(list(choice.items()))), damage, parameters, budget)


def _check_feasible(parameters: dict[str, dict[str, int]], budget: int) -> None:
    smallest = sum(min(options.values()) for options in parameters.values())
    if smallest > budget:
        raise ConvertError(f"the smallest candidate everywhere needs {smallest:,} parameters, over the budget of "
                           f"{budget:,}: raise --keep or add smaller candidates")


def _spend_the_rest(choice: dict[str, str], damage, parameters, budget: int) -> dict[str, str]:
    """Upgrade projections, best damage saved per extra parameter first, while the budget allows."""
    choice = dict(choice)
    spare = budget - sum(parameters[name][label] for name, label in choice.items())
    while True:
        best = None
        for name, label in choice.items():
            for other, d in damage[name].items():
                extra = parameters[name][other] - parameters[name][label]
                saved = damage[name][label] - d
                if saved > 0 and 0 <= extra <= spare:
                    rate = saved / max(extra, 1)
                    if best is None or rate > best[0]:
                        best = (rate, name, other, extra)
        if best is None:
            return choice
        _, name, other, extra = best
        choice[name], spare = other, spare - extra


def choose_uniform(damage: dict[str, dict[str, float]], parameters: dict[str, dict[str, int]], budget: int) -> dict[str, str]:
    """One candidate for every projection: the one with the least summed damage among those meeting ``budget``."""
    labels = list(next(iter(damage.values())))
    fitting = [label for label in labels if sum(p[label] for p in parameters.values()) <= budget]
    if not fitting:
        raise ConvertError(f"no single candidate fits a budget of {budget:,} parameters: raise --keep or add smaller candidates")
    best = min(fitting, key=lambda label: sum(d[label] for d in damage.values()))
    return {name: best for name in damage}


def allocate(dense, names: list[str], keep: float, score: Callable[[Any], float], *, method: str = "sensitivity",
             candidates: list[Candidate] | None = None, pinned: dict[str, int] | None = None, cache: Path | None = None,
             grams: Callable[[], dict] | None = None, progress: bool = False) -> Allocation:
    """Choose a candidate for each projection ``names`` of ``dense`` so that the model keeps at most ``keep`` of
    its non-embedding parameters. ``pinned``: projections whose kind is already decided (``--override``), with
    their parameters; they are counted, not allocated."""
    if method not in ALLOCATIONS:
        raise ConvertError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, got {method!r}")
    if not 0 < keep < 1:
        raise ConvertError(f"--keep must be in (0, 1), got {keep}")
    candidates = candidates or load_candidates()
    pinned = pinned or {}
    free = [name for name in names if name not in pinned]
    table = measure_sensitivity(dense, free, candidates, score, cache, grams, progress)
    everything, embedding = model_parameter_counts(dense)
    total = everything - embedding
    dense_sizes = sum(p.numel() for name in names for p in dense.get_submodule(name).parameters())
    budget = int(keep * total) - (total - dense_sizes) - sum(pinned.values())
    choose = choose_sensitivity if method == "sensitivity" else choose_uniform
    choices = choose(table["damage"], table["parameters"], budget)
    return Allocation(
        method=method, keep=keep, budget=budget, source_score=table["source"], choices=choices,
        parameters={name: table["parameters"][name][label] for name, label in choices.items()},
        predicted_damage=sum(table["damage"][name][label] for name, label in choices.items()), candidates=candidates,
    )


def allocate_for_source(dense, tokenizer, keep: float, *, method: str = "sensitivity", candidates: str = "low-rank",
                        targets: list[str] | None = None, overrides: list | None = None, sensitivity_bytes: int = 4096,
                        calibration_ids=None, cache_dir: Path | None = None, progress: bool = False) -> Allocation:
    """:func:`allocate` for a loaded source model: its targeted projections (``targets``, default the
    architecture's), ``overrides`` pinned as the user asked, each candidate scored in bits per byte of the held-out
    text's last ``sensitivity_bytes`` (:func:`~kphi.convert.heldout.sensitivity_text`). ``calibration_ids``: token
    ids to fit each candidate on activations (else in Frobenius norm). The scores are kept in ``cache_dir``
    (default ``$KPHI_CACHE/sensitivity``) under a key of everything they depend on: the source's weights, the
    candidates, the text and the calibration ids."""

    candidate_list = load_candidates(candidates)
    _, target_names = target_config(dense.config, candidate_list[1].kind, targets, None)
    names = [n for n, m in dense.named_modules()
             if n and is_dense_projection(m) and any(matches_target(n, t) for t in target_names)]
    pinned = {}
    for override in override_dicts(overrides) or []:
        kind = projection_kind(override["projection"])
        for name in names:
            if name not in pinned and any(matches_target(name, t) for t in override["targets"]):
                weight, bias = linear_weight(dense.get_submodule(name))
                pinned[name] = kind.num_parameters(weight.shape[1], weight.shape[0], bias is not None)
    text = sensitivity_text(sensitivity_bytes)

    def score(model) -> float:
        return evaluate_text(model.eval(), tokenizer, [text], "sensitivity", context=256).bits_per_byte

    def grams() -> dict:
        return calibration_grams(dense, names, calibration_ids, progress=progress)

    cache = sensitivity_cache(cache_dir, dense, candidate_list, text, calibration_ids)
    return allocate(dense, names, keep, score, method=method, candidates=candidate_list, pinned=pinned, cache=cache,
                    grams=grams if calibration_ids is not None else None, progress=progress)


def sensitivity_cache(cache_dir: Path | None, dense, candidates: list[Candidate], text: str, calibration_ids) -> Path:
    """``CACHE_DIR/KEY.json``: the key hashes the source's weights, the candidates, the scoring text and the
    calibration ids, so the same scores are found again on any machine and never reused for other inputs."""

    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    key = {"weights": weights_sha256(dense), "candidates": [c.projection for c in candidates],
           "text": sha256(text.encode()), "context": 256,
           "calibration": None if calibration_ids is None else
           [list(calibration_ids.shape), sha256(calibration_ids.numpy().tobytes())]}
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "sensitivity"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{sha256(json.dumps(key, sort_keys=True).encode())[:20]}.json"
