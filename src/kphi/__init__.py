"""kphi: language models that keep their quality with a fraction of the parameters.

``import kphi`` registers the ``kphi3`` model type with transformers' ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM`` (no ``trust_remote_code`` needed).
"""

import os
import sys

from . import _version

__version__ = _version.__version__

__all__ = [
    "GroupedLinear",
    "GroupedPointwiseBlock",
    "KPhi3Config",
    "KPhi3ForCausalLM",
    "KPhi3Model",
    "group_count",
    "interleave",
    "make_projection",
    "replace_projections",
]

_BLOCK, _AUTO = "modeling.block", "sources.auto"
_HOMES = {"GroupedLinear": _BLOCK, "GroupedPointwiseBlock": _BLOCK, "group_count": _BLOCK, "interleave": _BLOCK,
          "KPhi3Config": _AUTO, "KPhi3ForCausalLM": _AUTO, "KPhi3Model": _AUTO, "make_projection": _AUTO,
          "replace_projections": _AUTO}


def _running_the_kphi_command() -> bool:
    """``kphi ...`` or ``python -m kphi ...``: each subcommand imports (and registers) what it needs itself, so
    the package skips its eager imports of torch and transformers' modeling code (seconds): ``kphi --help``,
    ``kphi configs`` and one-line input errors answer at once."""
    argv = getattr(sys, "orig_argv", [])
    after_m = argv[argv.index("-m") + 1 :] if "-m" in argv else []
    return after_m[:1] == ["kphi"] or (bool(sys.argv) and os.path.basename(sys.argv[0]) == "kphi")


def __getattr__(name: str):
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'kphi' has no attribute {name!r}")


if not _running_the_kphi_command():
    from .modeling.block import GroupedLinear, GroupedPointwiseBlock, group_count, interleave  # noqa: E402
    from .sources.auto import KPhi3Config, KPhi3ForCausalLM, KPhi3Model, make_projection, replace_projections  # noqa: E402
