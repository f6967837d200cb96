"""Every seeded initialisation kphi's committed results depend on, and the hash of its weights.

``initial_models()`` lists, for every bundled preset and every arm of every bundled suite (comparison arms,
controls, each width of a scaling suite, a compress suite's trained models), the model a run of it starts
from: ``torch.manual_seed(seed)`` then ``AutoModelForCausalLM.from_config(config)`` — the path ``kphi train``
takes, at the preset's vocabulary (a run's own, sized to its tokenizer, is recorded in its
``kphi-run.json``). ``tests/init_hashes.json`` holds the SHA-256 of each one's weights
(:func:`kphi.training.fingerprint.weights_sha256`).

A change to any of them changes committed results. If the change is intended, re-run the affected
experiments, update RESULTS.md, and only then record the new hashes::

    python tests/init_hashes.py --record
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import torch

RECORDED = Path(__file__).with_name("init_hashes.json")


def initial_models() -> Iterator[tuple[str, int, object]]:
    """``(name, seed, config)`` for every model a bundled preset or suite starts a run from."""
    from transformers import AutoConfig

    from kphi.experiments.arms import resolve_arms
    from kphi.experiments.suites import list_suites, load_suite, read_suite_yaml
    from kphi.experiments.compress import load_compress_suite
    from kphi.sources.auto import KPhi3Config, config_fields, with_overrides
    from kphi.presets import list_presets, load_preset
    from kphi.experiments.scaling import load_scaling_suite

    for name in list_presets():
        yield f"preset:{name}", 42, load_preset(name).config
    # kinds and parts no bundled preset uses yet, on the tiny presets
    tiny = config_fields(load_preset("tiny-phi3").config)
    yield "kind:monarch", 42, KPhi3Config(**{**tiny, "projection": {"kind": "monarch", "blocks": 4, "fraction": 0.25}})
    yield "kind:low_rank", 42, KPhi3Config(**{**tiny, "projection": {"kind": "low_rank", "fraction": 0.25}})
    yield "kind:width adapters (dense)", 42, KPhi3Config(**{**tiny, "embed_size": tiny["hidden_size"] // 2})
    grouped = config_fields(load_preset("tiny-kphi3").config)
    yield "kind:width adapters (grouped)", 42, KPhi3Config(**{**grouped, "embed_size": grouped["hidden_size"] // 2})
    yield "kind:grouped (report init)", 42, KPhi3Config(**with_overrides(grouped, {"grouped_init": "kaiming_uniform"}))
    for suite_name in list_suites():
        kind = (read_suite_yaml(suite_name)[1] or {}).get("kind")
        if kind == "scaling":
            scaling = load_scaling_suite(suite_name)
            seed = int(scaling.training.get("seed", 42))
            for width in scaling.widths:
                for arm in resolve_arms(scaling.suite_at(width)):
                    yield f"{suite_name}:w{width}:{arm.label}", seed, arm.config
        elif kind == "structure":
            continue  # fits a pretrained model's weights: nothing is initialised from a seed
        elif kind == "compress":
            suite = load_compress_suite(suite_name)
            seed = int(suite.training.get("seed", 42))
            yield f"{suite_name}:teacher", seed, load_preset(suite.teacher["preset"]).config
            if suite.scratch:
                fields = with_overrides(load_preset(suite.scratch["preset"]).config, suite.scratch.get("config", {}))
                yield f"{suite_name}:scratch", seed, KPhi3Config(**fields)
            other = suite.other_architecture
            if other:
                yield f"{suite_name}:{other['label']}-init", seed, AutoConfig.for_model(other["model_type"], **other.get("config", {}))
        else:
            suite = load_suite(suite_name)
            seed = int(suite.training.get("seed", 42))
            for arm in resolve_arms(suite):
                yield f"{suite_name}:{arm.label}", seed, arm.config


def initial_weights_hash(seed: int, config) -> str:
    """SHA-256 of the weights ``AutoModelForCausalLM.from_config(config)`` builds after ``torch.manual_seed(seed)``."""
    from transformers import AutoModelForCausalLM

    import kphi  # noqa: F401  (registers kphi3)
    from kphi.training.fingerprint import weights_sha256

    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    return weights_sha256(model)


def environment() -> dict[str, str]:
    """The library versions the hashes were recorded under (torch's RNG and transformers' init code decide them)."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def current_hashes(include=lambda name: True) -> dict[str, str]:
    """``{name: hash}`` for every entry of :func:`initial_models` that ``include(name)`` keeps; a model that
    several entries share is built once."""
    by_config: dict[str, str] = {}
    hashes = {}
    for name, seed, config in initial_models():
        if not include(name):
            continue
        key = f"{seed}|{type(config).__name__}|{config.to_json_string(use_diff=False)}"
        if key not in by_config:
            by_config[key] = initial_weights_hash(seed, config)
        hashes[name] = by_config[key]
    return hashes


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/init_hashes.py --record   (only after re-running what the change affects)")
    record = {"environment": environment(), "hashes": current_hashes()}
    RECORDED.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(record['hashes'])} hashes in {RECORDED}")
