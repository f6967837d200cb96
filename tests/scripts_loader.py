"""The repository's scripts (``scripts/NAME.py``, run by hand, not installed) imported as modules for tests."""

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """``scripts/NAME.py`` as a module (its ``if __name__ == "__main__"`` block not run)."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
