"""The layers of docs/ARCHITECTURE.md, checked on the code: every module of the package belongs to one layer, and
imports only from its own layer or the ones below it; what a standalone export ships (``modeling/``) imports
nothing of kphi's outside itself and no third-party package but torch and transformers (with its hub client).

Imports are read from the source (``ast``), those inside functions included, so a lazy import cannot hide a
dependency that goes the wrong way."""

import ast
import sys
from pathlib import Path

import pytest

import kphi

pytestmark = pytest.mark.fast

PACKAGE = Path(kphi.__file__).parent

#: docs/ARCHITECTURE.md's table, bottom to top: layer -> the modules and folders in it (relative to ``kphi``).
LAYERS = {
    0: ["_version", "errors", "files", "settings"],
    1: ["modeling"],
    2: ["sources", "presets", "params"],
    3: ["data"],
    4: ["train", "training", "generate", "export"],
    5: ["eval", "convert"],
    6: ["experiments", "tools"],
    7: ["cli", "__main__"],
}
SHIPPED_THIRD_PARTY = {"torch", "transformers", "huggingface_hub"}


def module_names() -> dict[str, Path]:
    """``"kphi.modeling.block"`` -> its file, for every module under the package (``__init__`` as the package)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["kphi", *path.relative_to(PACKAGE).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """What ``module`` imports anywhere in its file: kphi's modules (``from .x import name`` resolved to the
    submodule ``x.name`` where that is a module) and the top-level names of every other package."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return found


def layer_of(module: str) -> int | None:
    """The layer whose entry is the longest prefix of ``module`` (``kphi.training.lora`` -> ``training`` -> 4)."""
    rest = module.split(".")[1:]
    for depth in range(len(rest), 0, -1):
        for layer, entries in LAYERS.items():
            if ".".join(rest[:depth]) in entries:
                return layer
    return None


def kphi_imports() -> list[tuple[str, str]]:
    known = module_names()
    return [(module, target) for module, path in known.items() for target in sorted(imports(module, path, known))
            if target == "kphi" or target.startswith("kphi.")]


def test_every_module_belongs_to_a_layer():
    assert [m for m in module_names() if m != "kphi" and layer_of(m) is None] == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, target in kphi_imports()
              if module != "kphi" and target != "kphi" and layer_of(target) > layer_of(module)]
    assert upward == []


def test_nothing_inside_the_package_imports_its_public_face():
    """``kphi/__init__`` re-exports the public names (and imports torch and transformers to register them);
    a module that imported it would depend on every layer those names come from."""
    assert [module for module, target in kphi_imports() if target == "kphi" and module != "kphi"] == []


def test_what_an_export_ships_depends_only_on_torch_and_transformers():
    known = module_names()
    for module, path in known.items():
        if layer_of(module) != 1:
            continue
        found = imports(module, path, known)
        outside = sorted(t for t in found if t.startswith("kphi") and layer_of(t) != 1)
        third_party = sorted({t.split(".")[0] for t in found if not t.startswith("kphi")}
                             - set(sys.stdlib_module_names) - {"__future__"} - SHIPPED_THIRD_PARTY)
        assert (outside, third_party) == ([], []), module


def test_the_layer_check_sees_a_lazy_upward_import(tmp_path):
    """The reader catches an import inside a function, resolved from a relative name: what the test above relies on."""
    source = tmp_path / "block.py"
    source.write_text("def f():\n    from ..experiments import compare\n    from . import kinds\n")
    known = {"kphi.experiments": Path(), "kphi.experiments.compare": Path(), "kphi.modeling.kinds": Path()}
    found = imports("kphi.modeling.block", source, known)
    assert found == {"kphi.experiments.compare", "kphi.modeling.kinds"}
    assert layer_of("kphi.experiments.compare") > layer_of("kphi.modeling.block")
