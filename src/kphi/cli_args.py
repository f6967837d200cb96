"""Command-line flags generated from a settings dataclass: one definition per setting.

Every field of a dataclass such as :class:`kphi.train.TrainSettings` becomes ``--field-name`` with the
field's type and its docstring as help. Written here rather than taken from ``HfArgumentParser``: kphi
layers settings (dataclass default <- preset <- command line), so a flag the user did not give must stay
absent, not take the dataclass default; every generated flag therefore defaults to "not given"
(``argparse.SUPPRESS``), and ``given_settings(args)`` returns exactly the flags that were typed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing

__all__ = ["add_settings_arguments", "field_docs"]

_TYPES = {int: int, float: float, str: str}


def field_docs(cls) -> dict[str, str]:
    """``field -> help``: the string literal under each field of ``cls``, or its entry in the class
    docstring's ``Attributes:`` section (``name: text``, continued on more-indented lines)."""
    docs = _attributes_section(inspect.getdoc(cls) or "")
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    for stmt, following in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[stmt.target.id] = " ".join(following.value.value.split()).replace("``", "")
    return docs


def _attributes_section(doc: str) -> dict[str, str]:
    docs: dict[str, str] = {}
    lines = doc.splitlines()
    if "Attributes:" not in (line.strip() for line in lines):
        return docs
    start = [line.strip() for line in lines].index("Attributes:") + 1
    name = None
    for line in lines[start:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break
        head, sep, rest = line.strip().partition(": ")
        if sep and head.isidentifier() and (name is None or indent <= base):
            name, base = head, indent
            docs[name] = rest
        elif name is not None:
            docs[name] += " " + line.strip()
    return {k: " ".join(v.split()).replace("``", "") for k, v in docs.items()}


def _scalar(annotation):
    """``int | None`` -> ``int``; bool, str, int and float as they are; anything else -> ``None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (bool, int, float, str) else None


def add_settings_arguments(parser: argparse.ArgumentParser, cls, *, skip=(), required=(), choices=None) -> None:
    """Add ``--name`` for every field of the dataclass ``cls`` with a bool, int, float or str type.

    Fields in ``skip`` (or of other types) get no flag. A bool field becomes ``--name`` / ``--no-name``.
    ``choices`` maps field names to their allowed values.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = _scalar(hints[f.name])
        if f.name in skip or kind is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f" (default: {default})" if default is not None and f.name not in required else ""
        parser.add_argument(
            flag, dest=f.name, type=_TYPES[kind], default=argparse.SUPPRESS, required=f.name in required,
            choices=(choices or {}).get(f.name), metavar=None if (choices or {}).get(f.name) else f.name.upper(),
            help=(help_text + shown).strip(),
        )
