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


def cmd_train(args: argparse.Namespace) -> int:
    from .train import resolve_settings, train

    overrides = {
        "out": args.out,
        "data": args.data,
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "context_length": args.context_length,
        "max_rows": args.max_rows,
        "max_steps": args.max_steps,
        "max_tokens": args.max_tokens,
        "max_minutes": args.max_minutes,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "eval_steps": args.eval_steps,
        "save_steps": args.save_steps,
        "logging_steps": args.logging_steps,
        "seed": args.seed,
        "precision": args.precision,
        "progress": False if args.quiet else None,
    }
    settings = resolve_settings(args.preset, **overrides)
    result = train(settings, resume=args.resume)
    m = result.metrics
    if m:
        print(
            f"trained {m['steps']} steps ({m['tokens']:,} tokens) in {m['wall_seconds']:.0f} s: "
            f"train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}; model in {result.out}"
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import format_table, load_suite, run_compare

    suite = load_suite(args.suite)
    out = args.out or f"runs/compare-{suite.name}"
    log = (lambda *a, **k: None) if args.quiet else print
    results = run_compare(
        suite, out, seeds=args.seeds, data=args.data, max_tokens=args.max_tokens, progress=not args.quiet, log=log
    )
    print(format_table(results))
    print(f"\nresults: {out}/results.json, {out}/results.md, plots: {out}/val_loss.png, {out}/params_vs_loss.png")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import PrepareSettings, prepare_dataset

    fields = {
        "source": args.source,
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "context_length": args.context_length,
        "validation_rows": args.validation_rows,
        "seed": args.seed,
        "packing": args.packing,
        "loss_on": args.loss_on,
        "max_rows": args.max_rows,
    }
    if args.columns:
        fields["columns"] = tuple(args.columns.split(","))
    settings = PrepareSettings(**{k: v for k, v in fields.items() if v is not None})
    path = prepare_dataset(settings, out_dir=args.out, progress=not args.quiet)
    if args.quiet:
        print(path)
    return 0


def cmd_tokenizer_phi3(args: argparse.Namespace) -> int:
    from .data.tokenizers import build_tokenizer, describe_tokenizer

    tokenizer = build_tokenizer("phi3-hub" if args.hub else "phi3")
    _save_tokenizer(tokenizer, args.out)
    info = describe_tokenizer(tokenizer)
    print(f"phi-3 tokenizer ({info['vocab_size']:,} tokens) saved in {args.out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data.recipe import format_sample
    from .data.sources import open_source
    from .data.tokenizers import train_bpe_tokenizer

    source = open_source(args.source)
    texts = []
    for i, (instruction, response) in enumerate(source):
        if args.max_rows is not None and i >= args.max_rows:
            break
        texts.append(format_sample(instruction, response))
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size, show_progress=not args.quiet)
    _save_tokenizer(tokenizer, args.out)
    print(f"BPE tokenizer ({len(tokenizer):,} tokens) trained on {len(texts):,} samples, saved in {args.out}")
    return 0


def cmd_tokenizer_info(args: argparse.Namespace) -> int:
    from .data.tokenizers import build_tokenizer, describe_tokenizer

    print(json.dumps(describe_tokenizer(build_tokenizer(args.spec)), indent=2))
    return 0


def _save_tokenizer(tokenizer, out: str) -> None:
    from pathlib import Path

    from .data.tokenizers import TokenizerError

    path = Path(out)
    if path.exists() and any(path.iterdir()) and not (path / "tokenizer_config.json").is_file():
        raise TokenizerError(f"{path} is not empty and holds no tokenizer; refusing to write into it")
    tokenizer.save_pretrained(path)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="kphi", description="Train and compare parameter-efficient phi-3 models.")
    parser.add_argument("--version", action="version", version=f"kphi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("params", help="parameter counts of presets or model configs (no weights allocated)")
    p.add_argument("presets", nargs="*", metavar="PRESET_OR_CONFIG", help="preset name, preset YAML, config.json or model dir (default: all presets)")
    p.add_argument("--json", action="store_true", help="print JSON (one object for one preset)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("data", help="prepare instruction corpora")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = data_sub.add_parser("prepare", help="format, filter, split, tokenize and pack a corpus")
    d.add_argument("--source", help="default (offline corpus) | lamini | chitchat | chatterbot | PATH (.parquet/.jsonl/.json/.csv or a folder)")
    d.add_argument("--columns", help="instruction and response column names, e.g. 'instruction,response'")
    d.add_argument("--tokenizer", help="bpe (default, trained on the training split) | phi3 | phi3-hub | PATH")
    d.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    d.add_argument("--context-length", type=int, help="tokens per packed row (default 256)")
    d.add_argument("--validation-rows", type=int, help="pairs held out for validation (default 5000)")
    d.add_argument("--seed", type=int, help="split seed (default 42)")
    d.add_argument("--packing", choices=["tokens", "reference"], help="tokens (default, no padding) | reference (the report's character packing)")
    d.add_argument("--loss-on", choices=["all", "assistant"], help="loss on every token (default) or on assistant tokens only")
    d.add_argument("--max-rows", type=int, help="read at most this many pairs")
    d.add_argument("--out", help="output directory (default: only the cache, whose path is printed)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("tokenizer", help="build, train and inspect tokenizers")
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tok_sub.add_parser("phi3", help="write the exact phi-3 tokenizer (offline, from the GGUF vocabulary)")
    t.add_argument("--out", required=True)
    t.add_argument("--hub", action="store_true", help="load microsoft/Phi-3-mini-4k-instruct from the hub instead")
    t.set_defaults(func=cmd_tokenizer_phi3)
    t = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer with the phi-3 special tokens")
    t.add_argument("--source", default="default")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--max-rows", type=int)
    t.add_argument("--out", required=True)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_tokenizer_train)
    t = tok_sub.add_parser("info", help="vocabulary size and special tokens of a tokenizer (bpe needs no data: use a PATH)")
    t.add_argument("spec", help="phi3 | phi3-hub | PATH")
    t.set_defaults(func=cmd_tokenizer_info)

    p = sub.add_parser("train", help="train one model; the output directory becomes a model directory")
    p.add_argument("--preset", required=True, help="preset name or YAML, config.json or model dir")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final model)")
    p.add_argument("--data", help="prepared data dir, or a source: default | lamini | PATH (default: the preset's, else 'default')")
    p.add_argument("--tokenizer", help="bpe | phi3 | phi3-hub | PATH, when preparing data")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    p.add_argument("--context-length", type=int)
    p.add_argument("--max-rows", type=int, help="read at most this many pairs from the source")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--max-tokens", type=int)
    budget.add_argument("--max-minutes", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--save-steps", type=int)
    p.add_argument("--logging-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train the arms of a suite and print the report's table")
    p.add_argument("--suite", default="cpu", help="cpu (default, ~10 min on 2 cores) | smoke | paper | a suite YAML")
    p.add_argument("--seeds", type=int, help="repeat every arm with this many seeds (mean and spread)")
    p.add_argument("--out", help="output directory (default runs/compare-SUITE)")
    p.add_argument("--data", help="override the suite's data source: default | lamini | PATH")
    p.add_argument("--max-tokens", type=int, help="override the training budget per arm")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .presets import PresetError

    errors: list[type[BaseException]] = [PresetError, FileNotFoundError, NotADirectoryError, PermissionError]
    for module, name in (
        ("kphi.data.sources", "DataError"),
        ("kphi.data.tokenizers", "TokenizerError"),
        ("kphi.train", "TrainError"),
        ("kphi.compare", "CompareError"),
    ):
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
