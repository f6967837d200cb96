"""Reading a model directory: one place where every missing or broken file becomes one clear error.

``kphi generate``, ``chat`` and ``export`` read model directories (``kphi train``'s output, an export, any
transformers causal LM directory). A directory can be broken in many ways — no ``config.json``, a truncated
or foreign ``model.safetensors``, weights of another shape, a damaged tokenizer or generation config — and
each surfaces as :class:`ModelDirError` (a :class:`kphi.errors.KphiError`) with a message naming the file, never
as a library traceback, and never as a model silently filled with random weights. A model source that names no
directory at all (:func:`kphi.sources.resolve_model_dir`) is a :class:`kphi.sources.SourceError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import KphiError, first_line, validator_cause
from . import auto, resolve_model_dir

__all__ = [
    "ModelDirError", "TOKENIZER_FILES", "has_tokenizer", "read_model_config", "load_config", "check_weights", "load_model", "load_tokenizer",
]

class ModelDirError(KphiError, ValueError):
    """A model directory is missing a file, or a file in it is broken or does not fit the others."""


#: Any of these beside ``config.json`` means the directory carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

#: JSON files a model directory may carry beside ``config.json``; each must parse when present.
JSON_FILES = ("generation_config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelDirError(f"{path} is unreadable ({err})") from None
    if not isinstance(value, dict):
        raise ModelDirError(f"{path} does not hold a JSON object")
    return value


def read_model_config(model_dir: str | Path) -> dict:
    """``config.json`` of ``model_dir`` as a dict; raises :class:`ModelDirError` with one message when it is not a model dir.

    ``model_dir`` may be any model source (:func:`kphi.sources.resolve_model_dir`: a ``.gguf`` file, a known
    model such as ``smollm2-135m``, a hub id); so may every function here take.
    """
    path = resolve_model_dir(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"{path} is not a directory (expected a model directory, e.g. the --out of kphi train)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{path} is not a model directory: it has no config.json")
    return _read_json_object(config_file)


def has_tokenizer(model_dir: str | Path) -> bool:
    path = resolve_model_dir(model_dir)
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_config(model_dir: str | Path):
    """``config.json`` as a transformers config (kphi3 included); a config that cannot build raises :class:`ModelDirError`."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path = resolve_model_dir(model_dir)
    model_type = read_model_config(path).get("model_type")
    if isinstance(model_type, str):
        auto.register_model_type(model_type)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as err:
        lines = [line.strip() for line in str(validator_cause(err)).strip().splitlines() if line.strip()]
        raise ModelDirError(f"{path / 'config.json'} does not describe a model: {lines[-1] if lines else type(err).__name__}") from None


def check_weights(model_dir: str | Path) -> list[Path]:
    """The safetensors files of ``model_dir``, each opened to check that it is whole; :class:`ModelDirError` otherwise.

    A file whose header cannot be read, or whose header promises more bytes than the file holds
    (truncated), is refused here, before transformers would raise a raw ``SafetensorError``. Pickled
    ``.bin`` weights are refused: kphi never unpickles files.
    """
    from safetensors import SafetensorError, safe_open

    path = resolve_model_dir(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards or not all(isinstance(name, str) and name == Path(name).name for name in shards):
            raise ModelDirError(f"{index} needs a weight_map from tensor names to shard files in {path}")
        files = [path / name for name in shards]
    else:
        files = [path / "model.safetensors"]
    for file in files:
        if not file.is_file():
            pickled = "; it has pytorch_model.bin, which kphi does not load (pickle)" if (path / "pytorch_model.bin").exists() else ""
            raise ModelDirError(f"{path} has no weights: {file.name} is missing{pickled}")
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise ModelDirError(f"{file} is not a complete safetensors file ({err})") from None
    return files


def load_model(model_dir: str | Path, *, dtype: Any = None, trust_remote_code: bool = False):
    """The causal LM in ``model_dir``, with every file checked; any problem raises :class:`ModelDirError` naming it.

    Weights that do not fit the config (wrong shapes, or tensors missing so that some would be initialised
    at random) are refused rather than loaded.
    """
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(model_dir)
    config = load_config(path)
    for name in JSON_FILES:
        if (path / name).is_file():
            _read_json_object(path / name)
    check_weights(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code, dtype=dtype or "auto",
            output_loading_info=True, ignore_mismatched_sizes=True,  # reported below, with the tensor's name
        )
    except (OSError, ValueError, TypeError, RuntimeError, KeyError, SafetensorError, StrictDataclassError) as err:
        lines = [line.strip() for line in str(validator_cause(err)).strip().splitlines() if line.strip()]
        raise ModelDirError(f"cannot load the model in {path}: {lines[0] if lines else type(err).__name__}") from None
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(info.get("missing_keys") or []) - tied)
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if missing:
        raise ModelDirError(f"the weights in {path} do not fit its config.json: {len(missing)} tensors missing (e.g. {missing[0]})")
    if mismatched:
        first = mismatched[0]
        detail = (
            f"{first[0]} is {tuple(first[1])} in the file, {tuple(first[2])} in the model"
            if isinstance(first, tuple) and len(first) == 3 else f"e.g. {first}"
        )
        raise ModelDirError(f"the weights in {path} do not fit its config.json: {len(mismatched)} tensors of the wrong shape ({detail})")
    return model.eval()


def pretrained_tokenizer(path: str | Path, error: type[Exception] = ModelDirError):
    """``AutoTokenizer.from_pretrained(path)``, or one ``error`` naming ``path`` and the cause. Every exception is
    caught: the Rust ``tokenizers`` library raises a bare ``Exception`` for a malformed ``tokenizer.json``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - see the docstring
        detail = f"missing key {err}" if isinstance(err, KeyError) else first_line(err)
        raise error(f"cannot load the tokenizer in {path}: {detail}") from None


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved in ``model_dir``; :class:`ModelDirError` when there is none or it is damaged."""
    path = resolve_model_dir(model_dir)
    load_config(path)
    if not has_tokenizer(path):
        raise ModelDirError(
            f"{path} has no tokenizer (no tokenizer.json or tokenizer_config.json); "
            "save one beside the weights (tokenizer.save_pretrained) to use it"
        )
    for name in JSON_FILES[1:]:
        if (path / name).is_file():
            _read_json_object(path / name)
    return pretrained_tokenizer(path)
