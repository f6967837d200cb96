"""transformers' own common model tests, obtained at test time from the installed version's source distribution.

The sdist of ``transformers==<installed>`` holds ``tests/test_modeling_common.py`` (``ModelTesterMixin``) and
``tests/test_training_mixin.py`` (``TrainingTesterMixin``). They are downloaded once with pip into the kphi
cache (``transformers-tests/VERSION/``) and imported from there as the package ``hf_common_tests``; nothing of
them is kept in this repository.

Two modules they import are not in the sdist: ``generation/test_utils.py`` (``GenerationTesterMixin``, whose
generation tests kphi specifies in ``test_transformers_citizen.py`` and ``test_generate.py``) and
``exporters/test_export.py`` (``ExportTesterMixin``). Empty stand-ins of those two classes, written here, let
the module import; the tests they would add are not run.
"""

from __future__ import annotations

import importlib
import os
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import pytest

PACKAGE = "hf_common_tests"
FILES = ("test_modeling_common.py", "test_training_mixin.py")
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def _extract(sdist: Path, dest: Path) -> None:
    """Copy ``tests/<FILES>`` out of ``sdist``; archive names are matched, never used as paths."""
    found = {}
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.isreg() and len(parts) == 3 and parts[1] == "tests" and parts[2] in FILES:
                found[parts[2]] = tar.extractfile(member).read()
    missing = set(FILES) - set(found)
    if missing:
        raise RuntimeError(f"{sdist.name} has no tests/{', tests/'.join(sorted(missing))}")
    for name, data in found.items():
        (dest / name).write_bytes(data)


def common_tests_package() -> Path:
    """The directory holding ``hf_common_tests`` for the installed transformers; downloaded on first use."""
    import transformers

    from kphi.files import cache_root, pip_download, staged_dir

    root = cache_root() / "transformers-tests" / transformers.__version__
    package = root / PACKAGE
    if all((package / name).is_file() for name in FILES):
        return root
    with staged_dir(root) as staging, tempfile.TemporaryDirectory(prefix="kphi-sdist-") as tmp:
        target = staging / PACKAGE
        target.mkdir()
        sdist = pip_download(f"transformers=={transformers.__version__}", Path(tmp), RuntimeError)
        _extract(sdist, target)
        (target / "__init__.py").write_text("")
        for relative, text in STAND_INS.items():
            path = target / relative
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").write_text("")
            path.write_text(text)
    return root


def import_common_tests():
    """``(test_modeling_common, test_training_mixin)`` modules, or a skip (a failure under ``CI``) when the
    sdist cannot be obtained."""
    try:
        root = common_tests_package()
    except RuntimeError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"transformers' common tests are not available: {err}", allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_training_mixin"))
