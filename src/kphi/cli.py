"""The ``kphi`` command: one entry point whose subcommands call library functions.

Every user-facing failure (unknown preset, bad configuration, missing data, ...) is reported as one line
``kphi: error: ...`` with exit status 2; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .settings import add_kind_arguments, add_settings_arguments

__all__ = ["main"]


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.evaluate import format_eval_table, run_eval

    _quiet_transformers()
    reports = run_eval(args.models, texts=args.text, data=args.data, tasks=args.tasks, context=args.context,
                       stride=args.stride, limit=args.limit, max_bytes=args.max_bytes,
                       progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print(format_eval_table(reports))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .params import format_params_table, report_for
    from .presets import list_presets

    reports = [report_for(spec) for spec in args.presets or list_presets()]
    if args.json:
        objs = [{"name": name, "model": model, **r.to_dict()} for name, model, r in reports]
        print(json.dumps(objs[0] if len(objs) == 1 else objs, indent=2))
    else:
        print(format_params_table(reports))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainSettings, resolve_settings, train

    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and k != "preset"}
    if args.quiet:
        overrides["progress"] = False
    preset = getattr(args, "preset", None)
    if preset is None and overrides.get("init_from") is None:
        preset = TrainSettings.preset  # the default --help shows, when no model is named
    settings = resolve_settings(preset, **overrides)
    result = train(settings, resume=args.resume)
    m = result.metrics
    if m:
        train_loss = "-" if m["train_loss"] is None else f"{m['train_loss']:.4f}"
        print(
            f"trained {m['steps']} steps ({m['tokens']:,} tokens) in {m['wall_seconds']:.0f} s: "
            f"train loss {train_loss}, val loss {m['val_loss']:.4f}; model in {result.out}"
        )
    return 0


def _whole_number(least: int):
    """An argparse type for counts: a whole number of at least ``least``, anything else refused by argparse (one
    error line naming the flag, status 2) before any work starts."""
    def parse(text: str) -> int:
        value = _as_whole_number(text)
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, got {text!r}")
        return value
    return parse


def _as_whole_number(text: str) -> int | None:
    """``text`` as a whole number written out (``3000000``) or, as ``--budgets`` takes it, with an exponent
    (``3e6``); ``None`` for anything else."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _number_between(low: float, high: float = float("inf")):
    """An argparse type for rates and shares: a number strictly between ``low`` and ``high`` (finite when ``high``
    is infinite), anything else refused by argparse before any work starts."""
    words = f"above {low:g}" if high == float("inf") else f"strictly between {low:g} and {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"must be a number {words}, got {text!r}")
        return value
    return parse


def _names(text: str) -> list[str]:
    """An argparse type for comma-separated names: an empty item (``"a,,b"``, ``""``) is a typo, refused rather
    than dropped (dropping ``""`` would turn "these" into "all")."""
    names = [name.strip() for name in text.split(",")]
    if "" in names:
        raise argparse.ArgumentTypeError(f"has an empty item in {text!r}; separate the names by single commas")
    return names


def _log(args: argparse.Namespace):
    """``print``, or nothing with ``--quiet``."""
    return (lambda *a, **k: None) if args.quiet else print


def _single_process(command: str) -> None:
    """Experiments run their arms one after another in one process; under torchrun/accelerate every rank
    would run every arm (and only rank 0 gets metrics). One clear line instead."""
    from .errors import KphiError

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise KphiError(f"kphi {command} runs in one process (this is one of {world}); launch it with python -m kphi "
                        f"{command} ..., or scale out a single run with torchrun/accelerate launch -m kphi train")


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.budgets import format_budget_table, run_budget_series

    _single_process("compare")
    from .experiments.compare import CompareError, format_table, run_compare
    from .experiments.suites import load_suite, parse_counts, parse_learning_rates

    suite = load_suite(args.suite)
    options = dict(
        seeds=args.seeds, data=args.data, max_tokens=args.max_tokens, progress=not args.quiet, log=_log(args),
        learning_rates=parse_learning_rates(args.learning_rates) if args.learning_rates is not None else None,
        only_arms=args.arms, wait=not args.no_wait,
    )
    out = args.out or f"runs/compare-{suite.name}"
    series = bool(args.budgets is not None or suite.budgets or suite.budgets_per_parameter)
    budgets = parse_counts(args.budgets, "--budgets") if args.budgets is not None else None
    if args.dry_run:
        from .experiments.budgets import plan_budget_series
        from .experiments.compare import Comparison, format_plan, training_at_budget
        from .files import refuse_foreign_dir

        refuse_foreign_dir(Path(out), True, "kphi comparison")  # the one refusal a dry run can see: a file
        if not series and args.max_tokens is not None:
            suite = dataclasses.replace(suite, training=training_at_budget(suite.training, args.max_tokens))
        plan = plan_budget_series(suite, out, budgets, args.seeds) if series else [Comparison(suite.name, suite, Path(out), args.seeds)]
        print(format_plan(plan, options["learning_rates"], options["only_arms"]))
        return 0
    if args.report:
        if not series:
            raise CompareError("--report summarises a budget series (suite 'budgets:', 'budgets_per_parameter:' or --budgets)")
        from .experiments.budgets import rebuild_series_outputs

        results = rebuild_series_outputs(suite, out, budgets)
        print(format_budget_table(results))
        for warning in results["warnings"]:
            print(f"warning: {warning}")
        print(f"\nresults: {out}/results.json, {out}/results.md, plot: {out}/budgets.png")
        return 0
    results = run_budget_series(suite, out, budgets=budgets, **options) if series else run_compare(suite, out, **options)
    if results is None:
        print(f"left to the processes training the rest of {out}: the last of them writes its results")
        return 0
    if series:
        print(format_budget_table(results))
        print(f"\nresults: {out}/results.json, {out}/results.md, plot: {out}/budgets.png")
        return 0
    print(format_table(results))
    plots = [p.name for p in sorted(Path(out).glob("*.png"))]
    print(f"\nresults: {out}/results.json, {out}/results.md, plots: {', '.join(plots)}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from .experiments.suites import parse_counts, parse_learning_rates
    from .experiments.scaling import format_dry_run, format_scaling_table, load_scaling_suite, run_scaling

    _single_process("scale")
    suite = load_scaling_suite(args.suite)
    if args.widths is not None:
        suite.widths = parse_counts(args.widths, "--widths")
    if args.dry_run:
        print(format_dry_run(suite))
        return 0
    rates = parse_learning_rates(args.learning_rates) if args.learning_rates is not None else None
    out = args.out or f"runs/scale-{suite.name}"
    results = run_scaling(
        suite, out, seeds=args.seeds, learning_rates=rates, data=args.data, progress=not args.quiet, log=_log(args)
    )
    print(format_scaling_table(results))
    print(f"\nresults: {out}/results.json, {out}/results.md, plot: {out}/scaling.png")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .experiments.suites import read_suite_yaml
    from .experiments.compress import format_compress_table, load_compress_suite, run_compress

    _single_process("compress")
    parsed = read_suite_yaml(args.suite)[1]
    if isinstance(parsed, dict) and parsed.get("kind") == "structure":  # a pretrained model, fitted, no training
        from .experiments.structure import format_structure_table, load_structure_suite, run_structure

        structure = load_structure_suite(args.suite)
        out = args.out or f"runs/{structure.name}"
        _quiet_transformers()
        print(format_structure_table(run_structure(structure, Path(out), progress=not args.quiet, log=_log(args))))
        plots = ", ".join(f"{out}/{p.name}" for p in sorted(Path(out).glob("*.png")))
        print(f"\nresults: {out}/results.json, {out}/results.md, plots: {plots}")
        return 0
    suite = load_compress_suite(args.suite)
    out = args.out or f"runs/{suite.name}"
    _quiet_transformers()
    results = run_compress(suite, Path(out), progress=not args.quiet, log=_log(args))
    print(format_compress_table(results))
    print(f"\nresults: {out}/results.json, {out}/results.md, plot: {out}/compress.png")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import PrepareSettings, prepare_dataset

    names = {f.name for f in dataclasses.fields(PrepareSettings)}
    settings = PrepareSettings(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    path = prepare_dataset(settings, out_dir=args.out, progress=not args.quiet)
    if args.quiet:
        print(path)
    return 0


def cmd_tokenizer_phi3(args: argparse.Namespace) -> int:
    from .data.tokenizers import build_tokenizer, describe_tokenizer, save_tokenizer

    tokenizer = build_tokenizer("phi3-hub" if args.hub else "phi3")
    save_tokenizer(tokenizer, args.out)
    print(f"phi-3 tokenizer ({describe_tokenizer(tokenizer)['vocab_size']:,} tokens) saved in {args.out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data.tokenizers import save_tokenizer, train_bpe_on_source

    tokenizer, samples = train_bpe_on_source(args.source, args.vocab_size, args.max_rows, show_progress=not args.quiet)
    save_tokenizer(tokenizer, args.out)
    print(f"BPE tokenizer ({len(tokenizer):,} tokens) trained on {samples:,} samples, saved in {args.out}")
    return 0


def cmd_tokenizer_info(args: argparse.Namespace) -> int:
    from .data.tokenizers import build_tokenizer, describe_tokenizer

    print(json.dumps(describe_tokenizer(build_tokenizer(args.spec)), indent=2))
    return 0


def _quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers in replies and exports."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _sampling_settings(args: argparse.Namespace):
    from .generate import SamplingSettings

    settings = SamplingSettings(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(SamplingSettings)})
    settings.validate()
    return settings


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_reply, load_for_generation, prompt_messages

    messages = prompt_messages(sys.stdin.read() if args.prompt == "-" else args.prompt, args.system, args.raw)
    settings = _sampling_settings(args)
    _quiet_transformers()
    model, tokenizer = load_for_generation(args.model_dir)
    generate_reply(model, tokenizer, messages, settings, stream=sys.stdout, raw=args.raw)
    print(flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generate import ChatSession, chat_loop, load_for_generation

    settings = _sampling_settings(args)
    _quiet_transformers()
    model, tokenizer = load_for_generation(args.model_dir)
    chat_loop(ChatSession(model, tokenizer, settings, system=args.system))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from .training.launch_configs import describe_launch_config, launch_config, launch_configs

    if args.name:
        print(launch_config(args.name))
        return 0
    for name, path in launch_configs().items():
        print(f"{name:<16} {describe_launch_config(path)}\n{'':<16} {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_or_push

    _quiet_transformers()
    result, formats = export_or_push(args.model_dir, args.out, standalone=args.standalone, onnx=args.onnx,
                                     onnx_exporter=args.onnx_exporter, push_to_hub_repo=args.push_to_hub, private=args.private)
    if result.out is not None:
        print(f"exported {' and '.join(formats)} to {result.out}: {', '.join(result.files)}")
    if result.onnx is not None:
        print(f"ONNX: {result.onnx.path.name} ({result.onnx.exporter} exporter, opset {result.onnx.opset})")
    if result.url is not None:
        print(f"uploaded to {result.url}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_to_dir

    from .modeling.projections import PROJECTION_KINDS

    settings = {f.name: getattr(args, f.name) for kind in PROJECTION_KINDS.values() for f in dataclasses.fields(kind)
                if hasattr(args, f.name)}  # the kind flags typed (add_kind_arguments); the kind refuses another's
    _quiet_transformers()
    result = convert_to_dir(
        args.src, args.out, kind=args.kind, targets=args.targets, overrides=args.override, fit=args.fit, calibration=args.calibration_data,
        calibration_tokens=args.calibration_tokens, heldout_bytes=args.heldout_bytes, progress=not args.quiet,
        keep=args.keep, allocate=args.allocate, candidates=args.candidates, sensitivity_bytes=args.sensitivity_bytes,
        reconstruct_steps=args.reconstruct_steps, reconstruct_lr=args.reconstruct_lr, **settings,
    )
    print(result.describe(args.src, args.out))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    progress = (lambda *a, **k: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    if args.generate:
        from .tools.bench_generate import format_generation_speed, time_generation

        _quiet_transformers()
        report = time_generation(args.generate, new_tokens=args.new_tokens, repeats=3 if args.quick else 5,
                                 device=args.device, progress=progress)
        print(json.dumps(report, indent=2) if args.json else format_generation_speed(report))
        return 0
    if args.formulations:
        from .tools.bench_formulations import format_formulations, run_formulations

        report = run_formulations(quick=args.quick, device=args.device, compile=not args.no_compile, progress=progress)
        print(json.dumps(report, indent=2) if args.json else format_formulations(report))
        return 0
    from .tools.bench import format_report, run_bench

    report = run_bench(quick=args.quick, dtype=args.dtype, device=args.device, progress=progress)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _params_command(sub, command: str | None) -> None:
    p = sub.add_parser("params", help="parameter counts of presets or model configs (no weights allocated)")
    p.add_argument("presets", nargs="*", metavar="PRESET_OR_CONFIG", help="preset name, preset YAML, config.json, or a model: directory, .gguf file, known model (smollm2-135m), hub id (default: all presets)")
    p.add_argument("--json", action="store_true", help="print JSON (one object for one preset)")
    p.set_defaults(func=cmd_params)


def _eval_command(sub, command: str | None) -> None:
    p = sub.add_parser("eval", help="bits per byte and perplexity on held-out text, lm-evaluation-harness tasks")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model directory, .gguf file, known model (smollm2-135m) or hub id; several give one table")
    p.add_argument("--text", action="append", metavar="FILE",
                   help="a .txt file (one document) or .jsonl file (a 'text' per line); repeatable "
                        "(default: kphi's held-out English text)")
    p.add_argument("--data", metavar="PREPARED", help="also score a prepared corpus's validation split (the model's tokenizer)")
    p.add_argument("--tasks", type=_names, metavar="NAME,...", help="lm-evaluation-harness tasks, e.g. kphi_next_sentence (needs kphi[eval])")
    p.add_argument("--limit", type=_whole_number(1), metavar="N", help="at most N examples per lm_eval task")
    p.add_argument("--max-bytes", type=_whole_number(1), metavar="N", help="score only the first N bytes of each text (a quick look)")
    p.add_argument("--context", type=_whole_number(1), help="tokens per window (default: min(1024, the model's context))")
    p.add_argument("--stride", type=_whole_number(1), help="tokens between window starts (default: context // 2)")
    p.add_argument("--json", action="store_true", help="print every number as JSON on standard output")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def _data_command(sub, command: str | None) -> None:
    p = sub.add_parser("data", help="prepare a training corpus: instruction pairs or text (tokenize, split, pack)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = data_sub.add_parser("prepare", help="format, filter, split, tokenize and pack a corpus")
    from .data.prepare import PrepareSettings

    add_settings_arguments(d, PrepareSettings, skip=("columns", "filters"))
    d.add_argument("--columns", help="instruction and response column names, e.g. 'instruction,response'")
    d.add_argument("--out", help="output directory (default: only the cache, whose path is printed)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_data_prepare)


def _tokenizer_command(sub, command: str | None) -> None:
    p = sub.add_parser("tokenizer", help="build, train and inspect tokenizers")
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tok_sub.add_parser("phi3", help="write the exact phi-3 tokenizer (offline, from the GGUF vocabulary)")
    t.add_argument("--out", required=True)
    t.add_argument("--hub", action="store_true", help="load microsoft/Phi-3-mini-4k-instruct from the hub instead")
    t.set_defaults(func=cmd_tokenizer_phi3)
    t = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer with the phi-3 special tokens")
    t.add_argument("--source", default="default")
    from .data.recipe import DEFAULT_VOCAB_SIZE

    t.add_argument("--vocab-size", type=_whole_number(1), default=DEFAULT_VOCAB_SIZE)
    t.add_argument("--max-rows", type=_whole_number(1))
    t.add_argument("--out", required=True)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_tokenizer_train)
    t = tok_sub.add_parser("info", help="vocabulary size and special tokens of a tokenizer (bpe needs no data: use a PATH)")
    t.add_argument("spec", help="phi3 | phi3-hub | PATH")
    t.set_defaults(func=cmd_tokenizer_info)


def _train_command(sub, command: str | None) -> None:
    p = sub.add_parser(
        "train",
        help="train one model; the output directory becomes a model directory",
        description="Every setting of kphi.train.TrainSettings is a flag; a flag not given takes the preset's "
        "value (its training: section), else the default shown. Give at most one budget: --max-steps, "
        "--max-tokens or --max-minutes (it replaces the preset's).",
    )
    from .training.train_settings import TrainSettings

    add_settings_arguments(p, TrainSettings, skip=("progress",), required=("out",))
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_train)


def _bench_command(sub, command: str | None) -> None:
    p = sub.add_parser("bench", help="time the grouped block against dense layers (phi-3 shapes) and end to end")
    p.add_argument("--json", action="store_true", help="print one JSON object (with a 'shapes' list)")
    p.add_argument("--quick", action="store_true", help="512 tokens and 3 repeats instead of 2048 and 5")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--formulations", action="store_true",
                   help="time every formulation of the block (per-group GEMMs, two bmm, concatenated bmm, grouped "
                        "conv1d; eager and torch.compile'd; float32 and bf16 autocast) instead")
    p.add_argument("--no-compile", action="store_true", help="with --formulations: eager only")
    p.add_argument("--generate", nargs="+", metavar="MODEL",
                   help="instead: time greedy generation of these models (directories, .gguf, known models) in turns, "
                   "e.g. a source and its conversion; the first is the reference")
    p.add_argument("--new-tokens", type=_whole_number(1), default=64, metavar="N", help="with --generate: tokens generated (default 64)")
    p.set_defaults(func=cmd_bench)


def _compare_command(sub, command: str | None) -> None:
    p = sub.add_parser("compare", help="train the arms of a suite and print the report's table")
    p.add_argument("--suite", default="cpu", help="cpu (default, ~10 min on 2 cores) | smoke | paper | a suite YAML")
    p.add_argument("--seeds", type=_whole_number(1), help="repeat every arm with this many seeds (mean and spread)")
    p.add_argument("--out", help="output directory (default runs/compare-SUITE); several processes given the same "
                   "--out share its runs, each training the ones no other holds")
    p.add_argument("--data", help="override the suite's data source: default | lamini | PATH")
    p.add_argument("--max-tokens", type=_whole_number(1), help="override the training budget per arm")
    p.add_argument("--learning-rates", metavar="LR,LR,...",
                   help="train every arm at each of these peak rates and report each arm at its best (e.g. 1e-3,2e-3,4e-3)")
    p.add_argument("--budgets", metavar="TOKENS,TOKENS,...",
                   help="a budget series: every arm at each of these token budgets (e.g. 716800,3e6), one comparison each")
    p.add_argument("--arms", type=_names, metavar="LABEL,LABEL,...",
                   help="train and report only these arms of the suite (the others still size its controls)")
    look = p.add_mutually_exclusive_group()
    look.add_argument("--dry-run", action="store_true",
                      help="print every comparison, arm, budget, rate and seed the command would train, and how many of "
                      "those runs --out already holds; train nothing")
    look.add_argument("--report", action="store_true",
                      help="a budget series: rewrite its table, results and plots from the budgets --out has finished "
                      "so far (a series still running included); train nothing")
    p.add_argument("--no-wait", action="store_true",
                   help="with other processes sharing --out: train every run no other process holds, then exit instead "
                   "of waiting for theirs (the process that trains the last run writes the results)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)


def _scale_command(sub, command: str | None) -> None:
    p = sub.add_parser("scale", help="scaling curves: model families at several widths, tuned, fitted, compared")
    p.add_argument("--suite", default="scaling-cpu", help="a scaling suite: scaling-cpu (default) | scaling-smoke | a YAML file")
    p.add_argument("--seeds", type=_whole_number(1), help="seeds per point (the first tunes the rate, the others run at the best)")
    p.add_argument("--widths", metavar="W,W,...", help="override the suite's widths")
    p.add_argument("--data", help="override the suite's data source: default | lamini | PATH")
    p.add_argument("--learning-rates", metavar="LR,LR,...", help="override the suite's learning-rate grid")
    p.add_argument("--out", help="output directory (default runs/scale-SUITE)")
    p.add_argument("--dry-run", action="store_true", help="print every width's models, sizes and budgets; train nothing")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_scale)


def _compress_command(sub, command: str | None) -> None:
    p = sub.add_parser("compress", help="compress a trained dense model into structured projections, heal it, compare")
    p.add_argument("--suite", default="compress-cpu", help="a compress suite: compress-cpu (default) | compress-smoke | a YAML file")
    p.add_argument("--out", help="output directory (default runs/SUITE); finished runs in it are reused")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)


def _generate_command(sub, command: str | None) -> None:
    p = sub.add_parser(
        "generate",
        help="one reply from a model directory, streamed to the terminal",
        description="Wrap the prompt in the chat template (<|user|>PROMPT<|end|><|assistant|>) and print the "
        "model's reply as it is generated, up to <|end|> or end of text. Sampling defaults come from the model "
        "directory's generation_config.json (for kphi runs the report's: top_p 0.5, repetition penalty 1.2). A prompt that does not fit in the model's context "
        "(max_position_embeddings) with room for the reply is truncated from the left, with a warning on stderr.",
    )
    p.add_argument("model_dir", metavar="MODEL", help="a model: directory (kphi train's --out, an export), .gguf file, known model (smollm2-135m) or hub id")
    p.add_argument("--prompt", required=True, help="the user message ('-' reads it from standard input); "
                   "too long for the context: truncated from the left with a warning on stderr")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--system", help="a system message before the prompt")
    _add_sampling_arguments(p)
    p.set_defaults(func=cmd_generate)


def _chat_command(sub, command: str | None) -> None:
    p = sub.add_parser(
        "chat",
        help="an interactive multi-turn chat with a model directory",
        description="Talk to a model: each line you type is a user message, the history is rendered through the "
        "chat template. /reset clears the conversation, /exit or Ctrl-D ends it. When standard input is not a "
        "terminal (a script), standard output carries only the replies, one per message. When the "
        "conversation outgrows the context, the oldest turns are dropped (noted on stderr).",
    )
    p.add_argument("model_dir", metavar="MODEL", help="a model: directory (kphi train's --out, an export), .gguf file, known model (smollm2-135m) or hub id")
    p.add_argument("--system", help="a system message that starts (and stays in) the conversation")
    _add_sampling_arguments(p)
    p.set_defaults(func=cmd_chat)


def _configs_command(sub, command: str | None) -> None:
    p = sub.add_parser(
        "configs",
        help="the accelerate/DeepSpeed launch files kphi ships (ddp-gpus, fsdp, deepspeed)",
        description="Without NAME: every shipped launch file, what it is for and its path. With NAME: its path "
        "only, for accelerate launch --config_file \"$(kphi configs fsdp)\" -m kphi train ...",
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="ddp-gpus, fsdp, deepspeed or deepspeed-zero2")
    p.set_defaults(func=cmd_configs)


def _export_command(sub, command: str | None) -> None:
    p = sub.add_parser(
        "export",
        help="write a model that loads without kphi (and/or ONNX), or upload it to the hub",
        description="--standalone (the default): weights, config with auto_map, tokenizer, generation config and "
        "the modeling code, loadable with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) "
        "without kphi. --onnx: model.onnx, logits for input_ids + attention_mask. OUT must be empty, new or a "
        "previous export; it is replaced atomically.",
    )
    p.add_argument("model_dir", metavar="MODEL", help="a kphi model (kphi-3, or a kphi convert output of any architecture): directory, known model or hub id")
    p.add_argument("out", metavar="OUT", nargs="?", help="output directory (optional with --push-to-hub)")
    p.add_argument("--standalone", action="store_true", help="weights + modeling code + auto_map (default unless --onnx alone)")
    p.add_argument("--onnx", action="store_true", help="also (or only) write model.onnx; needs pip install 'kphi[onnx]'")
    if command in (None, "export"):
        from .export import ONNX_EXPORTERS

        p.add_argument("--onnx-exporter", choices=ONNX_EXPORTERS, default="auto",
                       help="torch.onnx.export path: dynamo (onnxscript), torchscript (legacy), auto: dynamo then torchscript")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the standalone export to this hub model repository "
                   "(token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the hub repository as private")
    p.set_defaults(func=cmd_export)


def _convert_command(sub, command: str | None) -> None:
    p = sub.add_parser(
        "convert",
        help="give a Llama, Mistral, Qwen2, Phi-3, GPT-2 or kphi-3 model structured projections",
        description="Replace the dense projections of a causal LM directory by a projection kind (grouped: the "
        "report's block; low_rank; monarch), fitted to the trained weights. OUT loads with "
        "AutoModelForCausalLM after `import kphi`, or with trust_remote_code=True without kphi; it trains with "
        "kphi train --init-from OUT. Per-projection fit errors go to OUT/kphi-convert.json.",
    )
    p.add_argument("src", metavar="SRC", help="the dense model: directory (config.json, and model.safetensors to fit), .gguf file, known model (smollm2-135m) or hub id")
    p.add_argument("--out", required=True, help="output model directory (new, empty or a previous conversion)")
    p.add_argument("--targets", type=_names, metavar="NAME,NAME,...",
                   help="modules to replace, as PEFT's target_modules: a name suffix (down_proj, layers.0.mlp.down_proj) "
                   "or a regular expression over the full name (default: the architecture's attention and MLP projections)")
    p.add_argument("--override", action="append", metavar="TARGETS=KIND[:FIELD=VALUE,...]",
                   help="another kind for some of the targets, first match wins (repeatable): v_proj=dense keeps "
                   "v_proj dense; '.*layers\\.0\\..*=low_rank:fraction=0.9' gives layer 0 its own ratio")
    p.add_argument("--calibration-data", metavar="DIR", help="a prepared data directory (kphi data prepare) tokenised "
                   "with SRC's tokenizer; needed by --fit activations, and reports calibration errors for any fit")
    p.add_argument("--heldout-bytes", type=_whole_number(0), default=8192, metavar="N",
                   help="report bits per byte before and after on N bytes of held-out text (default 8192; 0: skip)")
    p.add_argument("--keep", type=_number_between(0, 1), metavar="F", help="choose each projection's kind and size from --candidates so "
                   "that OUT keeps at most this fraction of SRC's non-embedding parameters (instead of --kind)")
    p.add_argument("--allocate", default="sensitivity", choices=("sensitivity", "uniform"),
                   help="with --keep: sensitivity (default) spends the parameters where structuring costs most bits "
                   "per byte on held-out text; uniform gives every projection the same candidate")
    p.add_argument("--candidates", default="low-rank", metavar="NAME|FILE",
                   help="with --keep: what a projection may become besides dense: low-rank (default), grouped, or a YAML list")
    p.add_argument("--sensitivity-bytes", type=_whole_number(1), default=4096, metavar="N",
                   help="with --keep: the last N bytes of the held-out text score each candidate (default 4096; the "
                   "scores after conversion read its first bytes; cached)")
    p.add_argument("--reconstruct-steps", type=_whole_number(0), default=0, metavar="N",
                   help="after the fit, train each decoder layer N steps to reproduce the source's outputs on "
                   "--calibration-data (default 0: off)")
    p.add_argument("--reconstruct-lr", type=_number_between(0), default=1e-3, metavar="LR", help="Adam learning rate of the reconstruction (default 1e-3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if command in (None, "convert"):  # flags whose choices and defaults are the model code's (imports torch)
        from .convert import CALIBRATION_TOKENS, FITS
        from .modeling.projections import PROJECTION_KINDS

        add_kind_arguments(p, PROJECTION_KINDS, default="grouped")
        p.add_argument("--fit", default="auto", choices=FITS,
                       help="frobenius: closest in weights (default with weights); activations: closest on calibration "
                       "inputs; none: fresh initialisation")
        p.add_argument("--calibration-tokens", type=_whole_number(1), default=CALIBRATION_TOKENS,
                       help=f"calibration tokens read (default {CALIBRATION_TOKENS})")
    p.set_defaults(func=cmd_convert)


#: The command line as a table: each command's name -> the function that adds its parser (flags, help, handler).
#: The handlers (``cmd_*``) import the library modules they dispatch to when they run.
COMMANDS = {
    "params": _params_command,
    "eval": _eval_command,
    "data": _data_command,
    "tokenizer": _tokenizer_command,
    "train": _train_command,
    "bench": _bench_command,
    "compare": _compare_command,
    "scale": _scale_command,
    "compress": _compress_command,
    "generate": _generate_command,
    "chat": _chat_command,
    "configs": _configs_command,
    "export": _export_command,
    "convert": _convert_command,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line (``command=None``). Given the ``command`` being run (``""``: none, as in ``kphi
    --help``), the flags of other subcommands whose choices come from model code (``convert``'s kinds,
    ``export``'s ONNX exporters) are left out, so that ``kphi configs`` or ``kphi --help`` answer without
    importing torch."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="kphi", description="Train and compare parameter-efficient phi-3 models.")
    parser.add_argument("--version", action="version", version=f"kphi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS.values():
        add_command(sub, command)
    return parser


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    from .generate import SamplingSettings

    add_settings_arguments(p, SamplingSettings)  # not given: the model directory's generation_config.json


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the command line reports as one line and status 2: kphi's own input errors and missing files."""
    from .errors import KphiError

    return (KphiError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))  # "": no subcommand (kphi --help)
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
