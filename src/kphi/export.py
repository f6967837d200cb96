"""``kphi export``: checkpoints that load without kphi (remote code), ONNX, and the Hugging Face hub.

Three ways out of a model directory (one written by ``kphi train`` or ``kphi convert``, or any
``save_pretrained`` folder of a kphi-3 or converted ``kphi_*`` model):

* **standalone** (:func:`export_model` with ``standalone=True``): weights (safetensors), ``config.json``,
  tokenizer, generation config *and the modeling code* beside them, with an ``auto_map`` in
  ``config.json``, so ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` works where
  transformers is installed and kphi is not. This is how the report's own checkpoints are published.
* **ONNX** (``onnx=True``): ``model.onnx`` mapping ``input_ids`` and ``attention_mask`` (``int64
  [batch, sequence]``) to ``logits`` (``float32 [batch, sequence, vocab]``), no KV cache, exported with
  ``torch.onnx.export`` (the dynamo exporter, falling back to the TorchScript one).
* **hub** (:func:`push_to_hub`): the standalone export uploaded with ``huggingface_hub``'s
  ``HfApi.create_repo`` and ``HfApi.upload_folder``.

The modeling code is not a second copy of the model, and no source is rewritten: kphi's classes live in
:mod:`kphi.modeling`, whose modules import only each other (relatively), transformers and torch.
transformers' custom-code mechanism does the rest: with the classes registered
for their Auto classes (``register_for_auto_class``), ``save_pretrained`` copies those modules (and their
relative imports) beside the weights and writes the ``auto_map`` into ``config.json``. The registration is
scoped to the export, so ordinary ``kphi train`` outputs carry no code.

An output directory holds one export, marked by ``kphi-export.json``. Export refuses to write into a
non-empty directory without that marker, and writes atomically: everything goes into a temporary
directory beside ``OUT`` that replaces ``OUT`` by renaming only once complete, so a failure leaves ``OUT``
as it was.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ._version import __version__
from .errors import KphiError, first_line
from .files import refuse_foreign_dir, staged_dir
from .sources import resolve_model_dir
from .sources.model_dir import has_tokenizer, load_model, load_tokenizer, read_model_config

__all__ = [
    "export_or_push",
    "AUTO_MAP",
    "CODE_FILES",
    "EXPORT_MARKER",
    "ExportError",
    "ExportResult",
    "OnnxResult",
    "code_files",
    "export_model",
    "export_onnx",
    "push_to_hub",
]

EXPORT_MARKER = "kphi-export.json"
ONNX_FILE = "model.onnx"
#: ``torch.onnx.export`` paths: ``dynamo`` (onnxscript), ``torchscript`` (legacy), ``auto`` (dynamo, then torchscript).
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")

#: The ``auto_map`` that an export's ``config.json`` carries (written by ``save_pretrained``).
AUTO_MAP = {
    "AutoConfig": "configuration_kphi3.KPhi3Config",
    "AutoModelForCausalLM": "modeling_kphi3.KPhi3ForCausalLM",
}
#: The code files a kphi-3 export carries: the two modules and their relative imports, all in kphi/modeling.
CODE_FILES = (
    "configuration_kphi3.py", "modeling_kphi3.py", "projections.py", "kinds.py", "block.py", "lowrank.py", "monarch.py",
)


class ExportError(KphiError, ValueError):
    """The model cannot be exported as asked (not a kphi-3 model, an occupied output directory, ...)."""


@dataclass
class OnnxResult:
    path: Path
    exporter: str
    """``"dynamo"`` or ``"torchscript"``: which ``torch.onnx.export`` path produced the file."""
    opset: int | None


@dataclass
class ExportResult:
    out: Path | None
    files: list[str] = field(default_factory=list)
    onnx: OnnxResult | None = None
    url: str | None = None
    """The hub repository URL after :func:`push_to_hub`."""


# --------------------------------------------------------------------------- loading


def _load_kphi_model(model_dir: str | os.PathLike, dtype=None):
    """The kphi model in ``model_dir`` (any model source), in eval mode: a kphi-3 model (``kphi3``) or a
    converted one (``kphi_llama``, ``kphi_gpt_neox``, ...: every model type kphi registers)."""
    path = resolve_model_dir(model_dir)
    model_type = read_model_config(path).get("model_type")
    if not isinstance(model_type, str) or not (model_type == "kphi3" or model_type.startswith("kphi_")):
        raise ExportError(
            f"{path} holds a {model_type!r} model; kphi export handles kphi's model types (kphi3, and the kphi_* "
            "models of kphi convert); a plain transformers model needs no export"
        )
    return load_model(path, dtype=dtype)


def code_files(model_dir: Path) -> list[str]:
    """The Python files a standalone directory needs: the modules its ``auto_map`` names and, recursively,
    the modules they import relatively."""

    auto_map = json.loads((model_dir / "config.json").read_text()).get("auto_map") or {}
    pending = sorted({reference.split("--")[-1].rsplit(".", 1)[0] for reference in auto_map.values()})
    needed: list[str] = []
    while pending:
        module = pending.pop()
        if f"{module}.py" in needed:
            continue
        needed.append(f"{module}.py")
        file = model_dir / f"{module}.py"
        if file.is_file():
            pending += [node.module for node in ast.walk(ast.parse(file.read_text()))
                        if isinstance(node, ast.ImportFrom) and node.level and node.module]
    return sorted(needed)


def _load_tokenizer(model_dir: Path):
    return load_tokenizer(model_dir) if has_tokenizer(model_dir) else None


# --------------------------------------------------------------------------- ONNX


def _logits_module(model):
    import torch

    class LogitsOnly(torch.nn.Module):
        """``(input_ids, attention_mask) -> logits``, no cache: the graph ONNX gets."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """The exporters' advisory warnings and log lines (missing torchvision ops, deprecations) stay out of the
    command's output; real failures still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model, path: str | os.PathLike, *, exporter: str = "auto", opset: int | None = None) -> OnnxResult:
    """Write ``model``'s logits for ``input_ids`` + ``attention_mask`` as ONNX at ``path`` (float32).

    ``exporter``: ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)``, with onnxscript),
    ``"torchscript"`` (the legacy tracer) or ``"auto"`` (dynamo, then torchscript if dynamo fails).
    Batch and sequence length are dynamic. Weights over 1 GiB go to an external-data file beside it.
    """
    import torch

    if exporter not in ONNX_EXPORTERS:
        raise ExportError(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    if exporter in ("auto", "dynamo") and importlib.util.find_spec("onnxscript") is None:
        if exporter == "dynamo":
            raise ExportError("the dynamo ONNX exporter needs onnxscript: pip install 'kphi[onnx]'")
        exporter = "torchscript"
    try:
        import onnx as onnx_lib
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'kphi[onnx]'") from None

    model = model.float().eval()
    wrapped = _logits_module(model)
    vocab = model.config.vocab_size
    example_ids = torch.arange(2 * 5, dtype=torch.long).reshape(2, 5) % max(vocab, 1)
    example_mask = torch.ones_like(example_ids)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = nbytes > (1 << 30)
    path = Path(path)
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"], "external_data": external}
    attempts = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    axes = {0: "batch", 1: "sequence"}
    failures = []
    for kind in attempts:
        try:
            with torch.no_grad(), _quiet_onnx_exporter():
                if kind == "dynamo":
                    torch.onnx.export(
                        wrapped, (example_ids, example_mask), str(path), dynamo=True, verbose=False,
                        dynamic_shapes={"input_ids": axes, "attention_mask": axes}, opset_version=opset, **names,
                    )
                else:
                    torch.onnx.export(
                        wrapped, (example_ids, example_mask), str(path), dynamo=False, opset_version=opset or 18,
                        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes}, **names,
                    )
        except Exception as err:  # noqa: BLE001 - each exporter fails in its own ways; try the next one
            failures.append(f"{kind}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            for leftover in (path, path.with_name(path.name + ".data")):
                leftover.unlink(missing_ok=True)
            continue
        proto = onnx_lib.load(str(path), load_external_data=False)
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        return OnnxResult(path=path, exporter=kind, opset=used_opset)
    raise ExportError("ONNX export failed: " + "; ".join(failures))


# --------------------------------------------------------------------------- the export


def _prepare_out(out: Path, source: Path) -> None:
    if out.resolve() == source.resolve():
        raise ExportError(f"the output directory must differ from the model directory ({source})")
    refuse_foreign_dir(out, (out / EXPORT_MARKER).is_file(), "kphi export", "choose another OUT")


_MODEL_CARD = """---
library_name: transformers
tags:
- kphi
- kphi-3
- phi-3
---

# {name}

A kphi-3 model ({params:,} parameters): phi-3 with grouped pointwise projections, exported by kphi {version}.
The modeling code is in this folder, so kphi does not need to be installed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)  # it reads config.json
messages = [{{"role": "user", "content": "Hello!"}}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**ids)[0], skip_special_tokens=True))
```
"""


@contextlib.contextmanager
def registered_for_auto_classes(model):
    """``register_for_auto_class`` for ``model``'s config and causal-LM classes, undone afterwards.

    While registered, ``save_pretrained`` copies the modules defining them (``configuration_kphi3.py`` /
    ``modeling_kphi3.py``, or ``*_structured.py`` for converted models, and the files they import
    relatively) into the folder and writes ``auto_map``; outside an export it must not.
    """
    config_class, model_class = type(model.config), type(model)
    previous = config_class._auto_class, model_class._auto_class
    config_class.register_for_auto_class("AutoConfig")
    model_class.register_for_auto_class("AutoModelForCausalLM")
    try:
        yield
    finally:
        config_class._auto_class, model_class._auto_class = previous


def _write_standalone(model, tokenizer, staging: Path, name: str) -> list[str]:
    with registered_for_auto_classes(model):
        model.save_pretrained(staging)
    missing = [f for f in code_files(staging) if not (staging / f).is_file()]
    if missing:  # pragma: no cover - guards the mechanism against a transformers change
        raise ExportError(f"save_pretrained did not copy the modeling code ({', '.join(missing)}); please report this")
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if not (staging / "README.md").exists():
        params = sum(p.numel() for p in model.parameters())
        (staging / "README.md").write_text(_MODEL_CARD.format(name=name, params=params, version=__version__))
    return sorted(p.name for p in staging.iterdir())


def export_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    standalone: bool = True,
    onnx: bool = False,
    onnx_exporter: str = "auto",
    name: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the kphi model in ``model_dir`` (kphi-3 or converted, any model source) to ``out`` (see the
    module docstring).

    ``standalone``: weights, config with ``auto_map``, tokenizer, generation config and the modeling code.
    ``onnx``: ``model.onnx`` (logits for ``input_ids`` + ``attention_mask``), plus config and tokenizer.
    ``name`` is the model's name in the model card (default: ``out``'s name). ``warn`` receives notes
    (default: printed on stderr). Raises :class:`ExportError` for bad input; ``out`` is then unchanged.
    """
    if not standalone and not onnx:
        raise ExportError("nothing to export: choose standalone and/or onnx")
    warn = warn or (lambda message: print(f"kphi: {message}", file=sys.stderr))

    source, out = resolve_model_dir(model_dir), Path(out)
    model = _load_kphi_model(source, dtype=None)
    tokenizer = _load_tokenizer(source)
    if tokenizer is None:
        warn(f"{source} has no tokenizer; the export has none either")
    _prepare_out(out, source)
    result = ExportResult(out=out)
    with staged_dir(out) as staging:
        if standalone:
            _write_standalone(model, tokenizer, staging, name or out.name)
        else:
            model.config.save_pretrained(staging)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        if onnx:
            result.onnx = export_onnx(model, staging / ONNX_FILE, exporter=onnx_exporter)  # after the weights: casts to float32
        formats = [f for f, on in (("standalone", standalone), ("onnx", onnx)) if on]

        marker = {
            "kphi_version": __version__,
            "source": str(source.resolve()),
            "formats": formats,
            "onnx": None if result.onnx is None else {"file": ONNX_FILE, "exporter": result.onnx.exporter, "opset": result.onnx.opset},
        }
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        result.files = sorted(p.name for p in staging.iterdir())
    if result.onnx is not None:
        result.onnx.path = out / ONNX_FILE
    return result


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    out: str | os.PathLike | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    onnx: bool = False,
    onnx_exporter: str = "auto",
    warn: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``model_dir`` standalone (into ``out``, else a temporary directory) and upload it to ``repo_id``.

    Creates the repository if needed (``HfApi.create_repo(..., exist_ok=True, private=private)``), then
    ``HfApi.upload_folder``. The token is ``token`` or huggingface_hub's own (``HF_TOKEN``, ``hf auth login``).
    Returns the export with ``url`` set to the repository URL.
    """
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise ExportError(f"invalid hub repository id {repo_id!r}; expected 'namespace/name'")
    with tempfile.TemporaryDirectory(prefix="kphi-push-") as scratch:
        target = Path(out) if out is not None else Path(scratch) / repo_id.rsplit("/", 1)[-1]
        result = export_model(model_dir, target, standalone=True, onnx=onnx, onnx_exporter=onnx_exporter, name=repo_id,
                              warn=warn)
        api = HfApi(token=token)
        try:
            # private=None leaves the visibility to the hub's default for the namespace
            repo = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(target),
                repo_type="model",
                commit_message=commit_message or "Upload kphi-3 model (kphi export --standalone)",
                ignore_patterns=[EXPORT_MARKER],
            )
        except (HfHubHTTPError, OSError, httpx2.HTTPError) as err:
            raise ExportError(f"upload to the hub repository {repo_id} failed: {first_line(err)}") from None
        result.url = str(repo)
        if out is None:
            result.out = None
    return result


def export_or_push(
    model_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    standalone: bool = False,
    onnx: bool = False,
    onnx_exporter: str = "auto",
    push_to_hub_repo: str | None = None,
    private: bool = False,
) -> tuple[ExportResult, list[str]]:
    """``kphi export``'s choices made once: a standalone export unless only ONNX is asked for (an upload is
    always standalone), into ``out`` and/or to the hub repository ``push_to_hub_repo``. Returns the result and
    the formats written."""
    if out is None and push_to_hub_repo is None:
        raise ExportError("give an output directory OUT, or --push-to-hub REPO_ID")
    if private and push_to_hub_repo is None:
        raise ExportError("--private only applies with --push-to-hub")
    standalone = standalone or not onnx or push_to_hub_repo is not None
    formats = [kind for kind, on in (("standalone", standalone), ("ONNX", onnx)) if on]
    if push_to_hub_repo is not None:
        return push_to_hub(model_dir, push_to_hub_repo, out=out, private=private, onnx=onnx, onnx_exporter=onnx_exporter), formats
    return export_model(model_dir, out, standalone=standalone, onnx=onnx, onnx_exporter=onnx_exporter), formats
