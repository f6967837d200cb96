"""kphi's version: read by ``pyproject.toml`` (``[tool.setuptools.dynamic]``) and stamped into what kphi writes
(converted and exported model directories). A module of its own so that any layer can import it without
importing the package's public names (and with them torch and transformers' modeling code)."""

__version__ = "0.1.0"
