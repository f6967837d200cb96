"""The ``kphi`` command: one entry point whose subcommands call library functions.

Every user-facing failure (unknown preset, bad configuration, missing data, ...) is reported as one line
``kphi: error: ...`` with exit status 2; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def cmd_params(args: argparse.Namespace) -> int:
    from .params import parameter_report
    from .presets import list_presets, load_preset, resolve_config

    specs = args.presets or list_presets()
    reports = []
    for spec in specs:
        preset = resolve_config(spec)
        baseline = None
        if preset.baseline:
            base = load_preset(preset.baseline)
            baseline = (base.name, base.config)
        reports.append((preset, parameter_report(preset.config, baseline)))
    if args.json:
        objs = [{"name": p.name, "model": p.model, **r.to_dict()} for p, r in reports]
        print(json.dumps(objs[0] if len(objs) == 1 else objs, indent=2))
        return 0
    headers = ["preset", "model", "layers", "interm.", "total", "embedding", "non-emb.", "% dense same shape", "% baseline"]
    rows = [
        [
            p.name,
            p.model,
            str(r.layers),
            str(r.intermediate_size),
            f"{r.total:,}",
            f"{r.embedding:,}",
            f"{r.non_embedding:,}",
            f"{r.percent_of_dense_same_shape:.1f}%",
            f"{r.percent_of_baseline:.1f}% of {r.baseline}" if r.baseline else "-",
        ]
        for p, r in reports
    ]
    print(_format_table(headers, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="kphi", description="Train and compare parameter-efficient phi-3 models.")
    parser.add_argument("--version", action="version", version=f"kphi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("params", help="parameter counts of presets or model configs (no weights allocated)")
    p.add_argument("presets", nargs="*", metavar="PRESET_OR_CONFIG", help="preset name, preset YAML, config.json or model dir (default: all presets)")
    p.add_argument("--json", action="store_true", help="print JSON (one object for one preset)")
    p.set_defaults(func=cmd_params)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .presets import PresetError

    errors: list[type[BaseException]] = [PresetError, FileNotFoundError, NotADirectoryError, PermissionError]
    for module, name in (("kphi.data.sources", "DataError"), ("kphi.data.tokenizers", "TokenizerError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"kphi: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kphi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
