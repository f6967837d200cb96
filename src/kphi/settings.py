"""Settings dataclasses: one definition per setting, from which both checks and command-line flags follow.

A field declares its type, its default, its docstring (help) and, through :func:`setting`, its bounds
and choices. :func:`invalid_setting` checks any such dataclass against those declarations, and
:func:`add_settings_arguments` turns its fields into ``--field-name`` flags.

The flags are generated here rather than by ``HfArgumentParser``: kphi layers settings (dataclass default
<- preset <- command line), so a flag the user did not give must stay absent rather than take the dataclass
default; every generated flag therefore defaults to "not given" (``argparse.SUPPRESS``), and
``vars(args)`` holds exactly the flags that were typed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import textwrap
import typing

__all__ = ["setting", "invalid_setting", "add_settings_arguments", "add_kind_arguments", "field_docs"]

def setting(default, *, minimum=None, above=None, maximum=None, choices=None):
    """A dataclass field with declared bounds (``minimum <= v``, ``above < v``, ``v <= maximum``) and/or
    allowed ``choices``; ``None`` (where the type allows it) always passes."""
    meta = {k: v for k, v in (("minimum", minimum), ("above", above), ("maximum", maximum), ("choices", choices)) if v is not None}
    return dataclasses.field(default=default, metadata=meta)


def _requirement(kind, meta) -> str:
    """What a field's declaration asks of a value, in words: 'a positive integer', 'in (0, 1]', ..."""
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    low, high = meta.get("minimum"), meta.get("maximum")
    if kind is int and low == 1 and high is None:
        return "a positive integer"
    if kind is float and meta.get("above") == 0 and high is None:
        return "positive"
    noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, "valid")
    if "above" in meta or low is not None:
        left = f"({meta['above']}" if "above" in meta else f"[{low}"
        if high is not None:
            return f"in {left}, {high}]"
        return f"{noun} {'>' if 'above' in meta else '>='} {meta.get('above', low)}"
    return noun if high is None else f"{noun} <= {high}"


def _valid(value, kind, meta) -> bool:
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        return False
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        return False
    if kind in (str, bool) and not isinstance(value, kind):
        return False
    if "choices" in meta and value not in meta["choices"]:
        return False
    if "minimum" in meta and not value >= meta["minimum"]:
        return False
    if "above" in meta and not value > meta["above"]:
        return False
    return not ("maximum" in meta and not value <= meta["maximum"])


def invalid_setting(obj) -> str | None:
    """``"NAME must be ..., got VALUE"`` for the first field of the dataclass ``obj`` whose value breaks its
    type (bool, int, float, str; ``X | None`` also admits ``None``) or its :func:`setting` bounds; ``None``
    when every field is valid. The settings class raises its own error with it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        kind, value = _scalar(hints[f.name]), getattr(obj, f.name)
        if kind is None or (value is None and _optional(hints[f.name])):
            continue
        if not _valid(value, kind, f.metadata):
            return f"{f.name} must be {_requirement(kind, f.metadata)}, got {value!r}"
    return None


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def field_docs(cls) -> dict[str, str]:
    """``field -> help``: the string literal under each field of ``cls`` (and of the dataclasses it inherits
    from), or its entry in a class docstring's ``Attributes:`` section (``name: text``, continued on
    more-indented lines)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's word wins
        docs.update(_attributes_section(inspect.getdoc(klass) or ""))
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
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
    name, base = None, 0
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


def _json_object(text: str) -> dict:
    """A flag's JSON object value; anything else is a usage error naming what was given."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


def add_settings_arguments(parser: argparse.ArgumentParser, cls, *, skip=(), required=()) -> None:
    """Add ``--name`` for every field of the dataclass ``cls`` with a bool, int, float or str type.

    Fields in ``skip`` (or of other types) get no flag. A bool field becomes ``--name`` / ``--no-name``, a
    ``dict`` field a flag taking a JSON object;
    a field declared with ``choices`` (:func:`setting`) offers them.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        kind = _scalar(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        if f.name not in skip and typing.get_origin(hints[f.name]) is dict:
            parser.add_argument(flag, dest=f.name, type=_json_object, default=argparse.SUPPRESS, metavar="JSON", help=help_text)
            continue
        if f.name in skip or kind is None:
            continue
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f" (default: {default})" if default is not None and f.name not in required else ""
        parser.add_argument(
            flag, dest=f.name, type=kind, default=argparse.SUPPRESS, required=f.name in required,
            choices=f.metadata.get("choices"), metavar=None if "choices" in f.metadata else f.name.upper(),
            help=(help_text + shown).strip(),
        )


def add_kind_arguments(parser: argparse.ArgumentParser, kinds: dict[str, type], *, default: str) -> list[str]:
    """``--kind`` (choices: the registry ``kinds``, name -> kind dataclass) and one ``--field-name`` flag per
    setting of any kind, from the kinds' own fields: type, choices, docstring (help) and defaults. A setting
    several kinds share (``fraction``) is one flag naming them all. Like every generated flag, a setting not
    given stays absent (the kind's default applies). Returns the settings' names (``dest``)."""
    parser.add_argument("--kind", default=default, choices=list(kinds), help=f"projection kind (default: {default})")
    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    docs: dict[str, str] = {}
    for name, cls in kinds.items():
        docs.update({k: v for k, v in field_docs(cls).items() if k not in docs})
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append((name, f))
    for setting_name, pairs in owners.items():
        f = pairs[0][1]
        kind = _scalar(typing.get_type_hints(kinds[pairs[0][0]])[setting_name])
        defaults = sorted({str(field.default) for _, field in pairs})
        shown = f" (default: {defaults[0]})" if len(defaults) == 1 else ""
        parser.add_argument(
            "--" + setting_name.replace("_", "-"), dest=setting_name, type=kind, default=argparse.SUPPRESS,
            choices=f.metadata.get("choices"), metavar=None if "choices" in f.metadata else setting_name.upper(),
            help=f"{', '.join(name for name, _ in pairs)}: {docs.get(setting_name, '').rstrip('.')}{shown}",
        )
    return list(owners)
